"""dp_bitfit_keras: differentially private bias-term fine-tuning (DP-BiTFiT) for Keras 3 on TF."""

from dp_bitfit_keras.gradients import PforFallbackError
from dp_bitfit_keras.gradients import PforFallbackWarning
from dp_bitfit_keras.gradients import last_pfor_fallbacks
from dp_bitfit_keras.gradients import per_example_gradients
from dp_bitfit_keras.selection import Selection
from dp_bitfit_keras.selection import select_variables

__version__ = "0.1.0"

__all__ = [
    "PforFallbackError",
    "PforFallbackWarning",
    "Selection",
    "last_pfor_fallbacks",
    "per_example_gradients",
    "select_variables",
]
