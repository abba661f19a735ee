"""Black-box one-run audit of the offline text task: mislabelled input canaries, final model only.

    uv run python research/blackbox_audit.py --out=research/results/blackbox_audit.json

The main example's task (pretrained MiniLM, binary tweet sentiment, its first 6,000 tweets split
80/10/10) plus `--canaries` tweets the task never uses (the rows after them in the corpus'
fixed order), each with its label flipped. A secret coin per canary puts it in the training set
with probability ½; each `--methods` entry then trains on the training split plus its included
canaries, through the same recipe as `examples/train_text_classifier.py` (ε = `--epsilon`,
δ = 1/(2n) over the n rows trained on). The attacker sees only the released model: a canary's
score is its logit margin for the flipped label (the model's log-odds of the wrong class), and
the one-run estimators of `dp_bitfit_keras.audit` (Steinke et al.'s bound, its f-DP refinement,
Clopper–Pearson, all at 95%) turn the scores of included and excluded canaries into ε lower
bounds. A non-private method in the list shows what the same attack reads off a model that
memorises. The JSON (and its Markdown table) is written after every method.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from dp_bitfit_keras.audit import estimators  # noqa: E402
from dpk_examples import datasets, recipes, tasks, text  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "research/results/blackbox_audit.json", "JSON output; Markdown beside it.")
flags.DEFINE_list("methods", ["dp_bitfit_head", "full"], "Methods of examples/dpk_examples/recipes.py.")
flags.DEFINE_integer("canaries", 1000, "Mislabelled canaries (each included with probability 1/2).")
flags.DEFINE_integer("max_examples", 6000, "The task's tweets, as in the main example.")
flags.DEFINE_float("epsilon", 8.0, "Target ε of the private methods.")
flags.DEFINE_integer("epochs", 3, "Epochs of every method (the main example's private default).")
flags.DEFINE_float("significance", 0.05, "Each bound holds with probability 1 - significance.")

ESTIMATORS = {
    "one_run": estimators.one_run_epsilon,
    "one_run_fdp": estimators.one_run_fdp_epsilon,
    "clopper_pearson": estimators.clopper_pearson_epsilon,
}


def canary_scores(model, inputs, labels) -> np.ndarray:
    """Logit margin of each canary's (flipped) label over the other class: the attacker's score."""
    logits = np.asarray(model.predict(inputs, batch_size=256, verbose=0), np.float64)
    return logits[np.arange(len(labels)), labels] - logits[np.arange(len(labels)), 1 - labels]


def markdown(rows) -> str:
    lines = [
        f"{rows[0]['canaries']:,} mislabelled tweets, each trained on with probability ½ "
        f"({rows[0]['included']} were); bounds at {1 - rows[0]['significance']:.0%}, δ = 1/(2n)",
        "",
        "| method | ε claimed | one-run | one-run f-DP | Clopper–Pearson | test % | mean score in / out | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        claimed = "∞ (not private)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        b = r["bounds"]
        lines.append(
            f"| {r['method']} | {claimed} | {b['one_run']:.2f} | {b['one_run_fdp']:.2f} | {b['clopper_pearson']:.2f} "
            f"| {100 * r['test_accuracy']:.1f} | {r['mean_score_in']:+.2f} / {r['mean_score_out']:+.2f} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main(_):
    logging.set_verbosity(logging.WARNING)
    task = tasks.text_task(max_examples=FLAGS.max_examples)
    texts, labels, _ = datasets.tweet_rows(binary=True)
    start = FLAGS.max_examples
    canary_texts = texts[start : start + FLAGS.canaries]
    canary_labels = 1 - labels[start : start + FLAGS.canaries]  # flipped: memorisation, not generalisation
    canary_inputs = text.tokenize(task.preprocessor, canary_texts)
    included = np.random.default_rng().random(FLAGS.canaries) < 0.5  # the secret coins
    x_train, y_train = task.splits.train
    x = {k: np.concatenate([v, canary_inputs[k][included]]) for k, v in x_train.items()}
    y = np.concatenate([y_train, canary_labels[included]])
    print(f"{len(y_train)} training tweets + {included.sum()} of {FLAGS.canaries} mislabelled canaries")
    rows = []
    for method in FLAGS.methods:
        began = time.perf_counter()
        private = recipes.METHODS[method][1]
        result = recipes.train(
            method,
            task.build_model,
            (x, y),
            task.splits.validation,
            task.splits.test,
            epsilon=FLAGS.epsilon,
            epochs=FLAGS.epochs,
            batch_size=128,
            learning_rate=task.learning_rate(method),
            lr_schedule=task.lr_schedule(method),
        )
        scores = canary_scores(result.model, canary_inputs, canary_labels)
        delta = result.delta
        bounds = {
            name: fn(scores[included], scores[~included], FLAGS.significance, delta) for name, fn in ESTIMATORS.items()
        }
        rows.append(
            dict(
                method=method,
                epsilon=result.epsilon if private else None,
                delta=delta,
                canaries=FLAGS.canaries,
                included=int(included.sum()),
                significance=FLAGS.significance,
                bounds=bounds,
                mean_score_in=float(scores[included].mean()),
                mean_score_out=float(scores[~included].mean()),
                test_accuracy=result.test_accuracy,
                validation_accuracy=result.validation_accuracy,
                steps=result.steps,
                wall_s=time.perf_counter() - began,
            )
        )
        print(rows[-1])
        with open(FLAGS.out, "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(markdown(rows))


if __name__ == "__main__":
    app.run(main)
