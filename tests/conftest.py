import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def slice_example(x, i):
    return tf.nest.map_structure(lambda t: t[i : i + 1], x)


def brute_force_gradients(model, loss_fn, x, y, variables, sample_weight=None, training=False):
    """The reference: one GradientTape per example, stacked."""
    batch = tf.nest.flatten(x)[0].shape[0]
    per_example = []
    for i in range(batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(None if y is None else y[i : i + 1], model(slice_example(x, i), training=training))
            loss = tf.reduce_mean(loss)
            if sample_weight is not None:
                loss = loss * sample_weight[i]
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        per_example.append([tf.convert_to_tensor(g) for g in grads])
    return [tf.stack(gs) for gs in zip(*per_example)]


def assert_gradients_close(actual, expected, rtol=1e-5):
    """Max abs error relative to the largest gradient entry overall.

    Gradients that are mathematically zero (attention key biases) come out as ~1e-8 round-off,
    so an element-wise relative tolerance would be meaningless for them.
    """
    assert len(actual) == len(expected)
    scale = max(float(np.max(np.abs(e))) for e in expected)
    assert scale > 0
    for a, e in zip(actual, expected):
        assert tuple(a.shape) == tuple(e.shape)
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(e)))) if np.size(e) else 0.0
        assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x scale {scale:.3g}"


def tiny_bert(batch=4, seq=10, dropout=0.0, num_classes=3):
    """A random-init keras-hub BertTextClassifier and a padded batch for it."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=seq,
        dropout=dropout,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=num_classes, preprocessor=None, dropout=dropout)
    lengths = [seq, max(seq - 4, 1), 3, seq - 2, 5, seq, 4, 7][:batch] + [seq] * max(0, batch - 8)
    mask = tf.sequence_mask(lengths, seq)
    x = {
        "token_ids": tf.random.uniform((batch, seq), 1, 64, tf.int32) * tf.cast(mask, tf.int32),
        "segment_ids": tf.zeros((batch, seq), tf.int32),
        "padding_mask": mask,
    }
    model(x)
    return model, x, tf.constant(np.arange(batch) % num_classes, tf.int32)
