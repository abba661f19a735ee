"""Training methods built on the same engine: one clip-and-noise path, one accountant."""

from dp_bitfit_keras.methods import sparta as sparta_module
from dp_bitfit_keras.methods.dpzero import DPZeroModel, dpzero
from dp_bitfit_keras.methods.sparta import SpartaResult, sparta, sparta_fit
from dp_bitfit_keras.methods.two_phase import TwoPhaseResult, two_phase_fit

__all__ = [
    "DPZeroModel",
    "SpartaResult",
    "TwoPhaseResult",
    "dpzero",
    "sparta",
    "sparta_fit",
    "sparta_module",
    "two_phase_fit",
]
