"""Book-keeping (ghost norms + clipped sums from layer inputs and output gradients) is exact:
the same per-example norms and clipped sums as per-example gradients from vectorized_map."""

import warnings

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_gradients_close, tiny_bert

import dp_bitfit_keras as dpk
from dp_bitfit_keras import bookkeeping, gradients, selection

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
BATCH = 4


def _optimizer(variables, clip=1.0, **kwargs):
    opt = dpk.DPOptimizer(keras.optimizers.SGD(0.1), clip, 0.0, seed=1, **kwargs)
    opt.build(variables)
    return opt


def _both(model, x, y, variables, sample_weight=None, clip=1.0, training=False, **kwargs):
    """(book-keeping sums, norms), (vectorized sums, norms) for the same batch, XLA-compiled."""
    opt = _optimizer(variables, clip, **kwargs)
    mask = dpk.model.example_mask(sample_weight)

    @tf.function(jit_compile=True, autograph=False)
    def ghost(x, y, sample_weight):
        summed, _, _, _ = bookkeeping.clipped_sums(
            model, LOSS, x, y, variables, sample_weight, opt, mask=mask, training=training, on_fallback="ignore"
        )
        return summed

    @tf.function(jit_compile=True, autograph=False)
    def vectorized(x, y, sample_weight):
        grads, _, _ = gradients.per_example_outputs(
            model, LOSS, x, y, variables, sample_weight, training=training, on_fallback="ignore"
        )
        summed, _, norms = opt.clipped_sum(grads, variables, mask)
        return summed, norms

    expected, norms = vectorized(x, y, sample_weight)
    actual = ghost(x, y, sample_weight)
    _, rest = bookkeeping.covered_variables(model, variables)
    if not rest:  # what is covered statically is computed by book-keeping in the step too
        assert bookkeeping.last_fallbacks() == ()
    return actual, expected, norms


# (layer factory, per-example input shape): the layers book-keeping covers.
LAYERS = {
    "Dense": (lambda: keras.layers.Dense(5), (6,)),
    "Dense_tokens": (lambda: keras.layers.Dense(5), (4, 3)),  # T=4 ≤ d·e: ghost norm
    "Dense_long": (lambda: keras.layers.Dense(2), (9, 1)),  # T²=81 > d·e=2: direct per-example
    "EinsumDense": (lambda: keras.layers.EinsumDense("btd,de->bte", (4, 5), bias_axes="e"), (4, 3)),
    "EinsumDense_heads": (lambda: keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de"), (4, 6)),
    "EinsumDense_out": (lambda: keras.layers.EinsumDense("abcd,cde->abe", (4, 5), bias_axes="e"), (4, 2, 3)),
    "EinsumDense_ellipsis": (lambda: keras.layers.EinsumDense("...b,bc->...c", 5, bias_axes="c"), (3, 4)),
    "LayerNormalization": (lambda: keras.layers.LayerNormalization(), (5, 6)),
    "Conv1D": (lambda: keras.layers.Conv1D(4, 3), (7, 2)),
    "Conv1D_same_dilated": (lambda: keras.layers.Conv1D(3, 2, padding="same", dilation_rate=2), (6, 2)),
    "Conv2D": (lambda: keras.layers.Conv2D(4, 3, strides=2), (7, 7, 2)),
    "Conv2D_same": (lambda: keras.layers.Conv2D(3, (2, 3), padding="same"), (5, 4, 2)),
    "Conv2D_patchify": (lambda: keras.layers.Conv2D(4, 4, strides=4), (8, 8, 3)),  # ViT's patch embedding
}


def _model_with(name):
    factory, shape = LAYERS[name]
    inputs = keras.Input(shape)
    hidden = factory()(keras.layers.Activation("tanh")(inputs))
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(keras.layers.Activation("gelu")(hidden)))
    model = keras.Model(inputs, outputs)
    return model, tf.random.normal((BATCH, *shape)), tf.constant([0, 1, 2, 1])


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # every example clipped / none clipped
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_exact_for_every_covered_layer(name, clip):
    model, x, y = _model_with(name)
    variables = list(model.trainable_variables)
    covered, rest = bookkeeping.covered_variables(model, variables)
    assert rest == []
    actual, expected, _ = _both(model, x, y, variables, clip=clip)
    assert_gradients_close(actual, expected)


def test_embedding_with_a_token_repeated_within_an_example():
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(7, 4)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))
    x = tf.constant([[1, 1, 1, 2, 3, 1], [0, 0, 0, 0, 0, 0], [6, 5, 4, 3, 2, 1], [2, 3, 2, 3, 2, 3]])
    variables = list(model.trainable_variables)
    actual, expected, _ = _both(model, x, tf.constant([0, 1, 2, 1]), variables)
    assert_gradients_close(actual, expected)


