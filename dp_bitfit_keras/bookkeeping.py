"""Clipped per-example gradient sums without per-example weight gradients (book-keeping).

A kernel's per-example gradient is a product of the layer's input and the gradient of its
output: for `z_i = a_i W` (a_i `[T, d]`, T tokens/positions of example i), `∇W_i = a_iᵀ g_i`
with `g_i = ∂L/∂z_i`. So one ordinary batched forward and backward pass, keeping each layer's
input `a` and output gradient `g` (the "book"), gives everything DP-SGD needs:

- each example's squared norm, per variable, without forming `[batch, *kernel.shape]`: the
  *ghost norm* ‖a_iᵀ g_i‖² = Σ_{t,s} (a_it·a_is)(g_it·g_is) (`T²`-sized Gram products, Li et al.
  2022) or the direct per-example gradient `[d, e]`, whichever is smaller for that layer
  (mixed ghost clipping, Bu et al. 2022);
- once the clip factors c_i are known, the clipped sum Σ_i c_i ∇W_i = Σ_i a_iᵀ (c_i g_i): one
  matmul of the size of the non-private weight gradient, and no second backward pass
  (book-keeping, Bu et al., ICML 2023).

Layers covered (their float, unquantized forms): `Dense` and `EinsumDense` (so every
`MultiHeadAttention` projection) kernels and biases, their Keras LoRA factors
(`enable_lora`), `Conv1D`/`Conv2D` (channels last, one group, "valid"/"same"; the input's
patches play the role of the input), `Embedding` (incl. keras-hub's `ReversibleEmbedding`, forward use) with
exact handling of a token repeated within one example, keras-hub `PositionEmbedding` and ViT's patch/class-token/position embedding, and
`LayerNormalization`'s gamma and beta. Any other trained variable (transposed/depthwise/separable convolutions, GroupNormalization,
a tied embedding used in reverse, a layer called twice) gets its per-example gradient from
`gradients._per_example` (`vectorized_map`), in a second pass over those variables only;
`on_fallback` warns once, naming them.

The clip factors, the handling of padding rows, of non-finite examples and of clipping styles
are the optimizer's (`DPOptimizer.clipped_sum_of`): both paths produce the same clipped sums,
and the noise, the ledger and the step are shared.

Assumption: a covered layer's variables are read only by that layer's own call (true of every
Keras and keras-hub layer; weight tying through `ReversibleEmbedding(reverse=True)` is
detected and falls back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import string
import threading
import warnings

import keras
import tensorflow as tf

from dp_bitfit_keras import gradients
from dp_bitfit_keras.privacy import clipping

__all__ = ["BookkeepingFallbackWarning", "covered_variables", "clipped_sums", "last_fallbacks"]

_state = threading.local()


def last_fallbacks() -> tuple:
    """Paths of the variables the last traced `clipped_sums` computed with vectorized_map."""
    return getattr(_state, "last_fallbacks", ())


class BookkeepingFallbackWarning(UserWarning):
    """Some trained variables are not covered by book-keeping: vectorized_map computes them."""


@dataclasses.dataclass
class _Use:
    """One call of a covered layer in the forward pass: what its variables' gradients need."""

    kind: str  # "einsum", "embedding", "position", "layernorm"
    layer: object
    inputs: object  # layer input (einsum), token ids (embedding), normalized input (layernorm)
    output: object  # the tensor whose gradient g is taken
    equation: str = ""
    start: int = 0


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


def _layer_variables(layer) -> dict:
    """The variables book-keeping can compute for `layer`, by role (None if not covered)."""
    if isinstance(layer, _einsum_layers()) and _plain(layer) and _own_call(layer, *_einsum_layers()):
        out = {"kernel": layer._kernel, "bias": layer.bias}
        if getattr(layer, "lora_enabled", False):
            out["lora_a"], out["lora_b"] = layer.lora_kernel_a, layer.lora_kernel_b
        return out
    if _conv_covered(layer):
        return {"kernel": layer._kernel, "bias": layer.bias}
    if isinstance(layer, _vit_embedding_type()):
        # keras-hub ViT: patches + a class token tiled over the batch, plus position embeddings
        # looked up with ids arange(P) of shape [1, P] (no batch axis): both per-example
        # gradients are slices of the layer's output gradient.
        return {"class_token": getattr(layer, "class_token", None), "positions": layer.position_embedding._embeddings}
    if (isinstance(layer, keras.layers.Embedding) and _plain(layer) and not getattr(layer, "lora_enabled", False)
            and _own_call(layer, *_embedding_bases())):
        return {"embeddings": layer._embeddings}
    if isinstance(layer, _position_embedding_type()):
        return {"embeddings": layer.position_embeddings}
    if (isinstance(layer, keras.layers.LayerNormalization) and not getattr(layer, "rms_scaling", False)
            and _own_call(layer, keras.layers.LayerNormalization)):
        return {"gamma": getattr(layer, "gamma", None), "beta": getattr(layer, "beta", None)}
    return {}


