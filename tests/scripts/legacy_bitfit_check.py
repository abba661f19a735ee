"""Run with the `legacy` extra: one tfp_legacy_bitfit step moves the biases and nothing else,
and the peer's model has the harness model's parameter counts. Prints a JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import numpy as np  # noqa: E402
import tfp_legacy  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow)

shape = json.loads(sys.argv[1])
model = tfp_legacy.build(shape, "tfp_legacy_bitfit")
before = {w.name: w.numpy().copy() for w in model.weights}
x, y = tfp_legacy.bert_batch(shape["batch"], shape["seq"])
model.train_on_batch(x, y)
moved = sorted({w.name for w in model.weights if not np.array_equal(w.numpy(), before[w.name])})
print(
    json.dumps(
        {
            "moved": moved,
            "trainable": sorted(w.name for w in model.trainable_weights),
            "total_params": int(sum(np.prod(w.shape) for w in model.weights)),
        }
    )
)
