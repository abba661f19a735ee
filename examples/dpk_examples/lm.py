"""A small byte-level causal LM for the generation example: public pretraining, private data.

Offline by construction: the tokenizer is the UTF-8 bytes of the text (id = byte + 1, 0 pads),
so no vocabulary file is needed; the public pretraining text is the Python standard library's
own documentation (`pydoc` of a fixed list of modules, PSF licence), generated from the Python
that runs the example; the private fine-tuning data are the offline tweets (`datasets`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pydoc
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from dpk_examples import presets

PAD = 0
VOCAB = 260  # 256 bytes + padding, rounded up
# Standard-library modules whose documentation is the public pretraining corpus (~3 MB).
PUBLIC_MODULES = (
    "os",
    "os.path",
    "re",
    "json",
    "collections",
    "itertools",
    "functools",
    "string",
    "textwrap",
    "argparse",
    "logging",
    "datetime",
    "pathlib",
    "subprocess",
    "typing",
    "dataclasses",
    "inspect",
    "unittest",
    "csv",
    "sqlite3",
    "random",
    "statistics",
    "decimal",
    "fractions",
    "math",
    "heapq",
    "bisect",
    "shutil",
    "tempfile",
    "glob",
    "fnmatch",
    "pickle",
    "copy",
    "pprint",
    "enum",
    "abc",
    "contextlib",
    "threading",
    "queue",
    "socket",
    "email.message",
    "http.client",
    "urllib.request",
    "urllib.parse",
    "html",
    "xml.etree.ElementTree",
    "zipfile",
    "tarfile",
    "gzip",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "struct",
    "codecs",
    "io",
    "time",
    "calendar",
    "locale",
    "gettext",
    "difflib",
    "operator",
    "weakref",
    "types",
    "array",
    "sched",
    "select",
    "selectors",
    "signal",
    "asyncio",
    "concurrent.futures",
    "multiprocessing",
    "platform",
    "sys",
    "warnings",
    "traceback",
    "timeit",
    "doctest",
    "pdb",
    "trace",
    "zlib",
    "configparser",
    "getpass",
    "uuid",
    "ipaddress",
    "mimetypes",
    "wave",
    "colorsys",
    "numbers",
    "cmath",
    "graphlib",
    "tomllib",
    "shlex",
    "cmd",
    "pkgutil",
)


def encode(texts, length: int):
    """`ids [n, length]` int32: UTF-8 bytes + 1, truncated, padded with 0."""
    ids = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        raw = np.frombuffer(str(text).encode("utf-8")[:length], np.uint8).astype(np.int32) + 1
        ids[i, : len(raw)] = raw
    return ids


def lm_arrays(texts, length: int):
    """Inputs, next-byte targets and per-token weights of a batch of texts.

    Each text is one example: x = its bytes (with the padding mask), y = the bytes shifted by
    one, weight 1 on every position whose target is a real byte (0 on padding and after the end).
    """
    ids = encode(texts, length + 1)
    x = {"token_ids": ids[:, :-1], "padding_mask": ids[:, :-1] > 0}
    y = ids[:, 1:]
    weights = (y > 0).astype("float32")
    return x, y, weights


def public_text() -> str:
    """The standard library's documentation for `PUBLIC_MODULES`, as plain text."""
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PUBLIC_MODULES:
            try:
                parts.append(pydoc.render_doc(name, renderer=pydoc.plaintext))
            except Exception:  # a module this Python lacks
                continue
    return "\n".join(parts)


def public_chunks(length: int, max_chunks: int | None = None, seed: int = 0) -> np.ndarray:
    """The public text cut into windows of `length` + 1 bytes (ids), shuffled."""
    ids = np.frombuffer(public_text().encode("utf-8"), np.uint8).astype(np.int32) + 1
    count = len(ids) // (length + 1)
    windows = ids[: count * (length + 1)].reshape(count, length + 1)
    order = np.random.default_rng(seed).permutation(count)
    return windows[order[:max_chunks] if max_chunks else order]


