"""Book-keeping's layer rules: one per layer family, each in its float, unquantized form.

A rule says which variables of a layer it covers (`variables`), records each call of the layer in
the forward pass (`recording_call`: the layer's input and the output whose gradient is taken) and
turns one recorded call and its output gradient into, per covered variable, the examples' squared
norms and a weighted-sum function (`terms`). `register_layer_rule` adds one, for a custom layer.
"""

from __future__ import annotations

import importlib
import math
import string

import keras
import tensorflow as tf

from dp_bitfit_keras.privacy import clipping


class Use:
    """One call of a covered layer in the forward pass: what its variables' gradients need.

    `supported=False` marks a call the rule cannot split per example (its variables fall back).
    """

    def __init__(self, rule, layer, inputs, output, supported=True, **info):
        self.rule, self.layer, self.inputs, self.output = rule, layer, inputs, output
        self.supported = supported
        self.info = info


class LayerRule:
    """How book-keeping covers one layer family (Opacus' grad samplers, for clipped sums).

    Subclass it and register an instance with `register_layer_rule`; or register a function of
    per-example gradients with `register_layer_rule(LayerType, fn)`.
    """

    def variables(self, layer) -> dict:
        """{role: variable or None} of `layer` this rule covers; {} if it does not cover `layer`."""
        raise NotImplementedError

    def recording_call(self, layer, original, uses: list):
        """A replacement for `layer.call` that computes the same output and appends a `Use`.

        By default: the layer's own call, recording its first input and its output."""

        def call(inputs, *args, **kwargs):
            out = original(inputs, *args, **kwargs)
            uses.append(Use(self, layer, inputs, out))
            return out

        return call

    def terms(self, use: Use, g, wanted):
        """[(variable, squared norms `[B]`, weighted_sum(weights, keep))] for the variables of
        one use that `wanted(role)` returns (not None); None if this use cannot be covered."""
        raise NotImplementedError


def _einsum_layers():
    return (keras.layers.Dense, keras.layers.EinsumDense)


def _position_embedding_type():
    try:
        from keras_hub.layers import PositionEmbedding
    except Exception:  # keras-hub absent: nothing to cover.
        return ()
    return (PositionEmbedding,)


def _vit_embedding_type():
    try:
        from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding
    except Exception:
        return ()
    return (ViTPatchingAndEmbedding,)


def _plain(layer) -> bool:
    return getattr(layer, "quantization_mode", None) is None


def _own_call(layer, *bases) -> bool:
    """Whether `layer` runs the forward pass of one of `bases` (a subclass may override `call`
    with other maths, which the recorded gradient formulas would not match)."""
    calls = {base.call for base in bases}
    for klass in type(layer).__mro__:
        if "call" in vars(klass):
            return vars(klass)["call"] in calls
    return False


def _embedding_bases():
    bases = [keras.layers.Embedding, keras.layers.ReversibleEmbedding]
    try:
        from keras_hub.layers import ReversibleEmbedding

        bases.append(ReversibleEmbedding)
    except Exception:
        pass
    return bases


def _conv_covered(layer) -> bool:
    """Conv1D/Conv2D (not transposed, depthwise or separable), channels last, one group, no LoRA."""
    return (
        type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D)
        and layer.data_format == "channels_last"
        and layer.groups == 1
        and layer.padding in ("valid", "same")
        and not getattr(layer, "lora_enabled", False)
        and _plain(layer)
    )


def _patches(layer, x):
    """The conv's input as `[B, positions, kernel entries]`: its kernel gradient is `patchesᵀ g`."""
    if layer.rank == 1:
        x = x[:, None]  # [B, 1, W, C]
        sizes, strides, rates = (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)
    else:
        sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
    patches = tf.image.extract_patches(
        x, sizes=[1, *sizes, 1], strides=[1, *strides, 1], rates=[1, *rates, 1], padding=layer.padding.upper()
    )
    return _flatten_positions(patches)


def _flatten_positions(t):
    """`[B, *positions, C]` -> `[B, P, C]`, P static whenever the positions are (the batch size
    may be unknown: under a multi-replica strategy the step is traced per replica)."""
    inner = t.shape[1:-1]
    positions = _size(inner) if all(d is not None for d in inner) else -1
    return tf.reshape(t, [tf.shape(t)[0], positions, t.shape[-1]])


def _normalizes_last_axis(layer, rank):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return len(axis) == 1 and axis[0] in (-1, rank - 1)


_LETTERS = string.ascii_letters


