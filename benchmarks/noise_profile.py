"""Where the time of the secure Gaussian draw goes: a profile, and the peers per value.

    uv run python benchmarks/noise_profile.py --out=benchmarks/results/cpu_noise_profile.json

One invocation, `--size` values (default 9,493,250: one per parameter of the `small` BERT shape,
what DP full fine-tuning draws per step), median of `--repeats` interleaved calls after a warm-up:

- **Stages of `prng.normal`**, each XLA-compiled in the draw's own chunk loop with every chunk
  reduced to a scalar (so only that stage runs): the ChaCha20 keystream (one block per 2
  values), + the radii (log, sqrt in float64), + the angles (polynomial cos, sin; or XLA's),
  and the whole draw as the training step calls it (written to memory).
- **Previous generator** (`_previous_normal`, the implementation this one replaced, kept here to
  measure before/after in one run): its keystream (20 rounds as a `while_loop` over a `[4, m]`
  state, `prng._rolled_blocks`, 4 words per value) and its whole draw (XLA's float64 `cos`/`sin`).
- **Peers, per value**: `tf.random.normal` (TensorFlow's kernel, outside XLA),
  `tf.random.stateless_normal` (Philox) inside XLA, NumPy's `standard_normal` (PCG64).
"""

import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dp_bitfit_keras.privacy import prng  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 9_493_250, "Gaussian values per draw.")
flags.DEFINE_integer("repeats", 7, "Timed calls per case (after one warm-up).")
flags.DEFINE_string("out", None, "Write JSON here and Markdown beside it.")


# --- the previous generator (for the before/after rows only) -----------------------------------


