"""`PrivacyCallback`: ε in the logs, and a hard stop at a privacy budget."""

from __future__ import annotations

import keras

from dp_bitfit_keras.optimizer import DPOptimizer


class PrivacyCallback(keras.callbacks.Callback):
    """Writes `epsilon` into the logs after each epoch (progress bar and `History`) and, with
    `max_epsilon`, stops training before a step would spend more.

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

    def on_train_batch_end(self, batch, logs=None):
        if self.max_steps is not None and self._optimizer().dp_steps >= self.max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self._optimizer().privacy_spent(self.delta)[0]

    def on_train_end(self, logs=None):
        if self.max_steps is not None:
            self._optimizer().set_step_budget(None)
