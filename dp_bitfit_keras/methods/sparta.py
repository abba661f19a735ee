"""SPARTA: DP sparse fine-tuning (Makni et al., KDD 2025, arXiv 2503.12822) on the package's engine.

Phase 1 (selection, `selection_epochs`, private; the model does not move). Every step releases
the Gaussian sum over the Poisson batch of each example's clipped *absolute* gradient of the
candidate kernels,

    u_i = |g_i| / max(1, ‖g_i‖ / C),      ũ = Σ_i u_i + N(0, σ²C² I),

(‖u_i‖ ≤ C: the same sensitivity, query, noise key and ledger as a DP-SGD step). The noisy
sums are averaged over the selection steps and pooled per row group: ṽ_j = Σ_{entries e of row
j} ũ_e. A row is the paper's row of a weight matrix (PyTorch `weight[out, in]`): all weights into
one output unit. In a Keras kernel `[..., in, out]` that is a slice along the last axis; for
`EinsumDense` (attention projections) the kernel axes its equation carries to the output. The
rows of all candidate kernels are ranked together (one global Top-k of ṽ, as in the paper's
equations) and k is the smallest number of top rows whose entries reach `density` of all
candidate entries (the last row may take it past by less than one row). The candidates are
the non-embedding kernels except the task head's (the last layer with a kernel), which phase 2
trains whole (`train_head=True`): a fine-tuning head is new for the task, and in a global Top-k
of summed scores its rows lose to wider ones (on the digits task: 2 of its 5 rows kept).

Phase 2 (training, `epochs`): DP-SGD on the kept rows only. The per-example gradients of the
kernels that hold kept rows are masked *before* clipping, so the clip and the noise cover just
those entries, and the update is masked after the noise. The paper clips the whole gradient
and masks after the noise; masking first is as private (the mask is a function of phase 1's
releases: post-processing; each masked per-example gradient has norm ≤ C after clipping, so
the sum's sensitivity is C) and spends the clip on the trained entries only.

Both phases use one σ, one sampling rate, one Poisson stream and one ledger: ε is accounted
over all steps (selection steps are Gaussian releases of a sensitivity-C sum, like DP-SGD
steps).

`variant="signed"` keeps this package's earlier SPARTA-style selection (row scores from the
mean magnitude of the noisy *signed* gradient sums, rows = one input feature's fan-out), for
comparison only: examples that push a weight in opposite directions cancel there.
"""

from __future__ import annotations

import dataclasses
import string

import keras
import numpy as np
import tensorflow as tf

from dp_bitfit_keras.methods._run import PrivateRun
from dp_bitfit_keras.model import DPModel
from dp_bitfit_keras.optimizer import DPOptimizer
from dp_bitfit_keras.selection import bias_variables, head_layer

VARIANTS = ("published", "signed")


