"""Predict with an exported text classifier in a fresh process (no dp_bitfit_keras needed).

    uv run python examples/predict.py --model_dir=savedmodels/tweets_binary_dp_bitfit_eps8/1 \
        "I love my new car" "the bus was late again"

Loads the SavedModel with `tf.saved_model.load` and calls its `serving_default` signature on raw
strings (tokenization is inside the graph; `tensorflow_text` registers its ops).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401  (registers the tokenizer ops the SavedModel uses)
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "SavedModel directory (savedmodels/<run>/<version>).")
flags.DEFINE_bool("json", False, "Print one JSON object per input instead of text.")
flags.mark_flag_as_required("model_dir")


def predict(model_dir, texts):
    """[(text, class name, probabilities)] for each input string."""
    loaded = tf.saved_model.load(model_dir)
    with open(os.path.join(model_dir, "assets", "class_names.txt")) as f:
        names = [line.strip() for line in f if line.strip()]
    out = loaded.signatures["serving_default"](text=tf.constant(texts))
    probabilities = out["probabilities"].numpy()
    return [(t, names[int(c)], p.tolist()) for t, c, p in zip(texts, out["class_id"].numpy(), probabilities)]


def main(argv):
    texts = argv[1:]
    if not texts:
        raise app.UsageError("Give one or more texts to classify.")
    for text, name, probabilities in predict(FLAGS.model_dir, texts):
        if FLAGS.json:
            print(json.dumps({"text": text, "class": name, "probabilities": probabilities}))
        else:
            print(f"{name:>10s}  {max(probabilities):.3f}  {text}")


if __name__ == "__main__":
    app.run(main)
