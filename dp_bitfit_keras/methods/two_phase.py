"""Two-phase private fine-tuning (DP-BiTFiT paper, §4.4): DP full fine-tuning, then DP-BiTFiT.

One noise multiplier, one sampling rate, one Poisson stream and one ledger for the whole run:
ε is accounted over the steps of both phases together.
"""

from __future__ import annotations

import dataclasses

import keras

from dp_bitfit_keras.methods._run import PrivateRun
from dp_bitfit_keras.model import DPModel


@dataclasses.dataclass
class TwoPhaseResult:
    model: DPModel  # the phase-2 model (its optimizer holds the ledger of the whole run)
    phase1_history: keras.callbacks.History
    phase2_history: keras.callbacks.History
    noise_multiplier: float
    steps: int
    epsilon: float
    delta: float


def two_phase_fit(
    model: keras.Model,
    x,
    y,
    *,
    loss,
    phase1_epochs: int,
    phase2_epochs: int,
    batch_size: int = 32,
    l2_norm_clip: float = 1.0,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    phase1_optimizer: keras.optimizers.Optimizer | None = None,
    phase2_optimizer: keras.optimizers.Optimizer | None = None,
    phase2_trainable="bias",
    clipping: str = "abadi",
    accountant: str = "rdp",
    gradient_accumulation_steps: int = 1,
    metrics=None,
    callbacks=None,
    seed: int | None = None,
    **fit_kwargs,
) -> TwoPhaseResult:
    """Phase 1: DP full fine-tuning for `phase1_epochs`; phase 2: DP-BiTFiT for `phase2_epochs`.

    Both phases train `model` in place with the same clip C, noise multiplier σ and Poisson
    sampling rate q = batch_size / n; each has its own inner optimizer (default Adam 5e-4 for
    phase 1, Adam 5e-3 for phase 2, as the paper's learning rates for full and bias-only
    fine-tuning). σ is `noise_multiplier`, or calibrated so that *all* steps of both phases
    spend `target_epsilon` at `delta`. The phase-2 optimizer continues the phase-1 ledger, so
    `result.model.privacy_spent(delta)` and `PrivacyCallback` report ε of the whole run.

    Args:
        model: a built Keras model.
        x, y: the private training arrays (examples on the first axis).
        loss: the per-example loss (as for `DPModel.compile`).
        phase2_trainable: what phase 2 trains (`"bias"`, `"bias+head"`, or a callable).
        metrics, callbacks, **fit_kwargs: passed to both phases' compile / fit.
        seed: None (default): secret noise and sampling keys from the operating system; an
            int makes both reproducible (and warns: not private against whoever knows it).

    Example:
        >>> result = two_phase_fit(base, x, y, loss=loss, phase1_epochs=1, phase2_epochs=2,
        ...                        batch_size=64, target_epsilon=8.0, delta=1e-5)  # doctest: +SKIP
        >>> result.epsilon <= 8.0  # doctest: +SKIP
        True
    """
    for name, value in [("phase1_epochs", phase1_epochs), ("phase2_epochs", phase2_epochs)]:
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"{name} must be an int >= 0; got {value!r}.")
    if phase1_epochs + phase2_epochs == 0:
        raise ValueError("Nothing to train: phase1_epochs + phase2_epochs == 0.")
    run = PrivateRun.plan(
        model,
        x,
        y,
        loss=loss,
        batch_size=batch_size,
        total_epochs=phase1_epochs + phase2_epochs,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        delta=delta,
        clipping=clipping,
        accountant=accountant,
        seed=seed,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    phase1 = run.phase("all", phase1_optimizer or keras.optimizers.Adam(5e-4), metrics)
    history1 = keras.callbacks.History()
    if phase1_epochs:
        history1 = phase1.fit(run.dataset, epochs=phase1_epochs, callbacks=callbacks, **fit_kwargs)
    phase2 = run.phase(phase2_trainable, phase2_optimizer or keras.optimizers.Adam(5e-3), metrics, after=phase1)
    history2 = keras.callbacks.History()
    if phase2_epochs:
        history2 = phase2.fit(run.dataset, epochs=phase2_epochs, callbacks=callbacks, **fit_kwargs)
    epsilon, _ = phase2.optimizer.privacy_spent(delta)
    return TwoPhaseResult(phase2, history1, history2, run.noise_multiplier, phase2.optimizer.dp_steps, epsilon, delta)
