"""Peak memory of a compiled training step from XLA's own buffer assignment.

Import this module before TensorFlow: it points XLA's dump of buffer assignments at a
temporary folder, restricted to modules named `*memory_probe*`, so `step_memory_mb` can read
the peak of a compiled step on CPU, where TF has no allocator statistics. Child processes
inherit the folder (`DPK_BENCH_XLA_DUMP`), so a peer measured in its own process (the
tf_keras one) is read the same way.

The figure is XLA's "Total bytes used" of the step's buffer assignment: arguments (weights,
optimizer slots, the batch), temporaries at their peak liveness, outputs. It is exact for the
step and needs only a compile, nothing runs.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile

DUMP_DIR = os.environ.get("DPK_BENCH_XLA_DUMP") or tempfile.mkdtemp(prefix="dpk_bench_xla_")
os.environ["DPK_BENCH_XLA_DUMP"] = DUMP_DIR
if "xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*memory_probe.*"
    ).strip()

_TOTAL = re.compile(r"Total bytes used: (\d+)")


def step_memory_mb(train_step, *data) -> float | None:
    """Peak memory (MB) of `train_step(data)` compiled by XLA (compile only); `data` is
    `(x, y)` or `(x, y, sample_weight)`.

    None when XLA's dump is not configured (this module imported after TF compiled anything).
    """
    import tensorflow as tf

    before = set(glob.glob(os.path.join(DUMP_DIR, "*memory-usage-report.txt")))

    def memory_probe(*data):
        return train_step(data)

    tf.function(memory_probe, jit_compile=True).experimental_get_compiler_ir(*data)(stage="optimized_hlo")
    new = set(glob.glob(os.path.join(DUMP_DIR, "*memory-usage-report.txt"))) - before
    totals = []
    for path in new:
        with open(path) as f:
            match = _TOTAL.search(f.read(4096))
        if match:
            totals.append(int(match.group(1)))
        os.remove(path)
    return max(totals) / 2**20 if totals else None
