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
