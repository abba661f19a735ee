"""One-run white-box canary audit of the real training path (Steinke, Nasr & Jagielski 2023).

`canary_audit` trains one model through `DPModel.fit` on arrays (the Poisson sampler, the clip,
the secure noise, the ledger: nothing is simulated) whose training set is m canaries, each
included with probability ½ by a secret coin. Canary j's gradient is C·e_j: a gradient of norm
exactly C on its own coordinate (an `Embedding(m, 1)` row read by a linear loss), the worst case
the clip allows. The weights are read after every step (the threat model allows every
intermediate model), so coordinate j's update at step t, rescaled by B/(lr·C), is

    o_tj = 1[canary j in step t's batch] + σ·z_tj,    z_tj ~ N(0, 1),

and each canary's score is its log-likelihood ratio "included" (sampled with probability q at
each step) against "absent". The estimators of `audit.estimators` turn the scores of the
included and absent canaries into ε lower bounds.

The same observations check the mechanism two-sidedly: an ε lower bound below the claim cannot
tell a correct run from one that adds too much noise or samples at another rate, so the run
must also match its claimed parameters: σ from the absent canaries (overall and at every step),
q from the included ones, and the spread of each included canary's appearances over windows of
1/q steps (Poisson sampling's binomial spread; shuffled fixed batches have none).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time

import keras
import numpy as np
from scipy import stats

from dp_bitfit_keras.audit import estimators
from dp_bitfit_keras.privacy import accounting


@dataclasses.dataclass
class CanaryAuditResult:
    """What `canary_audit` measured. ε figures at `delta`; intervals at the check significance."""

    claimed_epsilon: float  # the accountant's ε for the run's σ, q and steps
    empirical_epsilon: float  # the largest of `bounds`
    bounds: dict  # estimator -> ε lower bound (significance `significance`)
    family_noise_multiplier: float  # σ′ of the family estimator (inf: nothing rejected)
    noise_multiplier: float  # the claimed σ
    noise_multiplier_interval: tuple  # from the absent canaries
    step_noise_multiplier_range: tuple  # (min, max) of the per-step estimates of σ
    step_noise_consistent: bool  # every step's interval (Bonferroni) contains σ
    sampling_rate: float  # the claimed q
    sampling_rate_interval: tuple  # from the included canaries
    window_variance_ratio: float  # spread of appearances per window / Poisson's (1 expected)
    window_variance_interval: tuple  # of that ratio
    checks: dict  # check -> passed
    canaries: int
    included: int
    steps: int
    delta: float
    significance: float
    seconds: float

    @property
    def passed(self) -> bool:
        """All two-sided checks pass and no bound exceeds the claimed ε."""
        return all(self.checks.values())


def _canary_model(canaries: int):
    ids = keras.Input(shape=(), dtype="int32", name="canary")
    table = keras.layers.Embedding(canaries, 1, embeddings_initializer="zeros", name="canaries")
    return keras.Model(ids, table(ids)), table


def _linear_loss(clip):
    def loss(y_true, y_pred):
        # d loss / d row_j = −C for the canary's own row: a per-example gradient of norm exactly C.
        return -clip * keras.ops.reshape(y_pred, [-1])

    return loss


class _Reader(keras.callbacks.Callback):
    """Reads the canary table after every step (the threat model's intermediate models)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.snapshots = []

    def on_train_begin(self, logs=None):
        self.snapshots = [np.array(self.table.embeddings.numpy()[:, 0], np.float64)]

    def on_train_batch_end(self, batch, logs=None):
        self.snapshots.append(np.array(self.table.embeddings.numpy()[:, 0], np.float64))


def log_likelihood_ratios(observations: np.ndarray, sampling_rate: float, noise_multiplier: float) -> np.ndarray:
    """Per canary (column): Σ_t log[(1 − q)·φ(o/σ) + q·φ((o − 1)/σ)] − log φ(o/σ)."""
    z = (2 * observations - 1) / (2 * noise_multiplier**2)
    return np.sum(np.logaddexp(math.log1p(-sampling_rate), math.log(sampling_rate) + z), axis=0)


def _variance_interval(values: np.ndarray, z: float):
    """Asymptotic interval of a variance (any distribution with a fourth moment)."""
    values = np.asarray(values, np.float64).ravel()
    centred = values - values.mean()
    s2 = float(np.mean(centred**2))
    se = math.sqrt(max(float(np.mean(centred**4)) - s2**2, 0.0) / values.size)
    return s2, (max(s2 - z * se, 0.0), s2 + z * se)


def _mean_interval(values: np.ndarray, z: float):
    values = np.asarray(values, np.float64).ravel()
    mean = float(values.mean())
    se = float(values.std()) / math.sqrt(values.size)
    return mean, (float(mean - z * se), float(mean + z * se))


def mechanism_checks(observations, included, sampling_rate, noise_multiplier, check_significance):
    """The two-sided checks on the rescaled updates `observations` `[steps, canaries]`."""
    steps = observations.shape[0]
    absent, present = observations[:, ~included], observations[:, included]
    z = stats.norm.ppf(1 - check_significance / 8)  # 4 two-sided checks
    _, (lo, hi) = _variance_interval(absent, z)
    sigma_interval = (math.sqrt(lo), math.sqrt(hi))
    z_step = stats.norm.ppf(1 - check_significance / (8 * steps))
    step_sigmas, step_ok = [], True
    for t in range(steps):
        s2, (lo_t, hi_t) = _variance_interval(absent[t], z_step)
        step_sigmas.append(math.sqrt(s2))
        step_ok &= lo_t <= noise_multiplier**2 <= hi_t
    q_hat, q_interval = _mean_interval(present, z)
    window = max(1, round(1 / sampling_rate))
    usable = steps // window * window
    windows = present[:usable].reshape(usable // window, window, -1).sum(axis=1)
    expected = window * (sampling_rate * (1 - sampling_rate) + noise_multiplier**2)
    v, (v_lo, v_hi) = _variance_interval(windows, z)
    checks = {
        "noise_multiplier": bool(sigma_interval[0] <= noise_multiplier <= sigma_interval[1]),
        "noise_multiplier_every_step": bool(step_ok),
        "sampling_rate": bool(q_interval[0] <= sampling_rate <= q_interval[1]),
        "poisson_spread": bool(v_lo <= expected <= v_hi),
    }
    return dict(
        noise_multiplier_interval=sigma_interval,
        step_noise_multiplier_range=(min(step_sigmas), max(step_sigmas)),
        step_noise_consistent=bool(step_ok),
        sampling_rate_interval=q_interval,
        window_variance_ratio=float(v / expected),
        window_variance_interval=(float(v_lo / expected), float(v_hi / expected)),
        checks=checks,
    )


def canary_audit(
    canaries: int = 10_000,
    sampling_rate: float = 0.1,
    steps: int = 100,
    target_epsilon: float = 2.0,
    delta: float = 1e-5,
    *,
    l2_norm_clip: float = 1.0,
    significance: float = 0.05,
    check_significance: float = 1e-3,
    accountant: str = "pld",
    gradient_method: str = "bookkeeping",
    examples_per_user: int = 0,
    _mechanism=None,
) -> CanaryAuditResult:
    """Audit one training run of the default DP path with `canaries` white-box canaries.

    Args:
        canaries: m; each is in the training set with probability ½ (a secret coin).
        sampling_rate: q of the Poisson sampler (expected batch = q × included canaries).
        steps: DP steps of the run (weights read after each).
        target_epsilon, delta: σ is calibrated by the optimizer for this ε at this δ.
        significance: of each ε lower bound (each bound holds with probability 1 − this).
        check_significance: of the two-sided checks together (Bonferroni over them).
        accountant: "pld" (tight) or "rdp" for σ and the claimed ε.
        examples_per_user: k > 0 audits **user-level** training: each canary is a user with k
            rows pushing its coordinate, trained with `fit(..., user_ids=...,
            max_examples_per_user=k)` (users sampled, rows clipped at C/k); 0: row level.

    Returns:
        A `CanaryAuditResult`: `claimed_epsilon`, `empirical_epsilon` (the largest lower bound),
        `bounds` per estimator ("one_run", "one_run_fdp", "clopper_pearson", "family"), the
        checks' intervals, and `passed`.

    Example:
        >>> r = canary_audit(canaries=2_000, steps=20, target_epsilon=2.0)  # doctest: +SKIP
        >>> r.passed, r.empirical_epsilon <= r.claimed_epsilon  # doctest: +SKIP
        (True, True)
    """
    from dp_bitfit_keras import DPModel

    start = time.perf_counter()
    rng = np.random.default_rng(secrets.randbits(128))
    included = rng.random(canaries) < 0.5
    ids = np.flatnonzero(included).astype(np.int32)
    n = ids.size
    if n < 2:
        raise ValueError(f"Too few canaries ({canaries}): at least 2 must be included.")
    if steps % max(1, round(1 / sampling_rate)):
        raise ValueError(f"steps ({steps}) must be a multiple of round(1/sampling_rate), the steps of one epoch.")
    sigma = accounting.noise_multiplier_for_epsilon(target_epsilon, sampling_rate, steps, delta, accountant)
    claimed = accounting.compute_epsilon(sigma, sampling_rate, steps, delta, accountant)
    mechanism = _mechanism or _honest
    model_fn, table = _canary_model(canaries)
    optimizer = mechanism.optimizer(sigma, l2_norm_clip, accountant)
    model = DPModel(model_fn, trainable="all")
    model.compile(optimizer=optimizer, loss=_linear_loss(l2_norm_clip), gradient_method=gradient_method)
    reader = _Reader(table)
    rows = np.repeat(ids, examples_per_user) if examples_per_user else ids
    mechanism.fit(model, rows, sampling_rate, steps, reader, examples_per_user)
    if len(reader.snapshots) != steps + 1:
        raise RuntimeError(f"The audited run took {len(reader.snapshots) - 1} steps, not {steps}.")
    weights = np.stack(reader.snapshots)
    expected_batch = sampling_rate * n
    observations = np.diff(weights, axis=0) * expected_batch / l2_norm_clip  # learning rate 1
    scores = log_likelihood_ratios(observations, sampling_rate, sigma)
    in_scores, out_scores = scores[included], scores[~included]
    family, family_sigma = estimators.family_epsilon(
        in_scores, out_scores, sampling_rate, steps, significance, delta, accountant
    )
    bounds = {
        "one_run": estimators.one_run_epsilon(in_scores, out_scores, significance, delta),
        "one_run_fdp": estimators.one_run_fdp_epsilon(in_scores, out_scores, significance, delta),
        "clopper_pearson": estimators.clopper_pearson_epsilon(in_scores, out_scores, significance, delta),
        "family": family,
    }
    checked = mechanism_checks(observations, included, sampling_rate, sigma, check_significance)
    checked["checks"]["below_claim"] = bool(max(bounds.values()) <= claimed)
    return CanaryAuditResult(
        claimed_epsilon=float(claimed),
        empirical_epsilon=float(max(bounds.values())),
        bounds=bounds,
        family_noise_multiplier=family_sigma,
        noise_multiplier=float(sigma),
        sampling_rate=float(sampling_rate),
        canaries=int(canaries),
        included=int(n),
        steps=int(steps),
        delta=float(delta),
        significance=float(significance),
        seconds=time.perf_counter() - start,
        **checked,
    )


class Mechanism:
    """How `canary_audit` builds the optimizer and runs `fit`: the shipped path. Tests subclass
    it to plant known bugs (too little noise, another sampling rate, …) that the audit must catch."""

    def optimizer(self, noise_multiplier, l2_norm_clip, accountant):
        from dp_bitfit_keras import DPOptimizer

        return DPOptimizer(
            keras.optimizers.SGD(1.0), l2_norm_clip, noise_multiplier=noise_multiplier, accountant=accountant
        )

    def fit(self, model, ids, sampling_rate, steps, reader, examples_per_user=0):
        """`ids`: the rows (canary j's row is j; at user level, k rows j for user j)."""
        per_epoch = max(1, round(1 / sampling_rate))  # fit's epochs of Poisson steps on arrays
        users = dict(user_ids=ids, max_examples_per_user=examples_per_user) if examples_per_user else {}
        units = np.unique(ids).size
        model.fit(
            ids,
            np.zeros(ids.size, np.float32),
            sampling_rate=sampling_rate,
            batch_size=max(1, round(sampling_rate * units)),
            epochs=steps // per_epoch,
            callbacks=[reader],
            verbose=0,
            **users,
        )


_honest = Mechanism()

__all__ = ["CanaryAuditResult", "Mechanism", "canary_audit", "log_likelihood_ratios", "mechanism_checks"]
