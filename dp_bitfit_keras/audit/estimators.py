"""ε lower bounds from the scores of held-in and held-out canaries (one training run).

An attack scores each canary; canaries scoring at least a threshold are guessed "in". Each
estimator turns the counts at a threshold into the largest ε that an (ε, δ)-DP (or f-DP)
mechanism could not have produced them under, at significance `significance`; all thresholds
on the Pareto frontier of the ROC are tried, with a Bonferroni correction over them.

- `one_run_epsilon`: Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run"
  (arXiv 2305.08846), one-sided guesses.
- `one_run_fdp_epsilon`: Mahloujifar et al., "Auditing f-differential privacy in one run"
  (arXiv 2410.22235), against the Gaussian trade-off curve that (ε, δ) implies.
- `family_epsilon`: a test of the trade-off curve of the *mechanism's own family*, a
  Poisson-subsampled Gaussian at the run's sampling rate and steps, with simultaneous
  Clopper-Pearson bounds on the ROC; it finds the smallest noise multiplier σ′ whose curve the
  scores reject and reports ε(σ′) at δ (canaries as independent trials, see its docstring).
- `clopper_pearson_epsilon`: the classical bound from TPR/FPR intervals (one-sided).

The first two and the threshold handling follow JAX Privacy's `auditing.CanaryScoreAuditor`
(Apache 2.0); the tests reproduce its published values.
"""

from __future__ import annotations

import functools

import dp_accounting
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from dp_bitfit_keras.privacy import accounting

_norm = scipy.stats.norm
_binom = scipy.stats.binom


# --- thresholds -----------------------------------------------------------------------------------


def _pareto_frontier(points: np.ndarray) -> np.ndarray:
    """Indices of the points of a piecewise-linear curve (sorted by x) not weakly dominated by a
    chord between two outer points."""
    indices = np.arange(points.shape[0])
    while len(indices) > 2:
        diff = np.diff(points[indices], axis=0)
        dominated = diff[:-1, 1] * diff[1:, 0] - diff[1:, 1] * diff[:-1, 0] <= 0
        if not np.any(dominated):
            break
        indices = indices[np.r_[True, ~dominated, True]]
    return indices


def roc_counts(in_scores, out_scores):
    """(thresholds, true-positive counts, false-positive counts) on the ROC's Pareto frontier;
    a canary is guessed "in" when its score is ≥ the threshold."""
    in_scores, out_scores = np.sort(np.asarray(in_scores, float)), np.sort(np.asarray(out_scores, float))
    if in_scores.size == 0 or out_scores.size == 0:
        raise ValueError("Both in_scores and out_scores must be non-empty.")
    thresholds = np.concatenate([np.union1d(in_scores, out_scores), [np.inf]])
    fn = np.searchsorted(in_scores, thresholds, side="left")
    tn = np.searchsorted(out_scores, thresholds, side="left")
    keep = _pareto_frontier(np.stack([fn, tn], axis=1))
    return thresholds[keep], in_scores.size - fn[keep], out_scores.size - tn[keep]


def _clopper_pearson_upper(k, n, significance):
    return np.where(k < n, scipy.stats.beta.ppf(1 - significance, k + 1, n - k), 1.0)


# --- Steinke et al.'s one-run bound -----------------------------------------------------------------


def _one_run_p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """P[≥ `correct` of `guesses` right] for an (ε, δ)-DP mechanism with m canaries (Thm. 7)."""
    q = scipy.special.expit(eps)
    beta = _binom.sf(correct - 1, guesses, q)
    if delta == 0:
        return beta
    i = np.arange(1, correct + 1)
    alpha = np.max((_binom.sf(correct - i - 1, guesses, q) - beta) / i, initial=0)
    return min(beta + alpha * delta * 2 * m, 1.0)


def _largest_rejected(objective, eps_lo: float) -> float:
    """The ε where `objective` (positive while (ε, δ) is rejected) crosses 0, at least eps_lo."""
    if objective(eps_lo) <= 0:
        return eps_lo
    eps_hi = max(1.0, 2 * eps_lo)
    while objective(eps_hi) > 0:
        eps_lo, eps_hi = eps_hi, 2 * eps_hi
    return scipy.optimize.brentq(objective, eps_lo, eps_hi, xtol=1e-6)


