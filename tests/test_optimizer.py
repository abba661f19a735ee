import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import clipping


@pytest.mark.parametrize("style", ["abadi", "automatic"])
def test_clipped_norms_never_exceed_the_bound(style):
    norms = tf.constant([0.0, 1e-6, 0.05, 0.1, 0.5, 3.0, 1e4])
    clipped = norms * clipping.clip_factors(norms, 0.1, style)
    assert float(tf.reduce_max(clipped)) <= 0.1 * (1 + 1e-6)  # float32 round-off only.
    if style == "abadi":
        np.testing.assert_allclose(clipped.numpy()[:4], norms.numpy()[:4], rtol=1e-6)  # Short ones untouched.


def test_clipped_sum_bounds_each_example_over_all_variables():
    grads = [tf.random.normal((6, 3, 2)) * 10, tf.random.normal((6, 5))]
    mask = tf.constant([1, 1, 1, 1, 0, 1], tf.float32)
    sums, norms = clipping.clipped_sum(grads, 1.0, "abadi", mask)
    factors = tf.minimum(1.0, 1.0 / norms) * mask
    expected = [tf.einsum("b,b...->...", factors, g) for g in grads]
    for a, e in zip(sums, expected):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)
    per_example_clipped = tf.sqrt(sum(tf.reduce_sum(tf.square(tf.reshape(g, [6, -1])), 1) for g in grads)) * factors
    assert float(tf.reduce_max(per_example_clipped)) <= 1.0 + 1e-6


def test_noise_has_std_sigma_times_clip_over_batch():
    sigma, clip, batch = 1.3, 0.5, 8.0
    var = keras.Variable(np.zeros(2000, np.float32))
    opt = dpk.DPOptimizer(keras.optimizers.SGD(1.0), l2_norm_clip=clip, noise_multiplier=sigma, seed=11)
    opt.build([var])
    opt.begin_run(sampling_rate=0.01, expected_batch_size=batch, planned_steps=10)
    zero = [tf.zeros((4, 2000))]  # No signal: the update is the noise alone.
    step = tf.function(lambda: opt.apply_private_gradients(zero, [var]), jit_compile=True)
    deltas = []
    for _ in range(10):
        before = var.numpy().copy()
        step()
        deltas.append(before - var.numpy())
    deltas = np.stack(deltas)
    expected = sigma * clip / batch
    # 20,000 draws: the sample std is within ~1% of the truth; 3% leaves room, 10% error would fail.
    assert deltas.std() == pytest.approx(expected, rel=0.03)
    assert abs(deltas.mean()) < 4 * expected / np.sqrt(deltas.size)
    assert not np.allclose(deltas[0], deltas[1])  # Fresh noise every step.
    assert opt.dp_steps == 10


def test_same_seed_same_noise():
    results = []
    for _ in range(2):
        var = keras.Variable(np.zeros(10, np.float32))
        opt = dpk.DPOptimizer(keras.optimizers.SGD(1.0), 1.0, 1.0, seed=5)
        opt.build([var])
        opt.begin_run(0.1, 4.0, 1)
        opt.apply_private_gradients([tf.zeros((2, 10))], [var])
        results.append(var.numpy())
    np.testing.assert_array_equal(*results)


def test_step_budget_blocks_steps():
    var = keras.Variable(np.zeros(3, np.float32))
    opt = dpk.DPOptimizer(keras.optimizers.SGD(1.0), 1.0, 1.0, seed=1)
    opt.build([var])
    opt.begin_run(0.1, 1.0, 5)
    opt.set_step_budget(1)
    opt.apply_private_gradients([tf.ones((1, 3))], [var])
    after_one = var.numpy().copy()
    opt.apply_private_gradients([tf.ones((1, 3))], [var])
    np.testing.assert_array_equal(var.numpy(), after_one)
    assert opt.dp_steps == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip must be a finite number > 0"),
        (dict(l2_norm_clip=-1.0, noise_multiplier=1.0), "l2_norm_clip must be a finite number > 0"),
        (dict(l2_norm_clip=1.0, noise_multiplier=-0.5), "noise_multiplier must be >= 0"),
        (dict(l2_norm_clip=1.0), "exactly one of noise_multiplier"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, target_epsilon=1.0, target_delta=1e-5), "exactly one"),
        (dict(l2_norm_clip=1.0, target_epsilon=1.0), "needs target_delta"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, clipping="flat"), "clipping must be one of"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, accountant="gdp"), "accountant must be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpk.DPOptimizer(keras.optimizers.SGD(0.1), **kwargs)


def test_wraps_only_keras_optimizers():
    with pytest.raises(ValueError, match="keras.optimizers.Optimizer"):
        dpk.DPOptimizer("adam", 1.0, 1.0)


def test_averaged_gradients_are_refused():
    var = keras.Variable(np.zeros(3, np.float32))
    opt = dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="not private"):
        opt.apply_gradients([(tf.ones(3), var)])


def test_config_round_trip():
    opt = dpk.DPOptimizer(
        keras.optimizers.Adam(3e-3), 0.7, target_epsilon=3.0, target_delta=1e-6, clipping="automatic", accountant="pld"
    )
    clone = dpk.DPOptimizer.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()
    assert float(clone.learning_rate.numpy()) == pytest.approx(3e-3)


@pytest.mark.parametrize(
    "argument",
    [
        "clipnorm",
        "clipvalue",
        "global_clipnorm",
        "use_ema",
        "ema_momentum",
        "weight_decay",
        "loss_scale_factor",
        "ema_overwrite_frequency",
    ],
)
def test_arguments_the_wrapper_would_ignore_are_refused(argument):
    value = True if argument == "use_ema" else 0.5
    with pytest.raises(ValueError, match=f"does not support `{argument}`: set it on the inner optimizer"):
        dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0, **{argument: value})
    dpk.DPOptimizer(keras.optimizers.SGD(0.1, **{argument: value}), 1.0, 1.0)  # where it belongs
