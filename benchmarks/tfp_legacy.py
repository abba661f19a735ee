"""Peer in the same environment: TF Privacy's DP-SGD on Keras 2 (tf_keras legacy mode).

What a TensorFlow user who wants DP picks today: `pip install tf-keras`, `TF_USE_LEGACY_KERAS=1`,
and TF Privacy's `DPModel` (fast gradient clipping) on a Keras 2 model. This binary runs that
peer on the harness's BERT shape and prints results in the harness's JSON format. It sets
`TF_USE_LEGACY_KERAS=1` itself, so it must be its own process: `harness.run_modes` starts it
for the modes below (same machine, same invocation as ours), e.g.

    uv run --extra legacy python benchmarks/train_step.py --shape=small \\
        --modes=full,bitfit,dp_bitfit,dp_full,tf_keras_full,tf_keras_bitfit,tfp_legacy_full,tfp_legacy_bitfit

The model is keras-hub's `BertTextClassifier` layout rebuilt from tf_keras layers (token,
position and segment `Embedding`s, `LayerNormalization`, `MultiHeadAttention`, GELU `Dense`
feed-forward, post-LN residuals, tanh pooler on the first token or mean pooling, dropout 0.1,
`Dense` head): the same parameter count as the harness's model (checked by the smoke test).

With `--text_npz` it instead trains on the offline text task that examples/utility_sweep.py
exports (tokenized splits plus the starting weights of our Keras 3 model; the rebuild must
reproduce that model's logits before it trains): see `text_run`.

Modes:
  tf_keras_full, tf_keras_bitfit: non-private Keras 2 steps (all weights / biases only).
  tfp_legacy_full: `tensorflow_privacy...dp_keras_model.DPModel` with a layer registry for every
      trainable layer (Embedding, Dense, LayerNormalization, MultiHeadAttention), so its fast
      "ghost" clipping path runs: per-example norms from the registry, then one re-weighted
      backward pass.
  tfp_legacy_bitfit: the same `DPModel` on the biases only (LayerNorm betas included, as
      ours), per-example gradients by its vectorized microbatch path (one microbatch per
      example). Keras 2 has no per-variable `trainable` flag, so the kernels are moved to their
      layers' non-trainable weights. The fast path cannot do bias-only honestly: its registry
      functions return the norm of a whole layer's gradient (kernel and bias), so the clip
      would be set by the frozen kernels' gradients, and computing them costs what full
      fine-tuning costs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.skip_tf_privacy_import = True  # tensorflow_privacy/__init__ imports tensorflow_estimator
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import xla_memory  # noqa: E402,I001  (XLA dump flags: before TensorFlow)
from rows import VOCAB, bert_batch, epoch_data, result_row, time_epochs, time_interleaved  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

tf.get_logger().setLevel("ERROR")
MODES = ("tf_keras_full", "tf_keras_bitfit", "tfp_legacy_full", "tfp_legacy_bitfit")


def tf_keras_version() -> str:
    """tf_keras' version, after checking that `tf.keras` is tf_keras (legacy mode is on)."""
    import tf_keras

    if tf.keras.layers.Dense is not tf_keras.layers.Dense:
        raise RuntimeError("tf.keras is not tf_keras: set TF_USE_LEGACY_KERAS=1 before importing TensorFlow.")
    return tf_keras.__version__


def _gelu(x):
    return tf.nn.gelu(x, approximate=True)  # keras-hub BERT's activation (tanh approximation)


