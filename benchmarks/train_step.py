"""Training-step time and memory of every mode on one model, in one process.

    uv run python benchmarks/train_step.py --shape=small --out=benchmarks/results/cpu_small.json
    uv run python benchmarks/train_step.py --sweep=seq --out=benchmarks/results/cpu_seq.json
    uv run python benchmarks/train_step.py --sweep=batch --out=benchmarks/results/cpu_batch.json

Modes: `full` / `bitfit` (non-private Keras steps), `dp_bitfit`, `dp_bitfit_head`, `dp_full`
(DPModel), and whatever other families register in `harness.MODE_BUILDERS`; with the `legacy`
extra also the TF Privacy-on-Keras-2 peer (`tf_keras_full`, `tf_keras_bitfit`,
`tfp_legacy_full`, `tfp_legacy_bitfit`: benchmarks/tfp_legacy.py, run in its own process):

    uv run --extra legacy python benchmarks/train_step.py --shape=small \
        --modes=full,bitfit,dp_bitfit,dp_full,tf_keras_full,tf_keras_bitfit,tfp_legacy_full,tfp_legacy_bitfit
 Same random-init
keras-hub model, batch and seed for all; every step XLA-compiled; modes interleaved over the
timed repetitions, compile/warm-up steps excluded. Writes JSON, a Markdown table (.md) and a
plot (.png) next to `--out`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (sets XLA's dump flags before TensorFlow loads)
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(harness.SHAPES), "Model/batch shape.")
flags.DEFINE_list("modes", list(harness.MODES), "Modes to run.")
flags.DEFINE_enum(
    "sweep",
    "none",
    ["none", "seq", "batch"],
    "none: one shape; seq: time/memory vs sequence length; batch: largest batch under --memory_cap_mb.",
)
flags.DEFINE_list("seqs", ["64", "128", "256", "512"], "Sequence lengths of the seq sweep.")
flags.DEFINE_float("memory_cap_mb", 16384, "Memory cap of the batch sweep (MB).")
flags.DEFINE_integer("repeats", 5, "Timed steps per mode (interleaved).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per mode first (the first compiles).")
flags.DEFINE_string("out", None, "Write JSON here, and .md / .png beside it.")


def main(_):
    shape = dict(harness.SHAPES[FLAGS.shape], name=FLAGS.shape)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        harness.check_modes(shape, FLAGS.modes, FLAGS.sweep)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if FLAGS.sweep == "none":
        report = harness.run_modes(shape, FLAGS.modes, FLAGS.repeats, FLAGS.warmup, log=log)
        table, plot = harness.markdown(report), harness.plot_report
    elif FLAGS.sweep == "seq":
        if "seq" not in shape:
            raise app.UsageError("--sweep=seq needs a text shape (BERT or a decoder).")
        report = harness.seq_sweep(shape, FLAGS.modes, FLAGS.seqs, FLAGS.repeats, FLAGS.warmup, log=log)
        table, plot = harness.seq_markdown(report), harness.plot_seq
    else:
        report = harness.batch_sweep(shape, FLAGS.modes, FLAGS.memory_cap_mb, log=log)
        table, plot = harness.batch_markdown(report), harness.plot_batch
    print(table)
    if "ratios" in report:
        print(json.dumps(report["ratios"]))
    if FLAGS.out:
        stem = os.path.splitext(FLAGS.out)[0]
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
        plot(report, stem + ".png")
        log(f"wrote {FLAGS.out}, {stem}.md, {stem}.png")


if __name__ == "__main__":
    app.run(main)
