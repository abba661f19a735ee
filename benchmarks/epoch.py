"""What users pay per epoch: `fit` epochs of DP training (Poisson sampling) against non-private
`fit` epochs at the same (expected) batch, and the peers' epochs on the same shape and data.

    uv run python benchmarks/epoch.py --out=benchmarks/results/cpu_epoch_small.json
    uv run python benchmarks/epoch.py --shape=big --examples=256 --modes=bitfit,dp_bitfit_pad,dp_bitfit_auto
    uv run --extra legacy python benchmarks/epoch.py --shape=text --examples=1280 \\
        --modes=bitfit,dp_bitfit_auto,tf_keras_bitfit,tfp_legacy_bitfit,torch_bitfit,opacus_dp_bitfit

Shapes are the harness's (`harness.SHAPES`: the shape's `batch` is the expected batch); data is
`rows.epoch_data` (BERT: random tokens, lengths uniform in [8, seq]). Our modes run in this
process on the same random-init keras-hub model: each mode's first epoch (compile) is excluded,
then the modes' epochs are timed interleaved, `--epochs` rounds, median.

Modes. Ours: `bitfit`, `full` (non-private `fit`, shuffled batches; `_mbN`: the same batch in
micro-batches of N by Keras' gradient accumulation) and `dp_bitfit_*`, `dp_full_*` (`DPModel`,
Poisson sampling) where the suffix is the `physical_batch_size`: `pad` computes every row of the
padded Poisson batch (the 1 - 1e-9 binomial quantile), `cN` only the chunks of N rows that hold
sampled examples, `auto` the default (`model.chunk_size_for`); `dp_bitfit_vectorized_*`: bias
gradients by vectorized_map instead of the default book-keeping. Peers (BERT shapes only), each in
its own process, timed the same way (interleaved among that process's modes, so their ratios to
their own non-private twin are as robust as ours; across processes the machine's state may
differ): `tf_keras_bitfit`, `tfp_legacy_bitfit` (TF Privacy on tf_keras, `legacy` extra; its
`fit` uses shuffled fixed-size batches) and `torch_bitfit`, `opacus_dp_bitfit` (PyTorch +
Opacus in `benchmarks/peers`' own environment; Opacus' DPDataLoader samples Poisson batches).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402,I001  (XLA dump flags before TensorFlow)
from absl import app, flags  # noqa: E402
from rows import epoch_data, time_epochs  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402
from dp_bitfit_keras.privacy import sampling  # noqa: E402

OPACUS_MODES = ("torch_bitfit", "torch_full", "opacus_dp_bitfit", "opacus_dp_full")
PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
# Each mode's non-private twin (same framework, same trained variables), for the `× own
# non-private` column.
TWIN = {
    "tfp_legacy_bitfit": "tf_keras_bitfit",
    "tfp_legacy_full": "tf_keras_full",
    "opacus_dp_bitfit": "torch_bitfit",
    "opacus_dp_full": "torch_full",
}

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "shape", "epoch_small", list(harness.SHAPES), "Model shape (harness.SHAPES); its batch is the expected batch."
)
flags.DEFINE_integer("examples", 0, "Training examples n (0: 16 expected batches).")
flags.DEFINE_list(
    "modes",
    [
        "bitfit",
        "bitfit_mb16",
        "dp_bitfit_pad",
        "dp_bitfit_c8",
        "dp_bitfit_c16",
        "dp_bitfit_c32",
        "dp_bitfit_c64",
        "dp_bitfit_auto",
    ],
    "Modes (see the module doc).",
)
flags.DEFINE_integer("epochs", 3, "Timed epochs per mode (after one compile epoch).")
flags.DEFINE_string("out", None, "Write JSON here and Markdown beside it.")
flags.DEFINE_list("render", None, "Instead of running: recompute the statistics and Markdown of these result JSONs.")


def _peak_rss_mb():
    """This process's peak resident memory (VmHWM): every mode run here, plus TF itself."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def _twin(mode):
    """The non-private mode of the same framework and trained variables, or None."""
    if mode in TWIN:
        return TWIN[mode]
    if mode.startswith("dp_") or "_mb" in mode:
        return "full" if "full" in mode else "bitfit"
    return None


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _build(mode, shape):
    """(model, fit kwargs) of one of our modes."""
    trainable = "bias" if "bitfit" in mode else "all"
    base = harness.build_base(shape, trainable)
    batch = shape["batch"]
    if not mode.startswith("dp_"):
        micro = int(mode.split("_mb")[1]) if "_mb" in mode else batch
        if trainable == "bias":
            dpk.selection.apply_selection(base, dpk.select_variables(base, "bias"))
        accumulation = batch // micro if micro < batch else None
        base.compile(
            optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=accumulation),
            loss=_loss(),
            jit_compile=True,
        )
        return base, dict(batch_size=micro, shuffle=True)
    suffix = mode.rsplit("_", 1)[-1]  # pad | auto | c<N>
    if suffix == "pad":
        physical = None
    elif suffix == "auto":
        physical = "auto"
    elif suffix.startswith("c") and suffix[1:].isdigit():
        physical = int(suffix[1:])
    else:
        raise ValueError(f"unknown mode {mode!r}: dp_bitfit_/dp_full_ take pad, auto or c<N>")
    model = dpk.DPModel(base, trainable=trainable)
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.Adam(1e-3), 1.0, 1.0),
        loss=_loss(),
        physical_batch_size=physical,
        gradient_method="vectorized" if "_vectorized" in mode else "auto",
    )
    return model, dict(batch_size=batch)