def build_bert(shape: dict, num_classes: int = 2, pooling: str = "cls"):
    """(inputs, logits) of keras-hub's BERT classifier layout in tf_keras layers (seeded).

    Layer names follow keras-hub's weight paths (`transformer_layer_0/self_attention_layer/...`
    becomes `transformer_layer_0_self_attention_layer/...`), so pretrained keras-hub weights load
    by name (`load_keras_hub_weights`). `pooling`: "cls" (tanh pooler on the first token, as
    `BertTextClassifier`) or "mean" (masked mean of the token states, as
    `dpk_examples.text.bert_classifier`).
    """
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    t, h = shape["seq"], shape["hidden"]
    heads = shape.get("heads") or max(h // 64, 1)
    token_ids = tf.keras.Input((t,), dtype="int32", name="token_ids")
    segment_ids = tf.keras.Input((t,), dtype="int32", name="segment_ids")
    padding_mask = tf.keras.Input((t,), dtype="bool", name="padding_mask")
    positions = layers.Lambda(lambda ids: tf.broadcast_to(tf.range(tf.shape(ids)[1]), tf.shape(ids)), name="positions")(
        token_ids
    )
    # keras-hub's mask: every query attends to the unpadded keys ([B, 1, S], broadcast to [B, T, S]).
    mask = layers.Lambda(
        lambda m: tf.broadcast_to(m[:, None, :], [tf.shape(m)[0], tf.shape(m)[1], tf.shape(m)[1]]),
        name="attention_mask",
    )(padding_mask)
    x = layers.Add()(
        [
            layers.Embedding(shape.get("vocab", VOCAB), h, name="token_embedding")(token_ids),
            layers.Embedding(shape.get("max_positions", t), h, name="position_embedding")(positions),
            layers.Embedding(2, h, name="segment_embedding")(segment_ids),
        ]
    )
    x = layers.Dropout(0.1)(layers.LayerNormalization(epsilon=1e-12, name="embeddings_layer_norm")(x))
    for i in range(shape["layers"]):
        name = f"transformer_layer_{i}_"
        attention = layers.MultiHeadAttention(heads, h // heads, dropout=0.1, name=name + "self_attention_layer")(
            x, x, attention_mask=mask
        )
        x = layers.LayerNormalization(epsilon=1e-12, name=name + "self_attention_layer_norm")(
            layers.Add()([x, layers.Dropout(0.1)(attention)])
        )
        ff = layers.Dense(
            shape.get("intermediate") or 4 * h, activation=_gelu, name=name + "feedforward_intermediate_dense"
        )(x)
        ff = layers.Dropout(0.1)(layers.Dense(h, name=name + "feedforward_output_dense")(ff))
        x = layers.LayerNormalization(epsilon=1e-12, name=name + "feedforward_layer_norm")(layers.Add()([x, ff]))
    if pooling == "cls":
        first = layers.Lambda(lambda s: s[:, 0], name="first_token")(x)
        pooled = layers.Dense(h, activation="tanh", name="pooled_dense")(first)
    elif pooling == "mean":

        def masked_mean(args):
            states, m = args
            m = tf.cast(m, states.dtype)[:, :, None]
            return tf.reduce_sum(states * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)

        pooled = layers.Lambda(masked_mean, name="mean_pooling")([x, padding_mask])
    else:
        raise ValueError(f"pooling must be 'cls' or 'mean'; got {pooling!r}")
    logits = layers.Dense(num_classes, name="logits")(layers.Dropout(0.1)(pooled))
    return {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask}, logits


def load_keras_hub_weights(model, weights: dict) -> None:
    """Assigns keras-hub weights (`{path: array}`) by name; every model weight must get one."""
    import re

    by_name = {re.sub(r"^(transformer_layer_\d+)/", r"\1_", path): value for path, value in weights.items()}
    missing = []
    for w in model.weights:
        key = w.name.rsplit(":", 1)[0]
        if key not in by_name:
            missing.append(key)
            continue
        value = np.asarray(by_name.pop(key))
        if tuple(value.shape) != tuple(w.shape):
            raise ValueError(f"{key}: keras-hub shape {value.shape}, tf_keras shape {tuple(w.shape)}")
        w.assign(value)
    if missing or by_name:
        raise ValueError(f"weights without a value: {missing}; values without a weight: {sorted(by_name)}")


def _is_bias(variable) -> bool:
    return variable.name.split("/")[-1].split(":")[0] in ("bias", "beta")


def freeze_all_but_biases(model) -> None:
    """Keras 2 has no per-variable trainable flag: move every non-bias weight of every layer
    (nested ones included) to that layer's non-trainable weights."""
    for layer in [model, *model.submodules]:
        if isinstance(layer, tf.keras.layers.Layer) and layer._trainable_weights:
            kept = [w for w in layer._trainable_weights if _is_bias(w)]
            moved = [w for w in layer._trainable_weights if not _is_bias(w)]
            # In place: assigning a list of variables to a layer attribute re-tracks them
            # (trainable ones land back in _trainable_weights).
            layer._trainable_weights[:] = kept
            layer._non_trainable_weights.extend(moved)


def _registry():
    """Fast-clipping registry for every trainable layer type of the model."""
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
    from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions import (
        layer_normalization,
        multi_head_attention,
    )

    registry = layer_registry.make_default_layer_registry()  # Dense, Embedding
    registry.insert(tf.keras.layers.LayerNormalization, layer_normalization.layer_normalization_computation)
    registry.insert(tf.keras.layers.MultiHeadAttention, multi_head_attention.multi_head_attention_layer_computation)
    return registry


def make_model(
    shape: dict, mode: str, *, l2_norm_clip=1.0, noise_multiplier=1.0, num_classes=2, pooling="cls", weights=None
):
    """The tf_keras model of `mode` (uncompiled); `weights`: keras-hub weights to load first."""
    from tensorflow_privacy.privacy.keras_models import dp_keras_model

    if mode not in MODES:
        raise ValueError(f"unknown legacy mode {mode!r}; known: {MODES}")
    inputs, outputs = build_bert(shape, num_classes, pooling)
    if mode.startswith("tf_keras"):
        model = tf.keras.Model(inputs, outputs)
    else:
        # Full: every trainable layer is in the registry, so the fast clipping path runs.
        # Bias-only: no registry (see the module doc), the vectorized microbatch path.
        registry = _registry() if mode == "tfp_legacy_full" else None
        model = dp_keras_model.DPModel(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            use_xla=True,
            layer_registry=registry,
            inputs=inputs,
            outputs=outputs,
        )
        if registry is not None and not model._enable_fast_peg_computation:
            raise RuntimeError("TF Privacy did not enable fast gradient clipping for this model.")
    if weights is not None:
        load_keras_hub_weights(model, weights)
    if mode.endswith("bitfit"):
        freeze_all_but_biases(model)
    return model


def build(shape: dict, mode: str):
    """A compiled tf_keras model whose `train_on_batch` is one step of `mode` (σ = 1, C = 1)."""
    model = make_model(shape, mode)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # DPModel compiles its own train_step with XLA (use_xla=True); the plain ones ask for it.
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=loss, jit_compile=mode.startswith("tf_keras"))
    return model


