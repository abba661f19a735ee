"""Run under 2 logical CPU devices: DP steps with and without MirroredStrategy, as JSON."""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402


def build(strategy, sigma, units, accumulation=1, trainable="bias"):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(units)]
        )
        model = dpk.DPModel(base, trainable=trainable)
        model.compile(
            optimizer=dpk.DPOptimizer(
                keras.optimizers.SGD(1.0), 1.0, sigma, seed=7, gradient_accumulation_steps=accumulation
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.optimizer.build(model.trainable_variables)
    model.optimizer.begin_run(0.1, 8.0, 100)
    return model


def update(model, x, y, w=None):
    # One step through fit: Keras splits each distributed batch over the replicas. q = 1 puts
    # every example in the (padded) batch.
    before = [v.numpy().copy() for v in model.trainable_variables]
    ds = dpk.poisson_batches((x, y), 1.0, 16, steps_per_epoch=1, seed=1)
    if w is not None:  # all examples weighted 0: the update is the noise alone
        ds = ds.map(lambda a, b, m: (a, b, m * 0.0))
        ds.dp_sampler = None
    with model.distribute_strategy.scope():
        if w is None:
            model.fit(ds, epochs=1, verbose=0)
        else:
            model.fit(ds, epochs=1, verbose=0, sampling_rate=0.1)
    return [b - v.numpy() for b, v in zip(before, model.trainable_variables)]


rng = np.random.RandomState(0)
x = rng.randn(8, 6).astype("float32") * 3
y = rng.randint(0, 3, 8).astype("int32")
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
default = tf.distribute.get_strategy()
out = {"replicas": mirrored.num_replicas_in_sync}
# σ = 0: the same update with and without the strategy (clipped sums all-reduced once).
a, b = update(build(default, 0.0, 3), x, y), update(build(mirrored, 0.0, 3), x, y)
out["sigma0_max_error"] = max(float(np.abs(u - v).max()) for u, v in zip(a, b))
out["sigma0_update_norm"] = float(np.sqrt(sum((u**2).sum() for u in a)))
# Noise alone on a 4096-wide bias: its std must be σC/B, the single-device value.
for name, strategy in [("single", default), ("mirrored", mirrored)]:
    model = build(strategy, 2.0, 4096)
    noise = update(model, x, y, w=0)[-1]
    out[f"{name}_noise_std"] = float(noise.std())
    out[f"{name}_dp_steps"] = model.optimizer.dp_steps
# train_on_batch would hand every replica the whole batch: refused.
try:
    build(mirrored, 1.0, 3).train_on_batch(x, y)
    out["train_on_batch"] = "ran"
except ValueError as e:
    out["train_on_batch"] = str(e)
# fit under the strategy: Poisson batches split over the replicas, ε accounted.
model = build(mirrored, 1.0, 3)
xs, ys = rng.randn(160, 6).astype("float32"), rng.randint(0, 3, 160).astype("int32")
with mirrored.scope():
    model.fit(xs, ys, batch_size=16, epochs=1, verbose=0)
out["fit_dp_steps"] = model.optimizer.dp_steps
out["fit_epsilon"] = model.privacy_spent(1e-5)[0]
# Gradient accumulation under the strategy (k micro-batches folded into one chunked step):
# with σ = 0 the same weights as one device accumulating, for biases and book-keeping's kernels.
for trainable in ("bias", "all"):
    finals = []
    for strategy in (default, mirrored):
        model = build(strategy, 0.0, 3, accumulation=2, trainable=trainable)
        with strategy.scope():
            model.fit(xs, ys, batch_size=16, epochs=1, verbose=0)
        finals.append([v.numpy() for v in model.trainable_variables])
        out[f"accumulate_{trainable}_dp_steps_{'mirrored' if strategy is mirrored else 'single'}"] = (
            model.optimizer.dp_steps
        )
    out[f"accumulate_{trainable}_max_error"] = max(float(np.abs(u - v).max()) for u, v in zip(*finals))
json.dump(out, sys.stdout)
