"""Accuracy against ε for every method on the offline tasks: JSON, a Markdown table and a plot.

    uv run python research/utility_sweep.py --tasks=image --out=research/results/utility
    uv run python research/utility_sweep.py --tasks=text,image --text_max_examples=6000 --out=research/results/utility

Private methods run at each finite ε; non-private ones (`bitfit`, `full`) once, as ε = ∞. Same
seed, data split and model for all; each task's data (and the digits' public pretraining) is
prepared once.

With the `legacy` extra, the text task also runs the TF Privacy-on-Keras-2 peer
(`tfp_legacy_full`, `tfp_legacy_bitfit`: benchmarks/tfp_legacy.py in its own process, from the
same tokenized data and the same starting weights as ours):

    uv run --extra legacy python research/utility_sweep.py --tasks=text --epsilons=8 \
        --methods=dp_bitfit,dp_full,tfp_legacy_full,tfp_legacy_bitfit --out=research/results/utility_text_peer
"""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The examples' support code (dpk_examples) lives beside the binaries, outside the library.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dpk_examples import recipes, tasks  # noqa: E402

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_BINARY = os.path.join(ROOT, "benchmarks", "tfp_legacy.py")
# TF Privacy peer method -> our method training the same variables (its learning rate is used).
PEER_METHODS = {"tfp_legacy_full": "dp_full", "tfp_legacy_bitfit": "dp_bitfit"}
TEXT_POOLING = "mean"
flags.DEFINE_list("tasks", ["text", "image"], "Offline tasks: text (tweets_binary, MiniLM), image (digits transfer).")
flags.DEFINE_list("epsilons", ["1", "3", "8", "inf"], "Target ε values; inf = the non-private methods.")
flags.DEFINE_list("methods", list(recipes.METHODS), "Methods.")
flags.DEFINE_integer("text_max_examples", 6000, "Labelled tweets used (0: all 23,140).")
flags.DEFINE_integer("text_epochs", 1, "Epochs on the text task.")
flags.DEFINE_integer("text_batch_size", 128, "Expected batch size on the text task.")
flags.DEFINE_integer("image_epochs", 30, "Epochs on the image task.")
flags.DEFINE_integer("image_batch_size", 64, "Expected batch size on the image task.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, splits and dropout (not the DP noise or sampling).")
flags.DEFINE_integer(
    "noise_seed",
    None,
    "Make the DP noise and Poisson sampling reproducible (not private against "
    "whoever knows it). Default: secret keys, so private rows vary from run to run.",
)
flags.DEFINE_integer(
    "repeats",
    1,
    "Runs per (method, ε): same splits and initialisation, fresh DP noise and "
    "sampling each run; tables show mean ± standard deviation.",
)
flags.DEFINE_string("out", "research/results/utility", "Output prefix: writes <out>.json, <out>.md, <out>.png.")
flags.DEFINE_bool(
    "resume",
    False,
    "Keep the runs already in <out>.json (written after every run) and do only the "
    "missing ones (more methods, ε values or repeats); refused if that file was made "
    "with other run settings (epochs, batch, seed, clipping, ...).",
)
flags.DEFINE_float("l2_norm_clip", 1.0, "Clipping norm C of the private methods (recipes' default).")
flags.DEFINE_enum("clipping", "abadi", ["abadi", "automatic"], "Clipping style (recipes' default: abadi).")
flags.DEFINE_enum(
    "lr_schedule",
    None,
    ["constant", "linear"],
    "Learning rate over each run (recipes.train; "
    "two-phase methods: constant only). Default: the task's choice per method (Task.lr_schedule).",
)
flags.DEFINE_enum(
    "head_init",
    "auto",
    ["auto", "random", "zeros"],
    "Classifier head at start (recipes' default: auto). "
    "Tables made before research/accuracy_study.py used --l2_norm_clip=0.1 --clipping=automatic "
    "--head_init=random.",
)


def _runs(methods, epsilons):
    for method in methods:
        private = method in PEER_METHODS or recipes.METHODS[method][1]
        for eps in epsilons:
            if private == math.isfinite(eps):
                yield method, eps


def _own_flags():
    return {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])}


def check_methods(methods):
    unknown = [m for m in methods if m not in recipes.METHODS and m not in PEER_METHODS]
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; known: {list(recipes.METHODS) + list(PEER_METHODS)}")
    peers = [m for m in methods if m in PEER_METHODS]
    if peers and importlib.util.find_spec("tf_keras") is None:
        raise app.UsageError(f"{peers} need tf_keras: `uv run --extra legacy python research/utility_sweep.py ...`")


