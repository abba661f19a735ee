"""DP fine-tuning of keras-hub decoder LMs: bias-free models get biases, norm scales are a group,
per-token weights, and both gradient paths are exact (tied embeddings and RMS norms included)."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_gradients_close

import dp_bitfit_keras as dpk
from dp_bitfit_keras import bookkeeping, gradients

VOCAB, SEQ, BATCH = 48, 8, 3
TOKEN_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
SMALL = dict(vocabulary_size=VOCAB, num_layers=2, hidden_dim=16, intermediate_dim=32)
ARCHS = {
    "gpt2": lambda: keras_hub.models.GPT2CausalLM(
        keras_hub.models.GPT2Backbone(num_heads=2, dropout=0.0, max_sequence_length=SEQ, **SMALL), preprocessor=None
    ),
    "gemma": lambda: keras_hub.models.GemmaCausalLM(
        keras_hub.models.GemmaBackbone(num_query_heads=2, num_key_value_heads=1, head_dim=8, **SMALL),
        preprocessor=None,
    ),
    "llama": lambda: keras_hub.models.LlamaCausalLM(
        keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **SMALL), preprocessor=None
    ),
    "mistral": lambda: keras_hub.models.MistralCausalLM(
        keras_hub.models.MistralBackbone(num_query_heads=2, num_key_value_heads=1, **SMALL), preprocessor=None
    ),
    "qwen": lambda: keras_hub.models.QwenCausalLM(
        keras_hub.models.QwenBackbone(num_query_heads=2, num_key_value_heads=1, **SMALL), preprocessor=None
    ),
}


def tiny_lm(arch, seed=0):
    keras.utils.set_random_seed(seed)
    model = ARCHS[arch]()
    rng = np.random.RandomState(seed)
    lengths = np.array([SEQ, SEQ - 3, 2][:BATCH])
    mask = np.arange(SEQ)[None] < lengths[:, None]
    tokens = rng.randint(1, VOCAB, (BATCH, SEQ)) * mask
    x = {"token_ids": tokens.astype("int32"), "padding_mask": mask}
    y = np.roll(tokens, -1, axis=1).astype("int32")
    # Per-token weights: padding and the last position excluded, one prompt token too.
    weights = (mask & np.roll(mask, -1, axis=1)).astype("float32")
    weights[0, 0] = 0.0
    model(x)
    return model, x, y, weights


def _randomize(model):
    """Move every weight off its initial value (zero biases and LoRA factors give zero gradients)."""
    for i, v in enumerate(model.weights):
        if v.dtype == "float32":
            v.assign(v + tf.random.stateless_normal(v.shape, [7, i], stddev=0.05))


def _reference(model, x, y, w, variables):
    """Single-example tapes of Σ_t w_t·ℓ_t / Σ_t w_t."""
    out = []
    for i in range(BATCH):
        xi = {k: v[i : i + 1] for k, v in x.items()}
        with tf.GradientTape() as tape:
            tokens = TOKEN_LOSS(y[i : i + 1], model(xi, training=True))[0]
            loss = tf.reduce_sum(tokens * w[i]) / max(float(w[i].sum()), 1e-30)
        out.append(tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    return [tf.stack([tf.convert_to_tensor(g[j]) for g in out]) for j in range(len(variables))]


def _clipped_sums(model, x, y, w, variables, clip, method):
    opt = dpk.DPOptimizer(keras.optimizers.SGD(0.1), clip, 0.0, seed=1)
    opt.build(variables)
    x, y, w = (tf.nest.map_structure(tf.convert_to_tensor, t) for t in (x, y, w))

    @tf.function(jit_compile=True, autograph=False)
    def run(x, y, w):
        if method == "bookkeeping":
            return bookkeeping.clipped_sums(model, TOKEN_LOSS, x, y, variables, w, opt, on_fallback="ignore")[0]
        grads, _, _ = gradients.per_example_outputs(model, TOKEN_LOSS, x, y, variables, w)
        return opt.clipped_sum(grads, variables)[0]

    return [s.numpy() for s in run(x, y, w)]


def _needs_biases(arch):
    return arch in ("gemma", "llama", "mistral")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bias_free_models_get_biases_and_compute_the_same(arch):
    model, x, y, _ = tiny_lm(arch)
    norms = dpk.select_variables(model, "norm").variables
    assert norms and all(v.name in ("scale", "gamma") for v in norms)
    before = model(x).numpy()
    if _needs_biases(arch):
        with pytest.raises(ValueError, match="add_biases"):
            dpk.DPModel(model, trainable="bias")
    added = dpk.add_biases(model) if arch != "gpt2" else []
    assert (len(added) > 0) == (arch != "gpt2")
    np.testing.assert_allclose(model(x).numpy(), before, atol=1e-6)
    selection = dpk.DPModel(model, trainable="bias").selection
    assert {id(v) for v in added} <= {id(v) for v in selection.variables}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_weight_is_exact_on_both_paths_with_per_token_weights(arch):
    model, x, y, w = tiny_lm(arch)
    if arch != "gpt2":
        dpk.add_biases(model)
    _randomize(model)
    variables = list(model.trainable_variables)
    reference = _reference(model, x, y, w, variables)
    grads, _, _ = tf.function(
        lambda x, y, w: gradients.per_example_outputs(model, TOKEN_LOSS, x, y, variables, w), jit_compile=True
    )(x, y, tf.constant(w))
    assert_gradients_close(grads, reference, rtol=2e-4)
    # Clipped sums: no clipping (C large: plain sums) and clipping that bites (C small: norms).
    for clip in (1e6, 1e-3):
        ghost = _clipped_sums(model, x, y, w, variables, clip, "bookkeeping")
        assert bookkeeping.last_fallbacks() == ()  # tied embeddings and RMS norms included
        vectorized = _clipped_sums(model, x, y, w, variables, clip, "vectorized")
        assert_gradients_close([g[None] for g in ghost], [v[None] for v in vectorized], rtol=2e-4)


@pytest.mark.parametrize("arch", ["gemma", "gpt2"])
def test_lora_and_norm_scales_are_exact_by_book_keeping(arch):
    model, x, y, w = tiny_lm(arch, seed=1)
    model.backbone.enable_lora(2)
    _randomize(model)
    # keras-hub's enable_lora freezes every other weight: the norm scales are picked by hand.
    variables = list(dpk.select_variables(model, "lora").variables) + dpk.selection.norm_variables(model)
    assert any("lora" in v.path for v in variables) and any(v.name in ("scale", "gamma") for v in variables)
    expected = [tf.reduce_sum(g, 0).numpy() for g in _reference(model, x, y, w, variables)]
    ghost = _clipped_sums(model, x, y, w, variables, 1e6, "bookkeeping")
    assert bookkeeping.last_fallbacks() == ()
    assert_gradients_close([g[None] for g in ghost], [e[None] for e in expected], rtol=2e-4)


def test_added_biases_survive_saving_export_and_lora(tmp_path):
    import subprocess
    import sys

    model, x, _, _ = tiny_lm("llama")
    added = dpk.add_biases(model)
    for i, v in enumerate(added):  # trained values, not zeros
        v.assign(tf.random.stateless_normal(v.shape, [3, i], stddev=0.1))
    expected = model(x).numpy()
    # keras-hub backbones build their layers from their own config, which knows no biases: save
    # the DPModel, whose config records them (a bare keras-hub model's `.keras` file would not load).
    path = str(tmp_path / "lm.keras")
    dpk.DPModel(model, trainable="all").save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-5)
    assert sum(v.name == "bias" for v in loaded.model.weights) == len(added)
    assert dpk.DPModel(loaded.model, trainable="bias").selection.num_trainable == sum(
        int(np.prod(v.shape)) for v in added
    )

    export_dir = str(tmp_path / "export")
    model.export(export_dir, format="tf_saved_model", verbose=False)
    np.save(tmp_path / "tokens.npy", x["token_ids"])
    np.save(tmp_path / "mask.npy", x["padding_mask"])
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "x = {'token_ids': np.load(sys.argv[2]), 'padding_mask': np.load(sys.argv[3])}\n"
        "np.save(sys.argv[4], m.serve(x).numpy())\n"
    )
    out = str(tmp_path / "served.npy")
    subprocess.run(
        [sys.executable, "-c", code, export_dir, str(tmp_path / "tokens.npy"), str(tmp_path / "mask.npy"), out],
        check=True,
        capture_output=True,
    )
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)

    model.backbone.enable_lora(2)  # Keras LoRA on the same projections keeps the bias
    np.testing.assert_allclose(model(x).numpy(), expected, atol=1e-5)
    lora_path = str(tmp_path / "lora.keras")
    dpk.DPModel(model, trainable="lora").save(lora_path)
    np.testing.assert_allclose(keras.saving.load_model(lora_path)(x).numpy(), expected, atol=1e-5)


def test_add_biases_chooses_layers_and_refuses_when_nothing_lacks_one():
    model, x, _, _ = tiny_lm("gemma")
    first = dpk.add_biases(model, layers=lambda layer: "ffw_gating" in layer.name)
    assert first and all("ffw_gating" in v.path for v in first)
    rest = dpk.add_biases(model)
    assert not {id(v) for v in first} & {id(v) for v in rest}
    with pytest.raises(ValueError, match="no Dense / EinsumDense layer without a bias"):
        dpk.add_biases(model)
    gpt2, _, _, _ = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="without a bias"):
        dpk.add_biases(gpt2)


def test_einsum_biases_have_the_shape_keras_builds():
    from dp_bitfit_keras.biases import _einsum_bias

    for equation, out_shape, axes in [
        ("btd,dnh->btnh", (None, 2, 4), "nh"),
        ("btnh,nhd->btd", (None, 8), "d"),
        ("...b,bc->...c", (5,), "c"),
        ("abc,cde->abde", (4, 2, 3), "de"),
    ]:
        plain = keras.layers.EinsumDense(equation, out_shape)
        built = keras.layers.EinsumDense(equation, out_shape, bias_axes=axes)
        shape = {"btd,dnh->btnh": (1, 6, 8), "btnh,nhd->btd": (1, 6, 2, 4), "...b,bc->...c": (1, 3, 4)}.get(
            equation, (1, 4, 6)
        )
        plain.build(shape)
        built.build(shape)
        assert _einsum_bias(plain) == (axes, list(built.bias.shape))