@pytest.mark.parametrize("mode,style", [("all", "all_layer"), ("bias+head", "layer_wise")])
def test_exact_for_keras_hub_bert_with_padding(mode, style):
    model, x, y = tiny_bert(batch=6)
    x["token_ids"] = tf.tensor_scatter_nd_update(x["token_ids"], [[0, 1], [0, 2]], [5, 5])  # a repeated token
    variables = list(selection.select_variables(model, mode).variables)
    covered, rest = bookkeeping.covered_variables(model, variables)
    assert rest == [], [v.path for v in rest]
    weights = tf.constant([1.0, 0.5, 0.0, 1.0, 2.0, 0.0])  # padding rows of a Poisson batch: weight 0
    for clip in (1e-2, 1e2):
        actual, expected, _ = _both(model, x, y, variables, weights, clip=clip, clipping_style=style)
        assert_gradients_close(actual, expected)


@pytest.mark.parametrize("clipping", ["abadi", "automatic"])
def test_clipping_rules_and_param_wise_style(clipping):
    model, x, y = tiny_bert()
    variables = list(model.trainable_variables)
    for style in ("all_layer", "param_wise"):
        actual, expected, _ = _both(model, x, y, variables, clip=0.1, clipping=clipping, clipping_style=style)
        assert_gradients_close(actual, expected)


def test_exact_for_keras_hub_vit():
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    model = keras_hub.models.ViTImageClassifier(backbone, num_classes=3, preprocessor=None)
    x, y = tf.random.normal((BATCH, 8, 8, 3)), tf.constant([0, 1, 2, 1])
    model(x)
    variables = list(model.trainable_variables)
    assert bookkeeping.covered_variables(model, variables)[1] == []  # patches, class token, positions too
    for clip in (0.05, 1e3):
        actual, expected, _ = _both(model, x, y, variables, clip=clip)
        assert_gradients_close(actual, expected)


def test_lora_factors_of_dense_and_einsum_dense():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=10,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    _, x, y = tiny_bert()
    model(x)
    backbone.enable_lora(2)
    dense = model.get_layer("logits") if any(layer.name == "logits" for layer in model.layers) else None
    for v in model.trainable_variables:  # LoRA's B starts at 0: move it so A's gradient is not 0
        if "lora_kernel_b" in v.path:
            v.assign(tf.random.normal(v.shape, stddev=0.3))
    sel = selection.select_variables(model, "lora+head")
    assert any("lora_kernel_a" in v.path for v in sel.variables)
    variables = list(sel.variables)
    assert bookkeeping.covered_variables(model, variables)[1] == []
    actual, expected, _ = _both(model, x, y, variables, clip=0.1)
    assert_gradients_close(actual, expected)
    del dense


def test_non_finite_example_is_dropped_not_spread():
    model, x, y = _model_with("Dense_tokens")
    x = tf.tensor_scatter_nd_update(x, [[1, 0, 0]], [np.inf])
    variables = list(model.trainable_variables)
    actual, expected, _ = _both(model, x, y, variables)
    for a in actual:
        assert np.all(np.isfinite(a))
    assert_gradients_close(actual, expected)


def test_unknown_variables_are_reported_once():
    inputs = keras.Input((5, 2))
    hidden = keras.layers.Conv1DTranspose(3, 2)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))
    x, y = tf.random.normal((BATCH, 5, 2)), tf.constant([0, 1, 2, 1])
    variables = list(model.trainable_variables)
    opt = _optimizer(variables)
    bookkeeping._reported.clear()
    fn = tf.function(
        lambda x, y: bookkeeping.clipped_sums(model, LOSS, x, y, variables, None, opt)[0], jit_compile=True
    )
    with pytest.warns(bookkeeping.BookkeepingFallbackWarning, match="conv1d_transpose"):
        fn(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bookkeeping.BookkeepingFallbackWarning)
        tf.function(
            lambda x, y: bookkeeping.clipped_sums(model, LOSS, x, y, variables, None, opt)[0], jit_compile=True
        )(x, y)


_, _BERT_X, _BERT_Y = tiny_bert(batch=8, seq=10)  # one batch of data for every run


