"""ε of a DP-SGD run: the run is a composed `DpEvent`, an accountant reads it.

No accounting math lives here: `dp_accounting` does it (RDP by default, PLD on request).
"""

from __future__ import annotations

import logging
import math

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")


class _QuietLowOrders(logging.Filter):
    # The RDP accountant logs, per call, each low order (α near 1) whose series does not
    # converge and which it then drops from the minimum; dropping is correct (other orders
    # still bound ε), and at one line per order per call the warning drowns training logs.
    def filter(self, record):
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietLowOrders())


def validate(noise_multiplier=None, sampling_rate=None, steps=None, delta=None, accountant=None):
    """Raises a `ValueError` naming the first argument out of range (`None`s are not checked)."""
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier}.")
    if sampling_rate is not None and not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1] (expected batch size / dataset size); got {sampling_rate}.")
    if steps is not None and (int(steps) != steps or steps < 0):
        raise ValueError(f"steps must be a non-negative integer; got {steps}.")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}.")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}.")


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The `DpEvent` of `steps` Poisson-subsampled Gaussian steps."""
    validate(noise_multiplier, sampling_rate, steps)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        int(steps),
    )


def dp_sgd_event_of(step_event: dp_accounting.DpEvent, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` Poisson-subsampled repetitions of any per-step event (e.g. a composed one)."""
    validate(sampling_rate=sampling_rate, steps=steps)
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(sampling_rate, step_event), int(steps))


def make_accountant(accountant: str = "rdp") -> dp_accounting.PrivacyAccountant:
    validate(accountant=accountant)
    if accountant == "rdp":
        return rdp.RdpAccountant()
    return pld.PLDAccountant()


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp") -> float:
    """ε of any `DpEvent` (e.g. several phases composed) at `delta`."""
    validate(delta=delta, accountant=accountant)
    acc = make_accountant(accountant)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def compute_epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps.

    Args:
        noise_multiplier: σ, the noise std divided by the clipping norm.
        sampling_rate: q, the probability that an example is in a step's batch.
        steps: number of noisy steps taken.
        delta: the δ of (ε, δ)-DP.
        accountant: `"rdp"` (Rényi DP, Mironov et al.) or `"pld"` (privacy loss distributions,
            tighter, slower).

    Returns:
        ε; 0 for no steps, `inf` for σ = 0.

    Example:
        >>> round(compute_epsilon(1.1, 256 / 60000, 15 * 60000 // 256, 1e-5), 2)
        1.28
    """
    validate(noise_multiplier, sampling_rate, steps, delta, accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return epsilon_of_event(dp_sgd_event(noise_multiplier, sampling_rate, steps), delta, accountant)


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tol: float = 1e-3,
) -> float:
    """Smallest σ (within `tol`) whose run of `steps` steps stays within `target_epsilon`.

    Raises:
        ValueError: bad arguments, or a target no σ up to 1e4 reaches.
    """
    validate(None, sampling_rate, steps, delta, accountant)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0; got {target_epsilon}.")
    if steps == 0:
        return 0.0
    upper = 1e4
    if compute_epsilon(upper, sampling_rate, steps, delta, accountant) > target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon} is unreachable at delta={delta} with "
            f"{steps} steps at sampling rate {sampling_rate:.4g}: even noise_multiplier={upper:g} "
            "exceeds it. Raise target_epsilon or delta, or take fewer steps."
        )
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            lambda sigma: dp_sgd_event(sigma, sampling_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
            tol=tol,
        )
    )
