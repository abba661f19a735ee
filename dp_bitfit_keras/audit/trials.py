"""Empirical privacy auditing: a lower bound on ε from membership inference of a canary.

The auditor runs the *real* training step (the model's compiled `train_step`, its optimizer's
clip, noise and ledger) many times from the same starting weights, half the trials with a
canary example in the batch and half without (the canary row then has weight 0, which the
engine treats as absent). Each trial's final weights give a membership score per variable:
the weight change projected onto the direction the canary pushes that variable. An (ε, δ)-DP
mechanism bounds every test: TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ. A threshold is chosen on
one half of the trials and the rates are measured on the other; Clopper-Pearson intervals make
the bound hold with the given confidence (Bonferroni over the variables scored):

    ε_lower = max(log((TPR_low − δ) / FPR_high), log((TNR_low − δ) / FNR_high)).

Correct DP training must give ε_lower ≤ the accountant's ε (up to the confidence level);
broken training (no clipping, no noise, wrongly scaled noise, unprotected weights moving)
gives a bound above it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf
from scipy import stats

from dp_bitfit_keras.privacy import accounting, prng


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 − alpha) Clopper-Pearson interval of a binomial proportion."""
    lo = 0.0 if successes == 0 else stats.beta.ppf(alpha / 2, successes, trials - successes + 1)
    hi = 1.0 if successes == trials else stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)
    return float(lo), float(hi)


def epsilon_lower_bound(tp: int, fn: int, fp: int, tn: int, delta: float, alpha: float = 0.05) -> float:
    """ε that an (ε, δ)-DP mechanism must have for a test with these counts, at confidence 1 − alpha."""
    tpr_lo, _ = clopper_pearson(tp, tp + fn, alpha)
    _, fpr_hi = clopper_pearson(fp, fp + tn, alpha)
    tnr_lo, _ = clopper_pearson(tn, fp + tn, alpha)
    _, fnr_hi = clopper_pearson(fn, tp + fn, alpha)
    bounds = [0.0]
    for num, den in [(tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)]:
        if num > 0 and den > 0:
            bounds.append(math.log(num / den))
    return max(bounds)


def _best_threshold(pos: np.ndarray, neg: np.ndarray, delta: float) -> float:
    """The threshold (score ≥ t means 'canary in') with the largest point estimate of ε."""
    best, best_t = -1.0, float(np.max(pos))
    for t in np.unique(np.concatenate([pos, neg])):
        tpr, fpr = np.mean(pos >= t), np.mean(neg >= t)
        est = math.log(max(tpr - delta, 1e-12) / max(fpr, 1.0 / (2 * len(neg))))
        if est > best:
            best, best_t = est, float(t)
    return best_t


@dataclasses.dataclass
class AuditResult:
    empirical_epsilon: float  # the lower bound, at confidence 1 − alpha
    claimed_epsilon: float  # the accountant's ε for the audited steps
    delta: float
    trials: int  # per world (with / without canary)
    best_variable: str
    per_variable: dict  # variable path -> lower bound


def audit(
    model,
    x,
    y,
    canary_index: int,
    *,
    trials: int = 1000,
    steps: int = 1,
    delta: float = 1e-5,
    alpha: float = 0.05,
    seed: int | None = None,
    variables=None,
) -> AuditResult:
    """Audits `steps` DP steps of a compiled `DPModel` on the batch `(x, y)`.

    Args:
        model: a `DPModel` compiled with a `DPOptimizer` (any clipping, any selection).
        x, y: one batch (arrays); row `canary_index` is the canary, weighted 0 in the
            'without' world.
        trials: trials per world.
        steps: DP steps per trial (same batch each step, no subsampling: the claimed ε is that
            of `steps` Gaussian steps with q = 1).
        variables: the variables to score (default: all of the wrapped model's weights, so a
            weight that should be frozen but moves is caught too).
        seed: None (default): each trial's noise is keyed by a fresh secret key, as in a real
            run; an int derives the trials' keys from it (a reproducible audit).
    """
    opt = model.optimizer
    n = len(y)
    opt.build(list(model.selection.variables))
    opt.begin_run(sampling_rate=1.0, expected_batch_size=float(n - 1), planned_steps=10**9)
    variables = list(variables or model.model.weights)
    start = [v.numpy().copy() for v in variables]
    state = [v.numpy().copy() for v in opt.variables]
    # The direction the canary pushes each variable: minus its (non-private) gradient.
    loss = model.per_example_loss
    handles = [v.value for v in variables]  # frozen weights too: watch them explicitly
    with tf.GradientTape() as tape:
        tape.watch(handles)
        canary_loss = tf.reduce_sum(
            loss(y[canary_index : canary_index + 1], model.model(x[canary_index : canary_index + 1], training=False))
        )
    directions = [None if g is None else -tf.convert_to_tensor(g).numpy() for g in tape.gradient(canary_loss, handles)]
    weights_in = np.ones(n, "float32")
    weights_out = weights_in.copy()
    weights_out[canary_index] = 0.0

    def restore():
        for var, value in zip(opt.variables + variables, state + start):
            var.assign(value)

    scores = {0: [], 1: []}
    for trial in range(trials):
        for world, w in ((1, weights_in), (0, weights_out)):
            restore()
            opt.set_noise_key(
                prng.new_key() if seed is None else prng.derive_key(f"dp_bitfit_keras/audit/{seed}/{trial}/{world}")
            )
            for _ in range(steps):
                model.train_on_batch(x, y, sample_weight=w)
            scores[world].append(
                [
                    0.0 if d is None else float(np.sum((v.numpy() - s) * d))
                    for v, s, d in zip(variables, start, directions)
                ]
            )
    restore()
    pos, neg = np.array(scores[1]), np.array(scores[0])
    half = trials // 2
    per_variable = {}
    scored = [j for j, d in enumerate(directions) if d is not None and np.any(d)]
    for j in scored:
        t = _best_threshold(pos[:half, j], neg[:half, j], delta)
        p, q = pos[half:, j], neg[half:, j]
        tp, fp = int(np.sum(p >= t)), int(np.sum(q >= t))
        bound = epsilon_lower_bound(tp, len(p) - tp, fp, len(q) - fp, delta, alpha / max(len(scored), 1))
        per_variable[getattr(variables[j], "path", variables[j].name)] = bound
    best = max(per_variable, key=per_variable.get)
    claimed = accounting.compute_epsilon(opt.noise_multiplier, 1.0, steps, delta, opt.accountant)
    return AuditResult(per_variable[best], claimed, delta, trials, best, per_variable)


__all__ = ["AuditResult", "audit", "clopper_pearson", "epsilon_lower_bound"]
