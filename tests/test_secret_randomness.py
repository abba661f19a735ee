"""Noise and sampling are keyed by secret randomness: a global seed does not reproduce them,
an explicit seed does (and warns), and an exported SavedModel holds neither key nor ledger."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import prng

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _run(seed=None, sigma=1.0):
    """A script a user would call reproducible: global seed 0, then a DP fit."""
    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    x = rng.randn(64, 5).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(2)])
    model = dpk.DPModel(base, trainable="bias+head")
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.5), 1.0, sigma, seed=seed), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return model


def _weights(model):
    return [w.numpy() for w in model.model.weights]


def test_same_global_seed_without_explicit_seed_gives_different_noise():
    a, b = _run(), _run()
    assert not np.array_equal(a.optimizer._noise_key.numpy(), b.optimizer._noise_key.numpy())
    trained = [i for i, w in enumerate(a.model.weights) if w.trainable]
    for i in trained:
        assert not np.array_equal(_weights(a)[i], _weights(b)[i])
    frozen = [i for i, w in enumerate(a.model.weights) if not w.trainable]
    for i in frozen:  # initialisation still follows the global seed
        np.testing.assert_array_equal(_weights(a)[i], _weights(b)[i])


def test_same_global_seed_without_explicit_seed_gives_different_batches():
    x, y = np.arange(200, dtype="float32")[:, None], np.arange(200)

    def batches():
        keras.utils.set_random_seed(0)
        return [sorted(y_b.numpy()[m.numpy() > 0].tolist()) for _, y_b, m in dpk.poisson_batches((x, y), 0.1).take(5)]

    assert batches() != batches()


def test_explicit_seed_reproduces_a_run_bit_for_bit_and_warns():
    prng._warned.discard(77)
    with pytest.warns(prng.PredictableNoiseWarning, match="seed=77"):
        a = _run(seed=77)
    b = _run(seed=77)
    for wa, wb in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(wa, wb)
    assert not all(np.array_equal(wa, wc) for wa, wc in zip(_weights(a), _weights(_run(seed=78))))


def test_default_run_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", prng.PredictableNoiseWarning)
        _run()


def test_key_is_not_in_the_config():
    model = _run()
    config = str(model.optimizer.get_config())
    assert "seed" not in config and "key" not in config


def _key_bytes(model):
    return model.optimizer._noise_key.numpy().astype("<i8").tobytes()


def _files_contain(root, needle):
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                if needle in f.read():
                    return True
    return False


def test_saved_model_export_holds_neither_key_nor_ledger(tmp_path):
    model = _run()
    export = str(tmp_path / "savedmodels" / "run" / "1")
    model.export(export, format="tf_saved_model")
    loaded = tf.saved_model.load(export)
    names = [v.name for v in loaded.variables]
    assert names and not any(
        k in n for n in names for k in ("noise_key", "dp_steps", "noise_multiplier", "sampling_rate")
    )
    assert len(names) == len(model.model.weights)
    assert not _files_contain(export, _key_bytes(model))
    # A full checkpoint does hold the key (so it must be kept as secret as the data).
    checkpoint = str(tmp_path / "model.keras")
    model.save(checkpoint)
    import zipfile

    with zipfile.ZipFile(checkpoint) as z:
        assert any(_key_bytes(model) in z.read(n) for n in z.namelist())
