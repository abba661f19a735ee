"""What users pay per epoch: `fit` epochs of DP-BiTFiT (Poisson sampling) against non-private
BiTFiT `fit` epochs at the same (expected) batch, in one process.

    uv run python benchmarks/epoch.py --out=benchmarks/results/cpu_epoch_small.json

Same random-init keras-hub BERT and arrays for every mode; each mode's first epoch (compile) is
excluded, then the modes' epochs are timed interleaved, `--epochs` rounds, median. `dp_bitfit`
modes differ in `physical_batch_size`: `pad` computes every row of the padded Poisson batch
(the 1 - 1e-9 binomial quantile), `cN` computes only the chunks of N rows that hold sampled
examples, `auto` is the default (`model.chunk_size_for`).
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402,I001  (XLA dump flags before TensorFlow)
from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402
from dp_bitfit_keras import model as dp_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 2048, "Training examples n.")
flags.DEFINE_integer("batch_size", 128, "Expected (Poisson) / fixed batch size.")
flags.DEFINE_integer("seq", 64, "Sequence length.")
flags.DEFINE_integer("layers", 2, "BERT layers.")
flags.DEFINE_integer("hidden", 128, "BERT hidden size.")
flags.DEFINE_list("modes", ["bitfit", "dp_bitfit_pad", "dp_bitfit_c8", "dp_bitfit_c16", "dp_bitfit_c32", "dp_bitfit_c64", "dp_bitfit_auto"],
                  "bitfit (non-private), bitfit_mbN (non-private, micro-batches of N), dp_bitfit_pad (no chunking), dp_bitfit_cN (chunks of N), dp_bitfit_auto.")
flags.DEFINE_integer("epochs", 3, "Timed epochs per mode (after one compile epoch).")
flags.DEFINE_string("out", None, "Write JSON here and Markdown beside it.")


def _data():
    x, _ = harness.bert_batch(FLAGS.examples, FLAGS.seq)
    lengths = np.random.RandomState(0).randint(8, FLAGS.seq + 1, FLAGS.examples)
    mask = np.arange(FLAGS.seq)[None] < lengths[:, None]
    x = {"token_ids": x["token_ids"].numpy() * mask, "segment_ids": x["segment_ids"].numpy(), "padding_mask": mask}
    y = (np.arange(FLAGS.examples) % 2).astype("int32")
    return x, y


def _build(mode, shape):
    base = harness.build_base(shape)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if mode.startswith("bitfit"):
        # `bitfit_mbN`: the same logical batch in micro-batches of N (Keras' own gradient
        # accumulation), the non-private twin of a chunked step.
        micro = int(mode.split("_mb")[1]) if "_mb" in mode else FLAGS.batch_size
        dpk.selection.apply_selection(base, dpk.select_variables(base, "bias"))
        base.compile(optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=FLAGS.batch_size // micro if micro < FLAGS.batch_size else None),
                     loss=loss, jit_compile=True)
        return base, dict(batch_size=micro, shuffle=True)
    suffix = mode.rsplit("_", 1)[-1]  # pad | auto | c<N>
    physical = {"pad": None, "auto": "auto"}[suffix] if suffix in ("pad", "auto") else int(suffix[1:])
    model = dpk.DPModel(base, trainable="bias")
    model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.Adam(1e-3), 1.0, 1.0), loss=loss, physical_batch_size=physical)
    return model, dict(batch_size=FLAGS.batch_size)


def main(_):
    shape = dict(model="bert", seq=FLAGS.seq, layers=FLAGS.layers, hidden=FLAGS.hidden, batch=FLAGS.batch_size)
    x, y = _data()
    runs = {}
    for mode in FLAGS.modes:
        model, kwargs = _build(mode, shape)
        start = time.perf_counter()
        model.fit(x, y, epochs=1, verbose=0, **kwargs)
        print(f"[{mode}] compile epoch {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        runs[mode] = (model, kwargs, [])
    for r in range(FLAGS.epochs):
        for mode, (model, kwargs, times) in runs.items():
            start = time.perf_counter()
            model.fit(x, y, epochs=1, verbose=0, **kwargs)
            times.append(time.perf_counter() - start)
        print(f"round {r + 1}/{FLAGS.epochs}", file=sys.stderr, flush=True)
    base = statistics.median(runs["bitfit"][2]) if "bitfit" in runs else None
    rows = []
    for mode, (model, kwargs, times) in runs.items():
        seconds = statistics.median(times)
        steps = FLAGS.examples // FLAGS.batch_size
        row = dict(mode=mode, epoch_s=round(seconds, 3), ms_per_step=round(1e3 * seconds / steps, 1),
                   ms_per_expected_example=round(1e3 * seconds / FLAGS.examples, 3),
                   vs_bitfit=None if base is None else round(seconds / base, 3),
                   chunk=getattr(model, "_chunk", None))
        if mode != "bitfit":
            row["padded_rows"] = dp_model.sampling.max_batch_size_for(FLAGS.examples, FLAGS.batch_size / FLAGS.examples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"BERT {FLAGS.layers} layers x {FLAGS.hidden}, seq {FLAGS.seq}, n = {FLAGS.examples}, (expected) batch "
             f"{FLAGS.batch_size}, {FLAGS.epochs} timed epochs (median), CPU ({os.cpu_count()} cores)", "",
             "| mode | chunk | s / epoch | ms / expected example | × bitfit |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['chunk'] or '-'} | {r['epoch_s']:.2f} | {r['ms_per_expected_example']:.2f} | "
                     f"{'' if r['vs_bitfit'] is None else format(r['vs_bitfit'], '.3f')} |")
    table = "\n".join(lines)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"shape": shape, "examples": FLAGS.examples, "rows": rows, "tf": tf.__version__}, f, indent=1)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
