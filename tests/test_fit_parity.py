"""Keras `fit` arguments on DPModel: sample and per-token weights, class_weight, validation, initial_epoch."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_gradients_close

import dp_bitfit_keras as dpk
from dp_bitfit_keras import bookkeeping

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(seed=7, sigma=1.0):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    model = dpk.DPModel(base, trainable="all")
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, sigma, seed=seed), loss=LOSS)
    return model


def _data(n=120):
    rng = np.random.RandomState(0)
    return rng.randn(n, 4).astype("float32"), rng.randint(0, 3, n).astype("int32")


def _fit_weights(**fit_kwargs):
    model = _model()
    x, y = _data()
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, **fit_kwargs)
    return [w.numpy() for w in model.trainable_variables], model


def test_class_weight_is_the_matching_sample_weight():
    _, y = _data()
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}
    by_class, _ = _fit_weights(class_weight=class_weight)
    by_example, _ = _fit_weights(sample_weight=np.array([class_weight[int(c)] for c in y], np.float32))
    unweighted, _ = _fit_weights()
    for a, b in zip(by_class, by_example):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(by_class, unweighted))


def test_unit_sample_weights_change_nothing():
    weighted, _ = _fit_weights(sample_weight=np.ones(120, np.float32))
    plain, _ = _fit_weights()
    for a, b in zip(weighted, plain):
        np.testing.assert_array_equal(a, b)


def test_validation_split_rows_never_enter_the_private_sampling():
    model = _model()
    x, y = _data()
    history = model.fit(x, y, batch_size=20, epochs=2, verbose=0, validation_split=0.25)
    assert "val_loss" in history.history and len(history.history["val_loss"]) == 2
    (segment,) = model.optimizer.segments
    assert segment.sampling_rate == pytest.approx(20 / 90)  # q over the 90 training rows
    assert segment.steps == 2 * round(90 / 20)


def test_initial_epoch_plans_the_remaining_epochs():
    model = _model()
    x, y = _data()
    history = model.fit(x, y, batch_size=20, epochs=3, initial_epoch=1, verbose=0)
    assert len(history.history["loss"]) == 2
    assert model.optimizer.dp_steps == 2 * 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_weight={0: 1.0}), "sample weights come from the dataset"),
        (dict(validation_split=0.2), "validation_split needs arrays"),
    ],
)
def test_unsupported_on_datasets_raise_before_any_step(kwargs, match):
    model = _model()
    x, y = _data()
    before = [w.numpy() for w in model.trainable_variables]
    ds = dpk.poisson_batches((x, y), 0.2, seed=1)
    with pytest.raises(ValueError, match=match):
        model.fit(ds, epochs=1, verbose=0, **kwargs)
    for a, b in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize(
    "weights, match",
    [
        (-np.ones(120, np.float32), "must be >= 0"),
        (np.ones((119,), np.float32), r"\[n\] or per token"),
        (np.full(120, np.nan, np.float32), "sample_weight"),
    ],
)
def test_bad_sample_weights_are_refused(weights, match):
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0, sample_weight=weights)


# --- Per-token weights: the sequence is the privacy unit ---------------------------------------


def _sequence_model(vocab=11, seq=6):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, 8)(inputs)
    h = keras.layers.Dense(8, activation="tanh")(h)
    outputs = keras.layers.Dense(vocab)(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(1)
    x = rng.randint(1, vocab, (5, seq)).astype("int32")
    y = rng.randint(0, vocab, (5, seq)).astype("int32")
    w = (rng.rand(5, seq) > 0.4).astype("float32") * rng.choice([1.0, 2.0], (5, seq)).astype("float32")
    w[3] = 0.0  # an example without weighted tokens: loss 0, no gradient
    return model, x, y, w


def _reference(model, x, y, w, variables):
    """Single-example tapes of Σ_t w_t·ℓ_t / Σ_t w_t."""
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            tokens = LOSS_TOKENS(y[i : i + 1], model(x[i : i + 1]))[0]
            total = float(w[i].sum())
            loss = tf.reduce_sum(tokens * w[i]) / total if total else 0.0 * tf.reduce_sum(tokens)
        grads.append(tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    return [tf.stack(g) for g in zip(*grads)]


LOSS_TOKENS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def test_per_token_weights_vectorized_path_is_exact():
    model, x, y, w = _sequence_model()
    variables = model.trainable_variables
    got = dpk.per_example_gradients(model, LOSS_TOKENS, x, y, variables, sample_weight=w)
    assert_gradients_close(got, _reference(model, x, y, w, variables))
    assert all(float(tf.reduce_max(tf.abs(g[3]))) == 0.0 for g in got)


def test_per_token_weights_bookkeeping_path_is_exact():
    model, x, y, w = _sequence_model()
    variables = model.trainable_variables
    optimizer = dpk.DPOptimizer(keras.optimizers.SGD(1.0), 1e6, 0.0)
    optimizer.build(variables)
    summed, _, losses, _ = bookkeeping.clipped_sums(
        model, LOSS_TOKENS, tf.constant(x), tf.constant(y), variables, tf.constant(w), optimizer
    )
    expected = [tf.reduce_sum(g, axis=0) for g in _reference(model, x, y, w, variables)]
    assert_gradients_close([s[None] for s in summed], [e[None] for e in expected])
    assert float(losses[3]) == 0.0


def test_per_token_weights_train_through_fit_and_poisson_batches():
    model, x, y, w = _sequence_model()
    x, y, w = (np.repeat(a, 8, axis=0) for a in (x, y, w))
    dp = dpk.DPModel(model, trainable="bias")
    dp.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0, seed=2), loss=LOSS_TOKENS)
    dp.fit(x, y, sample_weight=w, batch_size=8, epochs=1, verbose=0)
    ds = dpk.poisson_batches((x, y, w), 0.2, seed=3)
    xb, yb, wb = next(iter(ds))
    assert wb.shape == (ds.dp_sampler.max_batch_size, x.shape[1])
    dp.fit(ds, epochs=1, verbose=0)
    assert dp.optimizer.dp_steps == 5 + 5