def build_model(length: int, hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    """A GPT-2-style keras-hub causal LM (random init), byte vocabulary."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=4 * hidden,
        dropout=0.0,
        max_sequence_length=length,
    )
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    model({"token_ids": np.zeros((1, length), np.int32), "padding_mask": np.ones((1, length), bool)})
    return model


TOKEN_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def pretrain_config(length: int, steps: int, batch_size: int, hidden: int, layers: int) -> dict:
    return dict(
        length=length,
        steps=steps,
        batch_size=batch_size,
        hidden=hidden,
        layers=layers,
        vocab=VOCAB,
        modules=list(PUBLIC_MODULES),
        python=sys.version.split()[0],
        format=1,
    )


def pretrained(
    length: int = 128,
    steps: int = 2400,
    batch_size: int = 32,
    hidden: int = 128,
    layers: int = 4,
    cache_dir: str | None = None,
    verbose: int = 1,
):
    """The public pretrained model: trained once (non-privately, on `public_text`), then cached.

    Returns `(model, info)`; `info` says where the weights are and whether this call trained them.
    """
    config = pretrain_config(length, steps, batch_size, hidden, layers)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir or presets._cache_dir(), "causal_lm")
    path = os.path.join(root, f"gpt2_bytes_{key}.weights.h5")
    model = build_model(length, hidden, layers)
    info = dict(config, weights=path, trained_now=False)
    if os.path.exists(path):
        with warnings.catch_warnings():  # the file also holds the pretraining optimizer's state
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(path)
        return model, info
    chunks = public_chunks(length)
    x = {"token_ids": chunks[:, :-1], "padding_mask": np.ones_like(chunks[:, :-1], bool)}
    y = chunks[:, 1:]
    per_epoch = min(steps, len(y) // batch_size)
    epochs = math.ceil(steps / per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, epochs * per_epoch, alpha=0.1)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=TOKEN_LOSS, jit_compile=True)
    start = time.time()
    # The windows are already shuffled (public_chunks); Keras would ignore shuffle for this input.
    model.fit(x, y, batch_size=batch_size, epochs=epochs, steps_per_epoch=per_epoch, shuffle=False, verbose=verbose)
    info.update(trained_now=True, pretrain_seconds=time.time() - start, public_bytes=int(chunks.size))
    os.makedirs(root, exist_ok=True)
    tmp = path + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)
    return model, info


def perplexity(model, x, y, weights, batch_size: int = 64) -> float:
    """exp(mean negative log-likelihood per weighted byte) of `model` on the arrays."""
    total, count = 0.0, 0.0
    predict = tf.function(lambda x: model(x, training=False), jit_compile=True)
    for start in range(0, len(y), batch_size):
        xb = {k: v[start : start + batch_size] for k, v in x.items()}
        losses = TOKEN_LOSS(y[start : start + batch_size], predict(xb)).numpy()
        w = weights[start : start + batch_size]
        total += float((losses * w).sum())
        count += float(w.sum())
    return math.exp(total / max(count, 1.0))


class TextModule(tf.Module):
    """What the SavedModel serves: raw strings in, a log-likelihood per string or a continuation out."""

    def __init__(self, model, length: int):
        super().__init__()
        self.model, self.length = model, length

    def _ids(self, texts):
        raw = tf.strings.substr(texts, 0, self.length)  # the first `length` bytes
        values = tf.cast(tf.io.decode_raw(raw, tf.uint8, fixed_length=self.length), tf.int32)
        real = tf.range(self.length)[None] < tf.strings.length(raw)[:, None]
        return tf.where(real, values + 1, PAD)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def score(self, texts):
        """Log-likelihood (nats) of each string's bytes after its first, and the byte count."""
        ids = self._ids(texts)
        logits = self.model({"token_ids": ids, "padding_mask": ids > 0}, training=False)
        targets = ids[:, 1:]
        logp = -TOKEN_LOSS(targets, logits[:, :-1])
        w = tf.cast(targets > 0, tf.float32)
        return {"log_likelihood": tf.reduce_sum(logp * w, axis=1), "bytes": tf.reduce_sum(w, axis=1)}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
        ]
    )
    def generate(self, prompts, max_new_bytes, temperature, seed):
        """Continues each prompt by sampling (temperature 0: greedy) up to `max_new_bytes` bytes."""
        ids = self._ids(prompts)
        lengths = tf.reduce_sum(tf.cast(ids > 0, tf.int32), axis=1)
        rows = tf.range(tf.shape(ids)[0])

        def body(i, ids, lengths):
            logits = self.model({"token_ids": ids, "padding_mask": ids > 0}, training=False)
            last = tf.gather(logits, tf.maximum(lengths - 1, 0), batch_dims=1)[:, 1:257]  # bytes only
            greedy = tf.argmax(last, axis=-1, output_type=tf.int32)
            sampled = tf.random.stateless_categorical(
                last / tf.maximum(temperature, 1e-6), 1, [seed, i], dtype=tf.int32
            )[:, 0]
            chosen = tf.where(temperature > 0, sampled, greedy) + 1
            room = lengths < self.length
            ids = tf.tensor_scatter_nd_update(
                ids,
                tf.stack([rows, tf.minimum(lengths, self.length - 1)], axis=1),
                tf.where(room, chosen, tf.gather(ids, tf.minimum(lengths, self.length - 1), batch_dims=1)),
            )
            return i + 1, ids, lengths + tf.cast(room, tf.int32)

        _, ids, lengths = tf.while_loop(lambda i, *_: i < max_new_bytes, body, (tf.constant(0), ids, lengths))
        table = tf.constant([bytes([i]) for i in range(256)])
        text = tf.strings.reduce_join(tf.gather(table, tf.ragged.boolean_mask(ids - 1, ids > 0)), axis=-1)
        return {"text": text, "length": lengths}


def export(model, path: str, length: int) -> str:
    """Writes a SavedModel with `score` and `generate` signatures over raw strings."""
    module = TextModule(model, length)
    tf.saved_model.save(module, path, signatures={"score": module.score, "generate": module.generate})
    return path


def summary_table(rows) -> str:
    out = io.StringIO()
    out.write("| method | ε | steps | val ppl | test ppl | ms/step | wall |\n|---|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        eps = "∞" if r["epsilon"] == math.inf else f"{r['epsilon']:.3f}"
        out.write(
            f"| {r['method']} | {eps} | {r['steps']} | {r['validation_perplexity']:.3f} | "
            f"{r['test_perplexity']:.3f} | {r['ms_per_step']:.0f} | {r['wall_s'] / 60:.1f} min |\n"
        )
    return out.getvalue()
