import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_gradients_close, brute_force_gradients, tiny_bert

from dp_bitfit_keras import gradients, selection
from dp_bitfit_keras.gradients import per_example_gradients

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
BATCH = 4

# (layer factory, per-example input shape): every layer type whose bias DP-BiTFiT trains.
LAYERS = {
    "Dense": (lambda: keras.layers.Dense(5), (6,)),
    "EinsumDense": (lambda: keras.layers.EinsumDense("btd,de->bte", (4, 5), bias_axes="e"), (4, 3)),
    "Conv1D": (lambda: keras.layers.Conv1D(4, 3), (7, 2)),
    "Conv2D": (lambda: keras.layers.Conv2D(4, 3, strides=2), (7, 7, 2)),
    "Conv3D": (lambda: keras.layers.Conv3D(3, 2), (4, 4, 4, 2)),
    "DepthwiseConv1D": (lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2), (7, 3)),
    "DepthwiseConv2D": (lambda: keras.layers.DepthwiseConv2D(3), (6, 6, 3)),
    "SeparableConv1D": (lambda: keras.layers.SeparableConv1D(4, 3), (7, 3)),
    "SeparableConv2D": (lambda: keras.layers.SeparableConv2D(4, 3), (6, 6, 3)),
    "Conv1DTranspose": (lambda: keras.layers.Conv1DTranspose(3, 3, strides=2), (5, 2)),
    "Conv2DTranspose": (lambda: keras.layers.Conv2DTranspose(3, 3, strides=2), (4, 4, 2)),
    "Conv3DTranspose": (lambda: keras.layers.Conv3DTranspose(2, 2), (3, 3, 3, 2)),
    "LayerNormalization": (lambda: keras.layers.LayerNormalization(), (5, 6)),
    "GroupNormalization": (lambda: keras.layers.GroupNormalization(groups=2), (5, 4)),
}


def _model_with(layer_name):
    factory, shape = LAYERS[layer_name]
    inputs = keras.Input(shape)
    # A non-linearity before the layer so its input gradient matters; Flatten + Dense head.
    hidden = factory()(keras.layers.Activation("tanh")(inputs))  # layers[2] is the layer under test
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(keras.layers.Activation("gelu")(hidden)))
    model = keras.Model(inputs, outputs)
    x = tf.random.normal((BATCH, *shape))
    y = tf.constant([0, 1, 2, 1])
    return model, x, y


def _compiled(model, variables, **kwargs):
    return tf.function(
        lambda x, y: per_example_gradients(model, LOSS, x, y, variables, training=False, **kwargs),
        jit_compile=True,
    )


@pytest.mark.parametrize("mode", ["bias", "all"])
@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_exact_for_every_layer_type(layer_name, mode):
    model, x, y = _model_with(layer_name)
    variables = list(selection.select_variables(model, mode).variables)
    if mode == "bias":
        layer = model.layers[2]
        own = layer.beta if isinstance(layer, selection._BETA_LAYERS) else layer.bias
        assert any(v is own for v in variables)
    actual = _compiled(model, variables, on_fallback="ignore")(x, y)
    if mode == "bias":
        # Bias gradients need no weight-gradient op, so nothing may fall back to a while_loop.
        assert gradients.last_pfor_fallbacks() == ()
    assert_gradients_close(actual, brute_force_gradients(model, LOSS, x, y, variables))


def _tiny_bert(dropout=0.0):
    return tiny_bert(dropout=dropout)


@pytest.mark.parametrize("mode", ["bias", "bias+head", "all"])
def test_exact_for_keras_hub_bert_with_padding(mode):
    model, x, y = _tiny_bert()
    variables = list(selection.select_variables(model, mode).variables)
    actual = _compiled(model, variables)(x, y)
    assert gradients.last_pfor_fallbacks() == ()
    assert_gradients_close(actual, brute_force_gradients(model, LOSS, x, y, variables))


@pytest.mark.parametrize("mode", ["bias", "bias+head", "all"])
def test_exact_for_keras_hub_vit(mode):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    model = keras_hub.models.ViTImageClassifier(backbone, num_classes=3, preprocessor=None)
    x = tf.random.normal((BATCH, 8, 8, 3))
    y = tf.constant([0, 1, 2, 1])
    model(x)
    variables = list(selection.select_variables(model, mode).variables)
    actual = _compiled(model, variables, on_fallback="ignore")(x, y)
    if mode != "all":
        assert gradients.last_pfor_fallbacks() == ()
    assert_gradients_close(actual, brute_force_gradients(model, LOSS, x, y, variables))


def test_multi_head_attention_biases_exact():
    inputs = keras.Input((5, 6))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(attended)))
    x, y = tf.random.normal((BATCH, 5, 6)), tf.constant([0, 1, 2, 1])
    sel = selection.select_variables(model, "bias")
    assert {v.path.split("/")[-2] for v in sel.variables} >= {"query", "key", "value", "attention_output"}
    variables = list(sel.variables)
    assert_gradients_close(_compiled(model, variables)(x, y), brute_force_gradients(model, LOSS, x, y, variables))


