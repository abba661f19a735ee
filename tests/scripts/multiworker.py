"""One worker of a loopback cluster (or, with ports '-', a single process): DP fit, as JSON.

    multiworker.py INDEX PORTS OUT [--sigma S] [--seed N] [--accumulation K] [--epochs E]
                   [--backup DIR] [--kill_after_steps N] [--trainable T] [--data_seed D]

PORTS: comma-separated loopback ports of the cluster's workers, or '-' for no cluster.
"""

import argparse
import json
import os
import signal
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

parser = argparse.ArgumentParser()
parser.add_argument("index", type=int)
parser.add_argument("ports")
parser.add_argument("out")
parser.add_argument("--sigma", type=float, default=0.0)
parser.add_argument("--seed", type=int, default=None)
parser.add_argument("--accumulation", type=int, default=1)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--backup", default=None)
parser.add_argument("--kill_after_steps", type=int, default=-1)
parser.add_argument("--kill_worker", type=int, default=-1, help="only this worker kills itself")
parser.add_argument("--trainable", default="bias+head")
parser.add_argument("--data_seed", type=int, default=0)
parser.add_argument("--connect_timeout", type=float, default=60.0)
parser.add_argument("--dataset", default="arrays")
parser.add_argument("--heartbeat_timeout", type=float, default=30.0)
parser.add_argument(
    "--mismatched_seeds_first",
    action="store_true",
    help="first try a fit whose noise seed differs per worker (must be refused), then go on",
)
args = parser.parse_args()

if args.ports != "-":
    ports = args.ports.split(",")
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": args.index},
        }
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402
from dp_bitfit_keras import distribute  # noqa: E402

if args.ports != "-":
    try:
        strategy = distribute.multi_worker_strategy(
            connect_timeout=args.connect_timeout, collective_timeout=60, heartbeat_timeout=args.heartbeat_timeout
        )
    except distribute.WorkerUnreachableError as e:
        json.dump({"error": type(e).__name__, "message": str(e)}, open(args.out, "w"))
        sys.stdout.flush()
        os._exit(3)  # TF's half-started server thread must not keep the process alive
else:
    strategy = tf.distribute.get_strategy()

rng = np.random.RandomState(args.data_seed)
x = rng.randn(96, 6).astype("float32") * 2
y = rng.randint(0, 3, 96).astype("int32")


def build(seed):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
        model = dpk.DPModel(base, trainable=args.trainable)
        model.compile(
            optimizer=dpk.DPOptimizer(
                keras.optimizers.SGD(0.5), 1.0, args.sigma, seed=seed, gradient_accumulation_steps=args.accumulation
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    return model


out = {"worker": args.index, "replicas": strategy.num_replicas_in_sync}
if args.mismatched_seeds_first:
    try:
        build(args.index + 1).fit(x, y, batch_size=16, epochs=1, verbose=0)
        out["mismatched_seeds"] = "trained"
    except ValueError as e:
        out["mismatched_seeds"] = str(e)
model = build(args.seed)


class Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if args.kill_worker in (-1, args.index) and 0 <= args.kill_after_steps <= self.model.optimizer.dp_steps:
            os.kill(os.getpid(), signal.SIGKILL)


callbacks = [Kill()]
if args.backup:
    # One backup directory per worker (on several hosts: a local or shared path each).
    callbacks.insert(
        0,
        keras.callbacks.BackupAndRestore(
            os.path.join(args.backup, f"worker{args.index}"), save_freq=4, delete_checkpoint=False
        ),
    )
data = (x, y)
if args.dataset == "shuffled":
    data = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96).batch(16, drop_remainder=True),)
try:
    if args.dataset == "shuffled":
        model.fit(*data, epochs=args.epochs, verbose=0, sampling_rate=16 / 96, callbacks=callbacks)
    else:
        model.fit(*data, batch_size=16, epochs=args.epochs, verbose=0, callbacks=callbacks)
except ValueError as e:
    json.dump({"error": "ValueError", "message": str(e)}, open(args.out, "w"))
    sys.stdout.flush()
    os._exit(4)
out.update(
    dp_steps=model.optimizer.dp_steps,
    epsilon=model.privacy_spent(1e-5)[0],
    noise_multiplier=model.optimizer.noise_multiplier,
    weights=[v.numpy().tolist() for v in model.trainable_variables],
)
json.dump(out, open(args.out, "w"))
sys.stdout.flush()
os._exit(0)  # no collective shutdown handshake: the peer may already be gone