def _previous_words(key, nonce, start, count):
    first = start // 16
    words = tf.reshape(prng._rolled_blocks(key, nonce, first + tf.range(count // 16 + 1, dtype=tf.int64)), [-1])
    return tf.slice(words, [start % 16], [count])


def _previous_normal(key, size, step, chunk=1 << 20):
    nonce = prng._nonce(step, prng.NOISE)
    chunks = -(-size // chunk)

    def body(j, out):
        start = tf.cast(j, tf.int64) * chunk
        u = (
            tf.cast(tf.stack([_previous_words(key, nonce, k * size + start, chunk) for k in range(4)]), tf.float64)
            + 0.5
        ) / 2.0**32
        u = tf.reshape(u, [2, 2, chunk])
        radius, angle = tf.sqrt(-2.0 * tf.math.log(u[:, 0])), 2.0 * math.pi * u[:, 1]
        return j + 1, out.write(
            j, tf.cast(0.5 * tf.reduce_sum(radius * tf.cos(angle) + radius * tf.sin(angle), 0), tf.float32)
        )

    _, out = tf.while_loop(
        lambda j, _: j < chunks,
        body,
        (0, tf.TensorArray(tf.float32, size=chunks, element_shape=[chunk])),
        maximum_iterations=chunks,
    )
    return out.concat()[:size]


def _previous_keystream(key, size, step):
    nonce = prng._nonce(step, prng.NOISE)
    return _previous_words(key, nonce, tf.constant(0, tf.int64), 4 * size)


# --- stages of the current generator ------------------------------------------------------------


def _stage(key, size, step, upto):
    """One stage of the draw over all its chunks, as `prng.normal` runs them (a `while_loop` of
    `NORMAL_CHUNK` values), each chunk reduced to a scalar instead of written out."""
    chunk_blocks = prng.NORMAL_CHUNK // 2
    chunks = -(-size // prng.NORMAL_CHUNK)
    nonce = prng._nonce(step, prng.NOISE)

    def one_chunk(j):
        counters = tf.cast(j, tf.int64) * chunk_blocks + tf.range(chunk_blocks, dtype=tf.int64)
        words = prng._block_words(key, nonce, counters)
        if upto == "keystream":
            return tf.reduce_sum(tf.add_n([tf.cast(w, tf.float64) for w in words[:8]]))
        total = 0.0
        for radius_word, angle_word in (words[0:2], words[2:4], words[4:6], words[6:8]):
            term = tf.sqrt(-2.0 * tf.math.log(prng._unit_interval(radius_word)))
            if upto == "angles":
                cos, sin = prng._cos_sin_of_turn(angle_word)
                term = term * (cos + sin)
            elif upto == "angles_xla_trig":
                angle = (tf.cast(angle_word, tf.float64) + 0.5) * (2 * math.pi / 4294967296.0)
                term = term * (tf.cos(angle) + tf.sin(angle))
            total += term
        return tf.reduce_sum(total)

    _, total = tf.while_loop(
        lambda j, _: j < chunks,
        lambda j, acc: (j + 1, acc + one_chunk(j)),
        (tf.constant(0), tf.constant(0.0, tf.float64)),
        maximum_iterations=chunks,
    )
    return total


def _median_ms(fns, repeats):
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn(0)
    for r in range(1, repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


CASES = [
    # name, group, what
    ("keystream", "this generator", "ChaCha20 keystream, 1 block per 2 values"),
    ("radii", "this generator", "+ radii: log, sqrt in float64"),
    ("angles_xla_trig", "this generator", "+ angles with XLA's float64 cos, sin"),
    ("angles", "this generator", "+ angles with the polynomial cos, sin"),
    ("normal", "this generator", "`prng.normal`: the whole draw, written to memory"),
    ("previous_keystream", "previous generator", "ChaCha20 keystream, rolled `while_loop`, 4 words per value"),
    ("previous_normal", "previous generator", "the whole draw"),
    ("tf_random_normal", "peers", "`tf.random.normal`, TensorFlow kernel outside XLA (Philox)"),
    ("stateless_normal_xla", "peers", "`tf.random.stateless_normal` inside XLA (Philox)"),
    ("numpy", "peers", "NumPy `standard_normal` float32 (PCG64)"),
]


def main(_):
    size = FLAGS.size
    key = tf.constant(prng.new_key())
    xla = lambda f: tf.function(f, jit_compile=True)  # noqa: E731
    fns = {}
    for upto in ("keystream", "radii", "angles_xla_trig", "angles"):
        f = xla(lambda s, u=upto: _stage(key, size, s, u))
        fns[upto] = lambda r, f=f: f(tf.constant(r, tf.int64)).numpy()
    normal = xla(lambda s: prng.normal(key, [size], s, prng.NOISE))
    fns["normal"] = lambda r: normal(tf.constant(r, tf.int64))[:1].numpy()
    prev_ks = xla(lambda s: tf.reduce_sum(tf.cast(_previous_keystream(key, size, s), tf.float64)))
    fns["previous_keystream"] = lambda r: prev_ks(tf.constant(r, tf.int64)).numpy()
    prev = xla(lambda s: _previous_normal(key, size, s))
    fns["previous_normal"] = lambda r: prev(tf.constant(r, tf.int64))[:1].numpy()
    tfn = tf.function(lambda: tf.random.normal([size]))
    fns["tf_random_normal"] = lambda r: tfn()[:1].numpy()
    sl = xla(lambda s: tf.random.stateless_normal([size], seed=tf.stack([s, s])))
    fns["stateless_normal_xla"] = lambda r: sl(tf.constant(r, tf.int64))[:1].numpy()
    rng = np.random.default_rng()
    fns["numpy"] = lambda r: rng.standard_normal(size, dtype=np.float32)
    ms = _median_ms(fns, FLAGS.repeats)
    rows = [dict(case=c, group=g, what=w, ms=ms[c], ns_per_value=1e6 * ms[c] / size) for c, g, w in CASES]
    ratios = {
        "previous_normal/normal": ms["previous_normal"] / ms["normal"],
        "normal/tf_random_normal": ms["normal"] / ms["tf_random_normal"],
        "normal/stateless_normal_xla": ms["normal"] / ms["stateless_normal_xla"],
    }
    table = markdown(rows, ratios, size)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(dict(device="cpu", cores=os.cpu_count(), size=size, rows=rows, ratios=ratios), f, indent=1)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
        print(f"wrote {FLAGS.out}", file=sys.stderr)


def markdown(rows, ratios, size):
    lines = [
        f"{size:,} Gaussian values per draw, CPU ({os.cpu_count()} cores), median of {FLAGS.repeats} calls",
        "",
        "| | stage | ms | ns per value |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['group']} | {r['what']} | {r['ms']:.1f} | {r['ns_per_value']:.1f} |" for r in rows]
    lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