def _dense_equation(rank):
    middle = _LETTERS[26 : 26 + rank - 2]  # upper case: the positions between batch and features
    return f"b{middle}x,xy->b{middle}y"


def _expand_ellipsis(equation, input_rank):
    equation = equation.replace(" ", "")
    if "..." not in equation:
        return equation
    used = set(equation)
    fresh = [c for c in _LETTERS if c not in used]
    lhs, out = equation.split("->")
    ins, ker = lhs.split(",")
    n = input_rank - (len(ins) - 3)
    dots = "".join(fresh[:n])
    return f"{ins.replace('...', dots)},{ker.replace('...', '')}->{out.replace('...', dots)}"


def _parts(equation):
    """(input, kernel, output, T, C, E) index strings of a covered einsum, or None.

    The batch index leads input and output; T: other input indices kept in the output
    (tokens, positions, heads); C: input indices contracted with the kernel; E: kernel indices
    of the output. Any other pattern (an index in all three, a summed-out input index, a
    repeated index) is not covered.
    """
    lhs, out = equation.split("->")
    ins, ker = lhs.split(",")
    if not ins or not out or ins[0] != out[0] or ins[0] in ker:
        return None
    if any(len(set(s)) != len(s) for s in (ins, ker, out)):
        return None
    rest_in, rest_out = ins[1:], out[1:]
    t = "".join(c for c in rest_in if c in rest_out and c not in ker)
    c_ = "".join(c for c in rest_in if c in ker and c not in rest_out)
    e = "".join(c for c in ker if c in rest_out and c not in rest_in)
    if set(rest_in) != set(t) | set(c_) or set(ker) != set(c_) | set(e) or set(rest_out) != set(t) | set(e):
        return None
    return ins, ker, out, t, c_, e


def _size(shape):
    return int(math.prod(int(d) for d in shape))


def _matrix_squared_norms(a, g):
    """‖a_iᵀ g_i‖²_F per example for a `[B, T, d]`, g `[B, T, e]`: ghost or direct, the cheaper."""
    t, d, e = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return tf.reduce_sum(tf.square(a), [1, 2]) * tf.reduce_sum(tf.square(g), [1, 2])
    if t is None or t * t <= d * e:
        gram_a = tf.einsum("btd,bsd->bts", a, a)
        gram_g = tf.einsum("bte,bse->bts", g, g)
        return tf.reduce_sum(gram_a * gram_g, [1, 2])
    direct = tf.einsum("btd,bte->bde", a, g)
    return tf.reduce_sum(tf.square(direct), [1, 2])


def _einsum_terms(equation, x, g):
    """(squared norms `[B]`, weighted-sum function) of the kernel of `x ⊗ g` under `equation`."""
    ins, ker, out, t, c_, e = _parts(equation)
    b = ins[0]
    batch = tf.shape(x)[0]
    t_size = _size([x.shape[1 + ins[1:].index(ch)] for ch in t])
    # Static sizes (the batch may be unknown under a multi-replica strategy).
    c_dims = [x.shape[1 + ins[1:].index(ch)] for ch in c_]
    e_dims = [g.shape[1 + out[1:].index(ch)] for ch in e]
    c_size = _size(c_dims) if None not in c_dims else -1
    e_size = _size(e_dims) if None not in e_dims else -1
    a_mat = tf.reshape(tf.einsum(f"{ins}->{b}{t}{c_}", x), [batch, t_size, c_size])
    g_mat = tf.reshape(tf.einsum(f"{out}->{b}{t}{e}", g), [batch, t_size, e_size])
    squared = _matrix_squared_norms(a_mat, g_mat)

    def weighted_sum(weights, keep):
        return tf.einsum(
            f"{ins},{out}->{ker}", clipping.kept_rows(x, keep), clipping.kept_rows(g, keep) * _expand(weights, g)
        )

    return squared, weighted_sum


def _expand(weights, like):
    return tf.reshape(weights, [-1] + [1] * (len(like.shape) - 1))


def _reduce_to(g, shape):
    """Per-example gradient of a variable of `shape` broadcast against `g` `[B, ...]` (right-aligned)."""
    rank = len(g.shape) - 1
    lead = rank - len(shape)
    if lead > 0:
        g = tf.reduce_sum(g, axis=list(range(1, 1 + lead)))
    ones = [1 + j for j, d in enumerate(shape) if d == 1 and g.shape[1 + j] != 1]
    if ones:
        g = tf.reduce_sum(g, axis=ones, keepdims=True)
    return tf.reshape(g, [-1, *shape])


