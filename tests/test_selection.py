import keras
import keras_hub
import pytest

from dp_bitfit_keras import selection


def _tiny_bert_classifier(num_layers=2, hidden=16, intermediate=32, num_classes=3):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=hidden,
        intermediate_dim=intermediate,
        max_sequence_length=8,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=num_classes, preprocessor=None)


def test_bert_bias_count_matches_architecture():
    layers, hidden, intermediate, classes = 2, 16, 32, 3
    model = _tiny_bert_classifier(layers, hidden, intermediate, classes)
    sel = selection.select_variables(model, "bias")
    # Per layer: q, k, v, attention-output, two LayerNorm betas, FFN out (hidden each) + FFN in.
    # Plus embeddings LayerNorm beta, pooler bias, classifier bias.
    expected = layers * (7 * hidden + intermediate) + hidden + hidden + classes
    assert sel.num_trainable == expected
    assert sel.num_total == model.count_params()
    assert all(v.name in ("bias", "beta") for v in sel.variables)
    assert "trainable" in str(sel)


def test_bias_plus_head_adds_the_classifier_kernel():
    model = _tiny_bert_classifier()
    bias = selection.select_variables(model, "bias")
    head = selection.select_variables(model, "bias+head")
    assert head.head == "logits"
    assert head.num_trainable == bias.num_trainable + 16 * 3
    full = selection.select_variables(model, "all")
    assert full.num_trainable == model.count_params()


def test_callable_selection_and_apply():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    b = model.get_layer("b")
    sel = selection.select_variables(model, lambda v: any(v is w for w in b.weights))
    assert sel.variables == (b.kernel, b.bias)
    selection.apply_selection(model, sel)
    assert model.trainable_variables == [b.kernel, b.bias]


def test_frozen_layers_stay_frozen():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    model.get_layer("a").trainable = False
    sel = selection.select_variables(model, "bias")
    assert sel.variables == (model.get_layer("b").bias,)


def test_custom_layer_bias_by_name():
    class Affine(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), name="scale")
            self.b = self.add_weight(shape=(shape[-1],), name="bias", initializer="zeros")

        def call(self, x):
            return x * self.w + self.b

    model = keras.Sequential([keras.Input((4,)), Affine()])
    assert [v.name for v in selection.select_variables(model, "bias").variables] == ["bias"]


def test_no_selectable_variable_is_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, use_bias=False)])
    with pytest.raises(ValueError, match=r"has no bias terms.*add_biases\(model\).*trainable='lora'"):
        selection.select_variables(model, "bias")
    model.layers[-1].trainable = False
    with pytest.raises(ValueError, match="selects no variable"):
        selection.select_variables(model, "all")


def test_unknown_mode_is_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="trainable must be one of"):
        selection.select_variables(model, "biases")


def test_unbuilt_model_is_a_clear_error():
    with pytest.raises(ValueError, match="build it first"):
        selection.select_variables(keras.Sequential([keras.layers.Dense(3)]), "bias")


def test_trainable_batchnorm_is_rejected_with_a_fix():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(name="bn")])
    with pytest.raises(ValueError, match=r"'bn'.*GroupNormalization"):
        selection.check_per_example_separable(model)
    model.get_layer("bn").trainable = False
    selection.check_per_example_separable(model)  # Inference mode: examples are independent.
