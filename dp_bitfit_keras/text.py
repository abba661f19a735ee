"""Text classifiers on keras-hub BERT backbones: building, tokenizing, exporting for serving."""

from __future__ import annotations

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
    inputs = {name: keras.Input((None,), dtype="int32", name=name) for name in ("token_ids", "segment_ids", "padding_mask")}
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


def export_text_classifier(model: keras.Model, preprocessor, path: str, class_names) -> str:
    """Writes a SavedModel whose `serving_default` signature takes raw strings.

    Signatures:
      - `serving_default(text: string[batch])` -> `{"probabilities": [batch, classes],
        "class_id": int64[batch]}`; tokenization runs in the graph (TF Text ops: load with
        `import tensorflow_text` first; TF Serving builds include them).
      - `serve_tokens(token_ids, segment_ids, padding_mask)` -> logits, for clients that tokenize.
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

    token_spec = {k: tf.TensorSpec([None, None], tf.int32, name=k) for k in ("token_ids", "segment_ids", "padding_mask")}

    @tf.function(input_signature=[token_spec])
    def serve_tokens(features):
        return {"logits": model(features, training=False)}

    archive.add_endpoint("serving_default", serve_text)
    archive.add_endpoint("serve_tokens", serve_tokens)
    archive.write_out(path, verbose=False)
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, "assets", "class_names.txt"), "w") as f:
        f.writelines(f"{name}\n" for name in class_names)
    return path


def load_preprocessor(preset: str, sequence_length: int):
    tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=sequence_length)
