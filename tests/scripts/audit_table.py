"""The README's privacy-audit table: the shipped configuration and the broken fakes of
tests/test_audit.py, audited as the tests do (default secure keys, fresh per trial).

    uv run python tests/scripts/audit_table.py --out=research/results/audit.json
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test_audit as t  # noqa: E402  (the fakes and the setup the tests use)
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "research/results/audit.json", "JSON output; Markdown beside it.")

ROWS = [
    ("DP-BiTFiT as shipped (secret ChaCha20 keys)", {}),
    ("no clipping (fake)", dict(optimizer_cls=t.NoClipping)),
    ("no noise (fake)", dict(optimizer_cls=t.NoNoise)),
    ("noise per micro-batch scaled σC/k, k = 64 (fake)", dict(optimizer_cls=t.NoisePerMicroBatch)),
    ("kernels trained without noise (fake)", dict(optimizer_cls=t.KernelLeak, trainable="all")),
]


def main(_):
    rows = []
    for name, setup in ROWS:
        result = t._audit(*t._setup(**setup))
        rows.append(
            dict(
                training=name,
                empirical_epsilon=result.empirical_epsilon,
                claimed_epsilon=result.claimed_epsilon,
                trials=result.trials,
                caught=result.empirical_epsilon > result.claimed_epsilon,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"{t.TRIALS} + {t.TRIALS} trials, one step, σ = {t.SIGMA}, C = {t.CLIP}, δ = 1e-5; claimed ε = {rows[0]['claimed_epsilon']:.2f}",
        "",
        "| training | empirical ε (lower bound) | caught |",
        "|---|---:|---|",
    ]
    for r in rows:
        caught = "yes" if r["caught"] else "(≤ claimed, as it must be)" if r is rows[0] else "NO"
        lines.append(f"| {r['training']} | {r['empirical_epsilon']:.2f} | {caught} |")
    with open(FLAGS.out, "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