def _conv_covered(layer) -> bool:
    """Conv1D/Conv2D (not transposed, depthwise or separable), channels last, one group, no LoRA."""
    return (
        type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D)
        and layer.data_format == "channels_last" and layer.groups == 1 and layer.padding in ("valid", "same")
        and not getattr(layer, "lora_enabled", False) and _plain(layer)
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


def covered_variables(model, variables) -> tuple[list, list]:
    """Splits `variables` into (covered by book-keeping, computed by vectorized_map)."""
    owners = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for v in _layer_variables(layer).values():
            if v is not None:
                owners[id(v)] = layer
    covered = [v for v in variables if id(v) in owners]
    return covered, [v for v in variables if id(v) not in owners]


@contextlib.contextmanager
def _recording(model, selected_ids):
    """Patches the covered layers that hold selected variables to record their uses."""
    uses: list[_Use] = []
    patched = []
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    inner = {id(layer.position_embedding) for layer in layers if isinstance(layer, _vit_embedding_type())}
    for layer in layers:
        if id(layer) in inner:
            continue  # recorded by its enclosing layer
        roles = _layer_variables(layer)
        if not any(v is not None and id(v) in selected_ids for v in roles.values()):
            continue
        patched.append((layer, layer.__dict__.get("call")))
        layer.call = _recording_call(layer, uses)
    try:
        yield uses
    finally:
        for layer, own in patched:
            if own is None:
                del layer.call
            else:
                layer.call = own


def _recording_call(layer, uses):
    original = layer.__dict__.get("call") or type(layer).call.__get__(layer)

    if isinstance(layer, _einsum_layers()):
        def call(inputs, *args, **kwargs):
            if isinstance(layer, keras.layers.Dense):
                z = keras.ops.matmul(inputs, layer.kernel)
                equation = _dense_equation(len(inputs.shape))
            else:
                z = keras.ops.einsum(layer.equation, inputs, layer.kernel)
                equation = _expand_ellipsis(layer.equation, len(inputs.shape))
            if layer.bias is not None:
                z = keras.ops.add(z, layer.bias)
            uses.append(_Use("einsum", layer, inputs, z, equation=equation))
            return layer.activation(z) if layer.activation is not None else z
        return call

    if isinstance(layer, _vit_embedding_type()):
        def call(inputs, *args, **kwargs):
            out = original(inputs, *args, **kwargs)
            uses.append(_Use("vit_embedding", layer, inputs, out))
            return out
        return call

    if _conv_covered(layer):
        def call(inputs, *args, **kwargs):
            z = layer.convolution_op(inputs, layer.kernel)
            if layer.use_bias:
                z = keras.ops.add(z, layer.bias)
            uses.append(_Use("conv", layer, inputs, z))
            return layer.activation(z) if layer.activation is not None else z
        return call

    if isinstance(layer, keras.layers.Embedding):
        def call(inputs, *args, **kwargs):
            out = original(inputs, *args, **kwargs)
            reverse = kwargs.get("reverse", args[0] if args else False)
            # reverse=True (a tied output projection) is not covered: recorded as such.
            uses.append(_Use("embedding" if not reverse else "unsupported", layer, inputs, out))
            return out
        return call

    if isinstance(layer, _position_embedding_type()):
        def call(inputs, start_index=0, positions=None, **kwargs):
            out = original(inputs, start_index=start_index, positions=positions, **kwargs)
            ok = isinstance(start_index, int) and positions is None
            uses.append(_Use("position" if ok else "unsupported", layer, inputs, out, start=start_index if ok else 0))
            return out
        return call

    if isinstance(layer, keras.layers.LayerNormalization):
        def call(inputs, *args, **kwargs):
            if not _normalizes_last_axis(layer, len(inputs.shape)):
                out = original(inputs, *args, **kwargs)
                uses.append(_Use("unsupported", layer, inputs, out))
                return out
            x = tf.cast(inputs, tf.float32) if inputs.dtype in (tf.float16, tf.bfloat16) else inputs
            mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
            normalized = tf.cast((x - mean) * tf.math.rsqrt(variance + layer.epsilon), inputs.dtype)
            out = normalized
            if getattr(layer, "gamma", None) is not None:
                out = out * tf.cast(layer.gamma, out.dtype)
            if getattr(layer, "beta", None) is not None:
                out = out + tf.cast(layer.beta, out.dtype)
            uses.append(_Use("layernorm", layer, normalized, out))
            return keras.ops.cast(out, layer.compute_dtype)
        return call
    raise AssertionError(type(layer))


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
        return tf.einsum(f"{ins},{out}->{ker}", clipping.kept_rows(x, keep), clipping.kept_rows(g, keep) * _expand(weights, g))

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


