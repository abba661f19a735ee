"""SPARTA-style DP sparse fine-tuning (after Makni et al. 2025) on the package's engine.

Phase 1 (selection, `selection_epochs`, private): DP-SGD steps whose noisy sums of clipped
per-example gradients are *accumulated* instead of applied; the model does not move. Each
kernel is split into groups (the rows of its `[-1, last_dim]` view: one input feature's
weights), every group is scored by the mean magnitude of its accumulated noisy gradient, and
the best-scoring groups are kept until `density` of the candidate entries is reached.

Phase 2 (training, `epochs`): DP-SGD on the kept entries only. The per-example gradients of
the kernels that hold kept rows are masked before clipping (so the clip and the noise cover
just those entries) and the update is masked after the noise.

Both phases use one σ, one sampling rate, one Poisson stream and one ledger: ε is accounted
over all steps (selection steps are Gaussian releases like any other).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from dp_bitfit_keras.methods._run import PrivateRun
from dp_bitfit_keras.model import DPModel
from dp_bitfit_keras.selection import bias_variables


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


def default_candidates(variable) -> bool:
    """Kernels of ≥2 dims outside embeddings (per-example embedding gradients are
    vocabulary-sized: the part of DP full fine-tuning that does not fit)."""
    path = getattr(variable, "path", variable.name)
    return len(variable.shape) >= 2 and "embedding" not in path.lower()


def row_scores(noisy_sum: np.ndarray) -> np.ndarray:
    """Mean |noisy gradient| of each row of the `[-1, last_dim]` view."""
    view = np.abs(noisy_sum.reshape(-1, noisy_sum.shape[-1]))
    return view.mean(axis=1)


def select_rows(noisy_sums: list[np.ndarray], density: float) -> list[np.ndarray]:
    """0/1 masks (variable-shaped) keeping the highest-scoring rows until `density` of all
    entries is covered (the last row may take it slightly past)."""
    scored = []  # (score, variable index, row index, row size)
    for i, s in enumerate(noisy_sums):
        for r, score in enumerate(row_scores(s)):
            scored.append((float(score), i, r, s.shape[-1]))
    total = sum(s.size for s in noisy_sums)
    budget = density * total
    masks = [np.zeros(s.reshape(-1, s.shape[-1]).shape, np.float32) for s in noisy_sums]
    kept = 0
    for score, i, r, size in sorted(scored, key=lambda t: -t[0]):
        if kept >= budget:
            break
        masks[i][r] = 1.0
        kept += size
    return [m.reshape(s.shape) for m, s in zip(masks, noisy_sums)]


@dataclasses.dataclass
class SpartaResult:
    model: DPModel  # the phase-2 model; its optimizer holds the whole run's ledger
    masks: dict  # variable path -> 0/1 numpy mask
    density: float  # kept entries / candidate entries
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
    clipping: str = "abadi",
    accountant: str = "rdp",
    gradient_accumulation_steps: int = 1,
    metrics=None,
    callbacks=None,
    seed: int | None = None,
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
        seed: None (default): secret noise and sampling keys from the operating system; an
            int makes both reproducible (and warns: not private against whoever knows it).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1]; got {density}.")
    for name, value in [("epochs", epochs), ("selection_epochs", selection_epochs)]:
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    cands = [v for v in model.trainable_weights if candidates(v)] or [v for v in model.weights if candidates(v)]
    if not cands:
        raise ValueError("No candidate variables for SPARTA (check `candidates`).")
    run = PrivateRun.plan(
        model, x, y, loss=loss, batch_size=batch_size, total_epochs=selection_epochs + epochs,
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
        delta=delta, clipping=clipping, accountant=accountant, seed=seed,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    chosen = {id(v) for v in cands}

    # Phase 1: noisy clipped sums of the candidates' per-example gradients, accumulated.
    accumulator = NoisySumAccumulator()
    selector = run.phase(lambda v: id(v) in chosen, accumulator)
    selector.fit(run.dataset, epochs=selection_epochs, callbacks=callbacks, **fit_kwargs)
    variables = list(selector.selection.variables)
    sums = [accumulator.sums[accumulator._get_variable_index(v)].numpy() for v in variables]
    masks = select_rows(sums, density)
    kept = sum(float(m.sum()) for m in masks)
    by_path = {v.path: m for v, m in zip(variables, masks)}

    # Phase 2: DP-SGD on the kept rows (kernels with none kept are not trained at all).
    train_ids = {id(v) for v, m in zip(variables, masks) if m.any()}
    if train_biases:
        train_ids |= {id(v) for v in bias_variables(model)}
    trainer = run.phase(lambda v: id(v) in train_ids, optimizer or keras.optimizers.Adam(1e-3), metrics, after=selector)
    trainer.optimizer.gradient_masks = [
        tf.constant(by_path[v.path]) if v.path in by_path else None for v in trainer.selection.variables
    ]
    history = trainer.fit(run.dataset, epochs=epochs, callbacks=callbacks, **fit_kwargs)
    epsilon, _ = trainer.optimizer.privacy_spent(delta)
    return SpartaResult(
        model=trainer, masks=by_path, density=kept / sum(m.size for m in masks),
        selection_steps=selector.optimizer.dp_steps, steps=trainer.optimizer.dp_steps,
        noise_multiplier=run.noise_multiplier, epsilon=epsilon, delta=delta, history=history,
    )


sparta = sparta_fit

__all__ = ["NoisySumAccumulator", "SpartaResult", "select_rows", "sparta", "sparta_fit"]
