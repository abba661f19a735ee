"""User-level privacy: users are Poisson-sampled, a user's rows together move the update by at
most lr·C/B_users, and the ledger says its unit is the user."""

import warnings

import keras
import numpy as np
import pytest

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import sampling

C, LR, K = 1.0, 0.5, 4


def _users(heavy_rows=500, light=20, rows_each=3):
    ids = np.concatenate([np.repeat(np.arange(light), rows_each), np.full(heavy_rows, light)])
    return ids


def test_batches_hold_whole_users_and_at_most_k_rows_each():
    ids = _users()
    x = np.arange(ids.size, dtype=np.float32)[:, None]
    ds = sampling.poisson_batches((x, np.zeros(ids.size)), 0.5, user_ids=ids, max_examples_per_user=K, seed=3)
    sampler = ds.dp_sampler
    assert (sampler.unit, sampler.examples_per_unit, sampler.num_examples) == ("user", K, 21)
    assert sampler.expected_batch_size == pytest.approx(0.5 * 21)
    eligible = {u: [i for i in np.flatnonzero(ids == u)][:K] for u in np.unique(ids)}
    for xb, _, mask in ds.take(5):
        rows = xb.numpy()[mask.numpy() > 0, 0].astype(int)
        users = set(ids[rows])
        assert sorted(rows) == sorted(r for u in users for r in eligible[u])  # whole users, first k rows


def _model():
    inputs = keras.Input((3,))
    return dpk.DPModel(
        keras.Model(inputs, keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inputs)), trainable="all"
    )


def _one_step(x, y, ids, seed):
    model = _model()
    optimizer = dpk.DPOptimizer(keras.optimizers.SGD(LR), C, noise_multiplier=0.0, seed=seed)
    model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError())
    users = np.unique(ids).size
    with warnings.catch_warnings():  # the explicit seed (same batches in both runs), σ = 0
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=users, user_ids=ids, max_examples_per_user=K, epochs=1, steps_per_epoch=1, verbose=0)
    return model.trainable_variables[0].numpy().ravel(), users, optimizer


def test_a_user_with_500_rows_moves_the_update_by_at_most_lr_c_over_b():
    """σ = 0, every user sampled (q = 1), identical seeds: the dataset with a 500-row user of huge
    gradients against the same dataset where those rows have zero gradient (x = 0)."""
    ids = _users()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ids.size, 3)).astype(np.float32)
    y = rng.normal(size=(ids.size, 1)).astype(np.float32)
    heavy = ids == ids.max()
    x[heavy] = [100.0, 0.0, 0.0]
    y[heavy] = 1e4
    x_absent = x.copy()
    x_absent[heavy] = 0.0
    w, users, optimizer = _one_step(x, y, ids, seed=11)
    w_absent, _, _ = _one_step(x_absent, y, ids, seed=11)
    assert optimizer.privacy_unit == "user"
    bound = LR * C / users  # B_users = q · users = users
    moved = np.linalg.norm(w - w_absent)
    assert moved <= bound * (1 + 1e-5)
    assert moved >= 0.99 * bound  # the user's 4 used rows, each clipped at C/4, all one way: exactly C


def test_user_level_errors_come_before_any_step():
    model = _model()
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(LR), C, noise_multiplier=1.0), loss="mse")
    x, y, ids = np.zeros((30, 3), np.float32), np.zeros((30, 1), np.float32), np.arange(30) // 3
    with pytest.raises(ValueError, match="max_examples_per_user"):
        model.fit(x, y, user_ids=ids, batch_size=2, verbose=0)
    with pytest.raises(ValueError, match="validation_split cannot split users"):
        model.fit(x, y, user_ids=ids, max_examples_per_user=2, validation_split=0.2, verbose=0)
    ds = sampling.poisson_batches((x, y), 0.1)
    with pytest.raises(ValueError, match="user_ids= is for arrays"):
        model.fit(ds, user_ids=ids, verbose=0)
    with pytest.raises(ValueError, match="batch_size must be in"):
        model.fit(x, y, user_ids=ids, max_examples_per_user=2, batch_size=11, verbose=0)
    assert model.optimizer.dp_steps == 0
    model.fit(x, y, batch_size=3, epochs=1, verbose=0)  # a per-example ledger ...
    with pytest.raises(ValueError, match="cannot be composed"):  # ... cannot continue per user
        model.fit(x, y, user_ids=ids, max_examples_per_user=2, batch_size=2, verbose=0)


@pytest.mark.slow
def test_canary_users_audit_holds():
    r = dpk.audit.canary_audit(10_000, 0.1, 100, 2.0, 1e-5, examples_per_user=5)
    assert r.passed, r.checks
    assert r.bounds["family"] >= 0.6 * r.claimed_epsilon


# --- The clipped sum of each user's gradient: users packed as examples ----------------------


