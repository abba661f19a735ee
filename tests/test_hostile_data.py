"""One broken example must neither destroy a run nor reveal itself.

Before any step: NaN/inf values and labels the model cannot output raise a `ValueError` that
names the row, and no weight changes. Inside the step: an example whose gradient is not finite
gets weight 0, so the weights stay finite and equal those of a run without it.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import checks

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(sigma=0.0, classes=3):
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(classes)])
    model = dpk.DPModel(base, trainable="bias+head")
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.5), 1.0, sigma), loss=LOSS, metrics=["accuracy"])
    return model


def _data(n=40):
    rng = np.random.RandomState(0)
    return rng.randn(n, 4).astype("float32"), (np.arange(n) % 3).astype("int32")


def _weights(model):
    return [w.numpy().copy() for w in model.model.weights]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_feature_raises_before_any_step(bad):
    model = _model()
    x, y = _data()
    x[17, 2] = bad
    before = _weights(model)
    with pytest.raises(ValueError, match=r"x, row 17, column 2 is (nan|inf|-inf)"):
        model.fit(x, y, batch_size=8, verbose=0)
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)
    assert model.optimizer.dp_steps == 0


def test_non_finite_value_in_a_dict_input_names_the_input():
    inputs = {"a": keras.Input((2,), name="a"), "b": keras.Input((3,), name="b")}
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([inputs["a"], inputs["b"]]))
    model = dpk.DPModel(keras.Model(inputs, out), trainable="bias")
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss=LOSS)
    x = {"a": np.zeros((10, 2), "float32"), "b": np.zeros((10, 3), "float32")}
    x["b"][6, 1] = np.nan
    with pytest.raises(ValueError, match=r"x\['b'\], row 6, column 1 is nan"):
        model.fit(x, np.zeros(10, "int32"), batch_size=4, verbose=0)


@pytest.mark.parametrize("label", [3, -1, 1000])
def test_label_outside_the_classes_raises_with_the_row(label):
    model = _model()
    x, y = _data()
    y[23] = label
    before = _weights(model)
    with pytest.raises(ValueError, match=rf"y, row 23 is the label {label}, outside the model's 3 output"):
        model.fit(x, y, batch_size=8, verbose=0)
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)


def test_one_hot_labels_must_have_the_output_width():
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = dpk.DPModel(base, trainable="bias")
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    x, _ = _data()
    with pytest.raises(ValueError, match="one-hot labels of width 4 but the model has 3"):
        model.fit(x, np.eye(4, dtype="float32")[np.arange(40) % 4], batch_size=8, verbose=0)
    model.fit(
        x, np.eye(3, dtype="float32")[np.arange(40) % 3], batch_size=8, verbose=0, epochs=1
    )  # the right width trains


def test_binary_and_regression_labels():
    checks.check_labels(np.array([0, 1, 1]), 1, keras.losses.BinaryCrossentropy())
    with pytest.raises(ValueError, match="row 2 is the label 2"):
        checks.check_labels(np.array([0, 1, 2]), 1, keras.losses.BinaryCrossentropy())
    checks.check_labels(np.array([0, 7, 42]), 1, keras.losses.MeanSquaredError())  # integer regression targets


def test_poisson_batches_checks_what_it_holds():
    x, y = _data()
    x[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"data\[0\], row 3, column 0 is nan"):
        dpk.poisson_batches((x, y), 0.2, seed=0)
    x, y = _data()
    y[5] = 9
    ds = dpk.poisson_batches((x, y), 0.2, seed=0)
    with pytest.raises(ValueError, match="row 5 is the label 9"):
        _model().fit(ds, verbose=0)


@pytest.mark.parametrize("poison", ["nan_feature", "inf_feature", "label_out_of_range"])
def test_a_row_non_finite_inside_the_step_is_dropped(poison):
    """A dataset the pre-check cannot see (fixed batches, `sampling_rate=`): the poisoned row gets
    weight 0, so with σ = 0 the update is exactly that of the batch with the row weighted 0."""
    x, y = _data(16)
    bad, bad_y = x.copy(), y.copy()
    if poison == "label_out_of_range":
        bad_y[9] = 7  # the compiled cross-entropy returns NaN for it
    else:
        bad[9, 1] = np.nan if poison == "nan_feature" else np.inf
    keep = np.ones(16, "float32")
    weights = {}
    without = np.where(np.arange(16) == 9, 0.0, 1.0).astype("float32")
    for name, features, labels, w in [("poisoned", bad, bad_y, keep), ("without", x, y, without)]:
        keras.utils.set_random_seed(3)
        model = _model(sigma=0.0)
        initial = _weights(model)
        ds = tf.data.Dataset.from_tensor_slices((features, labels, w)).batch(16, drop_remainder=True)
        with pytest.warns(UserWarning, match="Accounting these batches"):
            history = model.fit(ds, sampling_rate=0.5, epochs=3, verbose=0)
        weights[name] = _weights(model)
        assert np.all(np.isfinite(history.history["loss"]))
        assert model.optimizer.dp_steps == 3
    for a, b in zip(weights["poisoned"], weights["without"]):
        assert np.all(np.isfinite(a))
        if poison != "inf_feature":  # an inf input may saturate tanh into a finite, clipped gradient
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not all(np.array_equal(a, b) for a, b in zip(weights["without"], initial))  # it trained
