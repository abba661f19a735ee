"""Text classifiers on keras-hub BERT backbones: building, tokenizing, exporting for serving."""

from __future__ import annotations

import json
import os

import keras
import keras_hub
import numpy as np
import tensorflow as tf


def bert_classifier(backbone, num_classes: int, pooling: str = "mean", dropout: float = 0.1) -> keras.Model:
    """A classifier head on a keras-hub BERT backbone.

    `pooling="mean"` averages the final token states over the padding mask (how
    sentence-transformers checkpoints such as all-MiniLM were trained); `"cls"` uses the
    backbone's pooled [CLS] output (keras-hub's BertTextClassifier).
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls'; got {pooling!r}.")
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name) for name in ("token_ids", "segment_ids", "padding_mask")
    }
    outputs = backbone(inputs)
    if pooling == "cls":
        pooled = outputs["pooled_output"]
    else:
        mask = keras.ops.expand_dims(keras.ops.cast(inputs["padding_mask"], "float32"), -1)
        summed = keras.ops.sum(outputs["sequence_output"] * mask, axis=1)
        pooled = summed / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)
    pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    logits = keras.layers.Dense(num_classes, name="logits")(pooled)
    return keras.Model(inputs, logits, name=f"{backbone.name}_classifier")


def tokenize(preprocessor, texts, batch_size: int = 1024) -> dict:
    """Token ids, segment ids and padding mask (int32 numpy arrays) for a list of strings."""
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = tf.constant([str(t) for t in texts[start : start + batch_size]])
        parts.append({k: np.asarray(v).astype(np.int32) for k, v in preprocessor(chunk).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def tokens_export_dir(path: str) -> str:
    """Where the tokens-only SavedModel of `savedmodels/<run>/<version>` goes:
    `savedmodels/<run>_tokens/<version>` (its own model name for TF Serving, same layout); for a
    directory without a version number, `<path>_tokens` beside it.

    Example:
        >>> tokens_export_dir("savedmodels/tweets/3"), tokens_export_dir("/tmp/model")
        ('savedmodels/tweets_tokens/3', '/tmp/model_tokens')
    """
    parent, version = os.path.split(os.path.normpath(path))
    if not version.isdigit():
        return os.path.normpath(path) + "_tokens"
    return os.path.join(parent + "_tokens", version)


def _write_assets(path, class_names, preprocessor=None):
    assets = os.path.join(path, "assets")
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, "class_names.txt"), "w") as f:
        f.writelines(f"{name}\n" for name in class_names)
    if preprocessor is not None:
        # What a client that tokenizes itself needs: the WordPiece vocabulary (ids = line numbers)
        # and the settings the training inputs were made with.
        tokenizer = preprocessor.tokenizer
        with open(os.path.join(assets, "vocab.txt"), "w") as f:
            f.writelines(f"{token}\n" for token in tokenizer.get_vocabulary())
        config = dict(
            sequence_length=int(preprocessor.sequence_length),
            lowercase=bool(getattr(tokenizer, "lowercase", True)),
            cls_token_id=int(tokenizer.cls_token_id),
            sep_token_id=int(tokenizer.sep_token_id),
            pad_token_id=int(tokenizer.pad_token_id),
        )
        with open(os.path.join(assets, "tokenizer.json"), "w") as f:
            json.dump(config, f, indent=1)


_TOKEN_SPEC = {k: tf.TensorSpec([None, None], tf.int32, name=k) for k in ("token_ids", "segment_ids", "padding_mask")}


def _outputs(logits):
    return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1), "class_id": tf.argmax(logits, axis=-1)}


def export_token_classifier(model: keras.Model, path: str, class_names, preprocessor=None) -> str:
    """Writes a SavedModel of plain TensorFlow ops that takes token ids (no TF Text needed).

    `serving_default(token_ids, segment_ids, padding_mask: int32[batch, seq])` ->
    `{"logits", "probabilities": [batch, classes], "class_id": int64[batch]}`. Assets:
    `class_names.txt`, and with `preprocessor` the vocabulary (`vocab.txt`) and
    `tokenizer.json` (sequence length, lowercasing, special token ids).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[_TOKEN_SPEC])
    def serve(features):
        return _outputs(model(features, training=False))

    archive.add_endpoint("serving_default", serve)
    archive.write_out(path, verbose=False)
    _write_assets(path, class_names, preprocessor)
    return path


def export_text_classifier(
    model: keras.Model, preprocessor, path: str, class_names, tokens_path: str | None = "auto"
) -> str:
    """Writes a SavedModel whose `serving_default` signature takes raw strings, and beside it a
    tokens-only SavedModel of plain TF ops (`export_token_classifier`, at `tokens_path`;
    `"auto"`: `tokens_export_dir(path)`, None: not written).

    Signatures of the raw-string model:
      - `serving_default(text: string[batch])` -> `{"probabilities": [batch, classes],
        "class_id": int64[batch]}`; tokenization runs in the graph (TF Text ops: load with
        `import tensorflow_text` first; TF Serving builds include them).
      - `serve_tokens(token_ids, segment_ids, padding_mask)` -> logits. It lives in the same
        graph, so loading it still needs TF Text: clients without it load the tokens-only model.
    The class names are saved as `assets/class_names.txt`.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(preprocessor)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve_text(text):
        features = preprocessor(text)
        logits = model({k: tf.cast(v, tf.int32) for k, v in features.items()}, training=False)
        return {"probabilities": tf.nn.softmax(logits, axis=-1), "class_id": tf.argmax(logits, axis=-1)}

    @tf.function(input_signature=[_TOKEN_SPEC])
    def serve_tokens(features):
        return {"logits": model(features, training=False)}

    archive.add_endpoint("serving_default", serve_text)
    archive.add_endpoint("serve_tokens", serve_tokens)
    archive.write_out(path, verbose=False)
    _write_assets(path, class_names)
    if tokens_path == "auto":
        tokens_path = tokens_export_dir(path)
    if tokens_path:
        export_token_classifier(model, tokens_path, class_names, preprocessor)
    return path


def load_preprocessor(preset: str, sequence_length: int):
    tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=sequence_length)