def test_pack_users_keeps_each_users_first_k_rows_in_order():
    ids = np.array([7, 3, 7, 7, 3, 9, 7])
    x = {"a": np.arange(7, dtype=np.float32)[:, None]}
    y = np.arange(7) * 10
    xu, yu, wu = dpk.pack_users(x, y, ids, max_examples_per_user=2, sample_weight=np.arange(1, 8, dtype=np.float32))
    assert xu["a"].shape == (3, 2, 1) and yu.shape == (3, 2)
    # users 3, 7, 9 (id order); rows in data order, at most 2, zero padding with weight 0
    np.testing.assert_array_equal(yu, [[10, 40], [0, 20], [50, 0]])
    np.testing.assert_array_equal(wu, [[2, 5], [1, 3], [6, 0]])
    np.testing.assert_array_equal(xu["a"][..., 0], [[1, 4], [0, 2], [5, 0]])


def _per_user_model(k):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    return base, dpk.PerUserModel(base, k)


@pytest.mark.parametrize("trainable", ["bias", "all"])
def test_per_user_model_clips_each_users_summed_gradient_at_c(trainable):
    """σ = 0, every user in the batch: the update is lr · Σ_u clip(∇ mean loss of u's rows, C) / B,
    each user's gradient from a tape over the plain model on that user's rows."""
    k, rng = 3, np.random.default_rng(2)
    ids = np.repeat(np.arange(6), [3, 1, 2, 3, 3, 2])
    x = (rng.normal(size=(ids.size, 3)) * 3).astype(np.float32)
    y = rng.integers(0, 2, ids.size)
    xu, yu, wu = dpk.pack_users(x, y, ids, k)
    base, per_user = _per_user_model(k)
    model = dpk.DPModel(per_user, trainable=trainable)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(LR), C, noise_multiplier=0.0, seed=1), loss=loss)
    variables = list(model.selection.variables)
    before = [v.numpy().copy() for v in variables]
    import tensorflow as tf

    expected = [np.zeros_like(b) for b in before]
    for u in range(6):
        rows = ids == u
        with tf.GradientTape() as tape:
            user_loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y[rows], base(x[rows]), from_logits=True)
            )
        grads = [g.numpy() for g in tape.gradient(user_loss, variables)]
        norm = np.sqrt(sum((g**2).sum() for g in grads))
        expected = [e + g * min(1.0, C / norm) for e, g in zip(expected, grads)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the explicit seed
        model.fit(xu, yu, sample_weight=wu, batch_size=6, sampling_rate=1.0, epochs=1, steps_per_epoch=1, verbose=0)
    assert model.optimizer.privacy_unit == "user" and model.optimizer.dp_steps == 1
    for v, b, e in zip(variables, before, expected):
        np.testing.assert_allclose(b - v.numpy(), LR * e / 6, rtol=1e-4, atol=1e-6)


def test_per_user_model_refuses_user_ids_and_bookkeeping():
    base, per_user = _per_user_model(2)
    model = dpk.DPModel(per_user, trainable="all")
    with pytest.raises(ValueError, match="vectorized"):
        model.compile(
            optimizer=dpk.DPOptimizer(keras.optimizers.SGD(LR), C, 1.0), loss="mse", gradient_method="bookkeeping"
        )
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(LR), C, 1.0), loss="mse")
    x, y = np.zeros((8, 2, 3), np.float32), np.zeros((8, 2, 2), np.float32)
    with pytest.raises(ValueError, match="users already"):
        model.fit(x, y, user_ids=np.arange(8), max_examples_per_user=1, batch_size=2, verbose=0)


@pytest.mark.parametrize("user_clipping", ["rows", "sum"])
def test_recipe_trains_at_user_level_both_ways(user_clipping):
    """The examples' recipe: rows clipped at C/k, or users packed and clipped whole; both account
    per user and evaluate the row-level model."""
    from dpk_examples import recipes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)

    def build():
        inputs = keras.Input((3,))
        return keras.Model(inputs, keras.layers.Dense(2, name="logits")(keras.layers.Dense(4)(inputs)))

    result = recipes.train(
        "dp_bitfit_head",
        build,
        (x[:200], y[:200]),
        (x[200:220], y[200:220]),
        (x[220:], y[220:]),
        epsilon=8.0,
        batch_size=10,
        epochs=2,
        user_ids=np.arange(200) // 4,
        max_examples_per_user=4,
        user_clipping=user_clipping,
        verbose=0,
    )
    assert result.model.optimizer.privacy_unit == "user"
    assert result.delta == pytest.approx(1 / (2 * 50))  # per user
    assert result.steps == 10  # 50 users, 10 expected per step, 2 epochs
    assert 0 <= result.test_accuracy <= 1
    assert not isinstance(result.base_model, (dpk.DPModel, dpk.PerUserModel))  # the row model: exported
    assert result.base_model.input_shape == (None, 3)
