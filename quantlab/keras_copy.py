"""Copies of a tf_keras model: new layers from the config, the weights matched by name.

`model.get_weights()` lists a layer's weights in the order they were created, and that order is not
a property of the layer: a MultiHeadAttention built by `strip_clustering` lists its four kernels,
then its four biases; the same layer built from its config lists each kernel with its bias. Copying
by position then fails on a shape, or, where shapes agree (query and key kernels), swaps weights
silently. Matching each layer's weights by name avoids both.
"""

from __future__ import annotations

from typing import Any, Callable


def weight_name(weight: Any) -> str:
    """"query/kernel" for "multi_head_attention/query/kernel:0": the name inside its layer."""
    return weight.name.split(":")[0].split("/", 1)[-1]


def copy_weights(source: Any, target: Any) -> None:
    """Set each layer of `target` to the weights of the `source` layer of the same name."""
    for layer in target.layers:
        if not layer.weights:
            continue
        original = source.get_layer(layer.name)
        by_name = {weight_name(w): w for w in original.weights}
        names = [weight_name(w) for w in layer.weights]
        if len(by_name) == len(original.weights) == len(names) and set(names) == set(by_name):
            layer.set_weights([by_name[name].numpy() for name in names])
        else:  # names that do not pair up one to one (e.g. repeated): the creation order
            layer.set_weights(original.get_weights())


def clone_with_weights(keras: Any, model: Any, clone_function: Callable[[Any], Any] | None = None) -> Any:
    """`keras.models.clone_model` (new layers, no compile state) with the model's own weights."""
    copy = keras.models.clone_model(model, clone_function=clone_function)
    copy_weights(model, copy)
    return copy


def reduced_precision_layers(model: Any) -> list[tuple[str, str]]:
    """(name, dtype policy) of each layer, nested models' layers included, that computes in float16
    or bfloat16 (a mixed-precision policy)."""
    from .keras_flatten import flat_layers

    return [(layer.name, str(layer.dtype_policy.name)) for layer in flat_layers(model)
            if str(getattr(layer, "compute_dtype", "float32")) in ("float16", "bfloat16")]


def float32_copy(keras: Any, model: Any) -> Any:
    """The model with every layer computing in float32 and the same weights.

    A mixed-precision model (`mixed_float16`, `mixed_bfloat16`) keeps float32 variables and casts
    activations to 16 bits; the TFLite converter cannot lower those casts around a convolution
    ("'tf.Conv2D' op is neither a custom op nor a flex op") and tfmot's wrappers fail on them.
    The float32 copy computes what the converter's float32 model computes.
    """
    def as_float32(layer: Any) -> Any:
        if isinstance(layer, keras.Model):   # a backbone inside a classifier
            return float32_copy(keras, layer)
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    return clone_with_weights(keras, model, clone_function=as_float32)
