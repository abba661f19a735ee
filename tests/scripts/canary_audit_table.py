"""The docs' one-run canary-audit table: the default configuration at 10^4 and 10^5 canaries,
user-level training with canary users, and the planted bugs of tests/test_canary_audit.py,
audited as the tests do.

    uv run python tests/scripts/canary_audit_table.py --out=research/results/canary_audit.json

Each row is one training run (q = 0.1, 100 steps, target ε = 2, δ = 1e-5); the JSON is written
after every row.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test_canary_audit as t  # noqa: E402  (the planted bugs the tests use)
from absl import app, flags  # noqa: E402

from dp_bitfit_keras.audit import canaries  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "research/results/canary_audit.json", "JSON output; Markdown beside it.")
flags.DEFINE_list("sizes", ["10000", "100000"], "Canary counts of the honest rows.")

ESTIMATORS = ("one_run", "one_run_fdp", "clopper_pearson", "family")


def row(name, result):
    return dict(
        training=name,
        canaries=result.canaries,
        claimed_epsilon=result.claimed_epsilon,
        bounds=result.bounds,
        family_over_claimed=result.bounds["family"] / result.claimed_epsilon,
        noise_multiplier=result.noise_multiplier,
        noise_multiplier_interval=list(result.noise_multiplier_interval),
        sampling_rate_interval=list(result.sampling_rate_interval),
        window_variance_ratio=result.window_variance_ratio,
        failed_checks=[k for k, ok in result.checks.items() if not ok],
        seconds=result.seconds,
    )


def markdown(rows):
    lines = [
        "q = 0.1, 100 steps, target ε = 2, δ = 1e-5, bounds at 95% (each), checks at 99.9% (together)",
        "",
        "| training | canaries | claimed ε | one-run | one-run f-DP | Clopper-Pearson | family | family / claimed "
        "| σ interval (claimed σ) | q interval | failed checks | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        b = r["bounds"]
        lines.append(
            f"| {r['training']} | {r['canaries']:,} | {r['claimed_epsilon']:.2f} | "
            + " | ".join(f"{b[e]:.2f}" for e in ESTIMATORS)
            + f" | {r['family_over_claimed']:.2f} | [{r['noise_multiplier_interval'][0]:.3f}, "
            f"{r['noise_multiplier_interval'][1]:.3f}] ({r['noise_multiplier']:.3f}) | "
            f"[{r['sampling_rate_interval'][0]:.4f}, {r['sampling_rate_interval'][1]:.4f}] | "
            f"{', '.join(r['failed_checks']) or 'none'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(_):
    rows = []

    def save():
        with open(FLAGS.out, "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(markdown(rows) + "\n")

    for size in FLAGS.sizes:
        rows.append(
            row("default (secure) configuration", canaries.canary_audit(int(size), t.Q, t.STEPS, t.EPS, t.DELTA))
        )
        print(json.dumps(rows[-1]), flush=True)
        save()
    result = canaries.canary_audit(t.CANARIES, t.Q, t.STEPS, t.EPS, t.DELTA, examples_per_user=5)
    rows.append(row("user level: canary users of 5 rows, each clipped at C/5", result))
    print(json.dumps(rows[-1]), flush=True)
    save()
    for name, (mechanism, _, m) in t.FAKES.items():
        result = canaries.canary_audit(m, t.Q, t.STEPS, t.EPS, t.DELTA, _mechanism=mechanism)
        rows.append(row(f"{name} (planted bug)", result))
        print(json.dumps(rows[-1]), flush=True)
        save()
    print(markdown(rows))


if __name__ == "__main__":
    app.run(main)
