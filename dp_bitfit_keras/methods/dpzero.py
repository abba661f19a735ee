"""DPZero: zeroth-order DP fine-tuning (Zhang et al. 2023) on the package's engine.

Per step: a random direction z (regenerated from the ledger's key and step, never stored),
two forward passes at θ+λz and θ−λz, each example's scalar finite difference
d_i = (ℓ_i(θ+λz) − ℓ_i(θ−λz)) / 2λ clipped to [−C, C], summed and noised by the optimizer's
Gaussian query (std σC), divided by the expected batch size, and θ ← θ − η·(noisy scalar)·z.
No backward pass, so memory stays at inference level. The privacy analysis is DP-SGD's
(Poisson-subsampled Gaussian with sensitivity C), so ε comes from the same accountant.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dp_bitfit_keras import gradients
from dp_bitfit_keras.model import DPModel, example_mask
from dp_bitfit_keras.privacy import clipping, prng

# The paper's defaults (for OPT/RoBERTa-size models).
DEFAULT_PERTURBATION = 1e-3
DEFAULT_CLIP = 200.0
DEFAULT_LEARNING_RATE = 1e-6
DEFAULT_BATCH_SIZE = 64


@keras.saving.register_keras_serializable(package="dp_bitfit_keras")
class DPZeroModel(DPModel):
    """`DPModel` whose step is DPZero's (zeroth-order) instead of per-example gradients.

    Compile it with `DPOptimizer(keras.optimizers.SGD(lr), l2_norm_clip=C, ...)`: C clips the
    per-example *scalar*, σ and the ledger are the usual ones. The forward passes run in
    inference mode (no dropout), so both see the same network.

    Args:
        model: a built Keras model.
        trainable: `"all"` (the paper) or `"bias"`, `"bias+head"`, a callable.
        perturbation: λ, the finite-difference step (1e-3).
    """

    def __init__(self, model, trainable="all", perturbation=DEFAULT_PERTURBATION, **kwargs):
        super().__init__(model, trainable=trainable, **kwargs)
        if not perturbation > 0:
            raise ValueError(f"perturbation must be > 0; got {perturbation}.")
        self.perturbation = float(perturbation)

    def get_config(self):
        return dict(super().get_config(), perturbation=self.perturbation)

    def _direction(self, variables):
        # Stateless: z of step t is a function of (noise key, t), so it is never stored and a
        # resumed run draws the same directions. Its own streams, so z never reuses the noise's.
        opt = self.optimizer
        key, step = opt.noise_stream()
        return prng.normal_list(
            key, [v.shape for v in variables], step, prng.DPZERO_DIRECTION, generator=opt.noise_generator
        )

    def _example_losses(self, x, y, sample_weight):
        """Each example's weighted loss (per-token weights: the weighted mean over its tokens)."""
        y_pred = self.model(x, training=False)
        losses = tf.cast(self._per_example_loss(y, y_pred), tf.float32)
        _, weighted = gradients.weighted_example_losses(losses, sample_weight)
        return weighted, y_pred

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = list(self.selection.variables)
        z = self._direction(variables)
        lam = self.perturbation

        def shift(scale):
            for v, d in zip(variables, z):
                v.assign_add(tf.cast(scale * d, v.dtype))

        shift(lam)
        plus, _ = self._example_losses(x, y, sample_weight)
        with tf.control_dependencies([plus]):
            shift(-2.0 * lam)
        with tf.control_dependencies([plus]):
            minus, y_pred = self._example_losses(x, y, sample_weight)
        with tf.control_dependencies([minus]):
            shift(lam)  # back to θ (up to float rounding of ±λz)
        scalars = (plus - minus) / (2.0 * lam)  # of the weighted losses: weights applied once
        mask = example_mask(sample_weight)
        with tf.control_dependencies([minus]):
            projected = private_projection(self.optimizer, scalars, z, variables, mask)
        self._track_loss(0.5 * (plus + minus), mask)
        metrics = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        # The released (noisy) projected gradient: post-processing of the DP output.
        return dict(metrics, projected_grad=projected)


def private_projection(optimizer, per_example_scalars, directions, trainable_variables, mask=None):
    """A zeroth-order DP step (DPZero) on the optimizer's one clip-and-noise path.

    Each per-example scalar d_i (a directional derivative) is clipped to [-C, C] (a 1-D clip is
    the L2 clip), summed, noised by the optimizer's Gaussian query and ledger like every other
    step, divided by the expected batch size, and the gradient handed to the inner optimizer is
    that scalar times `directions` (post-processing). Returns the noisy mean scalar.
    """
    if optimizer.accumulation_steps > 1:
        raise ValueError("DPZero steps do not accumulate: use gradient_accumulation_steps=1 (raise the batch size).")
    if not optimizer.built:
        optimizer.build(trainable_variables)
    summed, _ = clipping.clipped_sum(
        [per_example_scalars[:, None]], optimizer.per_example_clip_tensor(), optimizer.clipping, mask
    )
    released = []

    def to_gradients(noised):
        released.append(noised[0][0])
        return [noised[0][0] * tf.cast(d, tf.float32) for d in directions]

    optimizer.apply_clipped_sum(summed, tf.constant(0.0), trainable_variables, to_gradients=to_gradients)
    return released[0] / tf.cast(optimizer.expected_batch_size_tensor(), tf.float32)


def dpzero(model: keras.Model, trainable="all", perturbation: float = DEFAULT_PERTURBATION) -> DPZeroModel:
    """Wraps `model` for DPZero training; compile with a `DPOptimizer` around `SGD(lr)`.

    Example:
        >>> m = dpzero(base, trainable="all")  # doctest: +SKIP
        >>> m.compile(optimizer=DPOptimizer(keras.optimizers.SGD(1e-6), l2_norm_clip=200.0,
        ...                                 target_epsilon=8.0, target_delta=1e-5),
        ...           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # doctest: +SKIP
    """
    return DPZeroModel(model, trainable=trainable, perturbation=perturbation)


__all__ = ["DPZeroModel", "dpzero"]
