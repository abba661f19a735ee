"""Clipping styles, adaptive clipping, gradient accumulation, two-phase training, mixed precision."""

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import clipping

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _base(seed=0, width=8):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(width, activation="tanh"), keras.layers.Dense(3)])


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 6).astype("float32") * 3
    return x, (x[:, 0] > 0).astype("int32")


def _dp(base, trainable="all", lr=1.0, sigma=0.0, expected=None, **kw):
    model = dpk.DPModel(base, trainable=trainable)
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(lr), 1.0, sigma, seed=0, **kw), loss=LOSS)
    model.optimizer.build(model.trainable_variables)
    if expected is not None:
        model.optimizer.begin_run(sampling_rate=0.1, expected_batch_size=expected, planned_steps=1000)
    return model


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


# --- Clipping styles ------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["layer_wise", "param_wise", "group_wise"])
def test_grouped_clipping_bounds_each_group_and_the_whole(style):
    base = _base()
    x, y = _data(16)
    model = _dp(base, clipping_style=style, groups=[r"dense/"] if style == "group_wise" else None)
    variables = list(model.selection.variables)
    grads = dpk.per_example_gradients(
        base, keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), x, y, variables
    )
    groups = model.optimizer._group_index(variables)
    expected_groups = {"layer_wise": 2, "param_wise": 4, "group_wise": 2}[style]
    assert max(groups) + 1 == expected_groups
    # Clip each example on its own (batch of one) and check each group's and the total norm.
    for i in range(16):
        one = [g[i : i + 1] for g in grads]
        clipped, _ = clipping.clipped_sum(one, 1.0, "abadi", groups=groups)
        by_group = clipping.group_norms([c[None] for c in clipped], groups, expected_groups)[0].numpy()
        assert np.all(by_group <= 1.0 / np.sqrt(expected_groups) + 1e-5)
        total = np.sqrt(sum(float(tf.reduce_sum(tf.square(c))) for c in clipped))
        assert total <= 1.0 + 1e-5
    # The inputs are scaled up so every group is clipped: then each group's norm is exactly C/√G.
    assert np.isclose(by_group.max(), 1.0 / np.sqrt(expected_groups), rtol=1e-4)


def test_layer_wise_step_equals_manual_computation():
    base = _base()
    x, y = _data(8)
    model = _dp(base, clipping_style="layer_wise", expected=8.0)
    variables = list(model.selection.variables)
    grads = dpk.per_example_gradients(
        base, keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), x, y, variables
    )
    before = _weights(model)
    model.train_on_batch(x, y)
    # Manual: layer = (kernel, bias) pairs; threshold 1/√2 each.
    expected = []
    for layer in range(2):
        k, b = grads[2 * layer].numpy(), grads[2 * layer + 1].numpy()
        norms = np.sqrt((k.reshape(8, -1) ** 2).sum(1) + (b**2).sum(1))
        f = np.minimum(1.0, (1 / np.sqrt(2)) / norms)
        expected += [(f[:, None, None] * k).sum(0), (f[:, None] * b).sum(0)]
    for w0, w1, g in zip(before, _weights(model), expected):
        np.testing.assert_allclose(w0 - w1, g / 8.0, atol=1e-5)


def test_group_wise_needs_groups():
    with pytest.raises(ValueError, match="groups"):
        dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0, clipping_style="group_wise")
    with pytest.raises(ValueError, match="clipping_style"):
        dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0, clipping_style="per_layer")


# --- Adaptive clipping ----------------------------------------------------------------------


def test_adaptive_clip_tracks_the_median_norm_and_is_accounted():
    base = _base()
    x, y = _data(256)
    # lr 0: the model (hence the norm distribution) is fixed while C adapts from far above.
    model = _dp(base, lr=0.0, sigma=1.0, expected=64.0, target_unclipped_quantile=0.5, clip_learning_rate=0.2)
    model.optimizer.l2_norm_clip = 50.0
    model.optimizer._current_l2_norm_clip.assign(50.0)
    grads = dpk.per_example_gradients(
        base, keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), x, y
    )
    median = float(np.median(clipping.per_example_norms(grads).numpy()))
    for i in range(80):
        model.train_on_batch(x[(i % 4) * 64 : (i % 4 + 1) * 64], y[(i % 4) * 64 : (i % 4 + 1) * 64])
    clip = model.optimizer.current_l2_norm_clip
    assert abs(np.log(clip / median)) < 0.35, (clip, median)
    # ε: TF Privacy's composed event (sum + count Gaussians), Poisson-subsampled, 80 steps.
    opt = model.optimizer
    stddev = 64.0 / 20
    sum_sigma = (1.0**-2 - (2 * stddev) ** -2) ** -0.5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            0.1,
            dp_accounting.ComposedDpEvent(
                [dp_accounting.GaussianDpEvent(sum_sigma), dp_accounting.GaussianDpEvent(2 * stddev)]
            ),
        ),
        80,
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    assert opt.privacy_spent(1e-5)[0] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    # Paying for the count inside σ: the whole costs what one Gaussian of σ = 1 costs.
    assert opt.privacy_spent(1e-5)[0] == pytest.approx(dpk.compute_epsilon(1.0, 0.1, 80, 1e-5), rel=1e-6)


def test_adaptive_clipping_rejects_count_noise_that_costs_too_much():
    model = _dp(_base(), sigma=1.0, target_unclipped_quantile=0.5, clipped_count_stddev=0.4)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        model.optimizer.begin_run(0.1, 64.0, 10)