def write_peer_task(task, path, seed):
    """Everything the tf_keras peer needs, in one .npz: tokenized splits, the keras-hub weights
    of the model our runs start from (built with the same seed, so the same head), and its
    logits on a few test examples (the peer checks its rebuild against them)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)  # as recipes.train: the same initial head
    model = task.build_model()
    backbone = next(layer for layer in model.layers if isinstance(layer, keras_hub.models.BertBackbone))
    config = backbone.get_config()
    meta = {
        "shape": {
            "model": "bert",
            "layers": config["num_layers"],
            "hidden": config["hidden_dim"],
            "heads": config["num_heads"],
            "intermediate": config["intermediate_dim"],
            "max_positions": config["max_sequence_length"],
            "vocab": config["vocabulary_size"],
            "seq": int(task.splits.train[0]["token_ids"].shape[1]),
        },
        "num_classes": len(task.splits.class_names),
        "pooling": TEXT_POOLING,
    }
    arrays = {"meta": json.dumps(meta)}
    for name, (x, y) in zip(
        ("train", "validation", "test"), (task.splits.train, task.splits.validation, task.splits.test)
    ):
        arrays.update({f"{name}/{k}": v for k, v in x.items()})
        arrays[f"{name}/y"] = y
    unused = ("pooled_dense/",) if TEXT_POOLING == "mean" else ()
    arrays.update({f"weights/{w.path}": w.numpy() for w in model.weights if not w.path.startswith(unused)})
    x_test = task.splits.test[0]
    arrays["reference_logits"] = keras.ops.convert_to_numpy(
        model({k: v[:8] for k, v in x_test.items()}, training=False)
    )
    np.savez(path, **arrays)


def peer_run(task, task_file, method, eps, epochs, batch_size):
    """One TF Privacy peer run in a tf_keras process; returns its result row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [
            sys.executable,
            PEER_BINARY,
            f"--text_npz={task_file}",
            f"--text_mode={method}",
            f"--epsilon={eps}",
            f"--batch_size={batch_size}",
            f"--epochs={epochs}",
            f"--learning_rate={task.learning_rate(PEER_METHODS[method])}",
            f"--seed={FLAGS.seed}",
            f"--out={out}",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, TF_USE_LEGACY_KERAS="1"))
        with open(out) as f:
            return json.load(f)


def sweep(task_name, task, epochs, batch_size, done=(), save=lambda rows: None):
    """Runs `task`'s (method, ε, repeat) cells in order; `done` rows are kept, not re-run.

    `save(rows)` is called after every run with this task's rows so far (done ones included).
    """
    epsilons = [float(e) for e in FLAGS.epsilons]
    with tempfile.TemporaryDirectory(prefix="dpk_peer_") as scratch:  # the peer's task file, if any
        return _sweep_runs(task_name, task, epochs, batch_size, epsilons, scratch, list(done), save)


def _key(row):
    return row["task"], row["method"], float(row["target_epsilon"]), int(row["repeat"])


def _sweep_runs(task_name, task, epochs, batch_size, epsilons, scratch, done, save):
    rows = []
    finished = {_key(r): r for r in done}
    task_file = None
    for method, eps in _runs(FLAGS.methods, epsilons):
        for repeat in range(FLAGS.repeats if math.isfinite(eps) else 1):
            if (task_name, method, eps, repeat) in finished:
                rows.append(finished[(task_name, method, eps, repeat)])
                print(
                    f"== {task_name}: {method} at ε = {eps:g}, run {repeat + 1}: kept from {FLAGS.out}.json", flush=True
                )
                continue
            print(
                f"== {task_name}: {method} at ε = {eps:g}"
                + (f", run {repeat + 1}/{FLAGS.repeats}" if FLAGS.repeats > 1 else ""),
                flush=True,
            )
            if method in PEER_METHODS:
                if not task_name.startswith("text"):
                    print("   skipped: the TF Privacy peer runs on the text task only", flush=True)
                    continue
                if task_file is None:
                    task_file = os.path.join(scratch, "task.npz")
                    write_peer_task(task, task_file, FLAGS.seed)
                result = peer_run(task, task_file, method, eps, epochs, batch_size)
            else:
                # Recorded with each run: what it trained with.
                settings = dict(
                    learning_rate=task.learning_rate(method, eps),
                    optimizer=task.optimizer(method),
                    lr_schedule=FLAGS.lr_schedule or task.lr_schedule(method),
                )
                result = recipes.train(
                    method,
                    task.build_model,
                    task.splits.train,
                    task.splits.validation,
                    task.splits.test,
                    epsilon=eps if math.isfinite(eps) else 1.0,
                    epochs=epochs,
                    batch_size=batch_size,
                    seed=FLAGS.seed,
                    noise_seed=FLAGS.noise_seed,
                    verbose=0,
                    l2_norm_clip=FLAGS.l2_norm_clip,
                    clipping=FLAGS.clipping,
                    head_init=FLAGS.head_init,
                    **settings,
                ).as_dict()
                result.update(settings)
            row = dict(result, task=task_name, target_epsilon=eps, repeat=repeat)
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "method",
                            "target_epsilon",
                            "epsilon",
                            "validation_accuracy",
                            "test_accuracy",
                            "ms_per_step",
                        )
                    }
                ),
                flush=True,
            )
            rows.append(row)
            save(rows)
    return rows


def _cell(accuracies):
    """Test accuracy in %: one run's, or mean ± standard deviation (runs) of several."""
    if not accuracies:
        return ""
    if len(accuracies) == 1:
        return f"{100 * accuracies[0]:.1f}"
    return f"{100 * statistics.mean(accuracies):.1f} ± {100 * statistics.stdev(accuracies):.1f} ({len(accuracies)})"