def direct_terms(per_example):
    squared = clipping.squared_norms([per_example])[0]

    def weighted_sum(weights, keep):
        return tf.tensordot(weights, clipping.kept_rows(per_example, keep), axes=[[0], [0]])

    return squared, weighted_sum


def _lora_terms(layer, equation, x, g, a_var, b_var):
    """Keras LoRA: kernel = W + s·A·B (A: kernel indices but the last, + r; B: r + the last).

    ∇A_i = s·x_iᵀ(g_i Bᵀ) and ∇B_i = s·(x_i A)ᵀ g_i: two einsums of the same form as the
    kernel's, so the same ghost norms and weighted sums.
    """
    ins, ker, out, _, _, e = _parts(equation)
    last = ker[-1]
    if last not in e:
        return None
    r = next(c for c in _LETTERS if c not in equation)
    scale = layer.lora_alpha / layer.lora_rank
    a_ker, r_out = ker[:-1] + r, out.replace(last, r)
    terms = []
    if a_var is not None:
        g_a = scale * tf.einsum(f"{out},{r}{last}->{r_out}", g, tf.cast(layer.lora_kernel_b, tf.float32))
        terms.append((a_var, *_einsum_terms(f"{ins},{a_ker}->{r_out}", x, g_a)))
    if b_var is not None:
        u = scale * tf.einsum(f"{ins},{a_ker}->{r_out}", x, tf.cast(layer.lora_kernel_a, tf.float32))
        b_equation = f"{r_out},{r}{last}->{out}"
        if _parts(b_equation) is None:
            return None
        terms.append((b_var, *_einsum_terms(b_equation, u, g)))
    return terms


class EinsumRule(LayerRule):
    """`Dense` and `EinsumDense` (so every `MultiHeadAttention` projection): kernel, bias and the
    Keras LoRA factors. Kernel: ghost norm or direct, the cheaper; bias: the output gradient."""

    def variables(self, layer):
        if not (isinstance(layer, _einsum_layers()) and _plain(layer) and _own_call(layer, *_einsum_layers())):
            return {}
        out = {"kernel": layer._kernel, "bias": layer.bias}
        if getattr(layer, "lora_enabled", False):
            out["lora_a"], out["lora_b"] = layer.lora_kernel_a, layer.lora_kernel_b
        return out

    def recording_call(self, layer, original, uses):
        def call(inputs, *args, **kwargs):
            if isinstance(layer, keras.layers.Dense):
                z = keras.ops.matmul(inputs, layer.kernel)
                equation = _dense_equation(len(inputs.shape))
            else:
                z = keras.ops.einsum(layer.equation, inputs, layer.kernel)
                equation = _expand_ellipsis(layer.equation, len(inputs.shape))
            if layer.bias is not None:
                z = keras.ops.add(z, layer.bias)
            uses.append(Use(self, layer, inputs, z, equation=equation))
            return layer.activation(z) if layer.activation is not None else z

        return call

    def terms(self, use, g, wanted):
        x = tf.cast(use.inputs, tf.float32)
        equation = use.info["equation"]
        if _parts(equation) is None:
            return None
        terms = []
        if (v := wanted("kernel")) is not None:
            terms.append((v, *_einsum_terms(equation, x, g)))
        if (v := wanted("bias")) is not None:
            terms.append((v, *direct_terms(_reduce_to(g, v.shape))))
        a, b = wanted("lora_a"), wanted("lora_b")
        if a is not None or b is not None:
            lora = _lora_terms(use.layer, equation, x, g, a, b)
            if lora is None:
                return None
            terms.extend(lora)
        return terms


class ConvRule(LayerRule):
    """`Conv1D`/`Conv2D` (channels last, one group, "valid"/"same", no LoRA): the input's patches
    play the role of a Dense layer's input."""

    def variables(self, layer):
        return {"kernel": layer._kernel, "bias": layer.bias} if _conv_covered(layer) else {}

    def recording_call(self, layer, original, uses):
        def call(inputs, *args, **kwargs):
            z = layer.convolution_op(inputs, layer.kernel)
            if layer.use_bias:
                z = keras.ops.add(z, layer.bias)
            uses.append(Use(self, layer, inputs, z))
            return layer.activation(z) if layer.activation is not None else z

        return call

    def terms(self, use, g, wanted):
        terms = []
        if (v := wanted("kernel")) is not None:
            patches = _patches(use.layer, tf.cast(use.inputs, tf.float32))
            g_mat = _flatten_positions(g)
            squared, weighted = _einsum_terms("btk,kf->btf", patches, g_mat)
            terms.append((v, squared, lambda w, keep, f=weighted, shape=v.shape: tf.reshape(f(w, keep), shape)))
        if (v := wanted("bias")) is not None:
            terms.append((v, *direct_terms(_reduce_to(g, v.shape))))
        return terms


