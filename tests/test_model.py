import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import brute_force_gradients, tiny_bert

import dp_bitfit_keras as dpk

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PER_EXAMPLE = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _one_batch_dataset(x, y, mask=None):
    data = (x, y) if mask is None else (x, y, mask)
    return tf.data.Dataset.from_tensors(data)


def _compile(model, lr=0.1, clip=0.05, sigma=0.0, clipping="abadi", **kwargs):
    model.compile(
        optimizer=dpk.DPOptimizer(
            keras.optimizers.SGD(lr), l2_norm_clip=clip, noise_multiplier=sigma, clipping=clipping, seed=0
        ),
        loss=LOSS,
        metrics=["accuracy"],
        **kwargs,
    )


@pytest.mark.parametrize("clipping", ["abadi", "automatic"])
def test_one_step_is_minus_lr_times_mean_clipped_gradient(clipping):
    base, x, y = tiny_bert(batch=4)
    model = dpk.DPModel(base, trainable="bias")
    variables = list(model.selection.variables)
    before = [v.numpy().copy() for v in variables]
    per_example = brute_force_gradients(base, PER_EXAMPLE, x, y, variables)
    lr, clip = 0.1, 0.05
    _compile(model, lr=lr, clip=clip, clipping=clipping)
    model.fit(_one_batch_dataset(x, y), epochs=1, sampling_rate=4 / 100, verbose=0)
    norms = np.sqrt(sum(np.sum(np.reshape(g.numpy() ** 2, (4, -1)), axis=1) for g in per_example))
    factors = np.minimum(1.0, clip / norms) if clipping == "abadi" else clip / (norms + 0.01)
    assert np.all(norms * factors <= clip * (1 + 1e-6))
    assert clipping == "automatic" or np.any(norms > clip)  # The bound was active.
    scale = 0.0
    for v, b, g in zip(variables, before, per_example):
        expected = b - lr * np.tensordot(factors, g.numpy(), axes=1) / 4  # Batch of 4 (static).
        scale = max(scale, np.abs(expected - b).max())
        np.testing.assert_allclose(v.numpy(), expected, atol=1e-5 * lr * clip)
    assert scale > 0
    assert model.optimizer.dp_steps == 1


def test_bitfit_fit_changes_only_biases_and_ignores_padding_rows():
    base, x, y = tiny_bert(batch=6)
    model = dpk.DPModel(base, trainable="bias")
    selected = {id(v) for v in model.selection.variables}
    frozen = [(v, v.numpy().copy()) for v in base.weights if id(v) not in selected]
    biases = [(v, v.numpy().copy()) for v in model.selection.variables]
    _compile(model, sigma=0.0)
    mask = tf.constant([1, 1, 1, 1, 0, 0], tf.float32)
    model.fit(_one_batch_dataset(x, y, mask), sampling_rate=0.1, verbose=0)
    after_first = [v.numpy().copy() for v, _ in biases]
    for v, value in frozen:
        np.testing.assert_array_equal(v.numpy(), value)  # Bit-identical.
    assert any(not np.array_equal(v.numpy(), b) for v, b in biases)

    # Same step again from the same start, with garbage in the padding rows: same update.
    for v, b in biases:
        v.assign(b)
    garbage = dict(x)
    garbage["token_ids"] = tf.concat([x["token_ids"][:4], tf.fill((2, 10), 7)], axis=0)
    y2 = tf.concat([y[:4], [2, 2]], axis=0)
    model.optimizer._dp_steps.assign(0)  # Same noise seed position (σ=0 anyway).
    model.fit(_one_batch_dataset(garbage, y2, mask), sampling_rate=0.1, verbose=0)
    for (v, _), first in zip(biases, after_first):
        np.testing.assert_allclose(v.numpy(), first, rtol=0, atol=1e-7)