def _one_run_bound(eps_lo, m, guesses, correct, significance, delta):
    if _one_run_p_value(m, guesses, correct, eps_lo, 0) > significance:
        return eps_lo
    return _largest_rejected(lambda e: significance - _one_run_p_value(m, guesses, correct, e, delta), eps_lo)


# --- Mahloujifar et al.'s f-DP one-run bound ---------------------------------------------------------


def _fdp_objective(inverse_blow_up, m, guesses, correct, significance):
    """Positive when the counts falsify the trade-off whose inverse blow-up function is given
    ('audit_rh_with_cap' of arXiv 2410.22235)."""
    r = significance * correct / m
    h = significance * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        h_new = max(h, inverse_blow_up(r))
        if h_new == h:
            break
        r = min(r + (i / (guesses - i)) * (h_new - h), 1.0)
        h = h_new
    return r + h - guesses / m


@functools.lru_cache(maxsize=1000)
def _gaussian_inverse_blow_up(eps: float, delta: float):
    sigma = dp_accounting.get_sigma_gaussian(eps, delta)
    if sigma == 0:
        return lambda x: float(x == 1.0)
    return lambda x: _norm.cdf(_norm.ppf(x) - 1 / sigma)


def _one_run_fdp_bound(eps_lo, m, guesses, correct, significance, delta):
    return _largest_rejected(
        lambda e: _fdp_objective(_gaussian_inverse_blow_up(e, delta), m, guesses, correct, significance), eps_lo
    )


def _best_over_thresholds(bound, in_scores, out_scores, significance, delta):
    """Bonferroni over the frontier's thresholds; thresholds tried by decreasing precision bound."""
    thresholds, tp, fp = roc_counts(in_scores, out_scores)
    significance = significance / len(thresholds)
    m = len(in_scores) + len(out_scores)
    guesses = tp + fp
    precision_lo = 1.0 - _clopper_pearson_upper(fp, guesses, significance)
    best, best_q = 0.0, 0.5
    for idx in np.argsort(-precision_lo):
        if guesses[idx] == 0 or tp[idx] / guesses[idx] <= best_q:
            continue
        eps = bound(best, m, int(guesses[idx]), int(tp[idx]), significance, delta)
        if eps > best:
            best, best_q = eps, scipy.special.expit(eps)
    return float(best)


def one_run_epsilon(in_scores, out_scores, significance: float = 0.05, delta: float = 1e-5) -> float:
    """Steinke et al.'s one-run ε lower bound (one-sided guesses, Bonferroni over thresholds).

    Example:
        >>> from scipy import stats
        >>> n = 10_000
        >>> out = stats.norm.ppf((np.arange(n) + 0.5) / n)
        >>> round(one_run_epsilon(out + 1, out, 0.05, 1e-6), 4)  # JAX Privacy's test value: 1.13346
        1.1335
    """
    return _best_over_thresholds(_one_run_bound, in_scores, out_scores, significance, delta)


def one_run_fdp_epsilon(in_scores, out_scores, significance: float = 0.05, delta: float = 1e-5) -> float:
    """Mahloujifar et al.'s one-run f-DP ε lower bound (Gaussian trade-off of (ε, δ)).

    Example:
        >>> from scipy import stats
        >>> n = 10_000
        >>> out = stats.norm.ppf((np.arange(n) + 0.5) / n)
        >>> round(one_run_fdp_epsilon(out + 1, out, 0.05, 1e-6), 4)  # JAX Privacy's test value: 2.164749
        2.1647
    """
    return _best_over_thresholds(_one_run_fdp_bound, in_scores, out_scores, significance, delta)


def clopper_pearson_epsilon(in_scores, out_scores, significance: float = 0.05, delta: float = 1e-5) -> float:
    """max over thresholds of log((TPR_lo − δ) / FPR_hi), Clopper-Pearson at significance/2 each,
    Bonferroni over the frontier's thresholds (one-sided)."""
    thresholds, tp, fp = roc_counts(in_scores, out_scores)
    significance = significance / len(thresholds)
    n_in, n_out = len(in_scores), len(out_scores)
    tpr_lo = 1 - _clopper_pearson_upper(n_in - tp, n_in, significance / 2)
    fpr_hi = _clopper_pearson_upper(fp, n_out, significance / 2)
    valid = tpr_lo > delta
    if not np.any(valid):
        return 0.0
    return float(max(0.0, np.max(np.log(tpr_lo[valid] - delta) - np.log(fpr_hi[valid]))))


