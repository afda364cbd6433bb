"""Nested models inlined (keras_flatten) and mixed-precision models copied to float32 (keras_copy):
what lets fine-tuning and conversion reach a transfer-learning model or one trained on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests import model_zoo as zoo
from quantlab.keras_copy import float32_copy, reduced_precision_layers
from quantlab.keras_flatten import inline_nested_models

keras = zoo.keras2()


@pytest.fixture(scope="module")
def samples():
    return zoo.images(6)[0]


def test_a_backbone_inside_a_classifier_is_inlined_with_the_same_outputs(samples):
    model = zoo.transfer_model()
    flat, notes = inline_nested_models(keras, model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert len(flat.layers) == len(model.layers) - 1 + len(model.get_layer("backbone").layers) - 1
    np.testing.assert_allclose(flat(samples, training=False), model(samples, training=False), rtol=1e-6)
    assert notes[0].startswith("nested model 'backbone' (Functional, 5 layers) inlined")


def test_the_flat_model_shares_the_original_weights(samples):
    model = zoo.transfer_model()
    flat, _ = inline_nested_models(keras, model)
    inner = [layer for layer in model.get_layer("backbone").layers if layer.weights]
    assert all(any(layer is mine for mine in flat.layers) for layer in inner)


def test_the_training_flag_given_to_the_backbone_reaches_each_of_its_layers():
    flat, _ = inline_nested_models(keras, zoo.transfer_model())
    norm = next(layer for layer in flat.get_config()["layers"] if layer["class_name"] == "BatchNormalization")
    assert norm["inbound_nodes"][0][0][3] == {"training": False}
    head = next(layer for layer in flat.get_config()["layers"] if layer["name"] == "head")
    assert head["inbound_nodes"][0][0][3] == {}  # the classifier's own head: called as it was


def test_an_inner_layer_whose_name_is_taken_is_renamed_and_the_outer_names_stay():
    flat, notes = inline_nested_models(keras, zoo.transfer_model())
    names = [layer.name for layer in flat.layers]
    assert len(names) == len(set(names))
    assert flat.layers[-1].name == "head" and flat.output_names == ["head"]
    assert "backbone_head" in names
    assert "backbone/head -> backbone_head" in notes[-1]


def test_a_model_without_nested_models_comes_back_as_it_is():
    model = zoo.conv1d_model()
    assert inline_nested_models(keras, model) == (model, [])


def test_a_mixed_precision_model_gets_a_float32_copy_with_the_same_weights(samples):
    model = zoo.mixed_precision_model()
    assert reduced_precision_layers(model) == [(model.layers[0].name, "mixed_float16"),
                                               (model.layers[1].name, "mixed_float16")]
    copy = float32_copy(keras, model)
    assert reduced_precision_layers(copy) == []
    for original, copied in zip(model.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(original, copied)
    # float16 activations against float32 ones: close, not equal
    np.testing.assert_allclose(copy(samples), np.asarray(model(samples), np.float32), atol=1e-2)


def test_a_mixed_precision_backbone_inside_a_classifier_is_copied_to_float32_too(samples):
    """The float32 copy of the top-level layers alone left the backbone in float16: every conversion
    failed as before."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = zoo.transfer_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    inner = {name for name, _ in reduced_precision_layers(model.get_layer("backbone"))}
    assert inner and inner <= {name for name, _ in reduced_precision_layers(model)}
    copy = float32_copy(keras, model)
    assert reduced_precision_layers(copy) == []
    np.testing.assert_allclose(copy(samples), np.asarray(model(samples), np.float32), atol=1e-2)