class _FallbackLog(logging.Handler):
    """Notes pfor's while_loop fallbacks (TF logs them) while a step compiles. (Not
    `dp_bitfit_keras.last_pfor_fallbacks`: importing our package here would register its pfor
    converters in the peer's process.)"""

    def __init__(self):
        super().__init__()
        self.seen = False

    def emit(self, record):
        message = record.getMessage()
        self.seen |= "Using a while_loop for converting" in message or "uses a while_loop" in message


def run_modes(shape: dict, modes, repeats: int = 5, warmup: int = 2, log=print) -> list[dict]:
    """Times the modes interleaved on one batch; results in the harness's format."""
    tf_keras_version()
    x, y = bert_batch(shape["batch"], shape["seq"])
    runners, info = {}, {}
    logger = tf.get_logger()
    for mode in modes:
        log(f"[{mode}] build + compile ...")
        model = build(shape, mode)
        watcher = _FallbackLog()
        logger.addHandler(watcher)
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            for _ in range(warmup):
                model.train_on_batch(x, y)
        finally:
            logger.removeHandler(watcher)
            logger.setLevel(level)
        runners[mode] = model
        info[mode] = dict(
            trainable_params=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            pfor_fallback=watcher.seen,
            peak_mem_mb=xla_memory.step_memory_mb(model.train_step, x, y),
            times=[],
        )
    for mode, times in time_interleaved(runners, (x, y), repeats, log).items():
        info[mode]["times"] = times
    results = [
        result_row(
            mode,
            info[mode]["times"],
            shape["batch"],
            info[mode]["peak_mem_mb"],
            info[mode]["trainable_params"],
            info[mode]["pfor_fallback"],
        )
        for mode in modes
    ]
    return results