def _direct_terms(per_example):
    squared = clipping.squared_norms([per_example])[0]

    def weighted_sum(weights, keep):
        return tf.tensordot(weights, clipping.kept_rows(per_example, keep), axes=[[0], [0]])

    return squared, weighted_sum


def _terms_of_use(use, g, selected_ids):
    """[(variable, squared norms, weighted-sum function)] for the selected variables of one use."""
    roles = _layer_variables(use.layer)
    terms = []

    def wanted(role):
        v = roles.get(role)
        return v if v is not None and id(v) in selected_ids else None

    if use.kind == "einsum":
        x = tf.cast(use.inputs, tf.float32)
        equation = use.equation
        if _parts(equation) is None:
            return None
        if (v := wanted("kernel")) is not None:
            terms.append((v, *_einsum_terms(equation, x, g)))
        if (v := wanted("bias")) is not None:
            terms.append((v, *_direct_terms(_reduce_to(g, v.shape))))
        a, bvar = wanted("lora_a"), wanted("lora_b")
        if a is not None or bvar is not None:
            lora = _lora_terms(use, equation, x, g, a, bvar)
            if lora is None:
                return None
            terms.extend(lora)
        return terms
    if use.kind == "conv":
        if (v := wanted("kernel")) is not None:
            patches = _patches(use.layer, tf.cast(use.inputs, tf.float32))
            g_mat = _flatten_positions(g)
            squared, weighted = _einsum_terms("btk,kf->btf", patches, g_mat)
            terms.append((v, squared, lambda w, keep, f=weighted, shape=v.shape: tf.reshape(f(w, keep), shape)))
        if (v := wanted("bias")) is not None:
            terms.append((v, *_direct_terms(_reduce_to(g, v.shape))))
        return terms
    if use.kind == "vit_embedding":
        if (v := wanted("class_token")) is not None:
            terms.append((v, *_direct_terms(tf.reshape(g[:, :1, :], [-1, *v.shape]))))
        if (v := wanted("positions")) is not None:
            terms.append((v, *_direct_terms(tf.reshape(g, [-1, *v.shape]))))
        return terms
    if use.kind == "embedding":
        v = wanted("embeddings")
        g = _flatten_positions(g)
        ids = tf.reshape(tf.cast(use.inputs, tf.int32), [tf.shape(g)[0], g.shape[1] or -1])
        same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float32)
        squared = tf.reduce_sum(same * tf.einsum("btd,bsd->bts", g, g), [1, 2])

        def weighted_sum(weights, keep, g=g, ids=ids, rows=v.shape[0]):
            rows_g = tf.reshape(clipping.kept_rows(g, keep) * _expand(weights, g), [-1, g.shape[-1]])
            return tf.math.unsorted_segment_sum(rows_g, tf.reshape(ids, [-1]), rows)

        return [(v, squared, weighted_sum)]
    if use.kind == "position":
        v = wanted("embeddings")
        length, width = g.shape[-2], g.shape[-1]
        inner = g.shape[1:-2]
        g = tf.reshape(g, [tf.shape(g)[0], _size(inner) if all(d is not None for d in inner) else -1, length, width])
        per_example = tf.reduce_sum(g, axis=1)  # [B, T, D]: the rows start .. start+T
        squared = tf.reduce_sum(tf.square(per_example), [1, 2])

        def weighted_sum(weights, keep, p=per_example, start=use.start, rows=v.shape[0]):
            part = tf.tensordot(weights, clipping.kept_rows(p, keep), axes=[[0], [0]])
            return tf.pad(part, [[start, rows - start - length], [0, 0]])

        return [(v, squared, weighted_sum)]
    if use.kind == "layernorm":
        if (v := wanted("gamma")) is not None:
            terms.append((v, *_direct_terms(_reduce_to(g * tf.cast(use.inputs, tf.float32), v.shape))))
        if (v := wanted("beta")) is not None:
            terms.append((v, *_direct_terms(_reduce_to(g, v.shape))))
        return terms
    return None


