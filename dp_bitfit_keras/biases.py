"""Bias terms for models that have none (Gemma, Llama, Mistral, Qwen3), so DP-BiTFiT reaches them.

Most decoder language models drop the bias of every projection. `add_biases` gives each
`Dense` / `EinsumDense` without one a zero-initialised bias over its output feature axes: the
model computes exactly what it computed before, and `DPModel(model, trainable="bias")` then has
something to train. The new biases are ordinary layer variables: `use_bias` / `bias_axes` in the
layer's config say they exist, so `.keras` saving and loading, `model.export` and Keras LoRA on
the same layers work as for a layer built with a bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import keras

from dp_bitfit_keras.selection import layers_of


def _einsum_bias(layer) -> tuple[str, list[int]] | None:
    """(bias_axes, bias shape) of an EinsumDense over its output feature axes, as Keras builds it."""
    equation = layer.equation.replace(" ", "")
    lhs, output = equation.split("->")
    kernel = lhs.split(",")[1].replace("...", "")
    axes = "".join(c for c in output if c in kernel and c != ".")
    if not axes:
        return None
    first = min(output.index(c) for c in axes)
    tail = output[first:]
    if "." in tail:  # an ellipsis between the feature axes: sizes unknown here
        return None
    shape = [int(layer._kernel.shape[kernel.index(c)]) if c in axes else 1 for c in tail]
    return axes, shape


def lacks_bias(layer) -> bool:
    """Whether `layer` is a built, unquantized Dense / EinsumDense without a bias."""
    return (
        isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
        and layer.built
        and getattr(layer, "bias", None) is None
        and getattr(layer, "quantization_mode", None) is None
    )


def was_added(layer) -> bool:
    """Whether `layer`'s bias came from `add_biases`."""
    return bool(getattr(layer, "dp_bitfit_keras_added_bias", False))


def _chosen(layer, layers) -> bool:
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(layer))
    return any(layer is item or layer.name == item for item in layers)


def add_biases(model: keras.Layer, layers: Iterable | Callable | None = None) -> list:
    """Adds zero-initialised biases to the Dense / EinsumDense projections that have none.

    An `EinsumDense` gets its bias over its output feature axes (the kernel's axes that appear in
    the output), as `bias_axes` would have built it. The model's outputs are unchanged.

    Args:
        model: a built Keras model (keras-hub backbones and task models included).
        layers: which layers: None (every Dense / EinsumDense without a bias), an iterable of
            layers or layer names, or a callable `layer -> bool`.

    Returns:
        The new bias variables, in layer order.

    Raises:
        ValueError: the model is not built, or nothing was chosen that lacks a bias.

    Example:
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, use_bias=False),
        ...                          keras.layers.Dense(2, use_bias=False)])
        >>> [tuple(v.shape) for v in add_biases(base)]
        [(8,), (2,)]
        >>> str(dpk.DPModel(base, trainable="bias").selection)
        '10 of 58 parameters trainable (17.241%) in 2 variables'
    """
    if not model.built:
        raise ValueError(f"Model '{model.name}' is not built: call it on a batch (or give it an Input) first.")
    added, skipped = [], []
    for layer in layers_of(model):
        if not (lacks_bias(layer) and _chosen(layer, layers)):
            continue
        if isinstance(layer, keras.layers.Dense):
            shape, axes = [layer.units], None
        else:
            found = _einsum_bias(layer)
            if found is None:
                skipped.append(layer.name)
                continue
            axes, shape = found
        # A built layer refuses new state; Keras' own enable_lora unlocks it the same way.
        layer._tracker.unlock()
        try:
            bias = layer.add_weight(name="bias", shape=shape, initializer="zeros", dtype=layer.variable_dtype)
        finally:
            layer._tracker.lock()
        layer.bias = bias
        layer.dp_bitfit_keras_added_bias = True  # DPModel's config records it (keras-hub rebuilds layers)
        if axes is None:
            layer.use_bias = True
        else:
            layer.bias_axes = axes
        added.append(bias)
    if not added:
        raise ValueError(
            f"add_biases found no Dense / EinsumDense layer without a bias among the chosen layers of "
            f"model '{model.name}'" + (f" (skipped, unsupported equations: {skipped})" if skipped else "") + "."
        )
    return added
