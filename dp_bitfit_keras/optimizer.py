"""`DPOptimizer`: clip, sum, noise, average, step, and keep the privacy ledger.

The ledger (σ, sampling rate q, steps taken, step budget, secret noise key) is optimizer state:
Keras saves and restores it with the optimizer's variables, so ε survives checkpoints (and a
checkpoint must be kept as secret as the data: whoever holds the key can regenerate the noise).
"""

from __future__ import annotations

import math
import re
import warnings

import dp_accounting
import keras
import numpy as np
import tensorflow as tf

from dp_bitfit_keras.privacy import accounting, ledger, prng, queries
from dp_bitfit_keras.privacy import clipping as clipping_lib

_NO_BUDGET = np.iinfo(np.int64).max
# keras.optimizers.Optimizer arguments a wrapper would silently ignore: they belong on the inner
# optimizer (as keras.optimizers.LossScaleOptimizer says of its own).
_INNER_OPTIMIZER_ARGUMENTS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
)


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
        clipping_style: what one clip covers (DP-BiTFiT paper §3): `"all_layer"` (one norm
            over all trained variables, bound C), `"layer_wise"` (each layer's variables to
            C/√L for L layers), `"param_wise"` (each variable to C/√P), `"group_wise"` (the
            groups given by `groups`, each to C/√G). Every style bounds an example's whole
            clipped gradient by C, so the noise and ε are the same.
        groups: for `"group_wise"`: a list of regular expressions (a variable joins the first
            group whose pattern `re.search`es its path; the rest form one more group), or a
            callable `variable -> hashable key` (not saved with the model).
        target_unclipped_quantile: turns on adaptive clipping (Andrew et al. 2021, TF
            Privacy's `QuantileAdaptiveClipSumQuery`): C follows this quantile of the
            per-example norms (0.5: the median), starting from `l2_norm_clip`. Its noisy count
            of unclipped examples is paid for inside `noise_multiplier`: the sum gets
            σ_sum = (σ⁻² − (2·clipped_count_stddev)⁻²)^(-1/2), so ε is that of σ.
        clip_learning_rate: geometric learning rate of the adaptive clip (0.2 as in the paper).
        clipped_count_stddev: noise of the unclipped count; default expected batch / 20.
        gradient_accumulation_steps: k > 1 sums the clipped per-example gradients of k
            consecutive micro-batches and adds noise once per logical batch of k; the ledger
            counts logical steps. `DPModel.fit` then splits each Poisson batch into k parts.
        accountant: `"rdp"` or `"pld"`.
        seed: `None` (default): the noise is keyed by a secret 256-bit key from the operating
            system, which no global seed (`keras.utils.set_random_seed`) reproduces. An int
            makes the noise reproducible and warns (`PredictableNoiseWarning`): whoever knows
            the seed can regenerate and remove the noise. For tests and debugging only.
        noise_generator: `"chacha20"` (default; a cryptographic stream cipher, each noise value
            a sum of 4 Gaussians against floating-point attacks, see `privacy/prng.py`) or
            `"philox"` (TensorFlow's statistical generator with a 64-bit key: not secure,
            there to measure what the secure generator costs).

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
        clipping_style="all_layer",
        groups=None,
        target_unclipped_quantile=None,
        clip_learning_rate=0.2,
        clipped_count_stddev=None,
        gradient_accumulation_steps=1,
        noise_generator="chacha20",
        name=None,
        **kwargs,
    ):
        if isinstance(optimizer, dict):
            optimizer = keras.optimizers.deserialize(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(optimizer, DPOptimizer):
            raise ValueError(f"optimizer must be a keras.optimizers.Optimizer (not a DPOptimizer); got {optimizer!r}.")
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
        if clipping not in clipping_lib.CLIPPING:
            raise ValueError(f"clipping must be one of {clipping_lib.CLIPPING}; got {clipping!r}.")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}; got {accountant!r}.")
        if clipping_style not in clipping_lib.CLIPPING_STYLES:
            raise ValueError(f"clipping_style must be one of {clipping_lib.CLIPPING_STYLES}; got {clipping_style!r}.")
        if (clipping_style == "group_wise") != (groups is not None):
            raise ValueError("groups is required with clipping_style='group_wise', and only there.")
        if groups is not None and not callable(groups):
            groups = [str(g) for g in groups]
            for pattern in groups:
                re.compile(pattern)
        if target_unclipped_quantile is not None:
            if not 0 < target_unclipped_quantile < 1:
                raise ValueError(f"target_unclipped_quantile must be in (0, 1); got {target_unclipped_quantile}.")
            if clipping != "abadi" or clipping_style != "all_layer":
                raise ValueError("Adaptive clipping works with clipping='abadi' and clipping_style='all_layer'.")
            if not clip_learning_rate > 0:
                raise ValueError(f"clip_learning_rate must be > 0; got {clip_learning_rate}.")
            if clipped_count_stddev is not None and not clipped_count_stddev > 0:
                raise ValueError(f"clipped_count_stddev must be > 0; got {clipped_count_stddev}.")
        if not (isinstance(gradient_accumulation_steps, int) and gradient_accumulation_steps >= 1):
            raise ValueError(f"gradient_accumulation_steps must be an int >= 1; got {gradient_accumulation_steps!r}.")
        if noise_generator not in prng.GENERATORS:
            raise ValueError(f"noise_generator must be one of {prng.GENERATORS}; got {noise_generator!r}.")
        for argument in _INNER_OPTIMIZER_ARGUMENTS:
            if argument in kwargs:
                raise ValueError(
                    f"DPOptimizer does not support `{argument}`: set it on the inner optimizer, e.g. "
                    f"DPOptimizer(keras.optimizers.Adam(1e-3, {argument}=...), ...). There it acts on the "
                    "noised average (post-processing, no privacy cost); per-example clipping is `l2_norm_clip`."
                )
        kwargs.pop("learning_rate", None)  # Present in configs; the inner optimizer owns it.
        super().__init__(learning_rate=0.0, name=name or "dp_optimizer", **kwargs)
        self.inner_optimizer = optimizer
        self.l2_norm_clip = float(l2_norm_clip)
        self.initial_noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.clipping = clipping
        self.accountant = accountant
        self.seed = None if seed is None else int(seed)
        self.noise_generator = noise_generator
        # The key itself is never an attribute: it lives in the ledger variable `noise_key`.
        self._initial_key = prng.key_for(self.seed, "noise")
        self.clipping_style = clipping_style
        self.groups = groups
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = clipped_count_stddev
        self.accumulation_steps = gradient_accumulation_steps
        # Set by DPModel.fit under several replicas with accumulation: the step then takes the
        # whole Poisson batch and clips it chunk by chunk (the accumulation happens inside it).
        self.fold_accumulation = False
        self._query = queries.SeededGaussianSumQuery(self.l2_norm_clip, 0.0, noise_generator)
        self._adaptive_query = None

    # --- Keras optimizer plumbing (as keras.optimizers.LossScaleOptimizer does it) -------------

    def build(self, var_list):
        if self.built:
            return
        sigma = -1.0 if self.initial_noise_multiplier is None else self.initial_noise_multiplier
        state = dict(
            # name: (dtype, initial value, updated inside the step)
            noise_multiplier=("float64", sigma, False),
            sampling_rate=("float64", -1.0, False),
            expected_batch_size=("float32", -1.0, False),
            dp_steps=("int64", 0, True),
            max_dp_steps=("int64", _NO_BUDGET, False),
            planned_dp_steps=("int64", _NO_BUDGET, False),
            batches_seen=("int64", 0, True),
            current_l2_norm_clip=("float32", self.l2_norm_clip, True),
            # The open segment of the ledger began at this step; the closed ones are below.
            segment_start=("int64", 0, False),
            closed_segments=("int64", 0, False),
            # The privacy unit of the ledger (0: example, 1: user) and the rows a unit may bring
            # to one batch, k (each row is clipped at C/k).
            privacy_unit=("int64", 0, False),
            examples_per_unit=("float32", 1.0, False),
        )
        for name, (dtype, value, in_step) in state.items():
            # Updated in the step: under MirroredStrategy every replica computes the same
            # value (from all-reduced sums), and the first replica's is kept.
            var = self.add_variable(
                shape=(),
                dtype=dtype,
                initializer=keras.initializers.Constant(value),
                aggregation="only_first_replica" if in_step else "none",
                name=name,
            )
            if dtype == "float64":  # the initializer passes through float32; σ and q are exact
                var.assign(value)
            object.__setattr__(self, f"_{name}", var)
        key = self.add_variable(
            shape=(prng.KEY_WORDS,),
            dtype="int64",
            initializer=keras.initializers.Constant(self._initial_key),
            aggregation="none",
            name="noise_key",
        )
        object.__setattr__(self, "_noise_key", key)
        table = self.add_variable(
            shape=(ledger.MAX_SEGMENTS, ledger.COLUMNS),
            dtype="float64",
            initializer="zeros",
            aggregation="none",
            name="segment_table",
        )
        object.__setattr__(self, "_segment_table", table)
        self._initial_key = None
        if self.accumulation_steps > 1:
            accumulators = [
                self.add_variable(
                    shape=v.shape,
                    dtype="float32",
                    initializer="zeros",
                    aggregation="only_first_replica",
                    name=f"dp_accumulator_{i}",
                )
                for i, v in enumerate(var_list)
            ]
            object.__setattr__(self, "_accumulators", accumulators)
            below = self.add_variable(
                shape=(),
                dtype="float32",
                initializer="zeros",
                aggregation="only_first_replica",
                name="accumulated_below",
            )
            object.__setattr__(self, "_accumulated_below", below)
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

    def finalize_variable_values(self, var_list):
        # `fit` calls this at the end of training: an inner optimizer with `use_ema=True` then
        # writes its moving average of the (noised) iterates into the trained variables. The
        # average is post-processing of released values and costs no privacy.
        if self.inner_optimizer.use_ema and self.inner_optimizer.built:
            self.inner_optimizer.finalize_variable_values(self.inner_optimizer._trainable_variables)

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
            "clipping_style": self.clipping_style,
            # A callable grouping cannot be saved; regular expressions can.
            "groups": None if callable(self.groups) else self.groups,
            "target_unclipped_quantile": self.target_unclipped_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "clipped_count_stddev": self.clipped_count_stddev,
            "gradient_accumulation_steps": self.accumulation_steps,
            "noise_generator": self.noise_generator,
            # Neither the seed nor the key: a config is not secret (the key is restored with the
            # optimizer's variables from a checkpoint).
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.optimizers.deserialize(config.pop("optimizer"), custom_objects=custom_objects)
        if config.get("clipping_style") == "group_wise" and config.get("groups") is None:
            raise ValueError(
                "This DPOptimizer was saved with a callable `groups`, which cannot be saved: "
                "load with custom code that passes it again, or use regular-expression groups."
            )
        return cls(inner, **config)

    # --- The private step ------------------------------------------------------------------

    def _group_index(self, variables):
        return clipping_lib.group_index(self.clipping_style, self.groups, variables)

    def apply_private_gradients(self, per_example_grads, trainable_variables, mask=None):
        """One DP-SGD step (or micro-step, with accumulation) from per-example gradients.

        `per_example_grads[j]` is `[batch, *trainable_variables[j].shape]`. Rows with
        `mask == 0` (padding of a Poisson batch) contribute nothing. Under a
        `tf.distribute` strategy, each replica's clipped sum is all-reduced first and the noise
        is added once to the global sum (every replica draws the same noise from the ledger's
        key). Once `dp_steps` reaches the step budget, the step changes nothing.

        The same as `clipped_sum` of the batch (or the sum of `clipped_sum`s of its chunks, as
        `DPModel` computes them) followed by `apply_clipped_sum`.

        Returns:
            The per-example gradient norms before clipping, `[batch]`.
        """
        summed, below, norms = self.clipped_sum(per_example_grads, trainable_variables, mask)
        self.apply_clipped_sum(summed, below, trainable_variables)
        return norms

    def clipped_sum(self, per_example_grads, trainable_variables, mask=None):
        """Clip every example's gradient and sum: `(summed, below, norms)`.

        `below` is adaptive clipping's count Σ (1[‖g‖ ≤ C] − ½) over the real examples (0
        without adaptive clipping). Sums of disjoint sets of examples add up: a batch may be
        clipped chunk by chunk and the chunk sums added before `apply_clipped_sum`.
        """
        if not self.built:
            self.build(trainable_variables)
        per_example_grads = self.transform_per_example_gradients(per_example_grads)
        clip = self.per_example_clip_tensor()
        summed, norms = self._clip_and_sum(per_example_grads, clip, mask, self._group_index(trainable_variables))
        return summed, self._below(norms, clip, mask), norms

    def clipped_sum_of(self, squared_norms, weighted_sums, trainable_variables, mask=None):
        """`clipped_sum` from each variable's per-example squared norms (book-keeping).

        `squared_norms[j]`: `[batch]` squared norms of variable j's per-example gradients;
        `weighted_sums[j](weights, keep)`: Σ_i weights_i · g_ij over the rows with `keep`.
        The clip factors, padding and non-finite handling and clipping styles are those of
        `clipped_sum` (the same `clipping_lib.clip_weights`), so both give the same sums.
        """
        if not self.built:
            self.build(trainable_variables)
        if self.needs_per_example_gradients:
            raise ValueError(
                f"{type(self).__name__} transforms per-example gradients: it needs the vectorized per-example path."
            )
        clip = self.per_example_clip_tensor()
        factors, index, norms, finite = clipping_lib.clip_weights(
            squared_norms, clip, self.clipping, mask, self._group_index(trainable_variables)
        )
        summed = [
            tf.cast(fn(factors[:, k], finite), v.dtype) for fn, k, v in zip(weighted_sums, index, trainable_variables)
        ]
        return summed, self._below(norms, clip, mask), norms

    def _below(self, norms, clip, mask):
        if self.target_unclipped_quantile is None:
            return tf.constant(0.0)
        return clipping_lib.unclipped_count_minus_half(norms, clip, mask)

    # --- Hooks for methods built on this step (SPARTA, DPZero) ------------------------------

    @property
    def needs_per_example_gradients(self) -> bool:
        """Whether `transform_per_example_gradients` changes them (book-keeping cannot then run)."""
        return False

    def transform_per_example_gradients(self, per_example_grads):
        """Hook before clipping: a subclass may map each example's gradient (the clip then
        bounds what it returns, so the sensitivity stays C)."""
        return per_example_grads

    def transform_noised_sum(self, noised):
        """Hook after the noise: post-processing of the released sum (no privacy cost)."""
        return noised

    def noise_stream(self):
        """(secret key, step) tensors that key this step's noise. Randomness derived from them
        (DPZero's directions) must use its own `prng` stream, never the noise's."""
        return self._noise_key.value, self._dp_steps.value

    def clip_tensor(self):
        """The clip C of this step as a tensor (moves with adaptive clipping): the sensitivity
        of one privacy unit, which the noise is scaled to."""
        return self._current_l2_norm_clip.value

    def per_example_clip_tensor(self):
        """The clip of one row: C, or C/k at user level (k rows of a user per batch)."""
        return self._current_l2_norm_clip.value / self._examples_per_unit.value

    UNITS = ("example", "user")

    @property
    def privacy_unit(self) -> str:
        """What the ledger's ε protects: "example" (one row) or "user" (all rows of one user)."""
        return self.UNITS[int(self._privacy_unit.numpy())] if self.built else "example"

    def set_privacy_unit(self, unit: str, examples_per_unit: int = 1):
        """Makes the ledger protect `unit` ("example" or "user"), each row clipped at
        C/`examples_per_unit`. `DPModel.fit` sets it from its data (`user_ids`); a ledger
        cannot mix units."""
        if unit not in self.UNITS:
            raise ValueError(f"unit must be one of {self.UNITS}; got {unit!r}.")
        if not (isinstance(examples_per_unit, int) and examples_per_unit >= 1):
            raise ValueError(f"examples_per_unit must be an int >= 1; got {examples_per_unit!r}.")
        if unit == "user" and self.target_unclipped_quantile is not None:
            raise ValueError("Adaptive clipping counts examples, not users: use a fixed l2_norm_clip at user level.")
        if self.dp_steps and unit != self.privacy_unit:
            raise ValueError(
                f"This optimizer's ledger accounts per {self.privacy_unit} ({self.dp_steps} steps): a run per "
                f"{unit} cannot be composed with it. Start from a fresh optimizer."
            )
        self._privacy_unit.assign(self.UNITS.index(unit))
        self._examples_per_unit.assign(float(examples_per_unit))

    def expected_batch_size_tensor(self):
        """The expected (logical) batch size that normalises the noised sum, as a tensor."""
        return self._expected_batch_size.value

    def apply_clipped_sum(self, summed, below, trainable_variables, to_gradients=None):
        """Noise a batch's clipped sum once and step (or accumulate a micro-batch's).

        `to_gradients`: maps the noised sum to one gradient per trainable variable (DPZero's
        scalar times its directions); post-processing, so any function is private. Not with
        gradient accumulation.
        """
        if to_gradients is not None and self.accumulation_steps > 1 and not self.fold_accumulation:
            raise ValueError(
                "to_gradients does not accumulate: use gradient_accumulation_steps=1 (raise the batch size)."
            )
        if not self.built:
            self.build(trainable_variables)
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        # Under several replicas DPModel.fit hands the step the whole Poisson batch and clips it
        # chunk by chunk (`fold_accumulation`): the accumulation happens inside the step.
        folded = self.fold_accumulation
        if replicas > 1:
            if self.accumulation_steps > 1 and not folded:
                raise ValueError(
                    "Under a multi-replica tf.distribute strategy, gradient accumulation runs inside "
                    "DPModel.fit (each step takes the whole Poisson batch in chunks): train with fit."
                )
            summed, below = context.all_reduce(tf.distribute.ReduceOp.SUM, [summed, below])
        self._batches_seen.assign_add(1)
        if self.accumulation_steps == 1 or folded:
            self._noise_and_step(summed, below, trainable_variables, replicas, expand=to_gradients)
            return
        for acc, g in zip(self._accumulators, summed):
            acc.assign_add(tf.cast(g, tf.float32))
        self._accumulated_below.assign_add(below)

        def flush():
            totals = [tf.cast(acc.value, g.dtype) for acc, g in zip(self._accumulators, summed)]
            self._noise_and_step(totals, self._accumulated_below.value, trainable_variables, replicas)
            for acc in self._accumulators:
                acc.assign(tf.zeros_like(acc))
            self._accumulated_below.assign(0.0)
            return tf.constant(True)

        tf.cond(self._batches_seen.value % self.accumulation_steps == 0, flush, lambda: tf.constant(False))

    def _clip_and_sum(self, per_example_grads, clip, mask, groups):
        return clipping_lib.clipped_sum(per_example_grads, clip, self.clipping, mask, groups)

    def _noise_stddev(self, sigma, clip):
        return sigma * clip

    def _noise_and_step(self, summed, below, trainable_variables, replicas, expand=None):
        sigma = tf.cast(self._noise_multiplier.value, tf.float32)
        clip = self._current_l2_norm_clip.value
        key, step = self._noise_key.value, self._dp_steps.value
        if self._adaptive_query is None:
            global_state = self._query.make_global_state(clip, self._noise_stddev(sigma, clip), key, step)
            noised, new_clip = queries.noised_sum(self._query, global_state, summed), clip
        else:
            sum_sigma = tf.cast(self._sum_noise_multiplier, tf.float32)
            state = self._adaptive_query.state_for(clip, sum_sigma, key, step)
            noised, new_clip, _ = queries.adaptive_noised_sum(self._adaptive_query, state, summed, below)
        # Dividing by the expected batch size (not the realised one) keeps the released quantity
        # a function of the noised sum alone; the realised size is itself private. Under a
        # strategy the inner optimizer all-reduces (sums) again: every replica holds the same
        # global value, so each passes its 1/replicas share.
        scale = tf.cast(self._expected_batch_size.value, tf.float32) * replicas
        if expand is not None:
            noised = expand(noised)
        noised = self.transform_noised_sum(noised)
        grads = [g / tf.cast(scale, g.dtype) for g in noised]

        def step():
            self.inner_optimizer.apply(grads, trainable_variables)
            self._current_l2_norm_clip.assign(new_clip)
            self._dp_steps.assign_add(1)
            return tf.constant(True)

        if replicas > 1 or tf.distribute.has_strategy():
            # The inner optimizer all-reduces, a sync point that TF does not allow inside
            # tf.cond: under a strategy the step budget is enforced between steps instead (by
            # DPModel.fit / PrivacyCallback stopping training; fit checks steps_per_execution=1).
            step()
            return
        budget = tf.minimum(self._max_dp_steps.value, self._planned_dp_steps.value)
        tf.cond(self._dp_steps.value < budget, step, lambda: tf.constant(False))

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

    @property
    def batches_seen(self) -> int:
        """Micro-batches consumed (a resumed run's sampler continues after them)."""
        return int(self._batches_seen.numpy()) if self.built else 0

    @property
    def planned_dp_steps(self) -> int:
        """The step count at which the current run's plan ends."""
        return int(self._planned_dp_steps.numpy())

    def noise_key(self):
        """The secret noise key (`[8]` int64): whoever holds it can regenerate and remove the
        noise. Only for handing it to the other workers of the same run."""
        return self._noise_key.numpy()

    def set_noise_key(self, key):
        """Replaces the secret noise key (the workers of one run share the first one's)."""
        self._noise_key.assign(key)

    def begin_run(self, sampling_rate, expected_batch_size, planned_steps, num_examples=None):
        """Fixes q and the batch normalizer for this run and, if asked, calibrates σ.

        σ is calibrated once, at the first run, for its planned steps (plus steps already taken);
        later runs keep it. A run whose mechanism differs from the ledger's open segment (another
        sampling rate, σ or adaptive-clipping count noise) closes that segment and opens a new
        one: ε composes over all of them.
        """
        if not self.built:
            raise RuntimeError("Build the optimizer (DPModel.fit does) before begin_run.")
        accounting.validate(sampling_rate=sampling_rate)
        if self.target_delta is not None and num_examples and self.target_delta >= 1.0 / num_examples:
            warnings.warn(
                f"target_delta={self.target_delta} >= 1/n = {1 / num_examples:.3g}: such a δ allows "
                "releasing an example outright; use δ well below 1/n (e.g. 1/(2n) or smaller).",
                stacklevel=3,
            )
        before = self.open_segment() if self.dp_steps > int(self._segment_start.numpy()) else None
        self._sampling_rate.assign(sampling_rate)
        self._expected_batch_size.assign(expected_batch_size)
        self._planned_dp_steps.assign(self.dp_steps + planned_steps)
        if float(self._noise_multiplier.numpy()) < 0:
            sigma = accounting.noise_multiplier_for_epsilon(
                self.target_epsilon,
                sampling_rate,
                self.dp_steps + planned_steps,
                self.target_delta,
                self.accountant,
            )
            self._noise_multiplier.assign(sigma)
        if self.target_unclipped_quantile is not None:
            self._make_adaptive_query(expected_batch_size)
        if before is not None and not before.same_mechanism(self.open_segment()):
            self._close_segment(before)

    def _close_segment(self, segment):
        closed = self.closed_segments() + [segment]
        self._segment_table.assign(ledger.to_table(closed))
        self._closed_segments.assign(len(closed))
        self._segment_start.assign(self.dp_steps)

    def _make_adaptive_query(self, expected_batch_size):
        count_stddev = self.clipped_count_stddev or expected_batch_size / 20.0
        sigma = self.noise_multiplier
        sum_sigma = 0.0 if sigma == 0 else queries.sum_noise_multiplier_for(sigma, count_stddev)
        self._sum_noise_multiplier = sum_sigma
        self._adaptive_query = queries.SeededQuantileAdaptiveClipSumQuery(
            self.l2_norm_clip,
            sum_sigma,
            self.target_unclipped_quantile,
            self.clip_learning_rate,
            count_stddev,
            expected_batch_size,
            self.noise_generator,
        )

    @property
    def current_l2_norm_clip(self) -> float:
        """The clip C now (moves with adaptive clipping; `l2_norm_clip` otherwise)."""
        return float(self._current_l2_norm_clip.numpy()) if self.built else self.l2_norm_clip

    def open_segment(self) -> ledger.Segment:
        """The ledger's open segment: this optimizer's σ and q since the last change."""
        if self.noise_multiplier is None or self.sampling_rate is None:
            raise RuntimeError("σ and q are set at the start of fit; ask for the ledger afterwards.")
        steps = self.dp_steps - int(self._segment_start.numpy())
        if self.target_unclipped_quantile is None or self.noise_multiplier == 0:
            return ledger.Segment(self.noise_multiplier, self.sampling_rate, steps)
        if self._adaptive_query is None:  # restored from a checkpoint in a new process
            self._make_adaptive_query(float(self._expected_batch_size.numpy()))
        # TF Privacy's event: the sum's Gaussian composed with the count's (sensitivity ½).
        return ledger.Segment(
            self._sum_noise_multiplier, self.sampling_rate, steps, 2.0 * self._adaptive_query.clipped_count_stddev
        )

    def closed_segments(self) -> list[ledger.Segment]:
        """The ledger's segments before the open one (earlier runs at other σ or q)."""
        if not self.built:
            return []
        return ledger.from_table(self._segment_table.numpy(), int(self._closed_segments.numpy()))

    @property
    def segments(self) -> list[ledger.Segment]:
        """Every segment of the ledger, oldest first; ε is that of their composition."""
        if self.dp_steps == 0 and not self.closed_segments():
            return []
        return self.closed_segments() + [self.open_segment()]

    def step_event(self) -> dp_accounting.DpEvent:
        """The DpEvent of one step of the open segment, before subsampling: one Gaussian, or with
        adaptive clipping the composition of the sum's and the count's Gaussians."""
        return self.open_segment().step_event()

    def epsilon_curve(self, delta: float) -> ledger.EpsilonCurve:
        """ε as a function of the total step count, cheap to ask every step (RDP)."""
        return ledger.EpsilonCurve(
            self.closed_segments(),
            self.open_segment(),
            delta,
            self.accountant,
            first_step=int(self._segment_start.numpy()),
        )

    def continue_ledger(self, other: DPOptimizer):
        """Carries on `other`'s ledger: its segments, steps, batches seen and noise key (e.g. a
        second training phase with new variables and a new inner optimizer). `other`'s open
        segment is closed here, so this optimizer may run at another σ or q: ε composes over
        the steps of both."""
        if not (self.built and other.built):
            raise RuntimeError("Build both optimizers first.")
        if self.accountant != other.accountant:
            raise ValueError(
                f"A continued ledger needs the same accountant; got {self.accountant!r} vs {other.accountant!r}."
            )
        closed = other.closed_segments()
        if other.dp_steps > int(other._segment_start.numpy()):
            closed.append(other.open_segment())
        self._segment_table.assign(ledger.to_table(closed))
        self._closed_segments.assign(len(closed))
        self._segment_start.assign(other.dp_steps)
        for name in ("sampling_rate", "expected_batch_size", "dp_steps", "batches_seen", "noise_key"):
            getattr(self, f"_{name}").assign(getattr(other, f"_{name}").value)

    def set_step_budget(self, max_steps: int | None):
        """The optimizer takes no step past `max_steps` (None: no limit)."""
        self._max_dp_steps.assign(_NO_BUDGET if max_steps is None else int(max_steps))

    def privacy_spent(self, delta: float) -> tuple[float, float]:
        """(ε, δ) of the steps taken so far: every segment of the ledger composed."""
        return ledger.epsilon(self.segments, delta, self.accountant), delta

    def max_steps_within(self, epsilon: float, delta: float) -> int:
        """Largest total step count (the open segment's σ and q after the closed segments) whose
        ε stays ≤ `epsilon`."""
        return self.epsilon_curve(delta).max_steps_within(epsilon)
