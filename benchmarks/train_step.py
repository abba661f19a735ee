"""Training-step time and memory of every mode on one model, in one process.

    uv run python benchmarks/train_step.py --shape=small --out=bench.json

Modes: `full` / `bitfit` (non-private Keras `fit` steps), `dp_bitfit`, `dp_bitfit_head`,
`dp_full` (DPModel). Same random-init keras-hub BERT, data and seed for all; every step is
XLA-compiled; modes are interleaved over repetitions and the compile/warm-up steps excluded.
Peak memory: host RSS growth on CPU, `get_memory_info` peak on GPU.
"""

import json
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402

SHAPES = {
    "small": dict(batch=16, seq=128, layers=2, hidden=256),
    "big": dict(batch=32, seq=256, layers=4, hidden=512),
    "tiny": dict(batch=8, seq=32, layers=2, hidden=64),
}
MODES = ("full", "bitfit", "dp_bitfit", "dp_bitfit_head", "dp_full")

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(SHAPES), "Model/batch shape.")
flags.DEFINE_list("modes", list(MODES), "Modes to run.")
flags.DEFINE_integer("repeats", 8, "Timed steps per mode (interleaved), after 2 warm-up steps.")
flags.DEFINE_string("out", None, "Write the JSON results here.")


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(shape, mode):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522, num_layers=shape["layers"], num_heads=max(shape["hidden"] // 64, 1),
        hidden_dim=shape["hidden"], intermediate_dim=4 * shape["hidden"], max_sequence_length=shape["seq"],
    )
    base = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = {"full": "all", "bitfit": "bias", "dp_bitfit": "bias", "dp_bitfit_head": "bias+head", "dp_full": "all"}[mode]
    if mode.startswith("dp_"):
        model = dpk.DPModel(base, trainable=trainable)
        model.compile(optimizer=dpk.DPOptimizer(keras.optimizers.Adam(1e-3), l2_norm_clip=1.0, noise_multiplier=1.0), loss=loss)
        model.optimizer.build(model.trainable_variables)
        model.optimizer.begin_run(sampling_rate=shape["batch"] / 10000, expected_batch_size=shape["batch"], planned_steps=100)
    else:
        model = base
        dpk.selection.apply_selection(model, dpk.select_variables(model, trainable))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=True)
    return model


def _batch(shape):
    b, t = shape["batch"], shape["seq"]
    x = {
        "token_ids": tf.random.stateless_uniform((b, t), (1, 2), 1, 30522, tf.int32),
        "segment_ids": tf.zeros((b, t), tf.int32),
        "padding_mask": tf.ones((b, t), tf.bool),
    }
    return x, tf.random.stateless_uniform((b,), (3, 4), 0, 2, tf.int32)


def _peak_mb(before_rss):
    if tf.config.list_physical_devices("GPU"):
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return _rss_mb() - before_rss


def main(_):
    shape = SHAPES[FLAGS.shape]
    x, y = _batch(shape)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    runners, results = {}, {}
    for mode in FLAGS.modes:
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        rss = _rss_mb()
        model = _build(shape, mode)
        for _ in range(2):
            model.train_on_batch(x, y)
        runners[mode] = model
        results[mode] = dict(
            mode=mode,
            trainable_params=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            pfor_fallback=bool(dpk.last_pfor_fallbacks()) if mode.startswith("dp_") else False,
            peak_mem_mb=round(_peak_mb(rss), 1),
            times=[],
        )
    for _ in range(FLAGS.repeats):
        for mode, model in runners.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            results[mode]["times"].append(time.perf_counter() - start)
    rows = []
    for mode, r in results.items():
        ms = 1e3 * float(np.median(r.pop("times")))
        rows.append(dict(r, ms_per_step=round(ms, 2), examples_per_s=round(shape["batch"] / ms * 1e3, 1)))
    by = {r["mode"]: r["ms_per_step"] for r in rows}
    ratios = {}
    for a, b in [("dp_bitfit", "bitfit"), ("dp_bitfit", "full"), ("dp_full", "dp_bitfit"), ("dp_full", "full"), ("dp_bitfit_head", "dp_bitfit")]:
        if a in by and b in by:
            ratios[f"{a}/{b}"] = round(by[a] / by[b], 3)
    device = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0]).get("device_name", "GPU") if gpu else f"CPU ({os.cpu_count()} cores)"
    report = {"shape": dict(shape, name=FLAGS.shape), "device": device, "results": rows, "ratios": ratios}
    print("| mode | ms/step | examples/s | peak MB | trainable | pfor fallback |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms_per_step']} | {r['examples_per_s']} | {r['peak_mem_mb']} | {r['trainable_params']:,} | {r['pfor_fallback']} |")
    print(json.dumps(ratios))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