def _fit_bert(method, physical, **optimizer_kwargs):
    model, _, _ = tiny_bert(batch=8, seq=10)
    x, y = _BERT_X, _BERT_Y
    for w in model.weights:  # the same initial weights for every method
        w.assign(tf.random.stateless_normal(w.shape, [1, len(w.path)], stddev=0.1) if w.dtype == "float32" else w)
    dp = dpk.DPModel(model, trainable="all")
    dp.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.5), 0.05, 0.0, seed=3, **optimizer_kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        physical_batch_size=physical,
        gradient_method=method,
    )
    x = {k: np.repeat(np.asarray(v), 4, axis=0) for k, v in x.items()}
    dp.fit(x, np.repeat(np.asarray(y), 4), batch_size=8, epochs=1, verbose=0)
    assert dp.uses_bookkeeping() == (method == "bookkeeping")
    return [w.numpy() for w in model.weights], dp.optimizer.dp_steps


@pytest.mark.parametrize(
    "physical,kwargs",
    [
        (None, {}),
        (4, {"gradient_accumulation_steps": 2}),
        (None, {"target_unclipped_quantile": 0.5, "clipped_count_stddev": 1.0}),
    ],
)
def test_fit_gives_the_vectorized_update(physical, kwargs):
    """σ = 0, the same Poisson batches: book-keeping and vectorized_map end at the same weights,
    with chunked padded batches, gradient accumulation and adaptive clipping."""
    expected, steps = _fit_bert("vectorized", physical, **kwargs)
    actual, steps_b = _fit_bert("bookkeeping", physical, **kwargs)
    assert steps == steps_b > 0
    assert_gradients_close(actual, expected)


def test_auto_uses_bookkeeping_beyond_biases_and_for_covered_biases():
    # keras-hub BERT: every bias is a Dense/EinsumDense/LayerNormalization one (covered).
    for trainable, expected in (("bias", True), ("all", True), ("bias+head", True)):
        model, _, _ = tiny_bert()
        dp = dpk.DPModel(model, trainable=trainable)
        dp.compile(
            optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss="sparse_categorical_crossentropy"
        )
        assert dp.uses_bookkeeping() == expected
    with pytest.raises(ValueError, match="gradient_method"):
        dp.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss="mse", gradient_method="ghost")
    # A bias book-keeping does not cover (GroupNormalization's beta): vectorized, no warning.
    inputs = keras.Input((4, 4, 2))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.GroupNormalization(2)(inputs)))
    dp = dpk.DPModel(keras.Model(inputs, outputs), trainable="bias")
    dp.compile(optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0), loss="mse")
    assert not dp.uses_bookkeeping()


def test_dp_lora_trains_only_the_factors_and_head_and_exports_the_adapted_model(tmp_path):
    base, x, y = tiny_bert(batch=8)
    layers = dpk.enable_lora(base, rank=2)
    assert {layer.name for layer in layers} == {"query", "value"} or len(layers) == 4
    before = {v.path: v.numpy() for v in base.weights}
    model = dpk.DPModel(base, trainable="lora+head")
    paths = {v.path for v in model.selection.variables}
    assert all("lora_kernel" in p or p.startswith("logits/") for p in paths)
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.Adam(0.05), 1.0, 0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert model.uses_bookkeeping()
    x8 = {k: np.repeat(np.asarray(v), 4, axis=0) for k, v in x.items()}
    model.fit(x8, np.repeat(np.asarray(y), 4), batch_size=8, epochs=1, verbose=0)
    assert bookkeeping.last_fallbacks() == ()
    changed = {v.path for v in base.weights if not np.array_equal(v.numpy(), before[v.path])}
    assert changed and changed <= paths | {p for p in before if "lora" in p}
    assert any("lora_kernel_b" in p for p in changed)  # B starts at 0: the adapter really moved
    path = str(tmp_path / "export")
    model.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)  # keep a reference: its variables live as long as it does
    served = loaded.serve({**x, "padding_mask": tf.cast(x["padding_mask"], tf.int32)})
    np.testing.assert_allclose(served.numpy(), base.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_lora_without_enable_lora_is_a_clear_error():
    base, _, _ = tiny_bert()
    with pytest.raises(ValueError, match="enable_lora"):
        dpk.DPModel(base, trainable="lora")


class _DoubledDense(keras.layers.Dense):
    """A subclass with its own forward maths: book-keeping must not assume Dense's."""

    def call(self, inputs):
        return super().call(inputs) * 2.0


def test_a_subclass_with_its_own_call_falls_back_and_stays_exact():
    inputs = keras.Input((4, 3))
    hidden = _DoubledDense(5, name="doubled")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))
    variables = list(model.trainable_variables)
    assert [v.path for v in bookkeeping.covered_variables(model, variables)[1]] == ["doubled/kernel", "doubled/bias"]
    actual, expected, _ = _both(model, tf.random.normal((BATCH, 4, 3)), tf.constant([0, 1, 2, 1]), variables, clip=0.1)
    assert_gradients_close(actual, expected)
