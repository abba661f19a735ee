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
`gradients.per_example_outputs` (`vectorized_map`), in a second pass over those variables only;
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
import threading
import warnings

import tensorflow as tf

from dp_bitfit_keras import gradients
from dp_bitfit_keras.bookkeeping.rules import BUILTIN_RULES, LayerRule, PerExampleGradientRule, Use, direct_terms

__all__ = [
    "BookkeepingFallbackWarning",
    "LayerRule",
    "Use",
    "clipped_sums",
    "covered_variables",
    "last_fallbacks",
    "register_layer_rule",
    "rules_registered",
    "unregister_layer_rule",
]

_state = threading.local()
_USER_RULES: list[LayerRule] = []


def register_layer_rule(rule, per_example_gradients=None) -> LayerRule:
    """Adds a book-keeping rule, tried before the built-in ones (the newest first).

    Either a `LayerRule` instance, or a layer type and a function
    `per_example_gradients(layer, inputs, output_grad) -> {variable.path: [B, *variable.shape]}` that
    computes the per-example gradients of the layer's variables from its input and the gradient
    of its output (a leaf layer whose output rows `[B, ...]` belong to one example each).

    Example:
        >>> class Scale(keras.layers.Layer):
        ...     def build(self, shape):
        ...         self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")
        ...     def call(self, x):
        ...         return x * self.scale
        >>> rule = register_layer_rule(Scale, lambda layer, x, g: {layer.scale.path: x * g})
        >>> model = keras.Sequential([keras.Input((3,)), Scale(), keras.layers.Dense(2)])
        >>> covered, rest = covered_variables(model, model.trainable_variables)
        >>> len(covered), len(rest)
        (3, 0)
        >>> unregister_layer_rule(rule)
    """
    if not isinstance(rule, LayerRule):
        if per_example_gradients is None or not isinstance(rule, type):
            raise ValueError(
                "register_layer_rule takes a LayerRule, or a layer type and a function "
                f"(layer, inputs, output_grad) -> {{variable.path: per-example gradient}}; got {rule!r}."
            )
        rule = PerExampleGradientRule(rule, per_example_gradients)
    elif per_example_gradients is not None:
        raise ValueError("Give a LayerRule alone, or a layer type and a per-example-gradient function.")
    _USER_RULES.insert(0, rule)
    return rule


def unregister_layer_rule(rule: LayerRule) -> None:
    """Removes a rule added by `register_layer_rule`."""
    _USER_RULES.remove(rule)


def rules_registered() -> tuple:
    """The rules in the order they are tried (user rules first)."""
    return (*_USER_RULES, *BUILTIN_RULES)


def _rule_for(layer):
    """(rule, {role: variable}) of the first rule covering `layer`, or (None, {})."""
    for rule in rules_registered():
        roles = rule.variables(layer)
        if roles:
            return rule, roles
    return None, {}


def last_fallbacks() -> tuple:
    """Paths of the variables the last traced `clipped_sums` computed with vectorized_map."""
    return getattr(_state, "last_fallbacks", ())


class BookkeepingFallbackWarning(UserWarning):
    """Some trained variables are not covered by book-keeping: vectorized_map computes them."""


def _layers(model):
    return list(model._flatten_layers(include_self=True, recursive=True))


def covered_variables(model, variables) -> tuple[list, list]:
    """Splits `variables` into (covered by book-keeping, computed by vectorized_map)."""
    owners = {}
    for layer in _layers(model):
        for v in _rule_for(layer)[1].values():
            if v is not None:
                owners[id(v)] = layer
    covered = [v for v in variables if id(v) in owners]
    return covered, [v for v in variables if id(v) not in owners]


@contextlib.contextmanager
def _recording(model, selected_ids):
    """Patches the covered layers that hold selected variables to record their uses."""
    uses: list[Use] = []
    patched = []
    layers = _layers(model)
    inner = set()
    for layer in layers:
        rule, _ = _rule_for(layer)
        inner.update(id(sub) for sub in getattr(rule, "inner_layers", lambda _: [])(layer))
    for layer in layers:
        if id(layer) in inner:
            continue  # recorded by its enclosing layer
        rule, roles = _rule_for(layer)
        if not any(v is not None and id(v) in selected_ids for v in roles.values()):
            continue
        own = layer.__dict__.get("call")
        patched.append((layer, own))
        layer.call = rule.recording_call(layer, own or type(layer).call.__get__(layer), uses)
    try:
        yield uses
    finally:
        for layer, own in patched:
            if own is None:
                del layer.call
            else:
                layer.call = own


def clipped_sums(
    model,
    loss_fn,
    x,
    y,
    variables,
    sample_weight,
    optimizer,
    *,
    mask=None,
    training=True,
    loss_scale=None,
    on_fallback="warn",
):
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
        per_example = use.supported and g.shape.rank and g.shape[0] == batch
        terms = _terms_of_use(use, g, selected_ids) if per_example else None
        if terms is None:  # a use we cannot book-keep: its variables fall back
            for v in use.rule.variables(use.layer).values():
                if v is not None and id(v) in selected_ids:
                    found.setdefault(id(v), []).append(None)
            continue
        for v, squared, weighted_sum in terms:
            found.setdefault(id(v), []).append((squared, weighted_sum, use, g))
    direct = {}
    for v in variables:
        entries = found.get(id(v))
        if not entries or any(e is None for e in entries):
            continue
        if len(entries) == 1:
            direct[id(v)] = entries[0][:2]
            continue
        # A variable several calls use (a tied embedding): its rule may combine the uses exactly.
        combine = getattr(entries[0][2].rule, "combine", None)
        if combine is not None and all(e[2].rule is entries[0][2].rule for e in entries):
            combined = combine(v, [e[2:] for e in entries], [e[:2] for e in entries])
            if combined is not None:
                direct[id(v)] = combined
    rest = [v for v in variables if id(v) not in direct]
    _state.last_fallbacks = tuple(getattr(v, "path", v.name) for v in rest)
    if rest:
        _report_fallback(rest, on_fallback)
        grads, _, _ = gradients.per_example_outputs(
            model,
            loss_fn,
            x,
            y,
            rest,
            sample_weight,
            training=training,
            on_fallback=on_fallback,
            loss_scale=loss_scale,
        )
        for v, pg in zip(rest, grads):
            direct[id(v)] = direct_terms(tf.cast(pg, tf.float32))
    squared = [direct[id(v)][0] for v in variables]
    sums = [direct[id(v)][1] for v in variables]
    summed, below, norms = optimizer.clipped_sum_of(squared, sums, variables, mask)
    return summed, below, losses, y_pred


def _terms_of_use(use, g, selected_ids):
    roles = use.rule.variables(use.layer)

    def wanted(role):
        v = roles.get(role)
        return v if v is not None and id(v) in selected_ids else None

    return use.rule.terms(use, g, wanted)


_reported: set = set()


def _report_fallback(rest, on_fallback):
    names = tuple(sorted(getattr(v, "path", v.name) for v in rest))
    if on_fallback == "ignore" or names in _reported:
        return
    _reported.add(names)
    warnings.warn(
        f"Book-keeping does not cover {len(names)} trained variable(s); their per-example gradients "
        f"come from vectorized_map (a second pass over those variables only): {list(names)[:8]}"
        + (" ..." if len(names) > 8 else "")
        + ". For a custom layer, add a rule: dp_bitfit_keras.bookkeeping.register_layer_rule(LayerType, "
        "per_example_gradients).",
        BookkeepingFallbackWarning,
        stacklevel=3,
    )