# --- the mechanism's own family: Poisson-subsampled Gaussians -------------------------------------


@functools.lru_cache(maxsize=256)
def psg_trade_off(noise_multiplier: float, sampling_rate: float, steps: int):
    """The trade-off curve α ↦ β of `steps` Poisson-subsampled Gaussian steps (vectorised).

    f is the convex conjugate of the privacy profile δ(ε) (PLD, both neighbouring directions):
    f(α) = max(0, sup_ε 1 − δ(ε) − e^ε α, sup_ε e^−ε (1 − δ(ε) − α)), on a grid of ε. A grid
    and the PLD's pessimistic δ only lower f, so the curve used is never above the exact one:
    rejecting it rejects the mechanism.
    """
    pld = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
        noise_multiplier, sampling_prob=sampling_rate, value_discretization_interval=1e-3
    ).self_compose(steps)
    eps = np.concatenate([[0.0], np.geomspace(1e-3, 40, 400)])
    deltas = np.asarray(pld.get_delta_for_epsilon(eps), np.float64)
    offsets = np.concatenate([1 - deltas, np.exp(-eps) * (1 - deltas)])
    slopes = np.concatenate([np.exp(eps), np.exp(-eps)])

    def trade_off(alpha):
        alpha = np.asarray(alpha, np.float64)
        return np.maximum(0.0, np.max(offsets[None, :] - slopes[None, :] * alpha.reshape(-1, 1), axis=1))

    return trade_off


def family_epsilon(
    in_scores,
    out_scores,
    sampling_rate: float,
    steps: int,
    significance: float = 0.05,
    delta: float = 1e-5,
    accountant: str = "pld",
) -> tuple[float, float]:
    """(ε_lower, σ′): the smallest noise multiplier σ′ whose Poisson-subsampled Gaussian
    trade-off curve (at `sampling_rate`, `steps`) the scores reject, and ε(σ′) at `delta`
    (0 and σ′ = ∞ when none is rejected).

    The test: at every threshold of the ROC's Pareto frontier, Clopper-Pearson bounds on TPR
    (lower) and FPR (upper), Bonferroni over thresholds and both rates; σ′ is rejected when
    some threshold's β upper bound (1 − TPR) lies below f_σ′ at its α upper bound.

    Unlike the one-run estimators, this treats canaries as independent trials of the
    mechanism on one coordinate, which the white-box design of `canary_audit` makes true for a
    correct implementation (each canary owns a coordinate; Poisson inclusion and the noise are
    independent per coordinate). The one-run bounds need no such assumption; the two-sided
    checks of `canary_audit` flag implementations that couple coordinates.
    """
    _, tp, fp = roc_counts(in_scores, out_scores)
    n_in, n_out = len(in_scores), len(out_scores)
    alpha = significance / (2 * len(tp))
    beta_hi = _clopper_pearson_upper(n_in - tp, n_in, alpha)  # 1 − TPR lower bound
    fpr_hi = _clopper_pearson_upper(fp, n_out, alpha)
    useful = (beta_hi < 1) & (fpr_hi < 1)
    beta_hi, fpr_hi = beta_hi[useful], fpr_hi[useful]

    def rejected(sigma):
        return beta_hi.size > 0 and bool(np.any(beta_hi < psg_trade_off(float(sigma), sampling_rate, steps)(fpr_hi)))

    lo, hi = 0.1, 100.0
    if not rejected(hi):
        return 0.0, float("inf")
    if rejected(lo):
        hi = lo
    while hi / lo > 1.005:  # bisection on log σ′: more noise, a higher curve, easier to reject
        mid = float(np.sqrt(lo * hi))
        lo, hi = (lo, mid) if rejected(mid) else (mid, hi)
    return float(accounting.compute_epsilon(hi, sampling_rate, steps, delta, accountant)), float(hi)


__all__ = [
    "clopper_pearson_epsilon",
    "family_epsilon",
    "one_run_epsilon",
    "one_run_fdp_epsilon",
    "psg_trade_off",
    "roc_counts",
]
