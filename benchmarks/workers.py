"""1 → N loopback workers: the same DP run (examples/multi_worker.py) timed per epoch.

    uv run python benchmarks/workers.py                 # 1 and 2 workers, writes results/workers.{json,md}

Each worker gets 1/N of the machine's cores (the launcher sets TF's thread pools), so on one
machine the figure is the cost of the cluster's collectives and of splitting the batch, not a
speed-up: the total compute is the same. Seconds per epoch are the median over epochs after the
first (compilation).
"""

import json
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("workers", ["1", "2"], "Worker counts to run.")
flags.DEFINE_string("method", "dp_full", "Method (examples/multi_worker.py).")
flags.DEFINE_integer("epochs", 6, "Epochs per run.")
flags.DEFINE_integer("batch_size", 256, "Expected global batch size.")
flags.DEFINE_string("out", "benchmarks/results/workers", "Output prefix (.json, .md).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(_):
    rows = []
    for n in map(int, FLAGS.workers):
        summary = os.path.join(ROOT, "benchmarks", "results", f".workers_{n}.json")
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "examples", "multi_worker.py"),
                f"--local_workers={n}",
                f"--method={FLAGS.method}",
                f"--epochs={FLAGS.epochs}",
                f"--batch_size={FLAGS.batch_size}",
                f"--summary_json={summary}",
                f"--export_dir={os.path.join(ROOT, 'savedmodels', '.workers_bench')}",
            ],
            check=True,
        )
        results = [json.load(open(f"{summary}.{i}")) for i in range(n)]
        for i in range(n):
            os.remove(f"{summary}.{i}")
        rows.append(
            dict(
                workers=n,
                cores=os.cpu_count(),
                method=FLAGS.method,
                batch_size=FLAGS.batch_size,
                seconds_per_epoch=max(r["seconds_per_epoch"] for r in results),
                epsilon=results[0]["epsilon"],
                dp_steps=results[0]["dp_steps"],
                test_accuracy=results[0]["test_accuracy"],
                same_weights_on_every_worker=len({r["weights_fingerprint"] for r in results}) == 1,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds_per_epoch"]
    lines = [
        "| workers | cores each | s/epoch | vs 1 worker | ε | steps | same weights on every worker |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {max(1, r['cores'] // r['workers'])} | {r['seconds_per_epoch']:.2f} | "
            f"{r['seconds_per_epoch'] / base:.2f}× | {r['epsilon']:.3f} | {r['dp_steps']} | "
            f"{'yes' if r['same_weights_on_every_worker'] else 'NO'} |"
        )
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(
            f"{FLAGS.method}, digits transfer task, expected global batch {FLAGS.batch_size}, "
            f"{FLAGS.epochs} epochs, workers on 127.0.0.1 of one {os.cpu_count()}-core machine:\n\n" + table
        )
    print(table)


if __name__ == "__main__":
    app.run(main)
