"""Empirical privacy auditing: ε lower bounds that a correct mechanism must stay under.

- `canary_audit`: one training run of the real path with many white-box canaries, the
  one-run / f-DP / Clopper-Pearson / family estimators of `estimators`, and two-sided checks
  of σ, q and Poisson sampling on the same run (`canaries`).
- `audit`: membership of one canary over many repeated trials of the compiled step (`trials`).
"""

from dp_bitfit_keras.audit import estimators
from dp_bitfit_keras.audit.canaries import CanaryAuditResult, canary_audit
from dp_bitfit_keras.audit.trials import AuditResult, audit, clopper_pearson, epsilon_lower_bound

__all__ = [
    "AuditResult",
    "CanaryAuditResult",
    "audit",
    "canary_audit",
    "clopper_pearson",
    "epsilon_lower_bound",
    "estimators",
]
