"""Nested models inlined: a classifier around a backbone model becomes one flat Functional model.

Transfer learning builds models with a model inside, e.g.
`Sequential([MobileNetV2(include_top=False), GlobalAveragePooling2D(), Dense(n)])`. tfmot's
quantize_model, prune_low_magnitude and cluster_weights wrap only top-level layers, so the backbone,
nearly all of the weights, would stay untouched. The flat model calls the same layer objects (the
same weights) along the same graph, with the `training` argument the outer model passed to the
backbone (`base(x, training=False)` keeps its batch norms in inference mode) passed to each of its
layers. Layer names must be unique in one model: an inner layer whose name is taken is renamed
`<backbone>_<layer>`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ModelError


def nested_models(keras: Any, model: Any) -> list[Any]:
    """The top-level layers of `model` that are models themselves."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def flat_layers(model: Any) -> list[Any]:
    """The model's layers, with nested models replaced by their own layers (input layers left out)."""
    layers = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.__class__.__name__ in ("Functional", "Sequential", "Model"):
            layers.extend(flat_layers(layer))
        elif layer.__class__.__name__ != "InputLayer":
            layers.append(layer)
    return layers


def _give_unique_names(keras: Any, model: Any) -> list[str]:
    """Rename inner layers whose name another layer already has (the outer model's own layers keep
    theirs: an output's name is how its labels are found); return the renames made."""
    taken = {layer.name for layer in model.layers if not isinstance(layer, keras.Model)}
    renamed = []

    def visit(container: Any) -> None:
        for layer in container.layers:
            if isinstance(layer, keras.Model):
                visit(layer)
                continue
            if container is model:
                continue
            if layer.name in taken:
                new = f"{container.name}_{layer.name}"
                while new in taken:
                    new += "_"
                renamed.append(f"{container.name}/{layer.name} -> {new}")
                layer._name = new
            taken.add(layer.name)

    visit(model)
    return renamed


def _apply(keras: Any, model: Any, inputs: list[Any], training: bool | None) -> list[Any]:
    """Call `model`'s layers on `inputs` in graph order (tf_keras's own `_run_internal_graph`),
    inlining nested models; returns the flat list of its outputs."""
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    usage = model._tensor_usage_count
    tensors: dict[str, list[Any]] = {}
    for reference, tensor in zip(model.inputs, inputs):
        tensors[str(id(reference))] = [tensor] * usage[str(id(reference))]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            layer = node.layer
            if isinstance(layer, keras.Model):
                inner_training = kwargs.get("training", training)
                outputs = _apply(keras, layer, tf.nest.flatten(args[0]), inner_training)
            else:
                if training is not None and "training" not in kwargs and \
                        getattr(layer, "_expects_training_arg", False):
                    kwargs["training"] = training
                outputs = tf.nest.flatten(layer(*args, **kwargs))
            for tensor_id, tensor in zip(node.flat_output_ids, outputs):
                tensors[tensor_id] = [tensor] * usage[tensor_id]
    return [tensors[str(id(reference))].pop() for reference in model.outputs]


def _probe_inputs(model: Any) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    samples = []
    for tensor in model.inputs:
        shape = [2, *[int(d) for d in tensor.shape[1:]]]
        dtype = np.dtype(tensor.dtype.as_numpy_dtype)
        samples.append(np.zeros(shape, dtype) if dtype.kind in "iub"
                       else rng.random(shape).astype(dtype))
    return samples


def inline_nested_models(keras: Any, model: Any) -> tuple[Any, list[str]]:
    """`model` with its nested models' layers inline, and a note per nested model.

    A model without nested models comes back as it is, with no notes. The flat model's outputs are
    checked against the original's on two probe samples; a difference is a one-line ModelError.
    """
    nested = nested_models(keras, model)
    if not nested or not getattr(model, "_is_graph_network", False) or \
            not all(getattr(inner, "_is_graph_network", False) for inner in nested):
        return model, []
    renamed = _give_unique_names(keras, model)
    inputs = [keras.Input(shape=tensor.shape[1:], dtype=tensor.dtype, name=name)
              for tensor, name in zip(model.inputs, model.input_names)]
    outputs = _apply(keras, model, inputs, training=None)
    flat = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
    probe = _probe_inputs(model)
    feed = probe if len(probe) > 1 else probe[0]
    expected = [np.asarray(o) for o in _as_list(model(feed, training=False))]
    got = [np.asarray(o) for o in _as_list(flat(feed, training=False))]
    if any(e.shape != g.shape or not np.allclose(e, g, rtol=1e-4, atol=1e-5)
           for e, g in zip(expected, got)):
        names = ", ".join(repr(inner.name) for inner in nested)
        raise ModelError(f"the model with the layers of nested model(s) {names} inline does not "
                         f"compute what the model computes; rebuild it flat, with those layers "
                         f"inline, and upload that")
    notes = [f"nested model {inner.name!r} ({type(inner).__name__}, "
             f"{len(flat_layers(inner))} layers) inlined so that its layers are fine-tuned "
             f"too (same layers and weights)" for inner in nested]
    if renamed:
        notes.append(f"inner layers renamed to keep layer names unique: {', '.join(renamed)}")
    return flat, notes


def _as_list(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