class NoisySumAccumulator(keras.optimizers.Optimizer):
    """An 'optimizer' that accumulates the gradients it gets (here: noisy clipped sums / B)
    instead of applying them; `sums[i]` pairs with the i-th variable it was built with."""

    def __init__(self, name="noisy_sum_accumulator", **kwargs):
        super().__init__(learning_rate=0.0, name=name, **kwargs)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.sums = [self.add_variable_from_reference(v, "noisy_sum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        self.sums[self._get_variable_index(variable)].assign_add(tf.cast(gradient, tf.float32))

    def sum_for(self, variable):
        """The accumulated sum of `variable`'s gradients."""
        return self.sums[self._get_variable_index(variable)]


@keras.saving.register_keras_serializable(package="dp_bitfit_keras")
class SparseDPOptimizer(DPOptimizer):
    """`DPOptimizer` with SPARTA's hooks on the shared clip-and-noise step.

    `gradient_masks`: one 0/1 tensor (or None) per trained variable; only the 1 entries are
    trained: each example's gradient is masked before clipping, so the clip (hence the
    sensitivity C) is over those entries alone, and the noise is masked after (post-processing).
    `absolute_gradients`: the selection statistic, each example's gradient replaced by its
    entrywise absolute value before clipping. ‖|g|‖ = ‖g‖, so the clip factor, and with it the
    sensitivity C of the sum, are those of the signed gradient. Neither is saved in the config.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gradient_masks = None
        self.absolute_gradients = False

    @property
    def needs_per_example_gradients(self) -> bool:
        return self.gradient_masks is not None or self.absolute_gradients

    def transform_per_example_gradients(self, per_example_grads):
        if self.gradient_masks is not None:
            per_example_grads = [
                g if m is None else g * tf.cast(m, g.dtype)[None]
                for g, m in zip(per_example_grads, self.gradient_masks)
            ]
        if self.absolute_gradients:
            per_example_grads = [tf.abs(g) for g in per_example_grads]
        return per_example_grads

    def transform_noised_sum(self, noised):
        if self.gradient_masks is None:
            return noised
        return [g if m is None else g * tf.cast(m, g.dtype) for g, m in zip(noised, self.gradient_masks)]


def default_candidates(variable) -> bool:
    """Kernels of ≥2 dims outside embeddings (per-example embedding gradients are
    vocabulary-sized: the part of DP full fine-tuning that does not fit)."""
    path = getattr(variable, "path", variable.name)
    return len(variable.shape) >= 2 and "embedding" not in path.lower()


def output_axes(model: keras.Model, variable) -> tuple[int, ...]:
    """The axes of `variable` that index its layer's output units: an `EinsumDense` kernel's
    axes that its equation carries to the output, else the last axis (Dense, Conv kernels)."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.EinsumDense) and getattr(layer, "_kernel", None) is variable:
            inputs, output = layer.equation.split("->")
            kernel_spec = inputs.split(",")[1].strip()
            axes = tuple(i for i, c in enumerate(kernel_spec) if c in output and c in string.ascii_letters)
            if axes:
                return axes
    return (len(variable.shape) - 1,)


def _row_view(array: np.ndarray, axes) -> tuple[np.ndarray, tuple]:
    """`array` as `[rows, entries per row]`, the rows indexed by `axes`; and the permutation."""
    order = tuple(axes) + tuple(i for i in range(array.ndim) if i not in axes)
    rows = int(np.prod([array.shape[i] for i in axes]))
    return np.transpose(array, order).reshape(rows, -1), order


def _pool(view: np.ndarray, pool: str) -> np.ndarray:
    return view.sum(axis=1) if pool == "sum" else np.abs(view).mean(axis=1)


def row_scores(score: np.ndarray, axes=None, pool: str = "sum") -> np.ndarray:
    """Per-row pooled scores. `axes` (default: the last axis) index the rows; `pool`: "sum"
    (SPARTA: ṽ_j = Σ_e ũ_e) or "mean_abs" (the signed variant: mean |noisy sum|)."""
    if axes is None:
        axes = (score.ndim - 1,)
    return _pool(_row_view(score, axes)[0], pool)


def select_rows(scores: list[np.ndarray], density: float, axes=None, pool: str = "sum") -> list[np.ndarray]:
    """0/1 masks (variable-shaped): the global Top-k rows of all variables by pooled score,
    k the smallest count whose entries reach `density` of all entries. `axes[i]`: the row axes
    of `scores[i]` (default: the last axis of each)."""
    axes = axes or [(s.ndim - 1,) for s in scores]
    views = [_row_view(s, a) for s, a in zip(scores, axes)]  # ([rows, entries], permutation)
    scored = []  # (score, variable index, row index, row size)
    for i, (view, _) in enumerate(views):
        scored += [(float(value), i, r, view.shape[1]) for r, value in enumerate(_pool(view, pool))]
    budget = density * sum(s.size for s in scores)
    kept_views = [np.zeros(view.shape, np.float32) for view, _ in views]
    kept = 0
    for _, i, r, size in sorted(scored, key=lambda t: -t[0]):
        if kept >= budget:
            break
        kept_views[i][r] = 1.0
        kept += size
    masks = []
    for kept_view, (_, order), s in zip(kept_views, views, scores):
        permuted = kept_view.reshape([s.shape[i] for i in order])
        masks.append(np.transpose(permuted, np.argsort(order)))
    return masks


@dataclasses.dataclass
class SpartaResult:
    model: DPModel  # the phase-2 model; its optimizer holds the whole run's ledger
    masks: dict  # variable path -> 0/1 numpy mask
    density: float  # kept entries / candidate entries
    kept_rows: int  # rows (groups) kept, of candidate_rows
    candidate_rows: int
    kept_entries: int  # weights trained in phase 2 (biases with train_biases not included)
    variant: str
    selection_steps: int
    steps: int
    noise_multiplier: float
    epsilon: float
    delta: float
    history: keras.callbacks.History


def sparta_fit(
    model: keras.Model,
    x,
    y,
    *,
    loss,
    density: float = 0.2,
    epochs: int = 1,
    selection_epochs: int = 1,
    batch_size: int = 32,
    l2_norm_clip: float = 1.0,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    optimizer: keras.optimizers.Optimizer | None = None,
    candidates=default_candidates,
    train_biases: bool = False,
    train_head: bool = True,
    clipping: str = "abadi",
    accountant: str = "rdp",
    gradient_accumulation_steps: int = 1,
    metrics=None,
    callbacks=None,
    seed: int | None = None,
    variant: str = "published",
    **fit_kwargs,
) -> SpartaResult:
    """DP sparse fine-tuning: private row selection, then DP-SGD on the selected rows.

    Args:
        model: a built Keras model, trained in place.
        x, y: private training arrays.
        loss: per-example loss (as for `DPModel.compile`).
        density: fraction of the candidate kernel entries to train (rows kept greedily).
        epochs / selection_epochs: epochs of phase 2 / phase 1.
        noise_multiplier or target_epsilon: σ, or calibrated so both phases spend the target.
        optimizer: phase 2's inner optimizer (default Adam 1e-3).
        candidates: `variable -> bool`, the kernels to choose rows from.
        train_biases: also train every bias (dense, not masked) in phase 2.
        train_head: train the task head (`selection.head_layer`: the last layer with a kernel)
            whole in phase 2 and leave it out of the row selection. A fine-tuning head is new
            for the task; ranked with the backbone's rows by their summed scores it loses to
            wider rows (on the digits task a global Top-k kept 2 of its 5 rows).
        seed: None (default): secret noise and sampling keys from the operating system; an
            int makes both reproducible (and warns: not private against whoever knows it).
        variant: "published" (the paper's statistic, see the module doc) or "signed" (this
            package's earlier selection, kept for comparison).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1]; got {density}.")
    for name, value in [("epochs", epochs), ("selection_epochs", selection_epochs)]:
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    head = head_layer(model) if train_head else None
    head_ids = {id(v) for v in head.variables} if head is not None else set()
    cands = [v for v in model.trainable_weights if candidates(v)] or [v for v in model.weights if candidates(v)]
    cands = [v for v in cands if id(v) not in head_ids]
    if not cands:
        raise ValueError("No candidate variables for SPARTA (check `candidates`).")
    run = PrivateRun.plan(
        model,
        x,
        y,
        loss=loss,
        batch_size=batch_size,
        total_epochs=selection_epochs + epochs,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        delta=delta,
        clipping=clipping,
        accountant=accountant,
        seed=seed,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    chosen = {id(v) for v in cands}

    # Phase 1: noisy sums of the candidates' clipped (absolute) per-example gradients, averaged.
    accumulator = NoisySumAccumulator()
    selector = run.phase(lambda v: id(v) in chosen, accumulator, optimizer_class=SparseDPOptimizer)
    selector.optimizer.absolute_gradients = variant == "published"
    selector.fit(run.dataset, epochs=selection_epochs, callbacks=callbacks, **fit_kwargs)
    variables = list(selector.selection.variables)
    steps = max(selector.optimizer.dp_steps, 1)
    scores = [accumulator.sum_for(v).numpy() / steps for v in variables]
    if variant == "published":
        axes = [output_axes(model, v) for v in variables]
        masks = select_rows(scores, density, axes, pool="sum")
    else:  # rows of the [-1, last_dim] view: one input feature's fan-out
        axes = [tuple(range(len(v.shape) - 1)) for v in variables]
        masks = select_rows(scores, density, axes, pool="mean_abs")
    kept = sum(float(m.sum()) for m in masks)
    row_counts = [int(np.prod([v.shape[i] for i in a])) for v, a in zip(variables, axes)]
    kept_rows = sum(int(_row_view(m, a)[0].max(axis=1).sum()) for m, a in zip(masks, axes))
    by_path = {v.path: m for v, m in zip(variables, masks)}

    # Phase 2: DP-SGD on the kept rows (kernels with none kept are not trained at all).
    train_ids = {id(v) for v, m in zip(variables, masks) if m.any()}
    if train_biases:
        train_ids |= {id(v) for v in bias_variables(model)}
    train_ids |= head_ids
    for v in model.weights:  # phase 1 froze everything but the candidates
        if id(v) in train_ids:
            v.trainable = True
    trainer = run.phase(
        lambda v: id(v) in train_ids,
        optimizer or keras.optimizers.Adam(1e-3),
        metrics,
        after=selector,
        optimizer_class=SparseDPOptimizer,
    )
    trainer.optimizer.gradient_masks = [
        tf.constant(by_path[v.path]) if v.path in by_path else None for v in trainer.selection.variables
    ]
    history = trainer.fit(run.dataset, epochs=epochs, callbacks=callbacks, **fit_kwargs)
    epsilon, _ = trainer.optimizer.privacy_spent(delta)
    return SpartaResult(
        model=trainer,
        masks=by_path,
        density=kept / sum(m.size for m in masks),
        kept_rows=kept_rows,
        candidate_rows=sum(row_counts),
        kept_entries=int(kept),
        variant=variant,
        selection_steps=selector.optimizer.dp_steps,
        steps=trainer.optimizer.dp_steps,
        noise_multiplier=run.noise_multiplier,
        epsilon=epsilon,
        delta=delta,
        history=history,
    )


sparta = sparta_fit

__all__ = ["NoisySumAccumulator", "SpartaResult", "output_axes", "row_scores", "select_rows", "sparta", "sparta_fit"]
