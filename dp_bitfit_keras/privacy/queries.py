"""Noise: the one path every training method uses, after `clipping.clipped_sum`.

The clipped sum is handed to a TF Privacy
`GaussianSumQuery`, whose noise is drawn by `prng.normal` (ChaCha20, sum of 4 Gaussians) from a
secret key the optimizer keeps and the step number, so a resumed run continues the same stream
and no (key, step, variable) stream is used twice.
"""

from __future__ import annotations

import collections

import dp_accounting
import tensorflow as tf

from dp_bitfit_keras._compat import GaussianSumQuery, QuantileAdaptiveClipSumQuery
from dp_bitfit_keras.privacy import prng


class SeededGaussianSumQuery(GaussianSumQuery):
    """TF Privacy's `GaussianSumQuery` with keyed noise from `prng.normal`.

    The global state carries the secret key (`[8]` int64 words), the step and the stream (all
    tensors of the sum draw from that one stream, consecutively); everything else (global state, sample state,
    DpEvent) is TF Privacy's.
    """

    _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", "key", "step", "stream"])

    def __init__(self, l2_norm_clip, stddev, generator="chacha20"):
        super().__init__(l2_norm_clip, stddev)
        self.generator = generator

    def make_global_state(self, l2_norm_clip, stddev, key=(0,) * prng.KEY_WORDS, step=0, stream=prng.NOISE):
        return self._GlobalState(
            tf.cast(l2_norm_clip, tf.float32),
            tf.cast(stddev, tf.float32),
            tf.cast(key, tf.int64),
            tf.cast(step, tf.int64),
            int(stream),
        )

    def get_noised_result(self, sample_state, global_state):
        flat = tf.nest.flatten(sample_state)
        noise = prng.normal_list(
            global_state.key,
            [v.shape for v in flat],
            global_state.step,
            global_state.stream,
            stddev=global_state.stddev,
            dtypes=[v.dtype for v in flat],
            generator=self.generator,
        )
        noised = [v + z for v, z in zip(flat, noise)]
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return tf.nest.pack_sequence_as(sample_state, noised), global_state, event


def noised_sum(query: SeededGaussianSumQuery, global_state, summed):
    """Adds the query's noise to a clipped sum (the query's own sample-state path)."""
    sample_state = query.initial_sample_state(summed)
    sample_state = query.accumulate_preprocessed_record(sample_state, summed)
    result, _, _ = query.get_noised_result(sample_state, global_state)
    return result


class SeededQuantileAdaptiveClipSumQuery(QuantileAdaptiveClipSumQuery):
    """TF Privacy's adaptive-clipping query (Andrew et al. 2021) with seeded noise.

    Its two Gaussian sub-queries (the clipped sum, and the count of unclipped examples that
    drives the clip's geometric update) are `SeededGaussianSumQuery`s; the update rule, the
    global/sample state structure and the composed DpEvent are TF Privacy's.

    `noise_multiplier` here is the *sum's* multiplier; the one Gaussian equivalent to both
    releases has (σ_sum⁻² + (2·σ_count)⁻²)^(-1/2) (see `sum_noise_multiplier_for`).
    """

    def __init__(
        self,
        initial_l2_norm_clip,
        sum_noise_multiplier,
        target_unclipped_quantile,
        learning_rate,
        clipped_count_stddev,
        expected_num_records,
        generator="chacha20",
    ):
        super().__init__(
            initial_l2_norm_clip,
            sum_noise_multiplier,
            target_unclipped_quantile,
            learning_rate,
            clipped_count_stddev,
            expected_num_records,
            geometric_update=True,
        )
        self._sum_query = SeededGaussianSumQuery(
            initial_l2_norm_clip, sum_noise_multiplier * initial_l2_norm_clip, generator
        )
        # The below-estimate count is NormalizedQuery(GaussianSumQuery(0.5, stddev)) in TF Privacy 0.9.
        below = self._quantile_estimator_query._below_estimate_query
        below._numerator = SeededGaussianSumQuery(0.5, clipped_count_stddev, generator)
        self.clipped_count_stddev = float(clipped_count_stddev)
        self.expected_num_records = float(expected_num_records)
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clip_learning_rate = float(learning_rate)

    def state_for(self, l2_norm_clip, sum_noise_multiplier, key, step):
        """The global state at clip C with noise keyed by `key` at `step` (the sum and the
        count draw from different streams)."""
        sum_state = self._sum_query.make_global_state(
            l2_norm_clip, sum_noise_multiplier * l2_norm_clip, key, step, prng.NOISE
        )
        estimator = self._quantile_estimator_query
        below = estimator._below_estimate_query
        below_state = below._GlobalState(
            below._numerator.make_global_state(0.5, self.clipped_count_stddev, key, step, prng.COUNT_NOISE),
            tf.constant(self.expected_num_records, tf.float32),
        )
        estimator_state = estimator._GlobalState(
            tf.cast(l2_norm_clip, tf.float32),
            tf.constant(self.target_unclipped_quantile, tf.float32),
            tf.constant(self.clip_learning_rate, tf.float32),
            below_state,
        )
        return self._GlobalState(tf.cast(sum_noise_multiplier, tf.float32), sum_state, estimator_state)


def sum_noise_multiplier_for(noise_multiplier, clipped_count_stddev):
    """σ_sum such that sum and count releases together cost what one Gaussian of `noise_multiplier` does."""
    rest = noise_multiplier**-2 - (2.0 * clipped_count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"Adaptive clipping's count noise (clipped_count_stddev={clipped_count_stddev}) alone costs "
            f"more than noise_multiplier={noise_multiplier} allows; need 2·clipped_count_stddev > "
            "noise_multiplier (Andrew et al. suggest clipped_count_stddev = expected batch size / 20)."
        )
    return rest**-0.5


def adaptive_noised_sum(query: SeededQuantileAdaptiveClipSumQuery, global_state, summed, below_minus_half):
    """Noises the clipped sum and the unclipped count, and updates the clip (TF Privacy's rule).

    `below_minus_half`: Σ_i (1[‖g_i‖ ≤ C] − ½) over the batch's real examples, the count
    query's preprocessed records summed (its own clip of ½ leaves them unchanged).
    Returns the noised sum, the new clip and the step's DpEvent.
    """
    sample_state = query._SampleState(summed, tf.cast(below_minus_half, tf.float32))
    noised, new_state, event = query.get_noised_result(sample_state, global_state)
    return noised, new_state.sum_state.l2_norm_clip, event
