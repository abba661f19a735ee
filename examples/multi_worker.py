"""DP training on several workers (`MultiWorkerMirroredStrategy`), on one machine or several.

On one machine, N worker processes on the loopback address (ports picked free):

    uv run python examples/multi_worker.py --local_workers=2

On several hosts: run the same command without --local_workers on every host, each with its
own TF_CONFIG (same cluster, its own task index), e.g. on host A and host B:

    TF_CONFIG='{"cluster": {"worker": ["hostA:2222", "hostB:2222"]}, "task": {"type": "worker", "index": 0}}' \\
        uv run python examples/multi_worker.py
    TF_CONFIG='{"cluster": {"worker": ["hostA:2222", "hostB:2222"]}, "task": {"type": "worker", "index": 1}}' \\
        uv run python examples/multi_worker.py

Each worker trains the digits transfer task (public pretraining on 0-4, private fine-tuning on
5-9) with one global Poisson batch per step split over all replicas, the clipped sums
all-reduced and the noise added once; every worker ends with the same weights and reports the
same ε. Worker 0 exports the SavedModel. `--backup_dir` makes the run resumable: kill any
worker, start the job again with the same command, and it continues from the last backup.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "local_workers",
    0,
    "Start this many worker processes on 127.0.0.1 and wait for them "
    "(0: this process is one worker of the cluster in TF_CONFIG, or runs alone without it).",
)
flags.DEFINE_enum("method", "dp_full", ["dp_full", "dp_bitfit_head", "dp_lora"], "What to train privately.")
flags.DEFINE_float("epsilon", 8.0, "Target ε.")
flags.DEFINE_integer("epochs", 30, "Epochs.")
flags.DEFINE_integer("batch_size", 256, "Expected global batch size (Poisson), split over all replicas.")
flags.DEFINE_float(
    "learning_rate",
    None,
    "Learning rate; default: the method's digits default (with its optimizer: "
    "SGD with momentum for dp_full, Adam otherwise).",
)
flags.DEFINE_integer("gradient_accumulation_steps", 1, "Chunks of each global batch per replica (memory).")
flags.DEFINE_integer("pretrain_epochs", 30, "Epochs of the public pretraining (digits 0-4), on every worker.")
flags.DEFINE_string("backup_dir", None, "keras.callbacks.BackupAndRestore directory (one subdirectory per worker).")
flags.DEFINE_float("connect_timeout", 120.0, "Seconds to wait for the other workers before failing.")
flags.DEFINE_string(
    "export_dir", None, "SavedModel directory (worker 0); default savedmodels/multi_worker_<method>/<version>."
)
flags.DEFINE_string("summary_json", None, "Each worker writes its summary to this path with '.<index>' appended.")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(n):
    """Starts n workers of this script on 127.0.0.1, each with 1/n of this machine's cores."""
    ports = [_free_port() for _ in range(n)]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    threads = max(1, (os.cpu_count() or 1) // n)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_workers")]
    procs = []
    for i in range(n):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            DPK_THREADS=str(threads),
        )
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"worker exit codes: {codes}")


def train():
    import keras
    import tensorflow as tf

    if os.environ.get("DPK_THREADS"):
        tf.config.threading.set_intra_op_parallelism_threads(int(os.environ["DPK_THREADS"]))
        tf.config.threading.set_inter_op_parallelism_threads(int(os.environ["DPK_THREADS"]))
    import dp_bitfit_keras as dpk
    from dp_bitfit_keras import distribute
    from dpk_examples import recipes, tasks

    # The strategy first: TF must form the cluster before it runs any other op.
    if os.environ.get("TF_CONFIG"):
        strategy = distribute.multi_worker_strategy(connect_timeout=FLAGS.connect_timeout)
    else:
        strategy = tf.distribute.get_strategy()
    index = distribute.worker_index(strategy)
    task = tasks.digits_transfer_task(
        FLAGS.pretrain_epochs, verbose=index == 0
    )  # the same public pretraining on every worker
    (x, y), validation, test = task.splits.train, task.splits.validation, task.splits.test
    trainable = recipes.METHODS[FLAGS.method][0]
    learning_rate = FLAGS.learning_rate or task.learning_rate(FLAGS.method, FLAGS.epsilon)
    optimizer = task.optimizer(FLAGS.method)  # the one the default learning rate is for
    delta = 1.0 / (2 * len(y))

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times = getattr(self, "times", []) + [time.perf_counter() - self.start]

    timer = Timer()
    callbacks = [timer, dpk.PrivacyCallback(delta=delta)]
    if FLAGS.backup_dir:
        callbacks.insert(
            0,
            keras.callbacks.BackupAndRestore(
                os.path.join(FLAGS.backup_dir, f"worker{index}"), save_freq="epoch", delete_checkpoint=False
            ),
        )
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = task.build_model()
        if trainable != "bias":
            recipes.zero_head(base)  # the recipes' default for private runs that train the head
        if trainable.startswith("lora"):
            dpk.enable_lora(base, recipes.LORA_RANK)
        model = dpk.DPModel(base, trainable=trainable)
        model.compile(
            optimizer=dpk.DPOptimizer(
                recipes.OPTIMIZERS[optimizer](learning_rate),
                1.0,
                target_epsilon=FLAGS.epsilon,
                target_delta=delta,
                clipping="abadi",
                gradient_accumulation_steps=FLAGS.gradient_accumulation_steps,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    start = time.perf_counter()
    model.fit(
        x, y, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=2 if index == 0 else 0, callbacks=callbacks
    )
    wall = time.perf_counter() - start
    summary = dict(
        worker=index,
        workers=distribute.num_workers(strategy),
        replicas=strategy.num_replicas_in_sync,
        method=FLAGS.method,
        epsilon=model.privacy_spent(delta)[0],
        delta=delta,
        dp_steps=model.optimizer.dp_steps,
        validation_accuracy=float(model.evaluate(*validation, verbose=0, return_dict=True)["accuracy"]),
        test_accuracy=float(model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]),
        seconds_per_epoch=statistics.median(timer.times[1:] or timer.times),
        fit_seconds=wall,
        weights_fingerprint=distribute.fingerprint(model.trainable_variables),
    )
    print(json.dumps(summary), flush=True)
    if FLAGS.summary_json:
        with open(f"{FLAGS.summary_json}.{index}", "w") as f:
            json.dump(summary, f, indent=1)
    if index == 0:
        export_dir = FLAGS.export_dir or recipes.default_export_dir("multi_worker", FLAGS.method, FLAGS.epsilon)
        model.model.export(export_dir, format="tf_saved_model", verbose=False)
        print(f"SavedModel: {export_dir}", flush=True)
    # Leave without TF's collective shutdown handshake: a peer that already exited would make it wait.
    sys.stdout.flush()
    os._exit(0)


def main(_):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TF's distribute logs each all-reduce at INFO
    if FLAGS.local_workers:
        launch_local(FLAGS.local_workers)
    else:
        train()


if __name__ == "__main__":
    app.run(main)
