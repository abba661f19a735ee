"""Smoke demo: DP-BiTFiT through model.fit in a dozen lines (synthetic data, random-init model).

    uv run python examples/quickstart.py

It shows the API and the privacy ledger, not accuracy on a real task: for that, see
examples/train_text_classifier.py (pretrained BERT on real labelled text, offline).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402

flags.DEFINE_integer("num_examples", 2048, "Synthetic training examples.")
flags.DEFINE_integer("epochs", 2, "Epochs.")
flags.DEFINE_float("epsilon", 8.0, "Target ε.")
FLAGS = flags.FLAGS


def main(_):
    keras.utils.set_random_seed(0)
    n, seq = FLAGS.num_examples, 32
    rng = np.random.default_rng(0)
    # Synthetic task: the first token (3 or 4) gives the label, the rest is random tokens.
    token_ids = rng.integers(8, 500, size=(n, seq)).astype("int32")
    labels = rng.integers(0, 2, size=n).astype("int32")
    token_ids[:, 0] = 3 + labels
    x = {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": np.ones_like(token_ids, dtype=bool),
    }

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=500, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128, max_sequence_length=seq
    )
    base = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    model = dpk.DPModel(base, trainable="bias+head")
    model.compile(
        optimizer=dpk.DPOptimizer(
            keras.optimizers.Adam(5e-3),
            l2_norm_clip=0.1,
            target_epsilon=FLAGS.epsilon,
            target_delta=1 / (2 * n),
            clipping="automatic",
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary(line_length=100)
    model.fit(x, labels, batch_size=64, epochs=FLAGS.epochs, callbacks=[dpk.PrivacyCallback(delta=1 / (2 * n))])
    accuracy = model.evaluate(x, labels, verbose=0, return_dict=True)["accuracy"]
    print(
        f"training-set accuracy after DP-BiTFiT: {accuracy:.3f} (chance: {max(labels.mean(), 1 - labels.mean()):.3f})"
    )
    eps, delta = model.privacy_spent(1 / (2 * n))
    print(
        f"σ = {model.optimizer.noise_multiplier:.3f}, steps = {model.optimizer.dp_steps}, "
        f"spent (ε, δ) = ({eps:.2f}, {delta:.2e}); trainable: {model.selection}"
    )


if __name__ == "__main__":
    app.run(main)
