"""Private fine-tuning of a pretrained image classifier, then export.

    uv run python examples/train_image_classifier.py                 # offline default, < 1 min
    uv run python examples/train_image_classifier.py --preset=vit_base_patch16_224_imagenet --dataset=cifar10

Offline default (`--preset=offline-digits --dataset=digits`): an honest transfer set-up on
scikit-learn's real handwritten digits. A small CNN (GroupNormalization, so per-example
gradients are defined) is pretrained non-privately on the *public* half (digits 0-4); a fresh
head is then fine-tuned with DP on the *private* half (digits 5-9), whose 899 images never touch
the pretraining. Online: a keras-hub image classifier preset (e.g. ViT) and a TFDS image data set.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from dpk_examples import example_flags, recipes, tasks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "preset",
    "offline-digits",
    "'offline-digits' (CNN pretrained here on digits 0-4) or a keras-hub image classifier preset / directory.",
)
flags.DEFINE_string(
    "dataset", "digits", "'digits' (private half: 5-9) or a TFDS image classification name (e.g. cifar10)."
)
flags.DEFINE_enum(
    "method",
    None,
    sorted(recipes.METHODS),
    "What to train, privately or not. Default: the "
    "accuracy study's choice for the offline digits (dp_full), dp_bitfit_head for hub presets.",
)
example_flags.define_shared_flags()  # --epsilon, --l2_norm_clip, --optimizer, --seed, ...
flags.DEFINE_integer("epochs", None, "Epochs; default 100 on the offline digits (the study's choice), 30 otherwise.")
flags.DEFINE_integer(
    "batch_size",
    None,
    "Expected logical batch size (Poisson sampling for private methods); "
    "default 256 on the offline digits (the study's choice), 64 otherwise.",
)
flags.DEFINE_float(
    "learning_rate",
    None,
    "Learning rate; default per method (tasks.DIGITS_LEARNING_RATES on the digits, "
    "DIGITS_LOW_EPSILON_LEARNING_RATES at ε <= 3; for the optimizer of --optimizer's default).",
)
flags.DEFINE_integer("max_examples", 0, "Use at most this many labelled examples (0: all).")
flags.DEFINE_integer("image_size", 224, "Image size for hub presets (resized).")
flags.DEFINE_integer("pretrain_epochs", 30, "Epochs of public pretraining (offline default).")
flags.DEFINE_string("summary_json", None, "Also write the run summary here.")


def run():
    """Trains, exports and prints the summary; returns (summary dict, trained model)."""
    digits = FLAGS.preset == "offline-digits" and FLAGS.dataset == "digits"
    # examples/accuracy_study.py's choices on the digits; hub presets keep the earlier defaults.
    method = FLAGS.method or ("dp_full" if digits else "dp_bitfit_head")
    epochs = FLAGS.epochs or (100 if digits else 30)
    batch_size = FLAGS.batch_size or (256 if digits else 64)
    try:  # before any work: the optimizer the default learning rate is for, or one with its own rate
        optimizer = recipes.optimizer_for(
            method,
            FLAGS.optimizer,
            FLAGS.learning_rate,
            tasks.DIGITS_OPTIMIZERS.get(method, "adam") if digits else "adam",
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if digits:
        task = tasks.digits_transfer_task(FLAGS.pretrain_epochs, FLAGS.seed)
    else:
        task = tasks.hub_image_task(
            FLAGS.preset, FLAGS.dataset, FLAGS.image_size, FLAGS.max_examples or None, FLAGS.seed
        )
    build_model, data = task.build_model, task.splits
    print(
        f"{FLAGS.dataset}: {[len(y) for _, y in (data.train, data.validation, data.test)]} private train/validation/test images"
    )
    learning_rate = FLAGS.learning_rate or task.learning_rate(method, FLAGS.epsilon)
    lr_schedule = FLAGS.lr_schedule or task.lr_schedule(method)
    result = recipes.train(
        method,
        build_model,
        data.train,
        data.validation,
        data.test,
        epsilon=FLAGS.epsilon,
        delta=FLAGS.delta,
        epochs=epochs,
        batch_size=batch_size,
        l2_norm_clip=FLAGS.l2_norm_clip,
        clipping=FLAGS.clipping,
        head_init=FLAGS.head_init,
        lr_schedule=lr_schedule,
        optimizer=optimizer,
        learning_rate=learning_rate,
        seed=FLAGS.seed,
        noise_seed=FLAGS.noise_seed,
        verbose=2,
    )
    export_dir = FLAGS.export_dir or recipes.default_export_dir(FLAGS.dataset, method, FLAGS.epsilon)
    model = result.base_model
    model.export(export_dir, format="tf_saved_model", verbose=False)
    summary = dict(
        result.as_dict(),
        dataset=FLAGS.dataset,
        preset=FLAGS.preset,
        export_dir=export_dir,
        optimizer=optimizer,
        learning_rate=learning_rate,
        lr_schedule=lr_schedule,
    )
    recipes.print_summary(result, export_dir, "(serving_default: float32 images in [0, 1])")
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary, model


def main(_):
    logging.set_verbosity(logging.WARNING)  # not a page of INFO lines from the SavedModel export
    run()


if __name__ == "__main__":
    app.run(main)