class ViTEmbeddingRule(LayerRule):
    """keras-hub ViT's patch embedding: a class token tiled over the batch, plus position
    embeddings looked up with ids `arange(P)` of shape `[1, P]` (no batch axis): both per-example
    gradients are slices of the layer's output gradient. (Its patch conv is a `ConvRule` use.)"""

    def variables(self, layer):
        if not isinstance(layer, _vit_embedding_type()):
            return {}
        return {"class_token": getattr(layer, "class_token", None), "positions": layer.position_embedding._embeddings}

    def inner_layers(self, layer):
        return [layer.position_embedding]

    def terms(self, use, g, wanted):
        terms = []
        if (v := wanted("class_token")) is not None:
            terms.append((v, *direct_terms(tf.reshape(g[:, :1, :], [-1, *v.shape]))))
        if (v := wanted("positions")) is not None:
            terms.append((v, *direct_terms(tf.reshape(g, [-1, *v.shape]))))
        return terms


class EmbeddingRule(LayerRule):
    """`Embedding` and `ReversibleEmbedding`, with exact handling of a token repeated within one
    example. A reverse use (the output projection `h Eᵀ` of keras-hub's GPT-2 and Gemma) is an
    einsum of the hidden states and the logits' gradient; when the same matrix serves both uses
    (tied weights) the example's gradient is the sum of both, and its squared norm adds their
    cross term (`combine`), so no `[batch, vocabulary, hidden]` tensor is ever formed."""

    def variables(self, layer):
        if not (
            isinstance(layer, keras.layers.Embedding)
            and _plain(layer)
            and not getattr(layer, "lora_enabled", False)
            and _own_call(layer, *_embedding_bases())
        ):
            return {}
        out = {"embeddings": layer._embeddings}
        if not getattr(layer, "tie_weights", True) and getattr(layer, "reverse_embeddings", None) is not None:
            out["reverse"] = layer.reverse_embeddings
        return out

    def recording_call(self, layer, original, uses):
        def call(inputs, *args, **kwargs):
            reverse = kwargs.get("reverse", args[0] if args else False)
            if not reverse:
                out = original(inputs, *args, **kwargs)
                uses.append(Use(self, layer, inputs, out, reverse=False))
                return out
            # keras(-hub) ReversibleEmbedding's reverse call, with the logits before any soft cap.
            tied = layer.tie_weights
            kernel = keras.ops.transpose(layer.embeddings) if tied else layer.reverse_embeddings
            if layer.reverse_dtype is not None:
                inputs = keras.ops.cast(inputs, layer.reverse_dtype)
                kernel = keras.ops.cast(kernel, layer.reverse_dtype)
            logits = keras.ops.matmul(inputs, kernel)
            uses.append(Use(self, layer, inputs, logits, reverse=True, tied=tied))
            if layer.logit_soft_cap is not None:
                cap = layer.logit_soft_cap
                logits = keras.ops.multiply(keras.ops.tanh(keras.ops.divide(logits, cap)), cap)
            return logits

        return call

    def terms(self, use, g, wanted):
        if use.info["reverse"]:
            tied = use.info["tied"]
            v = wanted("embeddings" if tied else "reverse")
            if v is None:
                return []
            x = tf.cast(use.inputs, tf.float32)
            middle = _LETTERS[26 : 26 + len(x.shape) - 2]
            kernel = "yx" if tied else "xy"  # tied: E is [vocabulary, hidden]
            return [(v, *_einsum_terms(f"b{middle}x,{kernel}->b{middle}y", x, g))]
        v = wanted("embeddings")
        if v is None:
            return []
        g = _flatten_positions(g)
        ids = tf.reshape(tf.cast(use.inputs, tf.int32), [tf.shape(g)[0], g.shape[1] or -1])
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float32)
        squared = tf.reduce_sum(same * tf.einsum("btd,bsd->bts", g, g), [1, 2])

        def weighted_sum(weights, keep, g=g, ids=ids, rows=v.shape[0]):
            rows_g = tf.reshape(clipping.kept_rows(g, keep) * _expand(weights, g), [-1, g.shape[-1]])
            return tf.math.unsorted_segment_sum(rows_g, tf.reshape(ids, [-1]), rows)

        return [(v, squared, weighted_sum)]

    def combine(self, variable, uses_and_grads, terms):
        """One forward lookup and one tied reverse use of `variable`: (squared norms, weighted sum)
        of the example's whole gradient, ‖∇₁ + ∇₂‖² = ‖∇₁‖² + ‖∇₂‖² + 2⟨∇₁, ∇₂⟩. With ∇₁ the rows
        g₁ₜ at the tokens idₜ and ∇₂ = Σₛ g₂ₛ ⊗ hₛ: ⟨∇₁, ∇₂⟩ = Σₛₜ g₂[s, idₜ] ⟨hₛ, g₁ₜ⟩."""
        kinds = [use.info.get("reverse") for use, _ in uses_and_grads]
        if sorted(kinds) != [False, True] or not all(use.info.get("tied", True) for use, _ in uses_and_grads):
            return None
        forward = kinds.index(False)
        (f_use, f_g), (r_use, r_g) = uses_and_grads[forward], uses_and_grads[1 - forward]
        g1 = _flatten_positions(f_g)
        ids = tf.reshape(tf.cast(f_use.inputs, tf.int32), [tf.shape(g1)[0], g1.shape[1] or -1])
        h = _flatten_positions(tf.cast(r_use.inputs, tf.float32))
        g2 = _flatten_positions(r_g)
        at_tokens = tf.gather(g2, ids, axis=2, batch_dims=1)  # [B, S, T]: g₂[s, idₜ]
        cross = tf.reduce_sum(at_tokens * tf.einsum("bsd,btd->bst", h, g1), [1, 2])
        (sq_f, ws_f), (sq_r, ws_r) = terms[forward], terms[1 - forward]

        def weighted_sum(weights, keep):
            return ws_f(weights, keep) + ws_r(weights, keep)

        return sq_f + sq_r + 2.0 * cross, weighted_sum


