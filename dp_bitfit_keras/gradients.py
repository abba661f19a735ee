"""Exact per-example gradients with `tf.vectorized_map`.

One function, `per_example_gradients`, differentiates each example's loss separately and stacks
the results: `[batch, *variable.shape]` per variable. `tf.vectorized_map` (pfor) turns the
single-example computation into batched ops, so under XLA the cost is close to one batched
backward pass. For bias variables the backward pass only needs the activations' gradients, never
the weight-gradient outer products, which is what makes DP-BiTFiT cheap.

Two pfor pitfalls are handled here:
- an op pfor cannot vectorize is run in a `while_loop` over the batch, silently serializing the
  step. Every call watches pfor's conversion log and reports such fallbacks (`on_fallback`).
- stateless random ops with the same seed give every example the same dropout mask. While the
  per-example function is traced, Keras' dropout draws the mask for the whole batch from the
  layer's seed and each example takes its own row, so the masks are exactly those of a batched
  forward pass with that seed, and all of it stays vectorized.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import random as _keras_tf_random

from dp_bitfit_keras import _pfor_converters  # noqa: F401  (registers extra pfor converters)

__all__ = [
    "per_example_gradients",
    "PforFallbackWarning",
    "PforFallbackError",
    "last_pfor_fallbacks",
]

_FALLBACK_PREFIX = "Using a while_loop for converting "  # pfor's generic fallback.
_FALLBACK_SUFFIX = " uses a while_loop. Fix that!"  # pfor's special-cased converters.
_state = threading.local()


class PforFallbackWarning(UserWarning):
    """pfor ran some ops of the per-example computation in a while_loop over the batch."""


class PforFallbackError(RuntimeError):
    """Raised with `on_fallback="error"` when pfor would fall back to a while_loop."""


def last_pfor_fallbacks() -> tuple:
    """Op types that pfor ran in a while_loop during the last `per_example_gradients` trace."""
    return getattr(_state, "last_fallbacks", ())


class _FallbackRecorder(logging.Filter):
    """Collects pfor's fallback messages (logged at DEBUG or WARNING) from the TF logger."""

    def __init__(self, passthrough_level: int):
        super().__init__()
        self.ops: list[str] = []
        self._passthrough_level = passthrough_level

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_FALLBACK_PREFIX):
            self.ops.append(message[len(_FALLBACK_PREFIX) :].split(" cause ")[0])
            return False  # Reported by us, once, with context.
        if message.endswith(_FALLBACK_SUFFIX):
            self.ops.append(message[: -len(_FALLBACK_SUFFIX)])
            return False
        return record.levelno >= self._passthrough_level


@contextlib.contextmanager
def _record_pfor_fallbacks():
    logger = tf.get_logger()
    old_level = logger.level
    recorder = _FallbackRecorder(logger.getEffectiveLevel())
    logger.addFilter(recorder)
    logger.setLevel(logging.DEBUG)  # pfor logs most fallbacks at DEBUG only.
    try:
        yield recorder.ops
    finally:
        logger.setLevel(old_level)
        logger.removeFilter(recorder)


def _per_example_dropout(inputs, rate, noise_shape=None, seed=None):
    """Keras' dropout, drawn for the whole batch and indexed by the current example."""
    context = getattr(_state, "example", None)
    if context is None:
        return _original_dropout(inputs, rate, noise_shape=noise_shape, seed=seed)
    index, batch_size = context
    if rate == 1.0:
        return tf.zeros_like(inputs)
    if rate == 0.0:
        return inputs
    seed = _keras_tf_random._cast_seed(_keras_tf_random.draw_seed(seed))
    noise_shape = _keras_tf_random._get_concrete_noise_shape(inputs, noise_shape)
    # Inside the per-example function every tensor has a leading batch axis of 1 (one example);
    # draw the uniform noise for all `batch_size` examples (loop-invariant, so pfor draws it once)
    # and keep this example's row (a vectorizable gather).
    batch_noise_shape = tf.concat([[batch_size], noise_shape[1:]], axis=0)
    uniform = tf.random.stateless_uniform(batch_noise_shape, seed=seed, dtype=inputs.dtype)
    keep = tf.gather(uniform, index)[None] >= rate
    scale = tf.cast(1.0 / (1.0 - rate), inputs.dtype)
    return inputs * scale * tf.cast(keep, inputs.dtype)


_original_dropout = _keras_tf_random.dropout