def _lora_terms(use, equation, x, g, a_var, b_var):
    """Keras LoRA: kernel = W + s·A·B (A: kernel indices but the last, + r; B: r + the last).

    ∇A_i = s·x_iᵀ(g_i Bᵀ) and ∇B_i = s·(x_i A)ᵀ g_i: two einsums of the same form as the
    kernel's, so the same ghost norms and weighted sums.
    """
    ins, ker, out, _, _, e = _parts(equation)
    last = ker[-1]
    if last not in e:
        return None
    r = next(c for c in _LETTERS if c not in equation)
    layer = use.layer
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


def clipped_sums(model, loss_fn, x, y, variables, sample_weight, optimizer, *, mask=None,
                 training=True, loss_scale=None, on_fallback="warn"):
    """The clipped gradient sum of a batch by book-keeping: `(summed, below, losses, y_pred)`.

    `summed` and `below` are what `DPOptimizer.clipped_sum` returns for the per-example
    gradients of `variables` (same clip factors, padding and non-finite handling, clipping
    style), computed from one batched forward/backward pass (plus a `vectorized_map` pass over
    the variables book-keeping does not cover, if any).
    """
    variables = list(variables)
    selected_ids = {id(v) for v in variables}
    with tf.GradientTape() as tape:
        with _recording(model, selected_ids) as uses:
            y_pred = model(x, training=training)
        losses = loss_fn(y, y_pred)
        losses = tf.convert_to_tensor(losses)
        if losses.shape.rank is None or losses.shape.rank == 0:
            raise ValueError(
                "loss must return one value per example (use a Keras loss with reduction=None); "
                f"got shape {tuple(losses.shape)}."
            )
        losses, weighted = gradients.weighted_example_losses(losses, sample_weight)
        total = tf.reduce_sum(tf.cast(weighted, tf.float32))
        if loss_scale is not None:
            total = total * loss_scale
    batch = losses.shape[0]
    outputs = [u.output for u in uses]
    output_grads = tape.gradient(total, outputs) if outputs else []

    # The examples' output gradients are independent: example i's rows of g are ∂(w_i L_i)/∂z_i.
    found: dict = {}
    for use, g in zip(uses, output_grads):
        g = tf.zeros_like(use.output, tf.float32) if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
        if loss_scale is not None:
            g = g / loss_scale
        # A use on a tensor without the batch axis first (keras-hub ViT's position ids `[1, T]`)
        # or with examples merged into rows cannot be split per example: its variables fall back.
        per_example = use.kind != "unsupported" and g.shape.rank and g.shape[0] == batch
        terms = _terms_of_use(use, g, selected_ids) if per_example else None
        if terms is None:  # a use we cannot book-keep: its variables fall back
            for v in _layer_variables(use.layer).values():
                if v is not None and id(v) in selected_ids:
                    found.setdefault(id(v), []).append(None)
            continue
        for v, squared, weighted_sum in terms:
            found.setdefault(id(v), []).append((squared, weighted_sum))
    direct = {i: terms[0] for i, terms in found.items() if len(terms) == 1 and terms[0] is not None}
    rest = [v for v in variables if id(v) not in direct]
    _state.last_fallbacks = tuple(getattr(v, "path", v.name) for v in rest)
    if rest:
        _report_fallback(rest, on_fallback)
        grads, _, _ = gradients.per_example_outputs(
            model, loss_fn, x, y, rest, sample_weight, training=training, on_fallback=on_fallback,
            loss_scale=loss_scale,
        )
        for v, pg in zip(rest, grads):
            direct[id(v)] = _direct_terms(tf.cast(pg, tf.float32))
    squared = [direct[id(v)][0] for v in variables]
    sums = [direct[id(v)][1] for v in variables]
    summed, below, norms = optimizer.clipped_sum_of(squared, sums, variables, mask)
    return summed, below, losses, y_pred


_reported: set = set()


def _report_fallback(rest, on_fallback):
    names = tuple(sorted(getattr(v, "path", v.name) for v in rest))
    if on_fallback == "ignore" or names in _reported:
        return
    _reported.add(names)
    warnings.warn(
        f"Book-keeping does not cover {len(names)} trained variable(s); their per-example gradients "
        f"come from vectorized_map (a second pass over those variables only): {list(names)[:8]}"
        + (" ..." if len(names) > 8 else ""),
        BookkeepingFallbackWarning,
        stacklevel=3,
    )
