"""Which variables a DP fine-tuning run trains: biases (BiTFiT), biases + head, or everything.

BiTFiT trains the additive terms only: the bias of every affine layer (Dense, EinsumDense and
so the projections inside MultiHeadAttention, all convolutions) and the shift `beta` of
LayerNormalization / GroupNormalization. Their per-example gradients need no activations of the
layer's input, which is why DP-BiTFiT costs about what non-private BiTFiT costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras

TrainableSpec = str | Callable[[keras.Variable], bool]

MODES = ("bias", "bias+head", "all", "lora", "lora+head", "norm", "norm+head", "bias+norm", "bias+norm+head")
# The groups a mode joins with "+" (e.g. "bias+norm+head"); "all" stands alone.
GROUPS = ("bias", "norm", "lora", "head")

# Layers whose `bias` attribute is the additive term of an affine map. Subclasses (keras-hub's
# CachedMultiHeadAttention projections, ReversibleEmbedding, ...) are covered by isinstance.
_BIAS_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
# Normalization layers whose `beta` is a per-feature bias. Their statistics are per example.
_BETA_LAYERS = (keras.layers.LayerNormalization, keras.layers.GroupNormalization)
# Normalization layers whose scale is a per-feature multiplier (gamma; keras-hub's RMS norms of
# Gemma, Llama, Mistral, Qwen call it `scale`). As cheap as a bias: one value per feature.
_GAMMA_LAYERS = (keras.layers.LayerNormalization, keras.layers.GroupNormalization)
# Layers that couple the examples of a batch in training mode.
_BATCH_COUPLING_LAYERS = (keras.layers.BatchNormalization,)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The outcome of selecting trainable variables.

    Attributes:
        variables: the selected variables, in the model's variable order.
        num_trainable: scalar parameters in `variables`.
        num_total: scalar parameters in the whole model (trainable or not).
        head: name of the layer treated as the head (`"bias+head"` only), else None.
    """

    variables: tuple
    num_trainable: int
    num_total: int
    head: str | None = None

    @property
    def fraction(self) -> float:
        return self.num_trainable / max(self.num_total, 1)

    def __str__(self) -> str:
        return (
            f"{self.num_trainable:,} of {self.num_total:,} parameters trainable "
            f"({100 * self.fraction:.3f}%) in {len(self.variables)} variables"
        )


def layers_of(model: keras.Layer) -> list:
    return list(model._flatten_layers(include_self=True, recursive=True))


def size_of(variable) -> int:
    n = 1
    for d in variable.shape:
        n *= int(d)
    return n


def bias_variables(model: keras.Layer) -> list:
    """Every bias-like variable of `model`: see the module docstring for the layer types.

    A layer of another type contributes a variable whose name is exactly `"bias"` (the Keras
    convention for custom layers).
    """
    found = []
    for layer in layers_of(model):
        if isinstance(layer, _BETA_LAYERS):
            candidate = getattr(layer, "beta", None)
        elif isinstance(layer, _BIAS_LAYERS):
            candidate = getattr(layer, "bias", None)
        else:
            candidate = next((v for v in layer._trainable_variables if v.name == "bias"), None)
            if candidate is None:
                candidate = next((v for v in layer._non_trainable_variables if v.name == "bias"), None)
        if candidate is not None:
            found.append(candidate)
    return found


def norm_variables(model: keras.Layer) -> list:
    """Every normalization scale of `model`: the `gamma` of LayerNormalization (RMS form too) and
    GroupNormalization, and the `scale` (or `gamma`) of any other layer whose class name says it
    normalizes (keras-hub's RMSNormalization, LlamaLayerNorm, ...). BatchNormalization excluded."""
    out = []
    for layer in layers_of(model):
        if isinstance(layer, _BATCH_COUPLING_LAYERS):
            continue
        if isinstance(layer, _GAMMA_LAYERS):
            candidate = getattr(layer, "gamma", None)
        elif "Norm" in type(layer).__name__:
            candidate = next(
                (
                    v
                    for v in layer._trainable_variables + layer._non_trainable_variables
                    if v.name in ("scale", "gamma")
                ),
                None,
            )
        else:
            continue
        if candidate is not None:
            out.append(candidate)
    return out


def lora_variables(model: keras.Layer) -> list:
    """The LoRA factors Keras adds with `layer.enable_lora(rank)` / keras-hub's
    `backbone.enable_lora(rank)` (`lora_kernel_a/_b`, `lora_embeddings_a/_b`)."""
    found = []
    for layer in layers_of(model):
        if getattr(layer, "lora_enabled", False):
            found += [v for v in layer._trainable_variables if v.name.startswith("lora_")]
    return found


def enable_lora(model: keras.Layer, rank: int = 8) -> list:
    """Turns on Keras' own LoRA (`enable_lora(rank)`) where it usually goes; returns the layers.

    A model holding a keras-hub backbone: `backbone.enable_lora(rank)`, i.e. the attention
    query and value projections, the rest of the backbone frozen. Any other model: every
    `Dense`/`EinsumDense`/convolution with a kernel except the head (the last such layer),
    which `trainable="lora+head"` trains whole. Then select with `trainable="lora"` or
    `"lora+head"`.
    """
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be an int >= 1; got {rank!r}.")
    # A keras-hub backbone: the model itself, its `.backbone`, or a layer inside a wrapper model.
    backbone = next((layer for layer in layers_of(model) if hasattr(layer, "default_lora_layer_names")), None)
    if backbone is not None and hasattr(backbone, "enable_lora"):
        backbone.enable_lora(rank)
        return [layer for layer in layers_of(backbone) if getattr(layer, "lora_enabled", False)]
    head = head_layer(model)
    enabled = []
    for layer in layers_of(model):
        if layer is head or not hasattr(layer, "enable_lora") or isinstance(layer, keras.layers.Embedding):
            continue
        if isinstance(getattr(layer, "kernel", None), keras.Variable) or getattr(layer, "_kernel", None) is not None:
            if layer.trainable and not getattr(layer, "lora_enabled", False):
                layer.enable_lora(rank)
                enabled.append(layer)
    if not enabled:
        raise ValueError(f"Model '{model.name}' has no layer to enable LoRA on (besides its head).")
    return enabled


