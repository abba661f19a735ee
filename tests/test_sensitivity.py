"""Replace-one neighbouring datasets, identical explicit seeds (same noise, same Poisson batches):
the released update moves by at most lr·2C/B on every gradient path (per-example gradients by
vectorized_map or book-keeping, chunked steps, gradient accumulation, the clipping styles,
automatic clipping, mixed precision, two replicas of MirroredStrategy)."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import dp_bitfit_keras as dpk

C, LR, N, Q = 1.0, 0.3, 16, 0.5

PATHS = {
    "vectorized": dict(compile=dict(gradient_method="vectorized", physical_batch_size=None)),
    "bookkeeping": dict(compile=dict(gradient_method="bookkeeping", physical_batch_size=None)),
    "chunked": dict(compile=dict(gradient_method="vectorized", physical_batch_size=2)),
    "accumulation": dict(optimizer=dict(gradient_accumulation_steps=2)),
    "layer_wise clipping": dict(optimizer=dict(clipping_style="layer_wise")),
    "param_wise clipping": dict(optimizer=dict(clipping_style="param_wise")),
    "automatic clipping": dict(optimizer=dict(clipping="automatic")),
    "mixed_float16": dict(dtype="mixed_float16"),
    "mixed_bfloat16": dict(dtype="mixed_bfloat16", compile=dict(gradient_method="bookkeeping")),
}


def _released(x, y, path, trainable):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    dtype = path.get("dtype")  # a mixed-precision policy: layers compute in 16 bits, variables stay float32
    hidden = keras.layers.Dense(8, activation="tanh", dtype=dtype)(inputs)
    model = dpk.DPModel(keras.Model(inputs, keras.layers.Dense(2, dtype=dtype)(hidden)), trainable=trainable)
    optimizer = dpk.DPOptimizer(keras.optimizers.SGD(LR), C, noise_multiplier=1.0, seed=7, **path.get("optimizer", {}))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **path.get("compile", {}),
    )
    before = [v.numpy().copy() for v in model.selection.variables]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the explicit seed
        steps = 2 if "gradient_accumulation_steps" in path.get("optimizer", {}) else 1
        model.fit(x, y, batch_size=int(Q * N), epochs=1, steps_per_epoch=steps, verbose=0)
    assert optimizer.dp_steps == 1
    return np.concatenate([(v.numpy() - b).ravel() for v, b in zip(model.selection.variables, before)])


CASES = [(path, "all") for path in PATHS] + [("vectorized", "bias")]


@pytest.mark.slow
@pytest.mark.parametrize("path, trainable", CASES)
def test_replacing_one_example_moves_the_update_by_at_most_lr_2c_over_b(path, trainable):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    y = rng.integers(0, 2, N)
    moved = []
    for row in range(3):  # replace a few rows in turn with an extreme example
        x2, y2 = x.copy(), y.copy()
        x2[row], y2[row] = 1e3, 1 - y[row]
        moved.append(
            np.linalg.norm(_released(x, y, PATHS[path], trainable) - _released(x2, y2, PATHS[path], trainable))
        )
    bound = LR * 2 * C / (Q * N)
    assert max(moved) <= bound * (1 + 1e-4), (moved, bound)
    assert max(moved) > 0.05 * bound  # some replaced row was sampled: the test can see a change


@pytest.mark.slow
def test_two_replicas_keep_the_replace_one_bound():
    """MirroredStrategy on 2 logical CPU devices (a subprocess: devices are fixed at TF start-up),
    the same neighbours and seeds, per-example gradients by vectorized_map and book-keeping, and
    users packed as examples."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "mirrored_sensitivity.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    # per_user/all: users packed as examples (PerUserModel), one user's rows replaced: the
    # user-level bound under the strategy too.
    assert set(out["moved"]) == {"vectorized/all", "bookkeeping/all", "vectorized/bias", "per_user/all"}
    for case, moved in out["moved"].items():
        assert max(moved) <= out["bound"] * (1 + 1e-4), (case, moved, out["bound"])
        assert max(moved) > 0.05 * out["bound"], (case, moved)
