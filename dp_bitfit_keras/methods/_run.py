"""What the multi-phase methods share: one private run, several phases.

Every phase of a run trains on the same Poisson stream with the same clip, noise multiplier,
noise key and accountant, and continues the ledger of the phase before it, so ε is accounted
over all steps as one run.
"""

from __future__ import annotations

import dataclasses

import keras

from dp_bitfit_keras.model import DPModel
from dp_bitfit_keras.optimizer import DPOptimizer
from dp_bitfit_keras.privacy import accounting, sampling


@dataclasses.dataclass
class PrivateRun:
    model: keras.Model
    dataset: object  # from poisson_batches
    loss: object
    l2_norm_clip: float
    noise_multiplier: float
    clipping: str
    accountant: str
    seed: int | None  # explicit (reproducible, not private against whoever knows it), or None: secret keys
    accumulation_steps: int = 1

    @classmethod
    def plan(
        cls,
        model,
        x,
        y,
        *,
        loss,
        batch_size,
        total_epochs,
        l2_norm_clip,
        noise_multiplier,
        target_epsilon,
        delta,
        clipping,
        accountant,
        seed,
        gradient_accumulation_steps=1,
    ):
        """Checks the arguments, builds the Poisson stream and fixes σ (given, or calibrated so
        that `total_epochs` of steps spend `target_epsilon` at `delta`). With
        `gradient_accumulation_steps` k > 1 each Poisson batch arrives as k micro-batches and
        every phase's optimizer accumulates them (same mechanism, ~1/k of the memory)."""
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("Give exactly one of noise_multiplier or target_epsilon.")
        n = len(y) if y is not None else int(keras.tree.flatten(x)[0].shape[0])
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}]; got {batch_size}.")
        q = batch_size / n
        if not (isinstance(gradient_accumulation_steps, int) and gradient_accumulation_steps >= 1):
            raise ValueError(f"gradient_accumulation_steps must be an int >= 1; got {gradient_accumulation_steps!r}.")
        dataset = sampling.poisson_batches((x, y), q, seed=seed, micro_batches=gradient_accumulation_steps)
        if noise_multiplier is None:
            steps = dataset.dp_sampler.steps_per_epoch * total_epochs
            noise_multiplier = accounting.noise_multiplier_for_epsilon(target_epsilon, q, steps, delta, accountant)
        return cls(
            model,
            dataset,
            loss,
            l2_norm_clip,
            float(noise_multiplier),
            clipping,
            accountant,
            seed,
            gradient_accumulation_steps,
        )

    def phase(
        self,
        trainable,
        inner: keras.optimizers.Optimizer,
        metrics=None,
        after: DPModel | None = None,
        optimizer_class=DPOptimizer,
    ) -> DPModel:
        """A compiled, built `DPModel` for one phase; `after`: the phase whose ledger it continues;
        `optimizer_class`: `DPOptimizer` or a subclass with the method's hooks."""
        dp_model = DPModel(self.model, trainable=trainable)
        dp_model.compile(
            optimizer=optimizer_class(
                inner,
                self.l2_norm_clip,
                self.noise_multiplier,
                clipping=self.clipping,
                accountant=self.accountant,
                seed=self.seed,
                gradient_accumulation_steps=self.accumulation_steps,
            ),
            loss=self.loss,
            metrics=metrics,
        )
        dp_model.optimizer.build(list(dp_model.selection.variables))
        if after is not None:
            dp_model.optimizer.continue_ledger(after.optimizer)
        return dp_model