@contextlib.contextmanager
def _example_scope(index, batch_size):
    previous = getattr(_state, "example", None)
    _state.example = (index, batch_size)
    _keras_tf_random.dropout = _per_example_dropout
    try:
        yield
    finally:
        _state.example = previous
        if previous is None:
            _keras_tf_random.dropout = _original_dropout


def _batch_size(x):
    first = tf.nest.flatten(x)[0]
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


@tf.autograph.experimental.do_not_convert
def per_example_gradients(
    model: keras.Layer,
    loss_fn: Callable,
    x,
    y,
    variables: Sequence | None = None,
    sample_weight=None,
    *,
    training: bool = True,
    on_fallback: str = "warn",
):
    """Gradients of each example's loss, stacked over the batch.

    Exact: equal (up to float round-off) to a Python loop of single-example `GradientTape`s.
    Meant to be traced inside `tf.function(jit_compile=True)` (the training step); called eagerly
    it compiles itself with XLA first.

    Args:
        model: a built Keras model whose layers treat examples independently (no trainable
            BatchNormalization).
        loss_fn: `loss_fn(y_true, y_pred)` returning one loss per example, shape `[batch]`
            (a Keras loss with `reduction=None`, or any callable). Trailing axes (e.g. per-token
            losses `[batch, seq]`) are averaged into one value per example.
        x: a tensor, or a dict/list of tensors, with a leading batch axis.
        y: labels with a leading batch axis, or None if `loss_fn` ignores them.
        variables: the variables to differentiate; `None` means `model.trainable_variables`.
        sample_weight: optional `[batch]` weights; example i's gradient is that of
            `sample_weight[i] * loss_i` (0 removes an example, e.g. padding).
        training: passed to the model call (dropout on/off).
        on_fallback: what to do if pfor runs ops in a while_loop over the batch (correct but
            serial, hence slow): `"warn"` (a `PforFallbackWarning`), `"error"`
            (`PforFallbackError`) or `"ignore"`. `last_pfor_fallbacks()` lists the op types.

    Returns:
        A list with one tensor per variable, shaped `[batch, *variable.shape]`.

    Raises:
        ValueError: unbuilt model, empty `variables`, or a loss that does not return one value
            per example.

    Example:
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        >>> grads = per_example_gradients(model, loss, tf.ones([4, 3]), tf.zeros([4], tf.int32))
        >>> [tuple(g.shape) for g in grads] == [(4, 3, 2), (4, 2)]
        True
    """
    grads, _, _ = per_example_outputs(
        model, loss_fn, x, y, variables, sample_weight, training=training, on_fallback=on_fallback
    )
    return grads


