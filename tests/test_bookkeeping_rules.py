"""Book-keeping's registry of layer rules: each built-in family is covered by its rule, and a user
rule for a custom layer is exact and silences the fallback."""

import warnings

import keras
import keras_hub
import pytest
import tensorflow as tf
from conftest import assert_gradients_close
from test_bookkeeping import BATCH, LOSS, _both, _optimizer

from dp_bitfit_keras import bookkeeping
from dp_bitfit_keras.bookkeeping import rules

LAYERS = [
    (rules.EinsumRule, lambda: keras.layers.Dense(3), (5,)),
    (rules.EinsumRule, lambda: keras.layers.EinsumDense("bti,ij->btj", output_shape=(None, 3), bias_axes="j"), (4, 5)),
    (rules.ConvRule, lambda: keras.layers.Conv1D(3, 2), (6, 2)),
    (rules.EmbeddingRule, lambda: keras.layers.Embedding(7, 3), (4,)),
    (rules.LayerNormRule, lambda: keras.layers.LayerNormalization(), (4, 5)),
    (rules.RMSNormRule, lambda: keras.layers.RMSNormalization(), (4, 5)),
    (rules.PositionEmbeddingRule, lambda: keras_hub.layers.PositionEmbedding(6), (6, 3)),
    (rules.EmbeddingRule, lambda: keras_hub.layers.ReversibleEmbedding(7, 3, tie_weights=False), (4,)),
]


@pytest.mark.parametrize("rule_type, make, shape", LAYERS)
def test_each_family_is_covered_by_its_rule(rule_type, make, shape):
    layer = make()
    layer.build((None, *shape))
    rule, roles = bookkeeping._rule_for(layer)
    assert type(rule) is rule_type
    assert {id(v) for v in roles.values() if v is not None} == {id(v) for v in layer.trainable_variables}


class Scale(keras.layers.Layer):
    """A custom leaf layer: x * scale + shift, per feature."""

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones", name="scale")
        self.shift = self.add_weight(shape=(shape[-1],), initializer="zeros", name="shift")

    def call(self, x):
        return x * self.scale + self.shift


def _scale_grads(layer, x, g):
    rows = lambda t: tf.reshape(t, [tf.shape(g)[0], -1, g.shape[-1]])  # noqa: E731
    return {layer.scale.path: tf.reduce_sum(rows(x * g), axis=1), layer.shift.path: tf.reduce_sum(rows(g), axis=1)}


def _model():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((3, 4))
    h = Scale()(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    return model, tf.random.normal((BATCH, 3, 4)), tf.constant([0, 1, 2, 1])


def test_without_a_rule_the_fallback_warning_names_the_registration():
    model, x, y = _model()
    variables = list(model.trainable_variables)
    assert [v.name for v in bookkeeping.covered_variables(model, variables)[1]] == ["scale", "shift"]
    bookkeeping._reported.clear()
    opt = _optimizer(variables)
    with pytest.warns(bookkeeping.BookkeepingFallbackWarning, match="register_layer_rule"):
        tf.function(
            lambda x, y: bookkeeping.clipped_sums(model, LOSS, x, y, variables, None, opt)[0], jit_compile=True
        )(x, y)


def test_a_registered_rule_is_exact_and_covers_the_layer():
    model, x, y = _model()
    variables = list(model.trainable_variables)
    rule = bookkeeping.register_layer_rule(Scale, _scale_grads)
    try:
        assert bookkeeping.rules_registered()[0] is rule
        assert bookkeeping.covered_variables(model, variables)[1] == []
        with warnings.catch_warnings():
            warnings.simplefilter("error", bookkeeping.BookkeepingFallbackWarning)
            actual, expected, _ = _both(model, x, y, variables, sample_weight=tf.constant([1.0, 0.0, 2.0, 1.0]))
        assert_gradients_close(actual, expected)
    finally:
        bookkeeping.unregister_layer_rule(rule)
    assert rule not in bookkeeping.rules_registered()


def test_bad_registrations_are_refused():
    with pytest.raises(ValueError, match="LayerRule"):
        bookkeeping.register_layer_rule(Scale)
    with pytest.raises(ValueError, match="LayerRule alone"):
        bookkeeping.register_layer_rule(rules.EinsumRule(), _scale_grads)


@pytest.mark.parametrize("norm", [keras.layers.RMSNormalization, keras.layers.LayerNormalization])
def test_norm_scales_are_exact_by_book_keeping(norm):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3, 4))
    h = norm()(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    for i, v in enumerate(model.weights):
        v.assign(v + tf.random.stateless_normal(v.shape, [2, i], stddev=0.3))
    x, y = tf.random.normal((BATCH, 3, 4)), tf.constant([0, 1, 2, 1])
    variables = list(model.trainable_variables)
    assert bookkeeping.covered_variables(model, variables)[1] == []
    actual, expected, _ = _both(model, x, y, variables, clip=0.05)
    assert_gradients_close(actual, expected)
