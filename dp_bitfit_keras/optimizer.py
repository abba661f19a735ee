"""`DPOptimizer`: clip, sum, noise, average, step, and keep the privacy ledger.

The ledger (σ, sampling rate q, steps taken, step budget, noise seed) is optimizer state: Keras
saves and restores it with the optimizer's variables, so ε survives checkpoints.
"""

from __future__ import annotations

import math
import random
import warnings

import keras
import numpy as np
import tensorflow as tf

from dp_bitfit_keras.privacy import accounting, queries

_NO_BUDGET = np.iinfo(np.int64).max


@keras.saving.register_keras_serializable(package="dp_bitfit_keras")
class DPOptimizer(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer into DP-SGD's clip-and-noise step (Abadi et al. 2016).

    Each step: clip every example's gradient to `l2_norm_clip` (global norm over the trained
    variables), sum, add Gaussian noise of std `noise_multiplier * l2_norm_clip` through a TF
    Privacy `GaussianSumQuery`, divide by the *expected* batch size (Poisson sampling), and hand
    the result to the wrapped optimizer. It only takes per-example gradients (from `DPModel`):
    `apply`/`apply_gradients` with averaged gradients raise, since they would not be private.

    Args:
        optimizer: any `keras.optimizers.Optimizer` (Adam, SGD, AdamW, ...).
        l2_norm_clip: C > 0, the per-example gradient norm bound.
        noise_multiplier: σ ≥ 0. Give this or `target_epsilon`.
        target_epsilon: calibrate σ at the start of `fit` so the planned run reaches this ε.
        target_delta: δ for `target_epsilon`.
        clipping: `"abadi"` (min(1, C/‖g‖)) or `"automatic"` (C/(‖g‖+0.01), Bu et al.).
        accountant: `"rdp"` or `"pld"`.
        seed: seed of the noise stream. Default: drawn from Python's `random` (seeded by
            `keras.utils.set_random_seed`). Whoever knows the seed can remove the noise: keep
            it, like the checkpoints that store it, as secret as the data.

    Example:
        >>> opt = DPOptimizer(keras.optimizers.Adam(1e-3), l2_norm_clip=1.0, noise_multiplier=1.1)
    """

    def __init__(
        self,
        optimizer,
        l2_norm_clip,
        noise_multiplier=None,
        *,
        target_epsilon=None,
        target_delta=None,
        clipping="abadi",
        accountant="rdp",
        seed=None,
        name=None,
        **kwargs,
    ):
        if isinstance(optimizer, dict):
            optimizer = keras.optimizers.deserialize(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(optimizer, DPOptimizer):
            raise ValueError(
                f"optimizer must be a keras.optimizers.Optimizer (not a DPOptimizer); got {optimizer!r}."
            )
        if not (isinstance(l2_norm_clip, (int, float)) and l2_norm_clip > 0 and math.isfinite(l2_norm_clip)):
            raise ValueError(f"l2_norm_clip must be a finite number > 0; got {l2_norm_clip!r}.")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "Give exactly one of noise_multiplier (σ) or target_epsilon (σ is then calibrated "
                f"at fit); got noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon}."
            )
        if noise_multiplier is not None and not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier}.")
        if target_epsilon is not None:
            if not target_epsilon > 0:
                raise ValueError(f"target_epsilon must be > 0; got {target_epsilon}.")
            if target_delta is None or not 0 < target_delta < 1:
                raise ValueError(f"target_epsilon needs target_delta in (0, 1); got {target_delta}.")
        if clipping not in queries.CLIPPING:
            raise ValueError(f"clipping must be one of {queries.CLIPPING}; got {clipping!r}.")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}; got {accountant!r}.")
        kwargs.pop("learning_rate", None)  # Present in configs; the inner optimizer owns it.
        super().__init__(learning_rate=0.0, name=name or "dp_optimizer", **kwargs)
        self.inner_optimizer = optimizer
        self.l2_norm_clip = float(l2_norm_clip)
        self.initial_noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.clipping = clipping
        self.accountant = accountant
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        self._query = queries.SeededGaussianSumQuery(self.l2_norm_clip, 0.0)

    # --- Keras optimizer plumbing (as keras.optimizers.LossScaleOptimizer does it) -------------

    def build(self, var_list):
        if self.built:
            return
        sigma = -1.0 if self.initial_noise_multiplier is None else self.initial_noise_multiplier
        ledger = dict(
            noise_multiplier=("float64", sigma),
            sampling_rate=("float64", -1.0),
            expected_batch_size=("float32", -1.0),
            dp_steps=("int64", 0),
            max_dp_steps=("int64", _NO_BUDGET),
            noise_seed=("int64", self.seed),
        )
        for name, (dtype, value) in ledger.items():
            var = self.add_variable(
                shape=(), dtype=dtype, initializer=keras.initializers.Constant(value),
                aggregation="none", name=name,
            )
            object.__setattr__(self, f"_{name}", var)
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def apply(self, grads, trainable_variables=None):
        raise RuntimeError(
            "DPOptimizer received batch-averaged gradients, which are not private. Train with "
            "dp_bitfit_keras.DPModel (its train_step passes per-example gradients to "
            "DPOptimizer.apply_private_gradients)."
        )

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "l2_norm_clip": self.l2_norm_clip,
            "noise_multiplier": self.initial_noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "clipping": self.clipping,
            "accountant": self.accountant,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.optimizers.deserialize(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)

    # --- The private step ------------------------------------------------------------------

    def apply_private_gradients(self, per_example_grads, trainable_variables, mask=None):
        """One DP-SGD step from per-example gradients `[batch, *var.shape]`.

        Rows with `mask == 0` (padding of a Poisson batch) contribute nothing. Once `dp_steps`
        reaches the step budget (`set_step_budget`), the step changes nothing.

        Returns:
            The per-example gradient norms before clipping, `[batch]`.
        """
        if not self.built:
            self.build(trainable_variables)
        summed, norms = queries.clipped_sum(per_example_grads, self.l2_norm_clip, self.clipping, mask)
        sigma = tf.cast(self._noise_multiplier.value, tf.float32)
        global_state = self._query.make_global_state(
            self.l2_norm_clip, sigma * self.l2_norm_clip, tf.stack([self._noise_seed.value, self._dp_steps.value])
        )
        noised = queries.noised_sum(self._query, global_state, summed)
        # Dividing by the expected batch size (not the realised one) keeps the released quantity
        # a function of the noised sum alone; the realised size is itself private.
        grads = [g / tf.cast(self._expected_batch_size.value, g.dtype) for g in noised]

        def step():
            self.inner_optimizer.apply(grads, trainable_variables)
            self._dp_steps.assign_add(1)
            return tf.constant(True)

        tf.cond(self._dp_steps.value < self._max_dp_steps.value, step, lambda: tf.constant(False))
        return norms

    # --- The ledger --------------------------------------------------------------------------

    @property
    def noise_multiplier(self) -> float | None:
        if not self.built or float(self._noise_multiplier.numpy()) < 0:
            return self.initial_noise_multiplier
        return float(self._noise_multiplier.numpy())

    @property
    def sampling_rate(self) -> float | None:
        return float(self._sampling_rate.numpy()) if self.built and self._sampling_rate.numpy() > 0 else None

    @property
    def dp_steps(self) -> int:
        return int(self._dp_steps.numpy()) if self.built else 0

    def begin_run(self, sampling_rate, expected_batch_size, planned_steps, num_examples=None):
        """Fixes q and the batch normalizer for this run and, if asked, calibrates σ.

        σ is calibrated once (for the first run's planned steps, plus steps already taken);
        the ledger holds one (σ, q) pair, so a later run must use the same sampling rate.
        """
        if not self.built:
            raise RuntimeError("Build the optimizer (DPModel.fit does) before begin_run.")
        accounting._check(sampling_rate=sampling_rate)
        previous_q = self.sampling_rate
        if previous_q is not None and self.dp_steps > 0 and not math.isclose(previous_q, sampling_rate, rel_tol=1e-9):
            raise ValueError(
                f"This optimizer's ledger accounts steps at sampling rate {previous_q:.6g}; this run "
                f"would sample at {sampling_rate:.6g}. Keep the batch size / dataset size ratio, "
                "or account the runs separately with new optimizers."
            )
        if self.target_delta is not None and num_examples and self.target_delta >= 1.0 / num_examples:
            warnings.warn(
                f"target_delta={self.target_delta} >= 1/n = {1 / num_examples:.3g}: such a δ allows "
                "releasing an example outright; use δ well below 1/n (e.g. 1/(2n) or smaller).",
                stacklevel=3,
            )
        self._sampling_rate.assign(sampling_rate)
        self._expected_batch_size.assign(expected_batch_size)
        if float(self._noise_multiplier.numpy()) < 0:
            sigma = accounting.noise_multiplier_for_epsilon(
                self.target_epsilon, sampling_rate, self.dp_steps + planned_steps,
                self.target_delta, self.accountant,
            )
            self._noise_multiplier.assign(sigma)

    def set_step_budget(self, max_steps: int | None):
        """The optimizer takes no step past `max_steps` (None: no limit)."""
        self._max_dp_steps.assign(_NO_BUDGET if max_steps is None else int(max_steps))

    def privacy_spent(self, delta: float) -> tuple[float, float]:
        """(ε, δ) of the steps taken so far."""
        if self.dp_steps == 0:
            return 0.0, delta
        return (
            accounting.compute_epsilon(self.noise_multiplier, self.sampling_rate, self.dp_steps, delta, self.accountant),
            delta,
        )

    def max_steps_within(self, epsilon: float, delta: float) -> int:
        """Largest number of steps (of this ledger's σ and q) whose ε stays ≤ `epsilon`."""
        sigma, q = self.noise_multiplier, self.sampling_rate
        if sigma is None or q is None:
            raise RuntimeError("σ and q are set at the start of fit; call this afterwards.")

        def within(steps):
            return accounting.compute_epsilon(sigma, q, steps, delta, self.accountant) <= epsilon

        if not within(1):
            return 0
        low, high = 1, 2
        while within(high):
            low, high = high, high * 2
            if high > 1 << 40:
                return high
        while high - low > 1:  # ε grows with steps: bisect for the last step within budget.
            mid = (low + high) // 2
            low, high = (mid, high) if within(mid) else (low, mid)
        return low
