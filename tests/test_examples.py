"""The example binaries on tiny settings: a local preset directory and TFDS mock data."""

import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from dp_bitfit_keras import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.fixture
def tiny_preset(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=32
    )
    path = str(tmp_path / "preset")
    backbone.save_to_preset(path)
    tokenizer.save_to_preset(path)
    return path


def _run_example(module, argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS([module.__file__, *argv])
    try:
        return module.run()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("method", ["dp_bitfit_head", "bitfit"])
def test_text_example_trains_exports_and_serves(tiny_preset, tmp_path, method):
    import train_text_classifier

    export_dir = str(tmp_path / "savedmodel" / "1")
    with tfds.testing.mock_data(num_examples=40):
        summary, model, preprocessor = _run_example(train_text_classifier, [
            f"--preset={tiny_preset}", "--dataset=glue/sst2", f"--method={method}", "--batch_size=16",
            "--sequence_length=16", "--max_examples=100", f"--export_dir={export_dir}", "--epsilon=5",
        ])
    assert summary["export_dir"] == export_dir and summary["steps"] > 0
    if method.startswith("dp_"):
        assert 0 < summary["epsilon"] <= 5.0 + 1e-6
    texts = ["a good movie", "bad and boring", "zzz"]
    expected = keras.ops.softmax(model.predict(text.tokenize(preprocessor, texts), verbose=0)).numpy()
    # A fresh process, as a server would load it: raw strings in, probabilities out.
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "predict.py"), f"--model_dir={export_dir}", "--json", *texts],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    served = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [s["text"] for s in served] == texts
    np.testing.assert_allclose([s["probabilities"] for s in served], expected, rtol=1e-4, atol=1e-6)
    cli = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", export_dir, "--all"],
        capture_output=True, text=True, check=True,
    )
    assert "signature_def['serving_default']" in cli.stdout and "DT_STRING" in cli.stdout


def _serve_images(export_dir, images):
    code = (
        "import sys, json, numpy as np, tensorflow as tf;"
        "m = tf.saved_model.load(sys.argv[1]);"
        "x = np.load(sys.argv[2]);"
        "out = m.signatures['serving_default'](tf.constant(x));"
        "print(json.dumps(list(out.values())[0].numpy().tolist()))"
    )
    path = os.path.join(export_dir, "..", "images.npy")
    np.save(path, images)
    out = subprocess.run([sys.executable, "-c", code, export_dir, path], capture_output=True, text=True, check=True)
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def test_image_example_offline_digits_transfer(tmp_path):
    import train_image_classifier

    export_dir = str(tmp_path / "digits" / "1")
    summary, model = _run_example(train_image_classifier, [
        "--pretrain_epochs=2", "--epochs=1", f"--export_dir={export_dir}", "--epsilon=4",
    ])
    assert summary["method"] == "dp_bitfit_head" and 0 < summary["epsilon"] <= 4.0 + 1e-6
    from dp_bitfit_keras import datasets

    images = datasets.digits()[0][:5]
    np.testing.assert_allclose(_serve_images(export_dir, images), model.predict(images, verbose=0), rtol=1e-4, atol=1e-5)


def test_image_example_hub_path_with_local_vit_preset(tmp_path):
    import train_image_classifier

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    preset = str(tmp_path / "vit")
    keras_hub.models.ViTImageClassifier(backbone, num_classes=3, preprocessor=None).save_to_preset(preset)
    export_dir = str(tmp_path / "cifar" / "1")
    with tfds.testing.mock_data(num_examples=20):
        summary, model = _run_example(train_image_classifier, [
            f"--preset={preset}", "--dataset=cifar10", "--image_size=32", "--epochs=1", "--batch_size=8",
            f"--export_dir={export_dir}", "--method=dp_bitfit",
        ])
    assert summary["steps"] > 0 and summary["trainable_fraction"] < 0.2
    assert model.output_shape[-1] == 10
