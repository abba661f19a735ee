"""What secret randomness costs: ChaCha20 (the default) against TensorFlow's Philox.

    uv run python benchmarks/secure_sampler.py --out=benchmarks/results/cpu_secure_sampler.json

Two measurements, interleaved, median of `--repeats`:
  - Gaussian noise, XLA-compiled as in the training step: `prng.normal` (ChaCha20, each value a
    sum of 4 Gaussians) vs `generator="philox"` (one `stateless_normal` per value), per size.
  - One Poisson sample, as `poisson_batches` draws it in its `tf.data` pipeline: ChaCha20
    uniforms vs `tf.random.stateless_uniform`, for n examples.
The whole-step cost is in the harness (`dp_bitfit_philox`, `dp_full_philox` modes).
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dp_bitfit_keras.privacy import prng  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "noise_sizes",
    ["6146", "102914", "9493250", "22700000"],
    "Noise values per step (dp_bitfit small BERT, BERT-base biases, small BERT all, MiniLM all).",
)
flags.DEFINE_list("sample_sizes", ["4800", "18512", "1000000"], "Examples n of the Poisson sample.")
flags.DEFINE_integer("repeats", 7, "Timed calls per case (after one warm-up).")
flags.DEFINE_string("out", None, "Write JSON here and Markdown beside it.")


def _median_ms(fns, repeats):
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn(0)  # compile / warm up
    for r in range(1, repeats + 1):
        for name, fn in fns.items():  # interleaved
            start = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def noise_rows(sizes, repeats):
    key = tf.constant(prng.new_key())
    rows = []
    for size in sizes:
        fns = {}
        for generator in prng.GENERATORS:
            step = tf.function(
                lambda s, g=generator, n=size: tf.reduce_sum(prng.normal(key, [n], s, prng.NOISE, generator=g)),
                jit_compile=True,
            )
            fns[generator] = lambda r, f=step: f(tf.constant(r, tf.int64)).numpy()
        ms = _median_ms(fns, repeats)
        rows.append(
            dict(
                kind="noise",
                size=size,
                chacha20_ms=ms["chacha20"],
                philox_ms=ms["philox"],
                ratio=ms["chacha20"] / ms["philox"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sample_rows(sizes, repeats):
    key = tf.constant(prng.new_key())
    rows = []
    for n in sizes:
        q = 128.0 / n

        @tf.function
        def chacha(step, n=n, q=q):
            return tf.reduce_sum(tf.cast(prng.uniform(key, [n], step, prng.POISSON_SAMPLE) < q, tf.int32))

        @tf.function
        def philox(step, n=n, q=q):
            return tf.reduce_sum(
                tf.cast(tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(1, tf.int64), step])) < q, tf.int32)
            )

        ms = _median_ms(
            {
                "chacha20": lambda r: chacha(tf.constant(r, tf.int64)).numpy(),
                "philox": lambda r: philox(tf.constant(r, tf.int64)).numpy(),
            },
            repeats,
        )
        rows.append(
            dict(
                kind="poisson_sample",
                size=n,
                chacha20_ms=ms["chacha20"],
                philox_ms=ms["philox"],
                ratio=ms["chacha20"] / ms["philox"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows):
    lines = ["| what | size | ChaCha20 ms | Philox ms | ratio |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        what = "Gaussian noise (XLA)" if r["kind"] == "noise" else "Poisson sample (tf.data graph)"
        lines.append(f"| {what} | {r['size']:,} | {r['chacha20_ms']:.2f} | {r['philox_ms']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(_):
    rows = noise_rows([int(s) for s in FLAGS.noise_sizes], FLAGS.repeats)
    rows += sample_rows([int(s) for s in FLAGS.sample_sizes], FLAGS.repeats)
    table = markdown(rows)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"device": "cpu", "cores": os.cpu_count(), "rows": rows}, f, indent=1)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
        print(f"wrote {FLAGS.out}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