def run_epochs(shape: dict, modes, examples: int, epochs: int, log=print) -> list[dict]:
    """`fit` epochs of each mode on `rows.epoch_data` (TF Privacy's own sampling: shuffled
    batches of the shape's batch size), timed interleaved after a compile epoch."""
    x, y = epoch_data(shape, examples)
    runners = {}
    for mode in modes:
        model = build(shape, mode)
        runners[mode] = lambda model=model: model.fit(
            x, y, batch_size=shape["batch"], epochs=1, shuffle=True, verbose=0
        )
    return [{"mode": mode, "epoch_times_s": times} for mode, times in time_epochs(runners, epochs, log).items()]


class _StepTimer(tf.keras.callbacks.Callback):
    """Step times in fit (a tf_keras callback: `recipes.StepTimer` is a Keras 3 one)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


TEXT_PARTS = ("token_ids", "segment_ids", "padding_mask")


def text_run(
    npz_path: str,
    mode: str,
    *,
    epsilon: float,
    delta: float | None,
    batch_size: int,
    epochs: int,
    l2_norm_clip: float,
    learning_rate: float,
    seed: int = 0,
    log=print,
) -> dict:
    """TF Privacy's DP-SGD on a text task prepared by examples/utility_sweep.py.

    The .npz holds the tokenized splits, the keras-hub weights of the Keras 3 model our methods
    start from (backbone and the seeded head) and that model's logits on a few test examples,
    which the tf_keras rebuild must reproduce before training. Then the TF Privacy user's
    recipe: `DPModel.fit` on shuffled fixed-size batches, σ from TF Privacy's `compute_noise`
    for the target ε, ε accounted as TF Privacy does (as if the batches were Poisson samples).
    """
    import dp_accounting
    from tensorflow_privacy.privacy.analysis import compute_noise_from_budget_lib

    data = np.load(npz_path)
    meta = json.loads(str(data["meta"]))

    def split(name):
        x = {k: data[f"{name}/{k}"] for k in TEXT_PARTS}
        x["padding_mask"] = x["padding_mask"].astype(bool)
        return x, data[f"{name}/y"]

    (x_train, y_train), validation, (x_test, y_test) = split("train"), split("validation"), split("test")
    weights = {k.removeprefix("weights/"): data[k] for k in data.files if k.startswith("weights/")}
    n = len(y_train)
    delta = delta or 1 / (2 * n)
    steps = int(np.ceil(epochs * n / batch_size))
    sigma = float(compute_noise_from_budget_lib.compute_noise(n, batch_size, epsilon, epochs, delta, 1e-5))
    tf.keras.utils.set_random_seed(seed)
    model = make_model(
        meta["shape"],
        mode,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=sigma,
        num_classes=meta["num_classes"],
        pooling=meta["pooling"],
        weights=weights,
    )
    reference = data["reference_logits"]
    got = model({k: v[: len(reference)] for k, v in x_test.items()}, training=False).numpy()
    gap = float(np.max(np.abs(got - reference)))
    if gap > 1e-3 * max(1.0, float(np.max(np.abs(reference)))):
        raise RuntimeError(f"the tf_keras rebuild does not reproduce the Keras 3 model's logits (max gap {gap:.2e})")
    log(f"[{mode}] tf_keras rebuild reproduces the Keras 3 logits (max gap {gap:.1e}); σ = {sigma:.4f}")
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = _StepTimer()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True, callbacks=[timer], verbose=2)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(batch_size / n, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    total = int(sum(np.prod(v.shape) for v in model.weights))
    times = timer.times[1:] or timer.times
    return {
        "method": mode,
        "epsilon": float(accountant.get_epsilon(delta)),
        "delta": delta,
        "noise_multiplier": sigma,
        "validation_accuracy": float(model.evaluate(*validation, verbose=0, return_dict=True)["accuracy"]),
        "test_accuracy": float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]),
        "ms_per_step": 1e3 * float(np.median(times)),
        "trainable_params": trainable,
        "trainable_fraction": trainable / total,
        "steps": steps,
        "sampling": "shuffled fixed-size batches (TF Privacy's fit), accounted as Poisson",
        "reference_logit_gap": gap,
        "tf_keras": tf_keras_version(),
    }


FLAGS = flags.FLAGS
flags.DEFINE_string("shape_json", None, "Benchmark: the harness shape (JSON dict; BERT shapes only).")
flags.DEFINE_list("modes", list(MODES), "Benchmark: legacy modes to run.")
flags.DEFINE_integer("repeats", 5, "Benchmark: timed steps per mode (interleaved).")
flags.DEFINE_integer("warmup", 2, "Benchmark: untimed steps per mode first (the first compiles).")
flags.DEFINE_integer(
    "epoch_examples", 0, "Benchmark: time `fit` epochs over this many synthetic examples instead of steps."
)
flags.DEFINE_integer(
    "timed_epochs", 2, "Benchmark with --epoch_examples: timed epochs per mode (after a compile epoch)."
)
flags.DEFINE_string("text_npz", None, "Utility run instead: the task file written by examples/utility_sweep.py.")
flags.DEFINE_enum("text_mode", "tfp_legacy_full", ["tfp_legacy_full", "tfp_legacy_bitfit"], "Utility run: the method.")
flags.DEFINE_float("epsilon", 8.0, "Utility run: target ε.")
flags.DEFINE_float("delta", None, "Utility run: δ (default 1/(2n)).")
flags.DEFINE_integer("batch_size", 128, "Utility run: batch size.")
flags.DEFINE_integer("epochs", 1, "Utility run: epochs.")
flags.DEFINE_float("l2_norm_clip", 0.1, "Utility run: clipping norm C.")
flags.DEFINE_float("learning_rate", 5e-4, "Utility run: Adam learning rate.")
flags.DEFINE_integer("seed", 0, "Utility run: seed (head init is the Keras 3 model's, from the task file).")
flags.DEFINE_string("out", None, "Write the results (JSON) here.")


def main(_):
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if FLAGS.text_npz:
        report = text_run(
            FLAGS.text_npz,
            FLAGS.text_mode,
            epsilon=FLAGS.epsilon,
            delta=FLAGS.delta,
            batch_size=FLAGS.batch_size,
            epochs=FLAGS.epochs,
            l2_norm_clip=FLAGS.l2_norm_clip,
            learning_rate=FLAGS.learning_rate,
            seed=FLAGS.seed,
            log=log,
        )
    else:
        shape = json.loads(FLAGS.shape_json)
        if shape.get("model") != "bert":
            raise app.UsageError("The tf_keras peer builds BERT shapes only.")
        unknown = sorted(set(FLAGS.modes) - set(MODES))
        if unknown:
            raise app.UsageError(f"unknown legacy modes {unknown}; known: {list(MODES)}")
        if FLAGS.epoch_examples:
            results = run_epochs(shape, FLAGS.modes, FLAGS.epoch_examples, FLAGS.timed_epochs, log=log)
        else:
            results = run_modes(shape, FLAGS.modes, FLAGS.repeats, FLAGS.warmup, log=log)
        report = {"results": results, "tf_keras": tf_keras_version(), "tensorflow": tf.__version__}
    text = json.dumps(report, indent=1)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
