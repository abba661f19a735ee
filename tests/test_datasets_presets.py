import json

import keras_hub
import numpy as np
import tensorflow_datasets as tfds

from dpk_examples import datasets, presets, text


def test_tweet_corpus_counts_and_fixed_split():
    full = datasets.tweet_sentiment()
    sizes = [len(y) for _, y in (full.train, full.validation, full.test)]
    assert sum(sizes) == 38158 and sizes == [30526, 3815, 3817]
    all_labels = np.concatenate([full.train[1], full.validation[1], full.test[1]])
    assert np.bincount(all_labels).tolist() == [16186, 15018, 6954]
    assert full.class_names == ["negative", "neutral", "positive"]
    again = datasets.tweet_sentiment()
    assert list(again.test[0][:5]) == list(full.test[0][:5])  # Same split every time.
    binary = datasets.tweet_sentiment(binary=True)
    assert sum(len(y) for _, y in (binary.train, binary.validation, binary.test)) == 23140
    assert binary.num_classes == 2
    small = datasets.tweet_sentiment(binary=True, max_examples=500)
    assert [len(y) for _, y in (small.train, small.validation, small.test)] == [400, 50, 50]


def test_digits():
    x, y = datasets.digits()
    assert x.shape == (1797, 8, 8, 1) and 0 <= x.min() and x.max() <= 1 and set(y) == set(range(10))


def test_tfds_text_loader_with_mock_data():
    with tfds.testing.mock_data(num_examples=20):
        splits = datasets.tfds_text("glue/sst2")
    assert splits.class_names == ["negative", "positive"]
    assert sum(len(y) for _, y in (splits.train, splits.validation, splits.test)) == 60
    assert isinstance(splits.train[0][0], str)


def test_vocab_from_tokenizer_json(tmp_path):
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text(json.dumps({"model": {"vocab": {"[PAD]": 0, "b": 2, "a": 1}}}))
    assert presets.write_vocab_txt(str(tokenizer_json), str(tmp_path / "vocab.txt")) == 3
    assert (tmp_path / "vocab.txt").read_text().split("\n") == ["[PAD]", "a", "b", ""]


def test_offline_minilm_preset_loads_pretrained_bert(tmp_path):
    preset = presets.minilm_preset_dir(cache_dir=str(tmp_path))
    backbone = keras_hub.models.BertBackbone.from_preset(preset)
    assert backbone.count_params() == 22_713_216 and backbone.num_layers == 6
    preprocessor = text.load_preprocessor(preset, sequence_length=8)
    ids = text.tokenize(preprocessor, ["Hello world"])["token_ids"][0]
    assert ids[:4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in BERT's vocab.
    # Pretrained, not random: the two sentences about cars are closer than the unrelated one.
    model = text.bert_classifier(backbone, 2)
    pooled = __import__("keras").Model(model.inputs, model.get_layer("head_dropout").output)
    emb = pooled.predict(
        text.tokenize(preprocessor, ["I love my car", "my car is great", "the stock market fell"]), verbose=0
    )
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