class PositionEmbeddingRule(LayerRule):
    """keras-hub `PositionEmbedding` with a static start index: rows start .. start+T."""

    def variables(self, layer):
        return {"embeddings": layer.position_embeddings} if isinstance(layer, _position_embedding_type()) else {}

    def recording_call(self, layer, original, uses):
        def call(inputs, start_index=0, positions=None, **kwargs):
            out = original(inputs, start_index=start_index, positions=positions, **kwargs)
            ok = isinstance(start_index, int) and positions is None
            uses.append(Use(self, layer, inputs, out, supported=ok, start=start_index if ok else 0))
            return out

        return call

    def terms(self, use, g, wanted):
        v = wanted("embeddings")
        length, width = g.shape[-2], g.shape[-1]
        inner = g.shape[1:-2]
        g = tf.reshape(g, [tf.shape(g)[0], _size(inner) if all(d is not None for d in inner) else -1, length, width])
        per_example = tf.reduce_sum(g, axis=1)  # [B, T, D]: the rows start .. start+T
        squared = tf.reduce_sum(tf.square(per_example), [1, 2])

        def weighted_sum(weights, keep, p=per_example, start=use.info["start"], rows=v.shape[0]):
            part = tf.tensordot(weights, clipping.kept_rows(p, keep), axes=[[0], [0]])
            return tf.pad(part, [[start, rows - start - length], [0, 0]])

        return [(v, squared, weighted_sum)]


class LayerNormRule(LayerRule):
    """`LayerNormalization` over the last axis (not its RMS form): gamma from the normalized input
    times the output gradient, beta from the output gradient."""

    def variables(self, layer):
        if (
            isinstance(layer, keras.layers.LayerNormalization)
            and not getattr(layer, "rms_scaling", False)
            and _own_call(layer, keras.layers.LayerNormalization)
        ):
            return {"gamma": getattr(layer, "gamma", None), "beta": getattr(layer, "beta", None)}
        return {}

    def recording_call(self, layer, original, uses):
        def call(inputs, *args, **kwargs):
            if not _normalizes_last_axis(layer, len(inputs.shape)):
                out = original(inputs, *args, **kwargs)
                uses.append(Use(self, layer, inputs, out, supported=False))
                return out
            x = tf.cast(inputs, tf.float32) if inputs.dtype in (tf.float16, tf.bfloat16) else inputs
            mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
            normalized = tf.cast((x - mean) * tf.math.rsqrt(variance + layer.epsilon), inputs.dtype)
            out = normalized
            if getattr(layer, "gamma", None) is not None:
                out = out * tf.cast(layer.gamma, out.dtype)
            if getattr(layer, "beta", None) is not None:
                out = out + tf.cast(layer.beta, out.dtype)
            uses.append(Use(self, layer, normalized, out))
            return keras.ops.cast(out, layer.compute_dtype)

        return call

    def terms(self, use, g, wanted):
        terms = []
        if (v := wanted("gamma")) is not None:
            terms.append((v, *direct_terms(_reduce_to(g * tf.cast(use.inputs, tf.float32), v.shape))))
        if (v := wanted("beta")) is not None:
            terms.append((v, *direct_terms(_reduce_to(g, v.shape))))
        return terms


