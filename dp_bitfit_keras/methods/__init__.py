"""Training methods built on the same engine: one clip-and-noise path, one accountant."""

from dp_bitfit_keras.methods.two_phase import TwoPhaseResult
from dp_bitfit_keras.methods.two_phase import two_phase_fit

__all__ = ["TwoPhaseResult", "two_phase_fit"]
