"""DPZero and SPARTA on the shared engine: estimator, clip, selection, masks, accounting."""

import dp_accounting
import keras
import numpy as np
import pytest

import dp_bitfit_keras as dpk
from dp_bitfit_keras.methods import sparta_module

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PER_EXAMPLE = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _dpzero(base, trainable="all", lr=1.0, clip=1e6, sigma=0.0, perturbation=1e-3, expected=8.0):
    model = dpk.methods.dpzero(base, trainable=trainable, perturbation=perturbation)
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(lr), clip, sigma, seed=1), loss=LOSS)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.begin_run(0.1, expected, 10**6)
    return model


def _flat(variables):
    return np.concatenate([np.ravel(v) for v in variables])


def test_dpzero_update_is_unbiased_for_the_gradient():
    # σ = 0, no clipping, λ small: E_z[(∇ℓ·z) z] = ∇ℓ, so the mean update over many steps (each
    # from the same θ) is −lr × the mean gradient. 2,000 draws in 15 dimensions: the mean's
    # relative error is ≈ √(15/2000) ≈ 0.09.
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.random.RandomState(0).randn(8, 4).astype("float32")
    y = np.arange(8) % 3
    model = _dpzero(base)
    theta = [v.numpy().copy() for v in model.trainable_variables]
    grad = _flat([g.numpy().mean(0) for g in dpk.per_example_gradients(base, PER_EXAMPLE, x, y)])
    updates = []
    for _ in range(2000):
        model.train_on_batch(x, y)
        updates.append(_flat(theta) - _flat([v.numpy() for v in model.trainable_variables]))
        for v, t in zip(model.trainable_variables, theta):
            v.assign(t)
    mean = np.mean(updates, axis=0)
    assert np.linalg.norm(mean - grad) / np.linalg.norm(grad) < 0.25
    assert mean @ grad / np.linalg.norm(mean) / np.linalg.norm(grad) > 0.95
    # Each single update is a multiple of one random direction, not the gradient.
    single = updates[0] @ grad / np.linalg.norm(updates[0]) / np.linalg.norm(grad)
    assert single < 0.99


def test_dpzero_clips_the_scalar_and_trains_only_selected_variables():
    keras.utils.set_random_seed(1)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    x = np.random.RandomState(1).randn(1, 4).astype("float32") * 50
    model = _dpzero(base, trainable="bias", clip=0.01, expected=1.0)
    kernels = [w.numpy().copy() for w in base.weights if "kernel" in w.path]
    for _ in range(20):
        logs = model.train_on_batch(x, np.array([2]), return_dict=True)
        assert abs(logs["projected_grad"]) <= 0.01 + 1e-7  # |clip(d)| / B ≤ C / 1
    assert all(np.array_equal(k, w.numpy()) for k, w in zip(kernels, [w for w in base.weights if "kernel" in w.path]))
    assert model.optimizer.dp_steps == 20


def test_dpzero_noise_std_is_sigma_c_over_b():
    keras.utils.set_random_seed(2)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = _dpzero(base, clip=2.0, sigma=1.5, expected=10.0)
    zero = np.zeros(10, "float32")  # all examples weight 0: the released scalar is the noise alone
    draws = [
        model.train_on_batch(np.ones((10, 4), "float32"), np.zeros(10), sample_weight=zero, return_dict=True)[
            "projected_grad"
        ]
        for _ in range(600)
    ]
    assert np.std(draws) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.1)


def test_dpzero_fit_is_accounted_like_dp_sgd():
    keras.utils.set_random_seed(3)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.random.RandomState(3).randn(100, 4).astype("float32")
    model = dpk.methods.dpzero(base)
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(1e-3), 200.0, 1.0, seed=0), loss=LOSS)
    model.fit(x, np.zeros(100, "int32"), batch_size=10, epochs=2, verbose=0)
    assert model.privacy_spent(1e-5)[0] == pytest.approx(dpk.compute_epsilon(1.0, 0.1, 20, 1e-5))


def test_row_selection_has_the_requested_density():
    rng = np.random.RandomState(0)
    scores = [
        rng.randn(40, 10).astype("float32"),
        rng.randn(10, 20).astype("float32"),
        rng.randn(2, 3, 5).astype("float32"),
    ]
    axes = [(1,), (1,), (1, 2)]  # output units: columns of a Dense kernel; two axes of an EinsumDense one
    masks = sparta_module.select_rows(scores, 0.2, axes)
    total = sum(s.size for s in scores)
    kept = sum(m.sum() for m in masks)
    assert 0.2 * total <= kept < 0.2 * total + 40  # greedy rows: past the target by < one row
    views = [np.moveaxis(m, 0, -1).reshape(-1, m.shape[0]) for m in masks]  # [rows, entries]
    for view in views:  # whole rows (all weights into one output unit)
        assert set(np.unique(view.min(1) == view.max(1))) == {True}
    # The kept rows are the highest-scoring ones (scores pooled by sum over a row's entries).
    pooled = np.concatenate([np.moveaxis(s, 0, -1).reshape(-1, s.shape[0]).sum(1) for s in scores])
    kept_rows = np.concatenate([v[:, 0] > 0 for v in views])
    assert np.allclose(
        pooled, np.concatenate([sparta_module.row_scores(s, a) for s, a in zip(scores, axes)]), atol=1e-5
    )
    assert pooled[kept_rows].min() >= pooled[~kept_rows].max()


