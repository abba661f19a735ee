"""dpk.audit.canary_audit: an honest run reaches close to its claimed ε and passes its checks;
every planted bug is caught, by the bound or by the two-sided checks."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras.audit import canaries
from dp_bitfit_keras.privacy import sampling

CANARIES, Q, STEPS, EPS, DELTA = 10_000, 0.1, 100, 2.0, 1e-5


def test_honest_run_reaches_its_claim_and_passes_every_check():
    r = dpk.audit.canary_audit(CANARIES, Q, STEPS, EPS, DELTA)
    print(r)
    assert r.claimed_epsilon == pytest.approx(EPS, rel=0.01)
    assert r.passed, r.checks
    assert all(b <= r.claimed_epsilon for b in r.bounds.values())
    assert r.bounds["family"] >= 0.6 * r.claimed_epsilon  # goal 0.7; ideal canaries give 0.69-0.76
    assert r.noise_multiplier_interval[0] <= r.noise_multiplier <= r.noise_multiplier_interval[1]
    assert r.sampling_rate_interval[0] <= Q <= r.sampling_rate_interval[1]


class _Noise(canaries.Mechanism):
    def __init__(self, factor):
        self.factor = factor

    def optimizer(self, noise_multiplier, l2_norm_clip, accountant):
        return super().optimizer(self.factor * noise_multiplier, l2_norm_clip, accountant)


class _SamplingRate(canaries.Mechanism):
    """Samples at 1.2 q while everything downstream (normaliser, ledger) believes q."""

    def fit(self, model, ids, sampling_rate, steps, reader, examples_per_user=0):
        data = sampling.poisson_batches(
            (ids, np.zeros(ids.size, np.float32)), 1.2 * sampling_rate, steps_per_epoch=steps
        )
        data.dp_sampler = dataclasses.replace(data.dp_sampler, sampling_rate=sampling_rate)
        model.fit(data, epochs=1, callbacks=[reader], verbose=0)


class _ShuffledBatches(canaries.Mechanism):
    """Fixed-size shuffled batches, accounted as Poisson samples."""

    def fit(self, model, ids, sampling_rate, steps, reader, examples_per_user=0):
        batch = round(sampling_rate * ids.size)
        data = (
            tf.data.Dataset.from_tensor_slices((ids, np.zeros(ids.size, np.float32)))
            .shuffle(ids.size)
            .repeat()
            .batch(batch, drop_remainder=True)
        )
        with pytest.warns(UserWarning, match="Poisson"):
            model.fit(data, sampling_rate=sampling_rate, epochs=1, steps_per_epoch=steps, callbacks=[reader], verbose=0)


class _Optimizer(canaries.Mechanism):
    def __init__(self, cls):
        self.cls = cls

    def optimizer(self, noise_multiplier, l2_norm_clip, accountant):
        return self.cls(
            keras.optimizers.SGD(1.0), l2_norm_clip, noise_multiplier=noise_multiplier, accountant=accountant
        )


class _RealisedBatchSize(dpk.DPOptimizer):
    """Divides the noised sum by the realised batch size (Opacus #571), not the expected one.
    (The realised size is read off the canaries' clipped sum: −Σ/C.)"""

    def apply_clipped_sum(self, summed, below, trainable_variables, to_gradients=None):
        if not hasattr(self, "_realised"):
            self._realised = tf.Variable(1.0, trainable=False)
        self._realised.assign(tf.maximum(-tf.reduce_sum(summed[0]) / self.clip_tensor(), 1.0))
        return super().apply_clipped_sum(summed, below, trainable_variables, to_gradients)

    def transform_noised_sum(self, noised):
        scale = tf.cast(self.expected_batch_size_tensor(), tf.float32) / self._realised
        return [g * scale for g in noised]


class _ClipTheSum(dpk.DPOptimizer):
    """Clips the batch's sum to C instead of each example's gradient."""

    def apply_clipped_sum(self, summed, below, trainable_variables, to_gradients=None):
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in summed]))
        factor = tf.minimum(1.0, self.clip_tensor() / tf.maximum(norm, 1e-12))
        return super().apply_clipped_sum([g * factor for g in summed], below, trainable_variables, to_gradients)


# name: (mechanism, checks of which at least one must fail, canaries). Shuffled batches only
# narrow the spread of appearances by q(1 − q)/(q(1 − q) + σ²) ≈ 1.7% at σ = 2.25: the
# check resolves that from 10^5 canaries (at 10^4 it is within its interval).
FAKES = {
    "too little noise (0.8 sigma)": (_Noise(0.8), ("below_claim", "noise_multiplier"), CANARIES),
    "too much noise (1.25 sigma)": (_Noise(1.25), ("noise_multiplier",), CANARIES),
    "sampling rate off by 20%": (_SamplingRate(), ("sampling_rate",), CANARIES),
    "shuffled fixed batches accounted as Poisson": (_ShuffledBatches(), ("poisson_spread",), 100_000),
    "normalised by the realised batch size": (
        _Optimizer(_RealisedBatchSize),
        ("noise_multiplier_every_step",),
        CANARIES,
    ),
    "the sum clipped, not each example": (_Optimizer(_ClipTheSum), ("sampling_rate",), CANARIES),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAKES))
def test_every_planted_bug_is_caught(name):
    mechanism, expected_failures, m = FAKES[name]
    r = canaries.canary_audit(m, Q, STEPS, EPS, DELTA, _mechanism=mechanism)
    print(name, r.checks, r.bounds)
    assert not r.passed
    failed = {k for k, ok in r.checks.items() if not ok}
    assert failed & set(expected_failures), failed