def _methods_of(rows, task):
    """The methods with rows of `task`, in `recipes.METHODS` order (then the peers): a resumed
    sweep's table keeps its order whichever cells the last invocation ran."""
    order = list(recipes.METHODS) + list(PEER_METHODS)
    return sorted({r["method"] for r in rows if r["task"] == task}, key=order.index)


def markdown(rows):
    epsilons = sorted({r["target_epsilon"] for r in rows})
    header = "| task | method | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |"
    lines = [header, "|" + "---|" * (2 + len(epsilons))]
    for task in dict.fromkeys(r["task"] for r in rows):
        for method in _methods_of(rows, task):
            cells = {
                e: _cell(
                    [
                        r["test_accuracy"]
                        for r in rows
                        if r["task"] == task and r["method"] == method and r["target_epsilon"] == e
                    ]
                )
                for e in epsilons
            }
            lines.append(f"| {task} | {method} | " + " | ".join(cells.get(e, "") for e in epsilons) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 4), squeeze=False)
    # A private method and its non-private twin share a colour: solid line vs dashed level.
    colours = {"bitfit": "C0", "bitfit_head": "C1", "full": "C2"}
    for ax, task in zip(axes[0], task_names):
        epsilons = sorted(
            {r["target_epsilon"] for r in rows if r["task"] == task and math.isfinite(r["target_epsilon"])}
        )
        for method in _methods_of(rows, task):
            runs = [
                (r["target_epsilon"], r["test_accuracy"]) for r in rows if r["task"] == task and r["method"] == method
            ]
            points = sorted((e, statistics.mean(a for e2, a in runs if e2 == e)) for e in {e for e, _ in runs})
            colour = colours.get(method.removeprefix("dp_"))  # None: matplotlib's next colour
            if math.isinf(points[0][0]):
                ax.axhline(points[0][1], linestyle="--", color=colour, label=f"{method} (non-private)")
            else:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=method)
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.minorticks_off()
        ax.set_xlabel("ε (δ = 1/(2n))")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(json_path):
    """Re-renders the table and plot from a results JSON (no training)."""
    rows = json.load(open(json_path))["results"]
    for r in rows:
        r["target_epsilon"] = float(r["target_epsilon"])
    prefix = json_path[: -len(".json")]
    with open(prefix + ".md", "w") as f:
        f.write(markdown(rows))
    plot(rows, prefix + ".png")


def _resumed_rows(flag_values):
    """The rows of an earlier run of this sweep at <out>.json (same flags but `resume`), or none."""
    path = FLAGS.out + ".json"
    if not os.path.exists(path):
        return []
    with open(path) as f:
        earlier = json.load(f)
    ignore = {
        "resume",
        "out",
        "methods",
        "epsilons",
        "repeats",
        "tasks",
    }  # the file; the cells (rows are keyed by them)
    # A flag added since that file was written counts as having had its default there.
    recorded = {k: earlier["flags"].get(k, FLAGS[k].default) for k in flag_values}
    mismatched = sorted(k for k in flag_values if k not in ignore and recorded[k] != flag_values[k])
    if mismatched:
        raise app.UsageError(
            f"--resume: {path} was made with other run settings ({', '.join(mismatched)}); "
            "use another --out or the same flags."
        )
    return earlier["results"]


def main(_):
    run()


def run():
    """Runs the sweep named by the flags; writes <out>.json, .md, .png; returns the rows."""
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    check_methods(FLAGS.methods)
    unknown = [name for name in FLAGS.tasks if name not in ("text", "image")]
    if unknown:
        raise app.UsageError(f"Unknown tasks {unknown}: use text and/or image.")
    flag_values = _own_flags()
    done = _resumed_rows(flag_values) if FLAGS.resume else []
    rows = []

    def with_untouched(current):  # a resumed file's rows outside this invocation's cells stay in it
        keys = {_key(r) for r in current}
        return current + [r for r in done if _key(r) not in keys]

    def save(task_rows):  # After every run: nothing lost on a crash (--resume picks up from here).
        with open(FLAGS.out + ".json", "w") as f:
            json.dump({"flags": flag_values, "results": with_untouched(rows + task_rows)}, f, indent=1, default=str)

    for name in FLAGS.tasks:
        if name == "text":
            task = tasks.text_task(max_examples=FLAGS.text_max_examples or None, pooling=TEXT_POOLING)
            rows += sweep("text: tweets_binary, MiniLM-L6", task, FLAGS.text_epochs, FLAGS.text_batch_size, done, save)
        else:
            task = tasks.digits_transfer_task(seed=FLAGS.seed)
            rows += sweep(
                "image: digits 5-9, CNN pretrained on 0-4", task, FLAGS.image_epochs, FLAGS.image_batch_size, done, save
            )
        save([])
    rows = with_untouched(rows)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(markdown(rows))
    plot(rows, FLAGS.out + ".png")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    app.run(main)
