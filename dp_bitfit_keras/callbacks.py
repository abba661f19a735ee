"""`PrivacyCallback`: ε in the logs (every step and epoch), and a hard stop at a privacy budget."""

from __future__ import annotations

import keras

from dp_bitfit_keras.optimizer import DPOptimizer


class PrivacyCallback(keras.callbacks.Callback):
    """Writes `epsilon` into the logs after every batch (the progress bar shows it as steps go)
    and after each epoch (`History`, `keras.callbacks.TensorBoard`), and, with `max_epsilon`,
    stops training before a step would spend more.

    Per batch, ε is that of the steps taken so far, counted on the host (the ledger's step count
    at the start of `fit` plus one per logical batch) and read off an RDP curve computed once, so
    it adds no device read and ~0.1 ms per step; the epoch figure is the ledger's exact
    `privacy_spent`. With `accountant="pld"` the per-batch figure is left out (each would cost a
    fresh composition). List this callback before `TensorBoard` so that one sees `epsilon`.

    The budget is enforced inside the compiled step: the optimizer is given the largest number
    of steps whose ε stays within `max_epsilon` and takes no step past it; training then stops
    at the end of that batch.

    Args:
        delta: the δ at which ε is reported.
        max_epsilon: optional ε budget.

    Example:
        >>> callback = PrivacyCallback(delta=1e-5, max_epsilon=8.0)
        >>> # model.fit(ds, epochs=3, callbacks=[callback]); model.history.history["epsilon"]
    """

    def __init__(self, delta: float, max_epsilon: float | None = None):
        super().__init__()
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1); got {delta}.")
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be > 0; got {max_epsilon}.")
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.max_steps = None
        self._curve = None

    def _optimizer(self) -> DPOptimizer:
        optimizer = self.model.optimizer
        if not isinstance(optimizer, DPOptimizer):
            raise ValueError("PrivacyCallback needs a model compiled with a DPOptimizer.")
        return optimizer

    def on_train_begin(self, logs=None):
        optimizer = self._optimizer()
        if self.max_epsilon is not None:
            self.max_steps = optimizer.max_steps_within(self.max_epsilon, self.delta)
            optimizer.set_step_budget(self.max_steps)
        self._steps_at_begin = optimizer.dp_steps
        self._batches_before_epoch = self._batches_in_epoch = 0
        self._curve = None
        sigma, q = optimizer.noise_multiplier, optimizer.sampling_rate
        if optimizer.accountant == "rdp" and sigma and q:
            self._curve = optimizer.epsilon_curve(self.delta)

    def on_epoch_begin(self, epoch, logs=None):
        self._batches_before_epoch += self._batches_in_epoch
        self._batches_in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self._optimizer()
        self._batches_in_epoch = batch + 1
        if self.max_steps is not None:
            steps = optimizer.dp_steps  # read anyway for the stop
            if steps >= self.max_steps:
                self.model.stop_training = True
        else:
            batches = self._batches_before_epoch + self._batches_in_epoch
            steps = self._steps_at_begin + batches // optimizer.accumulation_steps
        if self._curve is not None and logs is not None:
            logs["epsilon"] = self._curve(steps)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self._optimizer().privacy_spent(self.delta)[0]

    def on_train_end(self, logs=None):
        if self.max_steps is not None:
            self._optimizer().set_step_budget(None)