def head_layer(model: keras.Layer):
    """The last layer (depth-first, in model order) that owns a `kernel`: the classifier head."""
    head = None
    for layer in layers_of(model):
        if isinstance(getattr(layer, "kernel", None), keras.Variable):
            head = layer
    return head


def check_per_example_separable(model: keras.Layer) -> None:
    """Raises if a layer in training mode mixes examples, so per-example gradients are undefined.

    Raises:
        ValueError: naming the first such layer (a trainable BatchNormalization) and the fix.
    """
    for layer in layers_of(model):
        if isinstance(layer, _BATCH_COUPLING_LAYERS) and layer.trainable:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) normalizes with statistics of the "
                "whole batch in training mode, so one example's gradient depends on the other "
                "examples and per-example gradients (hence DP-SGD) are undefined. Freeze it with "
                f"`model.get_layer('{layer.name}').trainable = False` (inference mode, moving "
                "statistics; its gamma/beta then stay fixed) or replace it by "
                "keras.layers.GroupNormalization / LayerNormalization."
            )


def select_variables(model: keras.Layer, trainable: TrainableSpec = "bias") -> Selection:
    """Chooses the variables to train, among those the model currently marks trainable.

    Layers the user froze (`layer.trainable = False`) stay frozen in every mode.

    Args:
        model: a built Keras model.
        trainable: `"bias"` (DP-BiTFiT), `"bias+head"` (biases plus every variable of the head,
            the last layer with a kernel), `"all"` (full fine-tuning), `"lora"` (the LoRA
            factors of the layers where `enable_lora(rank)` was called), `"norm"` (the
            normalization scales), any `+`-joined combination of `bias`, `norm`, `lora` and
            `head` (e.g. `"bias+norm+head"`), or a callable `variable -> bool` applied to each
            currently trainable variable.

    Returns:
        A `Selection`.

    Raises:
        ValueError: unknown mode, unbuilt model, or nothing selected.

    Example:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> str(select_variables(model, "bias"))
        '3 of 15 parameters trainable (20.000%) in 1 variables'
    """
    if not model.built or not model.weights:
        raise ValueError(
            f"Model '{model.name}' has no variables yet: build it first (call it on a batch or "
            "give it an Input) so that its variables can be selected."
        )
    candidates = list(model.trainable_variables)
    head = None
    if callable(trainable):
        chosen = [v for v in candidates if trainable(v)]
    elif trainable == "all":
        chosen = candidates
    elif isinstance(trainable, str) and trainable and set(trainable.split("+")) <= set(GROUPS):
        parts = trainable.split("+")
        wanted = set()
        if "bias" in parts:
            biases = bias_variables(model)
            if not biases:
                raise ValueError(
                    f"trainable={trainable!r}: model '{model.name}' has no bias terms (the projections of "
                    "Gemma, Llama, Mistral and Qwen3 have none). Add zero-initialised ones first with "
                    "`dp_bitfit_keras.add_biases(model)` (the model computes the same), or train the "
                    "normalization scales (trainable='norm') or LoRA factors (`enable_lora`, trainable='lora')."
                )
            wanted |= {id(v) for v in biases}
        if "norm" in parts:
            wanted |= {id(v) for v in norm_variables(model)}
        if "lora" in parts:
            factors = lora_variables(model)
            if not factors:
                raise ValueError(
                    f"trainable={trainable!r}: model '{model.name}' has no LoRA factors. Enable "
                    "LoRA first: `backbone.enable_lora(rank)` (keras-hub) or "
                    "`layer.enable_lora(rank)` on Dense/EinsumDense/Embedding layers."
                )
            wanted |= {id(v) for v in factors}
        if "head" in parts:
            head_layer_ = head_layer(model)
            if head_layer_ is not None:
                head = head_layer_.name
                wanted |= {id(v) for v in head_layer_.variables}
        chosen = [v for v in candidates if id(v) in wanted]
    else:
        raise ValueError(
            f"trainable must be one of {MODES}, another '+'-joined combination of {GROUPS}, or a "
            f"callable(variable) -> bool; got {trainable!r}."
        )
    if not chosen:
        raise ValueError(
            f"trainable={trainable!r} selects no variable of model '{model.name}': it has "
            f"{len(candidates)} trainable variables and none matches (frozen layers are never "
            "selected). Use trainable='all', or a callable that picks the variables to train."
        )
    return Selection(
        variables=tuple(chosen),
        num_trainable=sum(size_of(v) for v in chosen),
        num_total=sum(size_of(v) for v in model.weights),
        head=head,
    )


def apply_selection(model: keras.Layer, selection: Selection) -> None:
    """Marks exactly `selection.variables` trainable (variable-level, layers stay as they are)."""
    chosen = {id(v) for v in selection.variables}
    for v in model.trainable_variables:
        if id(v) not in chosen:
            v.trainable = False


def variable_names(variables: Sequence) -> list:
    return [v.path for v in variables]
