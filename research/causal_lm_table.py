"""The generation example's results table, from the runs' summary JSONs.

    for eps in 1 3 8; do uv run python examples/train_causal_lm.py --epsilon=$eps \\
        --summary_json=research/results/causal_lm/dp_bitfit_norm_eps$eps.json; done
    uv run python examples/train_causal_lm.py --method=full --summary_json=research/results/causal_lm/full.json
    uv run python research/causal_lm_table.py     # -> research/results/causal_lm.md

Rows: every run found, the non-private ones last; "gap closed" is how much of the test-perplexity
gap between the pretrained model and non-private full fine-tuning (same binary, same data) a run
closes.
"""

import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "research", "results", "causal_lm")


def table(rows) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    out = [
        "| method | trains (parameters) | Adam lr × epochs | ε | steps | val ppl | test ppl | gap closed | ms/step | wall |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if rows:
        r = rows[0]
        out.append(
            f"| pretrained (public text only) | – | – | – | – | {r['pretrained_validation_perplexity']:.3f} | "
            f"{r['pretrained_test_perplexity']:.3f} | 0% | – | – |"
        )
    for r in sorted(rows, key=lambda r: (r["epsilon"] == math.inf, r["method"], -r["epsilon"], r["epochs"])):
        eps = "∞" if r["epsilon"] == math.inf else f"{r['epsilon']:.2f}"
        closed = "–"
        if full is not None:
            gap = r["pretrained_test_perplexity"] - full["test_perplexity"]
            closed = f"{100 * (r['pretrained_test_perplexity'] - r['test_perplexity']) / gap:.0f}%" if gap > 0 else "–"
        optimizer = "SGD " if r["method"] == "dpzero" else ""
        out.append(
            f"| {r['method']} | {r['variables']} ({r['trainable_params']:,}) | "
            f"{optimizer}{r['learning_rate']:g} × {r['epochs']} | {eps} | {r['steps']} | "
            f"{r['validation_perplexity']:.3f} | {r['test_perplexity']:.3f} | {closed} | "
            f"{r['ms_per_step']:.0f} | {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(out) + "\n"


def main(argv) -> int:
    rows = []
    for path in sorted(glob.glob(os.path.join(RUNS, "*.json"))):
        with open(path) as f:
            row = json.load(f)
        row["epsilon"] = float(row["epsilon"])
        rows.append(row)
    text = table(rows)
    with open(os.path.join(ROOT, "research", "results", "causal_lm.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
