"""The empirical privacy audit passes correct DP-BiTFiT and flags deliberately broken variants.

The broken variants are test-only fakes (subclasses overriding one piece of the engine); they
are not options of the library.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras import audit
from dp_bitfit_keras.privacy import clipping

SIGMA, CLIP, TRIALS = 2.0, 0.1, 600
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class NoClipping(dpk.DPOptimizer):
    """Clips at 1e9 on every gradient path (vectorized and book-keeping); the noise stays σC."""

    def per_example_clip_tensor(self):
        return tf.constant(1e9)


class NoNoise(dpk.DPOptimizer):
    def _noise_stddev(self, sigma, clip):
        return 0.0 * sigma * clip


class NoisePerMicroBatch(dpk.DPOptimizer):
    """Splits the batch into k micro-batches and noises each with σC/k: the sum then carries
    σC/√k, not σC (the scaling bug of adding noise per micro-batch)."""

    k = 64

    @property
    def needs_per_example_gradients(self):
        return True  # the bug lives in the per-example clip-and-sum: keep the vectorized path

    def _clip_and_sum(self, grads, clip, mask, groups):
        sums, norms = clipping.clipped_sum(grads, clip, "abadi", mask)
        noise = [
            tf.random.normal(s.shape, stddev=tf.cast(self._noise_multiplier.value, tf.float32) * clip / self.k)
            for s in sums
        ]
        for _ in range(self.k - 1):
            noise = [
                a + tf.random.normal(s.shape, stddev=tf.cast(self._noise_multiplier.value, tf.float32) * clip / self.k)
                for a, s in zip(noise, sums)
            ]
        return [s + tf.cast(e, s.dtype) for s, e in zip(sums, noise)], norms

    def _noise_stddev(self, sigma, clip):
        return 0.0 * sigma


class KernelLeak(dpk.DPOptimizer):
    """Trains the kernels too (selection "all") but noises only the biases: the kernels' clipped
    sums reach the weights without noise."""

    def _noise_and_step(self, summed, below, variables, replicas, expand=None):
        def leak(noised):
            return [s if len(v.shape) > 1 else n for s, n, v in zip(summed, noised, variables)]

        return super()._noise_and_step(summed, below, variables, replicas, expand=leak)


def _setup(optimizer_cls=dpk.DPOptimizer, trainable="bias"):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    rng = np.random.RandomState(0)
    x = rng.randn(9, 3).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    x[8], y[8] = [4.0, -4.0, 4.0], 1  # the canary: a loud, atypical example
    model = dpk.DPModel(base, trainable=trainable)
    # The default (secure) configuration: secret keys, fresh for every trial of the audit.
    model.compile(optimizer=optimizer_cls(keras.optimizers.SGD(1.0), CLIP, SIGMA), loss=LOSS)
    return model, x, y


def _audit(model, x, y):
    return audit.audit(model, x, y, canary_index=8, trials=TRIALS, delta=1e-5)


def test_clopper_pearson_and_bound_basics():
    lo, hi = audit.clopper_pearson(0, 100, 0.05)
    assert lo == 0.0 and hi == pytest.approx(0.0362, abs=1e-3)
    # Perfect separation over 300 + 300 trials bounds ε at about log(0.988 / 0.012).
    assert audit.epsilon_lower_bound(300, 0, 0, 300, 1e-5) == pytest.approx(4.39, abs=0.05)
    assert audit.epsilon_lower_bound(150, 150, 150, 150, 1e-5) == 0.0


@pytest.mark.slow
def test_correct_dp_bitfit_stays_below_the_claimed_epsilon():
    result = _audit(*_setup())
    assert result.claimed_epsilon > 1.0
    assert result.empirical_epsilon <= result.claimed_epsilon, result


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["no_clipping", "no_noise", "noise_per_micro_batch", "kernel_leak"])
def test_broken_training_is_caught(broken):
    setup = {
        "no_clipping": dict(optimizer_cls=NoClipping),
        "no_noise": dict(optimizer_cls=NoNoise),
        "noise_per_micro_batch": dict(optimizer_cls=NoisePerMicroBatch),
        "kernel_leak": dict(optimizer_cls=KernelLeak, trainable="all"),
    }[broken]
    result = _audit(*_setup(**setup))
    assert result.empirical_epsilon > 1.25 * result.claimed_epsilon, result
