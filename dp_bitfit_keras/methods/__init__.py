"""Training methods built on the same engine: one clip-and-noise path, one accountant."""

from dp_bitfit_keras.methods import sparta as sparta_module
from dp_bitfit_keras.methods.dpzero import DPZeroModel
from dp_bitfit_keras.methods.dpzero import dpzero
from dp_bitfit_keras.methods.sparta import SpartaResult
from dp_bitfit_keras.methods.sparta import sparta
from dp_bitfit_keras.methods.sparta import sparta_fit
from dp_bitfit_keras.methods.two_phase import TwoPhaseResult
from dp_bitfit_keras.methods.two_phase import two_phase_fit

__all__ = ["DPZeroModel", "SpartaResult", "TwoPhaseResult", "dpzero", "sparta", "sparta_fit", "sparta_module", "two_phase_fit"]
