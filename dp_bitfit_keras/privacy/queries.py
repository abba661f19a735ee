"""Clip and noise: the one path every training method uses.

Per-example clipping is done here, vectorized over the batch (TF Privacy's `preprocess_record`
inside `vectorized_map` falls back to a slow while_loop). The sum is then handed to a TF Privacy
`GaussianSumQuery`, whose noise is drawn from a stateless generator keyed by a seed the optimizer
keeps, so runs are reproducible and resumable.
"""

from __future__ import annotations

import collections

import dp_accounting
import tensorflow as tf

from dp_bitfit_keras._compat import GaussianSumQuery

CLIPPING = ("abadi", "automatic")
# Stability constant of automatic clipping (Bu et al., "Automatic clipping", and DP-BiTFiT code).
AUTOMATIC_CLIPPING_GAMMA = 0.01


class SeededGaussianSumQuery(GaussianSumQuery):
    """TF Privacy's `GaussianSumQuery` with noise from `tf.random.stateless_normal`.

    The global state carries a `[2]` int seed; everything else (global state, sample state,
    DpEvent) is TF Privacy's.
    """

    _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", "seed"])

    def make_global_state(self, l2_norm_clip, stddev, seed=(0, 0)):
        return self._GlobalState(
            tf.cast(l2_norm_clip, tf.float32), tf.cast(stddev, tf.float32), tf.cast(seed, tf.int64)
        )

    def get_noised_result(self, sample_state, global_state):
        flat = tf.nest.flatten(sample_state)
        seeds = tf.random.experimental.stateless_split(global_state.seed, num=len(flat))
        noised = [
            v + tf.random.stateless_normal(tf.shape(v), seed=seeds[i], stddev=tf.cast(global_state.stddev, v.dtype), dtype=v.dtype)
            for i, v in enumerate(flat)
        ]
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return tf.nest.pack_sequence_as(sample_state, noised), global_state, event


def per_example_norms(per_example_grads):
    """Global L2 norm of each example's gradient over all variables: `[batch]`, in float32."""
    squares = [
        tf.reduce_sum(tf.reshape(tf.square(tf.cast(g, tf.float32)), [tf.shape(g)[0], -1]), axis=1)
        for g in per_example_grads
    ]
    return tf.sqrt(tf.add_n(squares))


def clip_factors(norms, l2_norm_clip, clipping="abadi"):
    """Per-example scale so that each clipped gradient has norm ≤ `l2_norm_clip`.

    `"abadi"`: min(1, C/‖g‖). `"automatic"`: C/(‖g‖ + 0.01), always rescaling (Bu et al.).
    """
    if clipping == "abadi":
        return tf.minimum(1.0, l2_norm_clip / tf.maximum(norms, 1e-12))
    if clipping == "automatic":
        return l2_norm_clip / (norms + AUTOMATIC_CLIPPING_GAMMA)
    raise ValueError(f"clipping must be one of {CLIPPING}; got {clipping!r}.")


def clipped_sum(per_example_grads, l2_norm_clip, clipping="abadi", mask=None):
    """Σ_i mask_i · clip(g_i), per variable, and the per-example norms before clipping."""
    norms = per_example_norms(per_example_grads)
    factors = clip_factors(norms, l2_norm_clip, clipping)
    if mask is not None:
        factors = factors * tf.cast(tf.reshape(mask, [-1]), factors.dtype)
    sums = [
        tf.cast(tf.tensordot(factors, tf.cast(g, tf.float32), axes=[[0], [0]]), g.dtype)
        for g in per_example_grads
    ]
    return sums, norms


def noised_sum(query: SeededGaussianSumQuery, global_state, summed):
    """Adds the query's noise to a clipped sum (the query's own sample-state path)."""
    sample_state = query.initial_sample_state(summed)
    sample_state = query.accumulate_preprocessed_record(sample_state, summed)
    result, _, _ = query.get_noised_result(sample_state, global_state)
    return result
