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


def released(strategy, x, y, method, trainable, weights=None):
    """One released update; `method="per_user"`: x, y packed by user ([users, k, ...]), each
    user's gradient clipped as a whole (a PerUserModel: user-level privacy under the strategy)."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        base = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        if method == "per_user":
            base, method = dpk.PerUserModel(base, x.shape[1]), "vectorized"
        model = dpk.DPModel(base, trainable=trainable)
        optimizer = dpk.DPOptimizer(keras.optimizers.SGD(LR), C, noise_multiplier=1.0, seed=7)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            gradient_method=method,
            physical_batch_size=None,
        )
    before = [v.numpy().copy() for v in model.selection.variables]
    examples = (x, y) if weights is None else (x, y, weights)
    data = dpk.poisson_batches(examples, Q, int(Q * len(y)), steps_per_epoch=1, seed=1)  # same rows both times
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
# User level: N users of 2 rows each, packed; the neighbour replaces one user's two rows.
users = np.arange(2 * N) // 2
xr = rng.normal(size=(2 * N, 4)).astype(np.float32)
yr = rng.integers(0, 2, 2 * N).astype(np.int32)
xu, yu, wu = dpk.pack_users(xr, yr, users, 2)
distances = []
for user in range(3):
    x2, y2 = xu.copy(), yu.copy()
    x2[user], y2[user] = 1e3, 1 - yu[user]
    a = released(strategy, xu, yu, "per_user", "all", wu)
    b = released(strategy, x2, y2, "per_user", "all", wu)
    distances.append(float(np.linalg.norm(a - b)))
moved["per_user/all"] = distances
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "bound": LR * 2 * C / (Q * N), "moved": moved}))