def test_fit_on_arrays_uses_poisson_batches_and_reports_epsilon():
    keras.utils.set_random_seed(3)
    n = 256
    x = np.random.randn(n, 6).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    model = dpk.DPModel(base, trainable="all")
    _compile(model, lr=0.5, clip=1.0, sigma=1.0)
    history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[dpk.PrivacyCallback(delta=1e-5)], verbose=0)
    eps = history.history["epsilon"]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert model.optimizer.dp_steps == 16  # round(1/q) = 8 steps per epoch.
    assert eps[1] == pytest.approx(dpk.compute_epsilon(1.0, 32 / n, 16, 1e-5))
    assert model.privacy_spent(1e-5) == (pytest.approx(eps[1]), 1e-5)


def test_target_epsilon_calibrates_sigma_at_fit():
    n = 200
    x, y = np.random.randn(n, 4).astype("float32"), np.zeros(n, "int32")
    model = dpk.DPModel(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), trainable="all")
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, target_epsilon=2.0, target_delta=1e-4), loss=LOSS
    )
    model.fit(x, y, batch_size=20, epochs=3, verbose=0)
    sigma = model.optimizer.noise_multiplier
    assert sigma == pytest.approx(dpk.noise_multiplier_for_epsilon(2.0, 0.1, 30, 1e-4), rel=1e-6)
    assert model.privacy_spent(1e-4)[0] == pytest.approx(2.0, abs=0.01)


def test_max_epsilon_stops_before_the_budget_is_exceeded():
    n = 100
    x, y = np.random.randn(n, 4).astype("float32"), np.zeros(n, "int32")
    model = dpk.DPModel(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), trainable="all")
    _compile(model, sigma=0.7, clip=1.0)
    callback = dpk.PrivacyCallback(delta=1e-5, max_epsilon=5.0)
    model.fit(x, y, batch_size=10, epochs=20, callbacks=[callback], verbose=0)
    steps = model.optimizer.dp_steps
    assert 0 < steps == callback.max_steps < 200
    assert model.privacy_spent(1e-5)[0] <= 5.0
    assert dpk.compute_epsilon(0.7, 0.1, steps + 1, 1e-5) > 5.0


