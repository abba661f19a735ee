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

from absl import app, flags  # noqa: E402

from dp_bitfit_keras import recipes, tasks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "offline-digits", "'offline-digits' (CNN pretrained here on digits 0-4) or a keras-hub image classifier preset / directory.")
flags.DEFINE_string("dataset", "digits", "'digits' (private half: 5-9) or a TFDS image classification name (e.g. cifar10).")
flags.DEFINE_enum("method", None, sorted(recipes.METHODS), "What to train, privately or not. Default: the "
                  "accuracy study's choice for the offline digits (dp_full), dp_bitfit_head for hub presets.")
flags.DEFINE_float("epsilon", 8.0, "Target ε (private methods).")
flags.DEFINE_float("delta", None, "δ; default 1/(2n).")
flags.DEFINE_integer("epochs", None, "Epochs; default 100 on the offline digits (the study's choice), 30 otherwise.")
flags.DEFINE_integer("batch_size", None, "Expected logical batch size (Poisson sampling for private methods); "
                     "default 256 on the offline digits (the study's choice), 64 otherwise.")
flags.DEFINE_float("l2_norm_clip", 1.0, "Per-example clipping norm C (default from examples/accuracy_study.py).")
flags.DEFINE_enum("clipping", "abadi", ["automatic", "abadi"], "Clipping style (Abadi: clip to C; automatic: normalize to C).")
flags.DEFINE_enum("head_init", "auto", ["auto", "random", "zeros"], "Classifier head kernel at start; auto: zeros for "
                  "private methods that train the head (examples/accuracy_study.py), the model's own otherwise.")
flags.DEFINE_float("learning_rate", None, "Learning rate; default per method (tasks.DIGITS_LEARNING_RATES on the digits, "
                   "DIGITS_LOW_EPSILON_LEARNING_RATES at ε <= 3; for the optimizer of --optimizer's default).")
flags.DEFINE_enum("lr_schedule", None, ["constant", "linear"], "Learning rate over the run: constant, or "
                  "linear decay to 0 (recipes.train). Default: the task's choice for the method (dp_bitfit_head on "
                  "text tasks: linear, chosen on the offline tweets; otherwise constant).")
flags.DEFINE_enum("optimizer", None, ["adam", "sgd"], "Inner optimizer: Adam, or SGD with momentum 0.9 "
                  "(recipes.train; the two-phase methods and DPZero keep their own). Default: the one the method's "
                  "default learning rate is for (Adam; SGD for dp_full on the offline digits).")
flags.DEFINE_integer("max_examples", 0, "Use at most this many labelled examples (0: all).")
flags.DEFINE_integer("image_size", 224, "Image size for hub presets (resized).")
flags.DEFINE_integer("pretrain_epochs", 30, "Epochs of public pretraining (offline default).")
flags.DEFINE_string("export_dir", None, "SavedModel directory; default savedmodels/<run name>/<version>.")
flags.DEFINE_string("summary_json", None, "Also write the run summary here.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, splits and dropout (not the DP noise or sampling).")
flags.DEFINE_integer("noise_seed", None, "Private methods: make the DP noise and Poisson sampling reproducible "
                     "from this seed. Default: secret keys from the OS. A run with a known noise seed is NOT private.")


def run():
    """Trains, exports and prints the summary; returns (summary dict, trained model)."""
    digits = FLAGS.preset == "offline-digits" and FLAGS.dataset == "digits"
    # examples/accuracy_study.py's choices on the digits; hub presets keep the earlier defaults.
    method = FLAGS.method or ("dp_full" if digits else "dp_bitfit_head")
    epochs = FLAGS.epochs or (100 if digits else 30)
    batch_size = FLAGS.batch_size or (256 if digits else 64)
    try:  # before any work: the optimizer the default learning rate is for, or one with its own rate
        optimizer = recipes.optimizer_for(method, FLAGS.optimizer, FLAGS.learning_rate,
                                          tasks.DIGITS_OPTIMIZERS.get(method, "adam") if digits else "adam")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if digits:
        task = tasks.digits_transfer_task(FLAGS.pretrain_epochs, FLAGS.seed)
    else:
        task = tasks.hub_image_task(FLAGS.preset, FLAGS.dataset, FLAGS.image_size, FLAGS.max_examples or None, FLAGS.seed)
    build_model, data = task.build_model, task.splits
    print(f"{FLAGS.dataset}: {[len(y) for _, y in (data.train, data.validation, data.test)]} private train/validation/test images")
    learning_rate = FLAGS.learning_rate or task.learning_rate(method, FLAGS.epsilon)
    lr_schedule = FLAGS.lr_schedule or task.lr_schedule(method)
    result = recipes.train(
        method, build_model, data.train, data.validation, data.test,
        epsilon=FLAGS.epsilon, delta=FLAGS.delta, epochs=epochs, batch_size=batch_size,
        l2_norm_clip=FLAGS.l2_norm_clip, clipping=FLAGS.clipping, head_init=FLAGS.head_init, lr_schedule=lr_schedule, optimizer=optimizer, learning_rate=learning_rate,
        seed=FLAGS.seed, noise_seed=FLAGS.noise_seed, verbose=2,
    )
    export_dir = FLAGS.export_dir or recipes.default_export_dir(FLAGS.dataset, method, FLAGS.epsilon)
    model = result.base_model
    model.export(export_dir, format="tf_saved_model", verbose=False)
    summary = dict(result.as_dict(), dataset=FLAGS.dataset, preset=FLAGS.preset, export_dir=export_dir,
                   optimizer=optimizer, learning_rate=learning_rate, lr_schedule=lr_schedule)
    recipes.print_summary(result, export_dir, "(serving_default: float32 images in [0, 1])")
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary, model


def main(_):
    run()


if __name__ == "__main__":
    app.run(main)
