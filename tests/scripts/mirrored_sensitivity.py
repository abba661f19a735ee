"""Replace-one neighbours under MirroredStrategy on 2 logical CPU devices, same seeds: how far the
released update moves, as JSON (tests/test_sensitivity.py checks it against lr·2C/B)."""

import json
import os
import warnings

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402

C, LR, N, Q = 1.0, 0.3, 16, 0.5


def released(strategy, x, y, method, trainable):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        model = dpk.DPModel(keras.Model(inputs, keras.layers.Dense(2)(hidden)), trainable=trainable)
        optimizer = dpk.DPOptimizer(keras.optimizers.SGD(LR), C, noise_multiplier=1.0, seed=7)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            gradient_method=method,
            physical_batch_size=None,
        )
    before = [v.numpy().copy() for v in model.selection.variables]
    data = dpk.poisson_batches((x, y), Q, int(Q * N), steps_per_epoch=1, seed=1)  # same rows both times
    with warnings.catch_warnings(), strategy.scope():
        warnings.simplefilter("ignore")  # the explicit seeds
        model.fit(data, epochs=1, verbose=0)
    assert optimizer.dp_steps == 1
    return np.concatenate([(v.numpy() - b).ravel() for v, b in zip(model.selection.variables, before)])


strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(1)
x = rng.normal(size=(N, 4)).astype(np.float32)
y = rng.integers(0, 2, N).astype(np.int32)
moved = {}
for method, trainable in (("vectorized", "all"), ("bookkeeping", "all"), ("vectorized", "bias")):
    distances = []
    for row in range(3):
        x2, y2 = x.copy(), y.copy()
        x2[row], y2[row] = 1e3, 1 - y[row]
        a, b = released(strategy, x, y, method, trainable), released(strategy, x2, y2, method, trainable)
        distances.append(float(np.linalg.norm(a - b)))
    moved[f"{method}/{trainable}"] = distances
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "bound": LR * 2 * C / (Q * N), "moved": moved}))
