"""Copies of a model keep each weight in its place, whatever order the layers made them in."""

from __future__ import annotations

import numpy as np

from quantlab.keras_copy import clone_with_weights, weight_name
from quantlab.tfcompat import import_tensorflow

tf, keras = import_tensorflow()
import tensorflow_model_optimization as tfmot  # noqa: E402  (after import_tensorflow)

L = keras.layers


def attention_model() -> keras.Model:
    inputs = keras.Input((6, 8))
    x = L.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(inputs, inputs)
    return keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(x)))


def test_weight_name_is_the_name_inside_the_layer():
    model = attention_model()
    assert [weight_name(w) for w in model.get_layer("attention").weights][:2] == ["query/kernel", "query/bias"]


def test_a_stripped_clustered_attention_model_is_copied_weight_for_weight():
    model = attention_model()
    stripped = tfmot.clustering.keras.strip_clustering(
        tfmot.clustering.keras.cluster_weights(keras.models.clone_model(model), number_of_clusters=4))
    made_in = [weight_name(w) for w in stripped.get_layer("attention").weights]
    rebuilt = [weight_name(w) for w in keras.models.clone_model(stripped).get_layer("attention").weights]
    assert made_in != rebuilt  # the case: the same layer lists its weights in another order
    copy = clone_with_weights(keras, stripped)
    by_name = {weight_name(w): w.numpy() for w in stripped.get_layer("attention").weights}
    for weight in copy.get_layer("attention").weights:
        np.testing.assert_array_equal(weight.numpy(), by_name[weight_name(weight)])
    x = np.random.default_rng(0).random((2, 6, 8), np.float32)
    np.testing.assert_allclose(copy(x).numpy(), stripped(x).numpy(), rtol=1e-6, atol=1e-6)