def test_dropout_uses_a_different_mask_per_example():
    # With loss = sum(Dense(dropout(h))), the per-example gradient of the Dense kernel is exactly
    # the dropped-out input of that example, so it reveals each example's mask.
    rate = 0.5
    inputs = keras.Input((64,))
    dropout = keras.layers.Dropout(rate, seed=7)
    model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")(dropout(inputs)))
    x = tf.ones((BATCH, 64))  # Identical examples: a shared mask would give identical gradients.
    identity_loss = lambda y_true, y_pred: tf.reduce_sum(y_pred, axis=-1)  # noqa: E731
    kernel = model.layers[-1].kernel
    state = dropout.seed_generator.state.numpy()
    f = tf.function(
        lambda x: per_example_gradients(model, identity_loss, x, None, [kernel], training=True),
        jit_compile=True,
    )
    (grads,) = f(x)
    dropped = grads.numpy()[..., 0]
    masks = dropped != 0
    for i in range(BATCH):
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), f"examples {i} and {j} share a mask"
    np.testing.assert_allclose(dropped[masks], 1.0 / (1.0 - rate))
    # And they are exactly the masks a batched forward pass draws from the same seed state
    # (compiled too: XLA's and TF's kernels may pick different RNG algorithms for one seed).
    dropout.seed_generator.state.assign(state)
    batched = tf.function(lambda x: dropout(x, training=True), jit_compile=True)(x)
    np.testing.assert_allclose(dropped, batched.numpy(), rtol=1e-6)


def test_dropout_masks_change_between_steps():
    model, x, y = _tiny_bert(dropout=0.3)
    variables = list(selection.select_variables(model, "bias").variables)
    f = tf.function(lambda x, y: per_example_gradients(model, LOSS, x, y, variables), jit_compile=True)
    first, second = f(x, y), f(x, y)
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(first, second)) > 0


def test_sample_weight_scales_each_example():
    model, x, y = _model_with("Dense")
    variables = list(model.trainable_variables)
    weights = tf.constant([1.0, 0.0, 2.5, 0.5])
    actual = per_example_gradients(model, LOSS, x, y, variables, sample_weight=weights, training=False)
    assert float(tf.reduce_max(tf.abs(actual[0][1]))) == 0.0
    assert_gradients_close(actual, brute_force_gradients(model, LOSS, x, y, variables, sample_weight=weights))


def test_compiles_to_xla_on_cpu():
    model, x, y = _tiny_bert()
    variables = list(selection.select_variables(model, "bias").variables)
    f = _compiled(model, variables)
    hlo = f.experimental_get_compiler_ir(x, y)(stage="hlo")
    assert "HloModule" in hlo
    # Fully vectorized: the compiled step has no loop over the examples.
    assert " while(" not in hlo


def test_scalar_loss_is_a_clear_error():
    model, x, y = _model_with("Dense")
    reduced = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match=r"one value per example \(use a Keras loss with reduction=None"):
        per_example_gradients(model, reduced, x, y)


def test_unbuilt_model_and_empty_variables_are_clear_errors():
    with pytest.raises(ValueError, match="not built"):
        per_example_gradients(keras.Sequential([keras.layers.Dense(2)]), LOSS, tf.ones((2, 3)), tf.zeros((2,)))
    model, x, y = _model_with("Dense")
    for v in model.trainable_variables:
        v.trainable = False
    with pytest.raises(ValueError, match="No variables to differentiate"):
        per_example_gradients(model, LOSS, x, y)
    with pytest.raises(ValueError, match="on_fallback"):
        per_example_gradients(model, LOSS, x, y, on_fallback="loud")


def test_while_loop_fallback_is_reported():
    # Conv2D kernels' per-example gradients have no vectorized converter in TF (special-cased log).
    model, x, y = _model_with("Conv2D")
    variables = list(model.trainable_variables)
    with pytest.warns(gradients.PforFallbackWarning, match="Conv2DBackpropFilter"):
        _compiled(model, variables)(x, y)
    with pytest.raises(gradients.PforFallbackError, match="Conv2DBackpropFilter"):
        per_example_gradients(model, LOSS, x, y, variables, on_fallback="error")


def test_generic_while_loop_fallback_is_reported():
    # A stateless random op whose seed depends on the example: pfor's generic (DEBUG-logged) path.
    class NoisyByInput(keras.layers.Layer):
        def call(self, x):
            seed = tf.cast(tf.stack([x[0, 0] * 0, x[0, 0] * 0]), tf.int32)
            return x + tf.random.stateless_uniform(tf.shape(x), seed=seed)

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(NoisyByInput()(inputs)))
    x, y = tf.random.normal((BATCH, 6)), tf.constant([0, 1, 2, 1])
    with pytest.raises(gradients.PforFallbackError, match="StatelessRandomUniform"):
        per_example_gradients(model, LOSS, x, y, on_fallback="error")


def test_eager_call_compiles_itself_and_is_exact():
    # Eager (non-XLA) pfor over attention aborted the process in oneDNN: the call must go via XLA.
    model, x, y = _tiny_bert(dropout=0.1)
    variables = list(selection.select_variables(model, "bias+head").variables)
    actual = per_example_gradients(model, LOSS, x, y, variables, training=False)
    assert_gradients_close(actual, brute_force_gradients(model, LOSS, x, y, variables))
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in per_example_gradients(model, LOSS, x, y, variables))


def test_variables_passed_as_function_arguments_are_a_clear_error():
    model, x, y = _model_with("Dense")
    f = tf.function(lambda x, y, v: per_example_gradients(model, LOSS, x, y, v), jit_compile=True)
    with pytest.raises(ValueError, match="None of the given variables affects the loss"):
        f(x, y, list(model.trainable_variables))
