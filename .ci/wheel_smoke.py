"""Smoke test of the installed wheel, run from outside the checkout (see .ci/run).

Checks that the package imported is the installed one, TF Privacy's DP queries import through
the compat shim, and a short DP-BiTFiT fit trains and reports ε on the versions a plain
resolver picked.
"""

import importlib.metadata
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402
from dp_bitfit_keras import _compat  # noqa: E402

checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assert not os.path.abspath(dpk.__file__).startswith(checkout + os.sep), f"imported the checkout: {dpk.__file__}"
assert dpk.__version__ == importlib.metadata.version("dp-bitfit-keras"), (
    dpk.__version__,
    importlib.metadata.version("dp-bitfit-keras"),
)
assert _compat.GaussianSumQuery is not None and _compat.QuantileAdaptiveClipSumQuery is not None
# The slim install: the library alone, without the examples' packages (their extra) or code.
required = [r.split(";")[0] for r in importlib.metadata.requires("dp-bitfit-keras") if "extra ==" not in r]
for heavy in ("keras-hub", "tensorflow-datasets", "matplotlib", "absl-py", "scikit-learn"):
    assert not any(r.startswith(heavy) for r in required), (heavy, required)
for module in ("keras_hub", "tensorflow_datasets", "matplotlib", "dpk_examples"):
    assert importlib.util.find_spec(module) is None, f"{module} is installed by the core wheel"
files = [str(f) for f in importlib.metadata.files("dp-bitfit-keras")]
assert not any(name in f for f in files for name in ("recipes.py", "tasks.py", "example_flags.py")), files

rng = np.random.RandomState(0)
x = rng.randn(256, 8).astype("float32")
y = (x[:, 0] > 0).astype("int32")
base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)])
model = dpk.DPModel(base, trainable="bias+head")
model.compile(
    optimizer=dpk.DPOptimizer(keras.optimizers.Adam(0.05), l2_norm_clip=1.0, target_epsilon=8.0, target_delta=1e-4),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
history = model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[dpk.PrivacyCallback(delta=1e-4)])
eps, _ = model.privacy_spent(1e-4)
acc = float(model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"])
assert 0 < eps <= 8.0 + 1e-6 and abs(eps - history.history["epsilon"][-1]) < 1e-9, eps
assert acc > 0.6, acc
versions = {
    p: importlib.metadata.version(p)
    for p in ("tensorflow", "keras", "tensorflow-privacy", "dp-accounting", "absl-py", "numpy")
}
print(f"wheel smoke OK on Python {sys.version.split()[0]}: ε = {eps:.3f}, accuracy = {acc:.3f}, {versions}")
