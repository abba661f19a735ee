"""dp_bitfit_keras: differentially private bias-term fine-tuning (DP-BiTFiT) for Keras 3 on TF."""

from dp_bitfit_keras import audit, bookkeeping, methods, users
from dp_bitfit_keras.biases import add_biases
from dp_bitfit_keras.callbacks import PrivacyCallback
from dp_bitfit_keras.gradients import PforFallbackError, PforFallbackWarning, last_pfor_fallbacks, per_example_gradients
from dp_bitfit_keras.model import DPModel
from dp_bitfit_keras.optimizer import DPOptimizer
from dp_bitfit_keras.privacy.accounting import compute_epsilon, noise_multiplier_for_epsilon
from dp_bitfit_keras.privacy.sampling import max_batch_size_for, poisson_batches
from dp_bitfit_keras.selection import Selection, enable_lora, select_variables
from dp_bitfit_keras.users import PerUserModel, pack_users

__version__ = "0.1.0"

__all__ = [
    "DPModel",
    "DPOptimizer",
    "PerUserModel",
    "PforFallbackError",
    "PforFallbackWarning",
    "PrivacyCallback",
    "Selection",
    "add_biases",
    "audit",
    "bookkeeping",
    "compute_epsilon",
    "enable_lora",
    "last_pfor_fallbacks",
    "max_batch_size_for",
    "methods",
    "noise_multiplier_for_epsilon",
    "pack_users",
    "per_example_gradients",
    "poisson_batches",
    "select_variables",
    "users",
]