def test_save_load_continue_keeps_steps_and_epsilon(tmp_path):
    n = 128
    x, y = np.random.randn(n, 5).astype("float32"), (np.arange(n) % 2).astype("int32")
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model = dpk.DPModel(base, trainable="bias")
    _compile(model, sigma=1.0, clip=1.0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    steps, eps = model.optimizer.dp_steps, model.privacy_spent(1e-5)[0]
    path = str(tmp_path / "dp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, dpk.DPModel) and isinstance(loaded.optimizer, dpk.DPOptimizer)
    assert loaded.optimizer.dp_steps == steps == 8
    assert loaded.privacy_spent(1e-5)[0] == pytest.approx(eps)
    index = {id(v): i for i, v in enumerate(model.weights)}
    loaded_index = {id(v): i for i, v in enumerate(loaded.weights)}
    assert [loaded_index[id(v)] for v in loaded.trainable_variables] == [
        index[id(v)] for v in model.trainable_variables
    ]
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert loaded.optimizer.dp_steps == 16
    assert loaded.privacy_spent(1e-5)[0] == pytest.approx(dpk.compute_epsilon(1.0, 16 / n, 16, 1e-5))


def test_callable_selection_survives_save_and_load(tmp_path):
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")])
    model = dpk.DPModel(base, trainable=lambda v: v is base.get_layer("b").kernel)
    _compile(model, sigma=1.0, clip=1.0)
    path = str(tmp_path / "callable.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert len(loaded.trainable_variables) == 1
    assert loaded.trainable_variables[0] is loaded.model.get_layer("b").kernel


def test_dp_bitfit_learns_like_bitfit_with_a_generous_epsilon():
    # A task that bias-only training can solve: the label is which side of a fixed random
    # hyperplane the input lies on; the frozen random ReLU features carry it, the biases adapt.
    keras.utils.set_random_seed(0)
    n = 1024
    x = np.random.randn(n, 10).astype("float32")
    y = (x @ np.random.randn(10) > 0).astype("int32")

    def base():
        keras.utils.set_random_seed(1)
        return keras.Sequential([keras.Input((10,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(2)])

    plain = base()
    dpk.selection.apply_selection(plain, dpk.select_variables(plain, "bias+head"))
    plain.compile(optimizer=keras.optimizers.Adam(0.02), loss=LOSS, jit_compile=True)
    initial = plain.evaluate(x, y, verbose=0)
    plain.fit(x, y, batch_size=64, epochs=8, verbose=0)
    private = dpk.DPModel(base(), trainable="bias+head")
    private.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.Adam(0.02), l2_norm_clip=1.0, noise_multiplier=0.6, seed=0),
        loss=LOSS,
    )
    private.fit(x, y, batch_size=64, epochs=8, verbose=0)
    plain_loss, private_loss = plain.evaluate(x, y, verbose=0), private.evaluate(x, y, verbose=0)
    assert private.privacy_spent(1e-5)[0] < 20
    assert plain_loss < 0.7 * initial and private_loss < 0.7 * initial
    assert private_loss < plain_loss + 0.15


def test_bad_inputs_fail_before_the_first_step():
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        dpk.DPModel(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="BatchNormalization"):
        dpk.DPModel(keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)]))
    model = dpk.DPModel(base, trainable="all")
    with pytest.raises(ValueError, match="trains with a dp_bitfit_keras.DPOptimizer"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    _compile(model)
    x, y = np.zeros((50, 4), "float32"), np.zeros(50, "int32")
    with pytest.raises(ValueError, match="cannot tell the sampling rate"):
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(10), verbose=0)
    with pytest.raises(ValueError, match="batch_size must be in"):
        model.fit(x, y, batch_size=500, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceeded max_batch_size"):
        model.fit(dpk.poisson_batches((x, y), 0.5, max_batch_size=5, seed=0), verbose=0)
    assert model.optimizer.dp_steps == 0
    # A loss callable that averages over the batch cannot give per-example gradients.
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0),
        loss=lambda t, p: tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(t, p, from_logits=True)),
    )
    with pytest.raises(ValueError, match="one value per example"):
        model.fit(x, y, batch_size=10, verbose=0)
    # Unreachable privacy target.
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, target_epsilon=1e-6, target_delta=1e-9), loss=LOSS
    )
    with pytest.raises(ValueError, match="unreachable"):
        model.fit(x, y, batch_size=50, epochs=1000, verbose=0)
    # δ ≥ 1/n is no privacy worth the name.
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, target_epsilon=5.0, target_delta=0.05), loss=LOSS
    )
    with pytest.warns(UserWarning, match="1/n"):
        model.fit(x, y, batch_size=10, verbose=0)


def test_plain_keras_model_with_dp_optimizer_is_refused():
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    base.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss=LOSS)
    with pytest.raises(RuntimeError, match="not private"):
        base.fit(np.zeros((8, 4)), np.zeros(8), verbose=0)


def test_evaluate_predict_export_behave_as_the_wrapped_model(tmp_path):
    base, x, y = tiny_bert(batch=4)
    model = dpk.DPModel(base, trainable="bias")
    _compile(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), base.predict(x, verbose=0), rtol=1e-6)
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "accuracy"}
    path = str(tmp_path / "export")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    out = served.serve({**x, "padding_mask": tf.cast(x["padding_mask"], tf.int32)})  # keras-hub's signature.
    np.testing.assert_allclose(out.numpy(), base.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_metrics_ignore_padding_rows():
    base, x, y = tiny_bert(batch=6)
    model = dpk.DPModel(base, trainable="bias")
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.0), 1.0, 1.0),
        loss=LOSS,
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
    )
    mask = tf.constant([1, 1, 1, 0, 0, 0], tf.float32)
    predicted = np.argmax(base.predict(x, verbose=0), axis=-1)
    y = tf.constant(np.where(np.arange(6) < 3, 1 - predicted, predicted), tf.int32)  # Real rows wrong, padding right.
    logs = model.train_step((x, y, mask))
    assert float(logs["accuracy"]) == 0.0
    assert float(logs["weighted_accuracy"]) == 0.0
