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
import math
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dp_bitfit_keras import datasets, recipes  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "offline-digits", "'offline-digits' (CNN pretrained here on digits 0-4) or a keras-hub image classifier preset / directory.")
flags.DEFINE_string("dataset", "digits", "'digits' (private half: 5-9) or a TFDS image classification name (e.g. cifar10).")
flags.DEFINE_enum("method", "dp_bitfit_head", sorted(recipes.METHODS), "What to train, privately or not.")
flags.DEFINE_float("epsilon", 8.0, "Target ε (private methods).")
flags.DEFINE_float("delta", None, "δ; default 1/(2n).")
flags.DEFINE_integer("epochs", 30, "Epochs.")
flags.DEFINE_integer("batch_size", 64, "Expected logical batch size (Poisson sampling for private methods).")
flags.DEFINE_float("l2_norm_clip", 0.1, "Per-example clipping norm C.")
flags.DEFINE_enum("clipping", "automatic", ["automatic", "abadi"], "Clipping style.")
flags.DEFINE_float("learning_rate", None, "Adam learning rate; default 2e-2 for bias(+head) methods, 1e-3 full, 2e-3 dp_full.")
flags.DEFINE_integer("max_examples", 0, "Use at most this many labelled examples (0: all).")
flags.DEFINE_integer("image_size", 224, "Image size for hub presets (resized).")
flags.DEFINE_integer("pretrain_epochs", 30, "Epochs of public pretraining (offline default).")
flags.DEFINE_string("export_dir", None, "SavedModel directory; default savedmodels/<run name>/<version>.")
flags.DEFINE_string("summary_json", None, "Also write the run summary here.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, sampling and noise.")


def digits_cnn(num_classes):
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same"), keras.layers.GroupNormalization(8), keras.layers.Activation("relu"),
        keras.layers.Conv2D(64, 3, padding="same", strides=2), keras.layers.GroupNormalization(8), keras.layers.Activation("relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(64, activation="relu", name="features"),
        keras.layers.Dense(num_classes, name="logits"),
    ])


def offline_digits(seed):
    """(build_model, splits, class names): pretrained on public digits 0-4, private 5-9."""
    x, y = datasets.digits()
    public = y < 5
    keras.utils.set_random_seed(seed)
    pretrained = digits_cnn(5)
    pretrained.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], jit_compile=True)
    pretrained.fit(x[public], y[public], batch_size=64, epochs=FLAGS.pretrain_epochs, verbose=0)
    print(f"public pretraining on digits 0-4 ({public.sum()} images): accuracy {pretrained.evaluate(x[public], y[public], verbose=0)[1]:.3f}")
    body = keras.Model(pretrained.inputs, pretrained.get_layer("features").output)

    def build_model():
        clone = keras.models.clone_model(body)
        clone.set_weights(body.get_weights())
        head = keras.layers.Dense(5, name="logits")(clone.output)
        return keras.Model(clone.inputs, head)

    splits = datasets.split_80_10_10(x[~public], y[~public] - 5, [str(d) for d in range(5, 10)])
    return build_model, splits


def hub_image(preset, name, seed):
    import keras_hub
    import tensorflow_datasets as tfds

    builder = tfds.builder(name)
    builder.download_and_prepare()
    class_names = list(builder.info.features["label"].names)
    images, labels = [], []
    for split in list(builder.info.splits) or ["train", "test"]:
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            if FLAGS.max_examples and len(labels) >= FLAGS.max_examples:
                break
            images.append(tf.image.resize(ex["image"], (FLAGS.image_size, FLAGS.image_size)).numpy() / 255.0)
            labels.append(int(ex["label"]))
    splits = datasets.split_80_10_10(np.stack(images).astype(np.float32), np.array(labels, np.int32), class_names)

    def build_model():
        keras.utils.set_random_seed(seed)
        # The preset's own classifier class (e.g. ViTImageClassifier), with a fresh head.
        return keras_hub.models.ImageClassifier.from_preset(preset, num_classes=len(class_names), preprocessor=None)

    return build_model, splits


def next_version_dir(root):
    versions = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    return os.path.join(root, str(max(versions, default=0) + 1))


def run():
    """Trains, exports and prints the summary; returns (summary dict, trained model)."""
    if FLAGS.preset == "offline-digits" and FLAGS.dataset == "digits":
        build_model, data = offline_digits(FLAGS.seed)
    else:
        build_model, data = hub_image(FLAGS.preset, FLAGS.dataset, FLAGS.seed)
    print(f"{FLAGS.dataset}: {[len(y) for _, y in (data.train, data.validation, data.test)]} private train/validation/test images")
    # This small CNN takes larger steps than a BERT (tuned on the validation split).
    learning_rate = FLAGS.learning_rate or {"full": 1e-3, "dp_full": 2e-3}.get(FLAGS.method, 2e-2)
    result = recipes.train(
        FLAGS.method, build_model, data.train, data.validation, data.test,
        epsilon=FLAGS.epsilon, delta=FLAGS.delta, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        l2_norm_clip=FLAGS.l2_norm_clip, clipping=FLAGS.clipping, learning_rate=learning_rate,
        seed=FLAGS.seed, verbose=2,
    )
    run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{FLAGS.dataset}_{FLAGS.method}" + (
        f"_eps{FLAGS.epsilon:g}" if recipes.METHODS[FLAGS.method][1] else ""))
    export_dir = FLAGS.export_dir or next_version_dir(os.path.join("savedmodels", run_name))
    model = result.base_model
    model.export(export_dir, format="tf_saved_model", verbose=False)
    summary = dict(result.as_dict(), dataset=FLAGS.dataset, preset=FLAGS.preset, export_dir=export_dir)
    eps = "∞ (not private)" if math.isinf(result.epsilon) else f"{result.epsilon:.3f} (δ = {result.delta:.2e}, σ = {result.noise_multiplier:.3f})"
    print("\n== Summary ==")
    print(f"method:              {FLAGS.method}")
    print(f"trainable:           {result.trainable_params:,} parameters ({100 * result.trainable_fraction:.3f}%)")
    print(f"ε spent:             {eps}")
    print(f"validation accuracy: {result.validation_accuracy:.4f}")
    print(f"test accuracy:       {result.test_accuracy:.4f}")
    print(f"ms/step:             {result.ms_per_step:.1f} ({result.steps} steps)")
    print(f"SavedModel:          {export_dir}  (serving_default: float32 images [batch, 8, 8, 1] in [0, 1])")
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary, model


def main(_):
    run()


if __name__ == "__main__":
    app.run(main)
