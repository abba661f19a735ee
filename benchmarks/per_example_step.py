"""Time one XLA-compiled per-example gradient computation: bias vs bias+head vs all.

    uv run python benchmarks/per_example_step.py --batch_size=16 --seq_len=128

Random-init keras-hub BERT (2 layers, hidden 256 by default); modes are interleaved and the
compile/warm-up calls are excluded. Prints a Markdown table and the ratios.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 16, "Examples per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
flags.DEFINE_integer("num_layers", 2, "Transformer layers.")
flags.DEFINE_integer("hidden_dim", 256, "Hidden size (intermediate = 4x).")
flags.DEFINE_integer("repeats", 10, "Timed calls per mode (after 2 warm-up calls).")
flags.DEFINE_list("modes", ["bias", "bias+head", "all"], "Variable selections to time.")


def _squared_norms(model, loss, variables, batch_size):
    # Per-example squared norms: what a DP step needs, and XLA cannot simplify them away. The
    # variables are captured (a tf.function argument would be a different handle).
    def fn(x, y):
        grads = dpk.per_example_gradients(model, loss, x, y, variables)
        return tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [batch_size, -1]), axis=1) for g in grads])

    return fn


def main(_):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522,
        num_layers=FLAGS.num_layers,
        num_heads=max(FLAGS.hidden_dim // 64, 1),
        hidden_dim=FLAGS.hidden_dim,
        intermediate_dim=4 * FLAGS.hidden_dim,
        max_sequence_length=FLAGS.seq_len,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    b, t = FLAGS.batch_size, FLAGS.seq_len
    x = {
        "token_ids": tf.random.uniform((b, t), 1, 30522, tf.int32),
        "segment_ids": tf.zeros((b, t), tf.int32),
        "padding_mask": tf.ones((b, t), tf.bool),
    }
    y = tf.random.uniform((b,), 0, 2, tf.int32)
    model(x)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    steps = {}
    for mode in FLAGS.modes:
        variables = list(dpk.select_variables(model, mode).variables)
        fn = tf.function(_squared_norms(model, loss, variables, b), jit_compile=True)
        for _ in range(2):
            fn(x, y)
        steps[mode] = (fn, dpk.select_variables(model, mode), dpk.last_pfor_fallbacks())
    forward = tf.function(lambda x: model(x, training=True), jit_compile=True)
    forward(x)
    steps["forward only"] = (forward, None, ())
    times = {mode: [] for mode in steps}
    for _ in range(FLAGS.repeats):
        for mode, (fn, sel, _) in steps.items():
            start = time.perf_counter()
            out = fn(x) if sel is None else fn(x, y)
            out.numpy()
            times[mode].append(1e3 * (time.perf_counter() - start))
    print(
        f"device: {tf.config.list_physical_devices('GPU') or 'CPU'}; B={b} T={t} "
        f"layers={FLAGS.num_layers} hidden={FLAGS.hidden_dim}"
    )
    print("| mode | trainable | median ms | pfor fallback |\n|---|---|---|---|")
    for mode, (_, sel, fallbacks) in steps.items():
        trainable = "-" if sel is None else f"{sel.num_trainable:,} ({100 * sel.fraction:.2f}%)"
        print(f"| {mode} | {trainable} | {np.median(times[mode]):.1f} | {bool(fallbacks)} |")
    if "bias" in times:
        for mode in times:
            if mode != "bias":
                print(f"{mode}/bias: {np.median(times[mode]) / np.median(times['bias']):.2f}x")


if __name__ == "__main__":
    app.run(main)