# --- Gradient accumulation ------------------------------------------------------------------


def test_accumulation_over_micro_batches_equals_one_big_batch():
    x, y = _data(48)
    big = _dp(_base(), expected=48.0)
    big.train_on_batch(x, y)
    accumulated = _dp(_base(), expected=48.0, gradient_accumulation_steps=3)
    before = _weights(accumulated)
    for part in range(3):
        accumulated.train_on_batch(x[part * 16 : (part + 1) * 16], y[part * 16 : (part + 1) * 16])
        if part < 2:  # nothing moves before the logical batch is complete
            assert all(np.array_equal(a, b) for a, b in zip(before, _weights(accumulated)))
            assert accumulated.optimizer.dp_steps == 0
    assert accumulated.optimizer.dp_steps == 1
    error = max(float(np.abs(a - b).max()) for a, b in zip(_weights(big), _weights(accumulated)))
    assert error < 1e-6, error


def test_accumulation_adds_noise_once_per_logical_batch():
    # Zero-weight examples: the update is the noise alone. Its std must be σC/B per logical
    # step whatever k is (k draws per logical batch would give √k times more).
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4096)])
    model = dpk.DPModel(base, trainable="bias")
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(1.0), 2.0, 1.5, seed=3, gradient_accumulation_steps=4),
        loss=keras.losses.MeanSquaredError(),
    )
    model.optimizer.build(model.trainable_variables)
    model.optimizer.begin_run(0.1, 10.0, 100)
    before = model.trainable_variables[0].numpy().copy()
    for _ in range(4):
        model.train_on_batch(
            np.ones((5, 4), "float32"), np.zeros((5, 4096), "float32"), sample_weight=np.zeros(5, "float32")
        )
    std = float(np.std(before - model.trainable_variables[0].numpy()))
    assert std == pytest.approx(1.5 * 2.0 / 10.0, rel=0.05)


def test_fit_with_accumulation_counts_logical_steps():
    x, y = _data(200)
    model = _dp(_base(), lr=0.1, sigma=1.0, gradient_accumulation_steps=2)
    model.fit(x, y, batch_size=20, epochs=2, verbose=0)
    assert model.optimizer.dp_steps == 20  # 10 logical steps per epoch, 20 micro-batches each
    assert model.privacy_spent(1e-5)[0] == pytest.approx(dpk.compute_epsilon(1.0, 0.1, 20, 1e-5))


def test_micro_batches_partition_the_poisson_batch():
    x, y = _data(100)
    whole = next(iter(dpk.poisson_batches((x, y), 0.2, 40, seed=5)))
    parts = list(dpk.poisson_batches((x, y), 0.2, 40, seed=5, micro_batches=4).take(4))
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([p[i].numpy() for p in parts]), whole[i].numpy())


# --- Two-phase training ---------------------------------------------------------------------


class _Snapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.log = []

    def on_train_begin(self, logs=None):
        self._start = [w.numpy().copy() for w in self.model.model.weights]

    def on_train_end(self, logs=None):
        self.log.append((self._start, [w.numpy().copy() for w in self.model.model.weights]))


def test_two_phase_trains_all_then_biases_and_accounts_both_phases():
    x, y = _data(200)
    base = _base()
    snapshots = _Snapshots()
    result = dpk.methods.two_phase_fit(
        base,
        x,
        y,
        loss=LOSS,
        phase1_epochs=2,
        phase2_epochs=1,
        batch_size=20,
        target_epsilon=4.0,
        delta=1e-5,
        callbacks=[snapshots, dpk.PrivacyCallback(1e-5)],
        seed=1,
        verbose=0,
    )
    assert result.steps == 30
    assert result.epsilon == pytest.approx(dpk.compute_epsilon(result.noise_multiplier, 0.1, 30, 1e-5))
    assert result.epsilon <= 4.0 and result.epsilon > 3.9
    assert result.phase2_history.history["epsilon"][-1] == pytest.approx(result.epsilon)
    (p1_start, p1_end), (p2_start, p2_end) = snapshots.log
    kernels = [i for i, w in enumerate(base.weights) if "kernel" in w.path]
    biases = [i for i, w in enumerate(base.weights) if "bias" in w.path]
    assert all(not np.array_equal(p1_start[i], p1_end[i]) for i in kernels)  # phase 1: everything
    assert all(np.array_equal(p2_start[i], p2_end[i]) for i in kernels)  # phase 2: kernels frozen
    assert all(not np.array_equal(p2_start[i], p2_end[i]) for i in biases)


# --- Mixed precision ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_clips_in_float32(policy):
    x, y = _data(16)
    reference = _dp(_base(width=16), expected=1.0)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _dp(_base(width=16), expected=1.0)
        assert isinstance(model.optimizer, dpk.DPOptimizer)  # Keras' LossScaleOptimizer unwrapped
        assert model.model.layers[0].compute_dtype != "float32"
        for m in (model, reference):
            before = _weights(m)
            m.train_on_batch(x[:1] * 100, y[:1])  # a huge gradient: clipped to exactly C
            m.update = np.concatenate([(a - b).ravel() for a, b in zip(before, _weights(m))])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.linalg.norm(model.update) == pytest.approx(1.0, rel=1e-3)
    cosine = model.update @ reference.update / np.linalg.norm(model.update) / np.linalg.norm(reference.update)
    assert cosine > 0.99