def test_rows_are_output_units():
    inputs = keras.Input((4, 8))
    dense = keras.layers.Dense(5)
    einsum = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3))
    conv = keras.layers.Conv1D(6, 3)
    model = keras.Model(inputs, [dense(inputs), einsum(inputs), conv(inputs)])
    assert sparta_module.output_axes(model, dense.kernel) == (1,)
    assert sparta_module.output_axes(model, einsum.kernel) == (1, 2)
    assert sparta_module.output_axes(model, conv.kernel) == (2,)


def _sparta_zero_noise(base, x, y, variant):
    return dpk.methods.sparta(
        base,
        x,
        y,
        loss=keras.losses.MeanSquaredError(reduction=None),
        density=0.5,
        batch_size=32,
        l2_norm_clip=1e3,
        noise_multiplier=0.0,
        seed=0,
        variant=variant,
        train_head=False,
        verbose=0,
    )


def test_sparta_published_statistic_keeps_large_cancelling_gradients():
    # One input, two output units (two rows). Unit 0's per-example gradients are large and
    # cancel in sign (targets ±3), unit 1's are small and agree (targets 0.5): the absolute
    # statistic keeps unit 0 (a signed sum would rank it ~0).
    x = np.ones((64, 1), "float32")
    y = np.stack([np.where(np.arange(64) % 2 == 0, 3.0, -3.0), np.full(64, 0.5)], axis=1).astype("float32")
    base = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, use_bias=False, kernel_initializer="zeros")])
    result = _sparta_zero_noise(base, x, y, "published")
    (mask,) = result.masks.values()
    assert (result.kept_rows, result.candidate_rows, result.kept_entries) == (1, 2, 1)
    assert mask[0, 0] == 1 and mask[0, 1] == 0


def test_sparta_signed_variant_keeps_consistent_small_gradients():
    # The earlier variant (rows = input features, signed sums): feature 0's gradients are
    # large and cancel (x0 = ±1), feature 1's small and agree (x1 = 0.5): it keeps feature 1.
    x = np.stack([np.where(np.arange(64) % 2 == 0, 1.0, -1.0), np.full(64, 0.5)], axis=1).astype("float32")
    y = np.full((64, 1), 3.0, "float32")
    base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    result = _sparta_zero_noise(base, x, y, "signed")
    (mask,) = result.masks.values()
    assert (result.kept_rows, result.candidate_rows) == (1, 2)
    assert mask[0, 0] == 0 and mask[1, 0] == 1


@pytest.mark.parametrize("train_head", [True, False])
def test_sparta_trains_only_masked_entries_and_accounts_both_phases(train_head):
    keras.utils.set_random_seed(4)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    rng = np.random.RandomState(4)
    x = rng.randn(200, 6).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    initial = {w.path: w.numpy().copy() for w in base.weights}
    result = dpk.methods.sparta(
        base,
        x,
        y,
        loss=LOSS,
        density=0.25,
        batch_size=20,
        noise_multiplier=1.0,
        seed=0,
        train_head=train_head,
        verbose=0,
    )
    head = base.layers[-1]
    # Candidates: both kernels (rows of 6 and of 16 entries), or the first alone (the head is
    # trained whole, outside the selection).
    candidates, widest = (6 * 16, 6) if train_head else (6 * 16 + 16 * 3, 16)
    assert 0.25 <= result.density < 0.25 + widest / candidates
    assert result.kept_entries == int(sum(m.sum() for m in result.masks.values())) > 0
    assert (head.kernel.path in result.masks) != train_head
    assert result.selection_steps == 10 and result.steps == 20
    for w in base.weights:
        changed = w.numpy() != initial[w.path]
        mask = result.masks.get(w.path)
        if train_head and any(w is v for v in head.variables):
            assert changed.all()  # the head: trained whole
        elif mask is None:  # biases: not candidates, not trained
            assert not changed.any()
        else:
            assert not (changed & (mask == 0)).any()  # nothing outside the mask moved
            if mask.any():  # (a global Top-k may keep no row of a kernel)
                assert changed[mask > 0].mean() > 0.99  # and the kept entries did
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 20
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    assert result.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_sparta_with_gradient_accumulation_is_the_same_run():
    # Micro-batches (what lets large models fit) must not change the mechanism: same Poisson
    # batches, same noise per logical batch, so the same selection, steps and ε.
    rng = np.random.RandomState(5)
    x = rng.randn(120, 6).astype("float32")
    y = (x[:, 1] > 0).astype("int32")
    results = []
    for k in (1, 3):
        keras.utils.set_random_seed(5)
        base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
        results.append(
            dpk.methods.sparta(
                base,
                x,
                y,
                loss=LOSS,
                density=0.3,
                batch_size=12,
                noise_multiplier=1.0,
                seed=3,
                verbose=0,
                gradient_accumulation_steps=k,
            )
        )
        results[-1].weights = [w.numpy() for w in base.weights]
    one, accumulated = results
    assert accumulated.selection_steps == one.selection_steps == 10 and accumulated.steps == one.steps == 20
    assert len(one.masks) == len(accumulated.masks) == 1  # the hidden kernel (the head is trained whole)
    for a, b in zip(accumulated.masks.values(), one.masks.values()):  # paths differ: a second model
        np.testing.assert_array_equal(a, b)
    for a, b in zip(accumulated.weights, one.weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert accumulated.epsilon == one.epsilon