def _opacus(shape, modes, examples, epochs):
    """Runs the PyTorch/Opacus modes in benchmarks/peers' environment; epoch seconds per mode."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "opacus.json")
        cmd = [
            "uv",
            "run",
            "python",
            "opacus_bench.py",
            f"--shape_json={json.dumps(shape)}",
            f"--modes={','.join(modes)}",
            f"--epoch_examples={examples}",
            f"--repeats={epochs}",
            f"--out={out}",
        ]
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        print(f"[{', '.join(modes)}] in the PyTorch peer's environment ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=PEERS_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise RuntimeError(f"the Opacus peer failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            report = json.load(f)
    return {r["mode"]: r["epoch_times_s"] for r in report["results"]}, report["device"]


def main(_):
    if FLAGS.render:
        for path in FLAGS.render:
            render(path)
        return
    shape = dict(harness.SHAPES[FLAGS.shape], name=FLAGS.shape)
    n = FLAGS.examples or 16 * shape["batch"]
    legacy = [m for m in FLAGS.modes if m in harness.LEGACY_MODES]
    opacus = [m for m in FLAGS.modes if m in OPACUS_MODES]
    ours = [m for m in FLAGS.modes if m not in legacy and m not in opacus]
    if (legacy or opacus) and shape["model"] != "bert":
        raise app.UsageError("The peers' epoch modes build BERT shapes only (decoder peers: opacus_bench.py's steps).")
    if legacy and not harness.legacy_available():
        raise app.UsageError(f"{legacy} need tf_keras: `uv run --extra legacy python benchmarks/epoch.py ...`")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    x, y, *w = epoch_data(shape, n)  # decoders: per-token weights too
    weights = dict(sample_weight=w[0]) if w else {}
    runners, models = {}, {}
    for mode in ours:
        model, kwargs = _build(mode, shape)
        runners[mode] = lambda model=model, kwargs=kwargs: model.fit(x, y, epochs=1, verbose=0, **kwargs, **weights)
        models[mode] = model
    times = time_epochs(runners, FLAGS.epochs, log)
    chunks = {mode: getattr(model, "_chunk", None) for mode, model in models.items()}
    del runners
    framework = {m: "ours (Keras 3)" for m in ours}
    if legacy:
        report = harness.run_legacy(shape, legacy, FLAGS.epochs, 0, log=log, epoch_examples=n)
        times.update({r["mode"]: r["epoch_times_s"] for r in report["results"]})
        framework.update(
            {m: ("TF Privacy on " if m.startswith("tfp") else "") + f"tf_keras {report['tf_keras']}" for m in legacy}
        )
    if opacus:
        peer_times, device = _opacus(shape, opacus, n, FLAGS.epochs)
        times.update(peer_times)
        framework.update({m: ("Opacus on " if m.startswith("opacus") else "") + device.split(", ")[-1] for m in opacus})
    report = {
        "shape": shape,
        "examples": n,
        "tf": tf.__version__,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "peak_rss_mb": round(_peak_rss_mb()),
        "rows": [
            dict(mode=m, framework=framework[m], chunk=chunks.get(m), epoch_times_s=[round(t, 3) for t in times[m]])
            for m in FLAGS.modes
        ],
    }
    report = summarize(report)
    for row in report["rows"]:
        log(json.dumps(row))
    table = markdown(report)
    print(table)
    if FLAGS.out:
        write(report, FLAGS.out)


def summarize(report: dict) -> dict:
    """Adds each row's statistics from its `epoch_times_s`: the minimum (the figure least
    disturbed by other load on a shared machine, whose noise only ever adds time) and the
    median, per expected example, and the ratios to the own non-private twin and to
    dp_bitfit_auto (both by minimum and by median)."""
    n, shape = report["examples"], report["shape"]
    stats = {r["mode"]: (min(r["epoch_times_s"]), statistics.median(r["epoch_times_s"])) for r in report["rows"]}
    padded = sampling.max_batch_size_for(n, shape["batch"] / n)
    report["padded_rows"] = padded
    for r in report["rows"]:
        mode = r["mode"]
        low, mid = stats[mode]
        twin, reference = _twin(mode), "dp_bitfit_auto" if "dp_bitfit_auto" in stats else None
        r.update(
            sampling="Poisson" if mode.startswith(("dp_", "opacus")) else "shuffled",
            epoch_s_min=round(low, 3),
            epoch_s_median=round(mid, 3),
            ms_per_expected_example=round(1e3 * low / n, 3),
            vs_non_private=round(low / stats[twin][0], 3) if twin in stats else None,
            vs_non_private_median=round(mid / stats[twin][1], 3) if twin in stats else None,
            vs_ours=round(low / stats[reference][0], 3) if reference else None,
            padded_rows=padded if mode.startswith("dp_") else None,
        )
    return report


def markdown(report: dict) -> str:
    shape, n = report["shape"], report["examples"]
    epochs = len(report["rows"][0]["epoch_times_s"])
    dims = (
        f"{shape['model'].upper() if shape['model'] == 'bert' else shape['model']} {shape['layers']} layers x "
        f"{shape['hidden']}, seq {shape['seq']}"
        if "seq" in shape
        else f"ViT {shape['layers']} layers x {shape['hidden']}, {shape['image']}x{shape['image']} images, patch {shape['patch']}"
    )
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"`{shape['name']}`: {dims}; n = {n}, (expected) batch {shape['batch']} (Poisson batches padded to "
        f"{report['padded_rows']} rows); {epochs} timed epochs per mode; CPU ({report.get('cpus') or os.cpu_count()} "
        f"cores), TF {report['tf']}, {report['date']}",
        "",
        "| mode | framework | sampling | chunk | s / epoch, min (median) | ms / expected example | × own non-private, min (median) | × dp_bitfit_auto |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        twin = "" if r["vs_non_private"] is None else f"{r['vs_non_private']:.2f} ({r['vs_non_private_median']:.2f})"
        lines.append(
            f"| {r['mode']} | {r['framework']} | {r['sampling']} | {r['chunk'] or '-'} | "
            f"{r['epoch_s_min']:.2f} ({r['epoch_s_median']:.2f}) | {r['ms_per_expected_example']:.2f} | {twin} | "
            f"{fmt(r['vs_ours'])} |"
        )
    if report.get("peak_rss_mb"):
        lines += ["", f"Peak RSS of the process running our modes: {report['peak_rss_mb']:,} MB."]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Bars: seconds per epoch (minimum) per mode, ours / TF Privacy / Opacus coloured apart,
    each DP bar labelled with its ratio to its own non-private epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    colour = lambda r: "C0" if r["framework"].startswith("ours") else ("C1" if "tf_keras" in r["framework"] else "C2")  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [r["epoch_s_min"] for r in rows], color=[colour(r) for r in rows])
    for y, r in zip(ys, rows):
        if r["vs_non_private"] is not None:
            ax.text(r["epoch_s_min"], y, f" {r['vs_non_private']:.2f}x", va="center", fontsize=8)
    ax.set_yticks(list(ys), [r["mode"] for r in rows])
    ax.set_xlabel("s / epoch (min over timed epochs); label: x own non-private epoch")
    ax.set_title(
        f"{report['shape']['name']}: n = {report['examples']}, expected batch {report['shape']['batch']}", fontsize=10
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown(report) + "\n")
    plot(report, os.path.splitext(path)[0] + ".png")


def render(path: str) -> None:
    """Recomputes the statistics and the Markdown of a result JSON from its epoch times."""
    with open(path) as f:
        report = json.load(f)
    report["shape"].setdefault(
        "name", next(k for k, v in harness.SHAPES.items() if all(report["shape"].get(a) == b for a, b in v.items()))
    )
    report["rows"] = [{k: r[k] for k in ("mode", "framework", "chunk", "epoch_times_s")} for r in report["rows"]]
    write(summarize(report), path)


if __name__ == "__main__":
    app.run(main)