def _rms_norm_types():
    """keras-hub's RMS normalizations (Gemma's out = n(x)·(1 + scale), Llama's, Mistral's and
    Qwen's out = n(x)·scale, n(x) = x / √(mean(x²) + ε)), by exact type: a subclass may compute
    something else."""
    found = []
    for module, name in (
        ("keras_hub.src.models.gemma.rms_normalization", "RMSNormalization"),
        ("keras_hub.src.models.gemma3.gemma3_layers", "RMSNormalization"),
        ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm"),
        ("keras_hub.src.models.mistral.mistral_layer_norm", "MistralLayerNormalization"),
        ("keras_hub.src.models.qwen.qwen_layernorm", "QwenLayerNorm"),
        ("keras_hub.src.models.qwen3.qwen3_layernorm", "Qwen3LayerNorm"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except Exception:  # keras-hub absent, or a version without this model
            continue
    return tuple(found)


class RMSNormRule(LayerRule):
    """RMS normalization scales: keras-hub's (Gemma, Llama, Mistral, Qwen) and Keras'
    `RMSNormalization` over the last axis. The output is n(x) = x / √(mean(x²) + ε) times an affine
    function of the scale, so an example's scale gradient is Σ_t g_t ⊙ n(x_t), whatever the offset.
    (Keras' deprecated `LayerNormalization(rms_scaling=True)` divides by the centred variance
    instead: not covered, it falls back.)"""

    def variables(self, layer):
        if type(layer) in _rms_norm_types():
            return {"scale": layer.scale}
        rms = getattr(keras.layers, "RMSNormalization", None)
        if rms is not None and type(layer) is rms and getattr(layer, "scale", None) is not None:
            return {"scale": layer.scale}
        return {}

    def recording_call(self, layer, original, uses):
        def call(inputs, *args, **kwargs):
            out = original(inputs, *args, **kwargs)
            if hasattr(layer, "axis") and not _normalizes_last_axis(layer, len(inputs.shape)):
                uses.append(Use(self, layer, inputs, out, supported=False))
                return out
            epsilon = keras.backend.epsilon() if layer.epsilon is None else layer.epsilon
            x = tf.cast(inputs, tf.float32)
            normalized = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + epsilon)
            uses.append(Use(self, layer, normalized, out))
            return out

        return call

    def terms(self, use, g, wanted):
        v = wanted("scale")
        return [(v, *direct_terms(_reduce_to(g * use.inputs, v.shape)))] if v is not None else []


class PerExampleGradientRule(LayerRule):
    """A rule from a function of per-example gradients, for a custom leaf layer: `fn(layer,
    inputs, output_grad)` returns {variable.path: `[B, *variable.shape]`} from the layer's input
    and the gradient of its output (each example's rows of which are its own)."""

    def __init__(self, layer_type, fn):
        self.layer_type, self.fn = layer_type, fn

    def variables(self, layer):
        if not isinstance(layer, self.layer_type):
            return {}
        return {getattr(v, "path", v.name): v for v in layer.weights}

    def terms(self, use, g, wanted):
        grads = self.fn(use.layer, use.inputs, g)
        terms = []
        for role, v in self.variables(use.layer).items():
            if wanted(role) is None:
                continue
            found = grads.get(role)
            if found is None:
                return None  # the function left this variable out: it falls back
            terms.append((v, *direct_terms(tf.reshape(tf.cast(found, tf.float32), [-1, *v.shape]))))
        return terms


BUILTIN_RULES = (
    EinsumRule(),
    ConvRule(),
    ViTEmbeddingRule(),
    EmbeddingRule(),
    PositionEmbeddingRule(),
    LayerNormRule(),
    RMSNormRule(),
)
