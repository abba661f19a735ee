"""A DP fit with BackupAndRestore; kills itself (SIGKILL) after global batch `kill_at` if >= 0.

python resume.py BACKUP_DIR OUT_JSON KILL_AT
"""

import json
import os
import signal
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import keras  # noqa: E402
import numpy as np  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402

backup_dir, out_path, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if kill_at >= 0 and self.model.optimizer.dp_steps >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a crash or preemption


keras.utils.set_random_seed(0)
rng = np.random.RandomState(0)
x = rng.randn(300, 6).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int32")
base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)])
model = dpk.DPModel(base, trainable="all")
model.compile(
    optimizer=dpk.DPOptimizer(keras.optimizers.Adam(1e-2), 1.0, target_epsilon=3.0, target_delta=1e-5, seed=11),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
ds = dpk.poisson_batches((x, y), 0.1, seed=5)  # 10 steps per epoch
model.fit(
    ds,
    epochs=4,
    verbose=0,
    callbacks=[keras.callbacks.BackupAndRestore(backup_dir, save_freq=3), Kill(), dpk.PrivacyCallback(1e-5)],
)
with open(out_path, "w") as f:
    json.dump(
        {
            "dp_steps": model.optimizer.dp_steps,
            "epsilon": model.privacy_spent(1e-5)[0],
            "noise_multiplier": model.optimizer.noise_multiplier,
            "weights": [w.tolist() for w in model.get_weights()],
        },
        f,
    )