@tf.autograph.experimental.do_not_convert
def per_example_outputs(
    model, loss_fn, x, y, variables=None, sample_weight=None, *, training=True, on_fallback="warn", loss_scale=None
):
    """`per_example_gradients`, also returning the per-example losses `[batch]` and outputs.

    `loss_scale`: multiply each loss by this before differentiating and divide the gradients
    (in float32) after: loss scaling for float16 models, without a data-dependent skip.
    """
    if on_fallback not in ("warn", "error", "ignore"):
        raise ValueError(f"on_fallback must be 'warn', 'error' or 'ignore'; got {on_fallback!r}.")
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it once on a batch (or give it an Input) "
            "before computing per-example gradients."
        )
    variables = list(model.trainable_variables if variables is None else variables)
    if tf.executing_eagerly():
        # Eager vectorized_map runs a non-XLA graph, which aborted the process inside oneDNN on
        # attention/conv models; the XLA-compiled computation is exact. Compile it here (once
        # per call: inside a training step, trace this function once instead).
        return tf.function(
            lambda x, y, sample_weight: per_example_outputs(
                model,
                loss_fn,
                x,
                y,
                variables,
                sample_weight,
                training=training,
                on_fallback=on_fallback,
                loss_scale=loss_scale,
            ),
            jit_compile=True,
            autograph=False,  # Our errors (PforFallbackError, ValueError) reach the caller as is.
        )(x, y, sample_weight)
    if not variables:
        raise ValueError(
            f"No variables to differentiate: model '{model.name}' has no trainable variables and "
            "`variables` was not given."
        )
    batch_size = _batch_size(x)
    elems = {"index": tf.range(batch_size), "x": x}
    if y is not None:
        elems["y"] = y
    if sample_weight is not None:
        sample_weight = tf.convert_to_tensor(sample_weight)
        per_token = sample_weight.shape.rank is not None and sample_weight.shape.rank >= 2
        elems["sample_weight"] = sample_weight if per_token else tf.reshape(sample_weight, [-1])

    def one_example(example):
        x_i = tf.nest.map_structure(lambda t: t[None], example["x"])
        y_i = None if y is None else tf.nest.map_structure(lambda t: t[None], example["y"])
        with tf.GradientTape() as tape:
            with _example_scope(example["index"], batch_size):
                y_pred = model(x_i, training=training)
            loss = _one_loss(loss_fn(y_i, y_pred))
            weight = example["sample_weight"][None] if "sample_weight" in example else None
            loss, weighted = weighted_example_losses(loss, weight)
            loss, weighted = loss[0], weighted[0]
            if loss_scale is not None:
                weighted = tf.cast(weighted, tf.float32) * loss_scale
        grads = tape.gradient(weighted, variables)
        if loss_scale is not None:
            grads = [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32) / loss_scale for g in grads]
        if all(g is None for g in grads):
            raise ValueError(
                "None of the given variables affects the loss: `variables` must be the model's "
                f"own variables (got {type(variables[0]).__name__} objects). Inside a tf.function, "
                "capture them rather than passing them as arguments, which turns them into copies."
            )
        # A variable off the loss path (e.g. an unused pooler) has a zero gradient. Embedding
        # gradients arrive as IndexedSlices; vectorized_map would densify them anyway (with a
        # warning): a per-example gradient is dense in the variable's shape.
        grads = [tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g) for v, g in zip(variables, grads)]
        return grads, loss, tf.nest.map_structure(lambda t: t[0], y_pred)

    with _record_pfor_fallbacks() as fallbacks:
        grads, losses, y_pred = tf.vectorized_map(one_example, elems, fallback_to_while_loop=True)
    _state.last_fallbacks = tuple(fallbacks)
    if fallbacks and on_fallback != "ignore":
        message = (
            "tf.vectorized_map could not vectorize these ops of the per-example computation and "
            f"runs them in a while_loop over the batch (correct, but serial): {sorted(set(fallbacks))}. "
            "Replace the layers that use them, or pass on_fallback='ignore' to accept the cost."
        )
        if on_fallback == "error":
            raise PforFallbackError(message)
        warnings.warn(message, PforFallbackWarning, stacklevel=2)
    return list(grads), losses, y_pred


def _one_loss(loss):
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank == 0 or (loss.shape.rank is not None and loss.shape[0] != 1):
        raise ValueError(
            "loss must return one value per example (use a Keras loss with reduction=None, "
            f"e.g. keras.losses.SparseCategoricalCrossentropy(reduction=None)); got shape "
            f"{tuple(loss.shape)} for a batch of 1 example."
        )
    return loss


def weighted_example_losses(losses, sample_weight=None):
    """Each example's loss, and the loss its gradient is taken of: `(losses, weighted)`, `[batch]`.

    `losses` is `[batch]` or `[batch, T, ...]` (e.g. per token); without weights an example's loss
    is their mean. `sample_weight` `[batch]`: weighted = w_i · loss_i (0 removes an example).
    `sample_weight` `[batch, T]` (per token): the example's loss is the weighted mean
    Σ_t w_t·ℓ_t / Σ_t w_t (0 for an example without weighted tokens) and is taken as it is: the
    sequence is the privacy unit, clipped once, so its sensitivity stays C whatever the weights.
    """
    losses = tf.convert_to_tensor(losses)
    rows = tf.shape(losses)[0]
    flat = tf.reshape(losses, [rows, -1])
    if sample_weight is not None:
        sample_weight = tf.convert_to_tensor(sample_weight)
        if sample_weight.shape.rank is not None and sample_weight.shape.rank >= 2:
            weights = tf.cast(tf.reshape(sample_weight, [rows, -1]), flat.dtype)
            # A token of weight 0 contributes nothing, even if its loss is not finite.
            terms = tf.where(weights > 0, weights * flat, tf.zeros_like(flat))
            per = tf.math.divide_no_nan(tf.reduce_sum(terms, axis=1), tf.reduce_sum(weights, axis=1))
            return per, per
    per = tf.reduce_mean(flat, axis=1)
    if sample_weight is None:
        return per, per
    return per, per * tf.cast(tf.reshape(sample_weight, [-1]), per.dtype)
