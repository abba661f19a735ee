"""Pay only for the examples sampled: a padded Poisson batch is computed chunk by chunk, only the
chunks that hold sampled rows, and the update is that of the whole batch (σ = 0: float round-off)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_bert

import dp_bitfit_keras as dpk
from dp_bitfit_keras import model as dp_model

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CHUNK = 4


def _dense():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])


def _train(build, data, physical_batch_size, trainable="all", sampling_rate=0.1, **optimizer_kwargs):
    base = build()
    model = dpk.DPModel(base, trainable=trainable)
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.3), 1.0, 0.0, seed=5, **optimizer_kwargs),
        loss=LOSS,
        metrics=["accuracy"],
        physical_batch_size=physical_batch_size,
    )
    history = model.fit(data, sampling_rate=sampling_rate, epochs=2, verbose=0)
    return [w.numpy() for w in base.weights], history.history, model


def _masked_batches(x, y, real_rows):
    """Fixed batches of len(y) rows whose first `real_rows` have weight 1 (a Poisson batch's layout)."""
    w = (np.arange(len(y)) < real_rows).astype("float32")
    return tf.data.Dataset.from_tensors((x, y, w)).repeat(3)


@pytest.mark.parametrize("real_rows", [0, CHUNK - 1, CHUNK, CHUNK + 1, 10])
@pytest.mark.filterwarnings("ignore:Accounting these batches")
def test_chunks_give_the_padded_update(real_rows):
    rng = np.random.RandomState(0)
    x, y = rng.randn(10, 5).astype("float32"), rng.randint(0, 3, 10).astype("int32")  # 10 rows: 3 chunks of 4, padded
    padded, h_padded, _ = _train(_dense, _masked_batches(x, y, real_rows), None)
    chunked, h_chunked, model = _train(_dense, _masked_batches(x, y, real_rows), CHUNK)
    assert model._chunk == CHUNK and model.optimizer.dp_steps == 6
    for a, b in zip(chunked, padded):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h_chunked["loss"], h_padded["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h_chunked["accuracy"], h_padded["accuracy"], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Accounting these batches")
def test_chunks_on_keras_hub_bert_with_padding_masks():
    model, x, y = tiny_bert(batch=8, seq=10)
    weights = [w.numpy() for w in model.weights]

    def build():
        for w, v in zip(model.weights, weights):
            w.assign(v)
        return model

    data = tf.data.Dataset.from_tensors((x, y, tf.constant([1, 1, 1, 1, 1, 0, 0, 0], tf.float32))).repeat(2)
    padded, _, _ = _train(build, data, None, trainable="bias+head")
    chunked, _, _ = _train(build, data, 2, trainable="bias+head")
    scale = max(float(np.max(np.abs(a - w0))) for a, w0 in zip(padded, weights))
    assert scale > 0
    for a, b in zip(chunked, padded):
        assert float(np.max(np.abs(a - b))) <= 1e-5 * scale


def test_poisson_fit_with_accumulation_and_adaptive_clipping_matches_unchunked():
    rng = np.random.RandomState(1)
    x, y = rng.randn(120, 5).astype("float32"), rng.randint(0, 3, 120).astype("int32")
    results = []
    for physical in (None, 2, "auto"):
        base = _dense()
        model = dpk.DPModel(base, trainable="all")
        model.compile(
            optimizer=dpk.DPOptimizer(
                keras.optimizers.SGD(0.3),
                1.0,
                0.0,
                seed=5,
                gradient_accumulation_steps=2,
                target_unclipped_quantile=0.5,
                clipped_count_stddev=1.0,
            ),
            loss=LOSS,
            physical_batch_size=physical,
        )
        model.fit(x, y, batch_size=24, epochs=1, verbose=0)
        results.append(
            ([w.numpy() for w in base.weights], model.optimizer.current_l2_norm_clip, model.optimizer.dp_steps)
        )
    for weights, clip, steps in results[1:]:
        assert steps == results[0][2] == 5
        assert clip == pytest.approx(results[0][1], rel=1e-6)
        for a, b in zip(weights, results[0][0]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_overflow_of_the_padded_size_still_raises():
    x, y = np.zeros((100, 5), "float32"), np.zeros(100, "int32")
    model = dpk.DPModel(_dense(), trainable="bias")
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss=LOSS, physical_batch_size=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceeded max_batch_size"):
        model.fit(dpk.poisson_batches((x, y), 0.5, max_batch_size=10), verbose=0)


def test_automatic_chunk_size():
    assert dp_model.chunk_size_for(128, 6_000) == 16
    assert dp_model.chunk_size_for(512, 6_000) == 64
    assert dp_model.chunk_size_for(3, 6_000) == 1
    # Full fine-tuning of 22.7M parameters: one chunk's per-example gradients stay under 1 GiB.
    assert dp_model.chunk_size_for(1024, 22_700_000) == 8
    with pytest.raises(ValueError, match="physical_batch_size"):
        dpk.DPModel(_dense()).compile(
            optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss=LOSS, physical_batch_size=0
        )
