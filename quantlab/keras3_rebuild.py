"""Rebuild a Keras 3 model as an equivalent tf_keras (Keras 2) model, so tfmot can wrap it.

tensorflow-model-optimization (QAT, clustering, pruning) only wraps tf_keras models. A Keras 3 model
built from standard layers is rebuilt here in three steps: its config is translated to the tf_keras
format (and every class it names is checked against tf_keras' built-ins), the tf_keras model is
built from that config, and the weights are copied layer by layer. Both models then run on the same
deterministic inputs; the rebuild is refused unless their outputs match.

Nothing outside tf_keras' built-in layers, initializers, regularizers and constraints is ever
deserialized: the translated config names only allow-listed classes, checked before building.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from quantlab.errors import ModelError
from quantlab.safe_load import LAYER_CLASSES, OTHER_CLASSES, TRAINING_TECHNIQUES_HINT

# Rebuilt models must match the Keras 3 outputs within ATOL_SCALE * (1 + max |output|).
ATOL_SCALE = 1e-5
SAMPLE_BATCH = 4
UNKNOWN_DIM = 6  # a None dimension other than the batch (e.g. a variable sequence length)
INT_INPUT_HIGH = 10  # integer inputs draw from [0, high); Embedding input_dim lowers it

MODEL_CLASSES = {"Sequential": "Sequential", "Functional": "Functional", "Model": "Functional"}
DTYPE_POLICY_CLASSES = frozenset({"DTypePolicy", "FloatDTypePolicy", "Policy"})
NESTED_OBJECT_MODULES = {"initializers": "keras.initializers",
                         "regularizers": "keras.regularizers",
                         "constraints": "keras.constraints"}

# Keras 3-only config fields tf_keras does not accept, with the value that means "behaves like
# tf_keras". A field at that value is dropped; at any other value the rebuild is refused.
NEUTRAL_LAYER_FIELDS: dict[str, Any] = {
    "quantization_config": None,  # Dense/EinsumDense/Embedding: Keras 3 int8/int4/fp8 quantization
    "lora_rank": None,  # Dense/EinsumDense/Embedding LoRA adapters
    "lora_alpha": None,
    "rms_scaling": False,  # LayerNormalization in RMS mode
}
_RECURRENT = ("LSTM", "GRU", "SimpleRNN", "LSTMCell", "GRUCell", "SimpleRNNCell")
# Keras 3-only fields that never change inference outputs: always dropped (with a note if set),
# as field -> (layer classes, (default, what the field does)).
OUTPUT_NEUTRAL_FIELDS: dict[str, tuple[tuple[str, ...], tuple[Any, str]]] = {
    "seed": (_RECURRENT, (None, "dropout seed; training only")),
    "use_cudnn": (("LSTM", "GRU"), ("auto", "kernel choice only")),
}
NEUTRAL_OBJECT_FIELDS: dict[str, Any] = {"input_axes": None, "output_axes": None}

# Weights whose name differs between Keras 3 and tf_keras (same shape and meaning).
WEIGHT_RENAMES = {("DepthwiseConv1D", "kernel"): "depthwise_kernel",
                  ("DepthwiseConv2D", "kernel"): "depthwise_kernel"}

_KERAS3_OPS_MODULE = re.compile(r"^keras(\.src)?\.ops(\.|$)")


@dataclass(frozen=True)
class Rebuilt:
    """A tf_keras model equivalent to a Keras 3 model.

    max_abs_diff is the largest output difference measured on the verification samples; notes say
    what the translation dropped or adjusted.
    """

    model: Any
    max_abs_diff: float
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def _cannot_rebuild(source: str, what: str) -> ModelError:
    return ModelError(f"{source}: {what}, so {TRAINING_TECHNIQUES_HINT} cannot rebuild this "
                      "Keras 3 model; post-training techniques still apply")


def _no_equivalent(source: str, layer: str, class_name: str) -> ModelError:
    return _cannot_rebuild(source, f"layer {layer!r} ({class_name}) has no tf_keras equivalent")


# --------------------------------------------------------------------------------------------------
# The allow-list: tf_keras' own built-in classes
# --------------------------------------------------------------------------------------------------


def _is_tf_keras_class(obj: Any, base: type | None = None) -> bool:
    return (isinstance(obj, type) and obj.__module__.startswith("tf_keras.")
            and (base is None or issubclass(obj, base)))


def allowed_layer_classes() -> frozenset[str]:
    """Layer class names a translated config may name: tf_keras built-ins QuantLab loads safely."""
    from quantlab.tfcompat import import_tensorflow

    _, tf_keras = import_tensorflow()
    return frozenset(name for name in LAYER_CLASSES
                     if _is_tf_keras_class(getattr(tf_keras.layers, name, None),
                                           tf_keras.layers.Layer))


def allowed_object_classes() -> dict[str, frozenset[str]]:
    """Initializer, regularizer and constraint class names tf_keras ships, by module."""
    from quantlab.tfcompat import import_tensorflow

    _, tf_keras = import_tensorflow()
    return {module: frozenset(name for name in OTHER_CLASSES
                              if _is_tf_keras_class(getattr(getattr(tf_keras, kind), name, None)))
            for kind, module in NESTED_OBJECT_MODULES.items()}


def _walk_objects(value: Any) -> Iterator[dict]:
    """Every serialized object (a dict with a class_name) in a tree, in document order."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("class_name"), str):
                yield node
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed(node))


def check_translated_config(config: dict, source_name: str) -> None:
    """Refuse a translated config naming any class outside tf_keras' allow-listed built-ins."""
    layers, objects = allowed_layer_classes(), allowed_object_classes()
    for node in _walk_objects(config):
        class_name, module = node["class_name"], node.get("module")
        ok = (module == "keras.layers" and class_name in layers) or (
            module == "keras.models" and class_name in MODEL_CLASSES.values()) or (
            class_name in objects.get(module, ()))
        if not ok or node.get("registered_name") is not None:
            raise _cannot_rebuild(source_name, f"the translated config names "
                                  f"{module}.{class_name}, which is not an allow-listed tf_keras "
                                  "built-in")


# --------------------------------------------------------------------------------------------------
# Config translation
# --------------------------------------------------------------------------------------------------


class _Translator:
    """Translates one serialized Keras 3 model; collects notes on what it changed."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.notes: list[str] = []
        self.layer_classes = allowed_layer_classes()
        self.object_classes = allowed_object_classes()

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ---- models ----------------------------------------------------------------------------------

    def model(self, node: dict) -> dict:
        class_name = node.get("class_name")
        if class_name not in MODEL_CLASSES:
            raise _cannot_rebuild(self.source, f"the top-level object is {class_name!r}, not a "
                                  "Sequential or Functional model")
        config = node.get("config") or {}
        name = config.get("name", "model")
        if MODEL_CLASSES[class_name] == "Sequential":
            translated = self._sequential(config)
        else:
            translated = self._functional(config, name)
        return {"module": "keras.models", "class_name": MODEL_CLASSES[class_name],
                "config": translated, "registered_name": None}

    def _sequential(self, config: dict) -> dict:
        out: dict[str, Any] = {"name": config.get("name", "sequential"),
                               "layers": [self.layer(layer) for layer in config.get("layers", [])]}
        if config.get("build_input_shape") is not None:
            out["build_input_shape"] = _plain(config["build_input_shape"])
        if config.get("trainable") is False:
            out["trainable"] = False
        return out

    def _functional(self, config: dict, name: str) -> dict:
        layers = [self.layer(layer) for layer in config.get("layers", [])]
        out = {"name": name, "trainable": config.get("trainable", True), "layers": layers,
               "input_layers": self._endpoints(config.get("input_layers"), name, "inputs"),
               "output_layers": self._endpoints(config.get("output_layers"), name, "outputs")}
        _shift_nested_model_nodes(out)
        _check_node_references(out, self.source)
        return out

    def _endpoints(self, value: Any, model_name: str, what: str) -> list:
        value = _plain(value)
        if isinstance(value, dict):
            raise _cannot_rebuild(self.source, f"model {model_name!r} names its {what} with a "
                                  "dict; re-save it with a list of inputs/outputs")
        if _is_history(value):
            return [value]
        if not (isinstance(value, list) and all(_is_history(v) for v in value)):
            raise _cannot_rebuild(self.source, f"model {model_name!r} has nested {what}")
        return value

    # ---- layers ----------------------------------------------------------------------------------

    def layer(self, node: dict) -> dict:
        class_name = node.get("class_name")
        config = node.get("config") or {}
        name = config.get("name") or node.get("name") or "?"
        module = str(node.get("module") or "")
        if _KERAS3_OPS_MODULE.match(module):
            raise _no_equivalent(self.source, name, f"keras.ops.{class_name}")
        if class_name in MODEL_CLASSES:
            out = self.model(node)
        elif class_name in self.layer_classes and node.get("registered_name") in (None, class_name):
            out = {"module": "keras.layers", "class_name": class_name,
                   "config": self._layer_config(class_name, config, name), "registered_name": None}
        else:
            raise _no_equivalent(self.source, name, str(class_name))
        # build_config is dropped: tf_keras builds every layer when it calls it on the graph.
        if "name" in node:
            out["name"] = node["name"]
        if "inbound_nodes" in node:
            out["inbound_nodes"] = [self._inbound_node(n, name) for n in node["inbound_nodes"]]
        return out

    def _layer_config(self, class_name: str, config: dict, name: str) -> dict:
        out = {}
        for key, value in config.items():
            if key in NEUTRAL_LAYER_FIELDS:
                if value != NEUTRAL_LAYER_FIELDS[key]:
                    raise _cannot_rebuild(self.source, f"layer {name!r} ({class_name}) sets the "
                                      f"Keras 3-only option {key}={value!r}, which tf_keras lacks")
                continue
            classes, (default, meaning) = OUTPUT_NEUTRAL_FIELDS.get(key, ((), (None, "")))
            if class_name in classes:
                if value != default:
                    self.note(f"Layer {name!r}: Keras 3-only {key}={value!r} dropped ({meaning}; "
                              f"tf_keras {class_name} has no such option).")
                continue
            out[key] = self.value(value, name, key)
        if class_name == "InputLayer" and "batch_shape" in out:
            out["batch_input_shape"] = out.pop("batch_shape")
        return out

    def _inbound_node(self, node: Any, layer: str) -> list:
        if not (isinstance(node, dict) and "args" in node):
            raise _cannot_rebuild(self.source, f"layer {layer!r} has an inbound node in an unknown "
                                  "format")
        args, kwargs = node.get("args") or [], node.get("kwargs") or {}
        if len(args) != 1:
            raise _cannot_rebuild(self.source, f"layer {layer!r} is called with {len(args)} "
                                  "positional arguments (tf_keras configs record one)")
        if any(True for _ in _walk_tensors(kwargs)):
            raise _cannot_rebuild(self.source, f"layer {layer!r} receives a tensor as a keyword "
                                  "argument")
        tensors = list(_walk_tensors(args[0]))
        if not tensors or not _is_flat_tensor_list(args[0]):
            raise _cannot_rebuild(self.source, f"layer {layer!r} is called on a nested structure")
        plain_kwargs = _plain(kwargs)
        return [[*tensor["config"]["keras_history"], plain_kwargs] for tensor in tensors]

    # ---- values inside a layer config ------------------------------------------------------------

    def value(self, value: Any, layer: str, key: str) -> Any:
        if isinstance(value, (list, tuple)):
            return [self.value(v, layer, key) for v in value]
        if not isinstance(value, dict):
            return value
        class_name = value.get("class_name")
        if class_name is None:
            return {k: self.value(v, layer, key) for k, v in value.items()}
        if class_name == "__tuple__":
            return self.value((value.get("config") or {}).get("value", []), layer, key)
        if class_name in DTYPE_POLICY_CLASSES:
            return self._dtype_name(value, layer)
        module = value.get("module")
        if module in self.object_classes:
            return self._nested_object(value, layer, key)
        if module in ("keras.layers", "keras", "keras.models") or class_name in MODEL_CLASSES:
            return self.layer(value)  # Bidirectional/TimeDistributed's layer, RNN cells
        raise _cannot_rebuild(self.source, f"layer {layer!r} has {key}={module}.{class_name}, "
                              "which has no tf_keras equivalent")

    def _dtype_name(self, policy: dict, layer: str) -> str:
        name = (policy.get("config") or {}).get("name")
        if not isinstance(name, str) or name not in ("float32", "float16", "bfloat16", "float64",
                                                     "mixed_float16", "mixed_bfloat16"):
            raise _cannot_rebuild(self.source, f"layer {layer!r} uses the Keras 3 dtype policy "
                                  f"{name!r} (e.g. Keras 3 int8 quantization)")
        return name

    def _nested_object(self, node: dict, layer: str, key: str) -> dict:
        module, class_name = node["module"], node["class_name"]
        if class_name not in self.object_classes[module] or node.get("registered_name") not in (
                None, class_name):
            raise _cannot_rebuild(self.source, f"layer {layer!r} has {key}={class_name}, which has "
                                  "no tf_keras equivalent")
        config = {}
        for field, value in (node.get("config") or {}).items():
            if field in NEUTRAL_OBJECT_FIELDS:
                if value != NEUTRAL_OBJECT_FIELDS[field]:
                    raise _cannot_rebuild(self.source, f"layer {layer!r} has {key}={class_name} "
                                          f"with the Keras 3-only option {field}={value!r}")
                continue
            config[field] = _plain(value)
        return {"module": module, "class_name": class_name, "config": config,
                "registered_name": None}


def _references(config: dict) -> Iterator[list]:
    """Every [layer, node_index, tensor_index, ...] reference in a translated functional config."""
    for layer in config["layers"]:
        for node in layer.get("inbound_nodes", []):
            yield from node
    yield from config["input_layers"]
    yield from config["output_layers"]


def _shift_nested_model_nodes(config: dict) -> None:
    """Keras 3 numbers a nested model's first call node 0; tf_keras skips the node the nested
    model's own Input created (`_should_skip_first_node`), so the same call is node 1 there."""
    nested = {layer["name"] for layer in config["layers"] if layer["class_name"] in MODEL_CLASSES}
    for reference in _references(config):
        if reference[0] in nested:
            reference[1] += 1


def _check_node_references(config: dict, source: str) -> None:
    """Refuse dangling references up front: tf_keras waits forever for a node that never comes."""
    layers = {layer["name"]: layer for layer in config["layers"]}
    for name, node_index, *_ in _references(config):
        layer = layers.get(name)
        if layer is None:
            raise _cannot_rebuild(source, f"the config refers to a layer {name!r} it does not "
                                  "define")
        if layer["class_name"] == "InputLayer":
            valid = range(1)
        elif layer["class_name"] in MODEL_CLASSES:
            valid = range(1, len(layer.get("inbound_nodes", [])) + 1)
        else:
            valid = range(len(layer.get("inbound_nodes", [])))
        if node_index not in valid:
            raise _cannot_rebuild(source, f"the config refers to call {node_index} of layer "
                                  f"{name!r}, which it does not record")


def _is_history(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and all(isinstance(v, int) for v in value[1:]))


def _is_tensor(value: Any) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


def _walk_tensors(value: Any) -> Iterator[dict]:
    for node in _walk_objects(value):
        if _is_tensor(node):
            yield node


def _is_flat_tensor_list(arg: Any) -> bool:
    return _is_tensor(arg) or (isinstance(arg, (list, tuple)) and all(_is_tensor(a) for a in arg))


def _plain(value: Any) -> Any:
    """Tuples (and Keras 3 `__tuple__` markers) as lists, the JSON form both Keras read."""
    if isinstance(value, dict):
        if value.get("class_name") == "__tuple__":
            return _plain((value.get("config") or {}).get("value", []))
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _translate(config: dict, source_name: str) -> tuple[dict, tuple[str, ...]]:
    translator = _Translator(source_name)
    translated = translator.model(config)
    check_translated_config(translated, source_name)
    return translated, tuple(translator.notes)


def translate_config(config: dict, source_name: str = "the model") -> dict:
    """Translate a serialized Keras 3 model (`keras.saving.serialize_keras_object(model)`, or a
    .keras archive's config.json) into the config tf_keras would have written for the same model.

    Raises ModelError naming the first layer or option tf_keras has no equivalent for.
    """
    return _translate(config, source_name)[0]


# --------------------------------------------------------------------------------------------------
# Building and copying weights
# --------------------------------------------------------------------------------------------------


def _build_tf_keras(translated: dict, source: str) -> Any:
    from quantlab.tfcompat import import_tensorflow

    _, tf_keras = import_tensorflow()
    try:
        return tf_keras.models.model_from_config(translated, custom_objects={})
    except Exception as exc:  # a field tf_keras rejects, or a graph it cannot wire
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _cannot_rebuild(source, f"tf_keras could not build the translated config "
                              f"({type(exc).__name__}: {first[:160]})") from None


def _short_weight_name(variable: Any) -> str:
    return str(variable.name).rsplit("/", 1)[-1].split(":", 1)[0]


def _is_model(layer: Any) -> bool:
    return hasattr(layer, "layers") and hasattr(layer, "inputs")


def _copy_layer_weights(layer3: Any, layer2: Any, source: str, notes: list[str]) -> None:
    class_name = type(layer3).__name__
    weights3, weights2 = list(layer3.weights), list(layer2.weights)
    if len(weights3) != len(weights2):
        raise _cannot_rebuild(source, f"layer {layer3.name!r} ({class_name}) has {len(weights3)} "
                              f"weights in Keras 3 but {len(weights2)} in tf_keras")
    values = []
    for w3, w2 in zip(weights3, weights2):
        name3, name2 = _short_weight_name(w3), _short_weight_name(w2)
        expected = WEIGHT_RENAMES.get((class_name, name3), name3)
        if expected != name2 or tuple(w3.shape) != tuple(w2.shape):
            raise _cannot_rebuild(source, f"layer {layer3.name!r} ({class_name}) weight {name3} "
                                  f"{tuple(w3.shape)} does not line up with tf_keras' {name2} "
                                  f"{tuple(w2.shape)}")
        if expected != name3:
            notes.append(f"Layer {layer3.name!r}: Keras 3 weight {name3!r} is tf_keras' {name2!r}.")
        values.append(np.asarray(w3.numpy() if hasattr(w3, "numpy") else w3.value))
    if values:
        layer2.set_weights(values)  # also runs finalize_state(), which Normalization needs
    if class_name == "Normalization":
        notes.append(f"Layer {layer3.name!r}: adapted Normalization mean/variance/count copied as "
                     "weights; tf_keras' set_weights re-derives the mean/variance it applies.")


def copy_weights(model3: Any, model2: Any, source_name: str) -> tuple[str, ...]:
    """Copy every layer's weights from the Keras 3 model into the tf_keras one, by layer name."""
    notes: list[str] = []
    by_name = {layer.name: layer for layer in model2.layers}
    for layer3 in model3.layers:
        layer2 = by_name.get(layer3.name)
        if layer2 is None:
            raise _cannot_rebuild(source_name, f"layer {layer3.name!r} is missing from the rebuilt "
                                  "model")
        if _is_model(layer3):
            notes.extend(copy_weights(layer3, layer2, source_name))
        else:
            _copy_layer_weights(layer3, layer2, source_name, notes)
    return tuple(notes)


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _int_input_high(model3: Any) -> int:
    dims = [layer.input_dim for layer in _all_layers(model3) if type(layer).__name__ == "Embedding"]
    return max(1, min([INT_INPUT_HIGH, *dims]))


def _all_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        yield layer
        if _is_model(layer):
            yield from _all_layers(layer)


def sample_inputs(model3: Any, seed: int = 0) -> list[np.ndarray]:
    """Deterministic inputs for every model input, in its own dtype (integer tokens for ids)."""
    rng = np.random.default_rng(seed)
    samples = []
    for tensor in model3.inputs:
        shape = [SAMPLE_BATCH] + [UNKNOWN_DIM if d is None else int(d) for d in tensor.shape[1:]]
        dtype = np.dtype(str(tensor.dtype).replace("tf.", ""))
        if np.issubdtype(dtype, np.integer):
            samples.append(rng.integers(0, _int_input_high(model3), size=shape).astype(dtype))
        elif dtype == np.bool_:
            samples.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            samples.append(rng.standard_normal(shape).astype(dtype))
    return samples


def _outputs_as_numpy(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        outputs = [outputs[k] for k in sorted(outputs)]
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(o) for o in outputs]


def measure_output_diff(model3: Any, model2: Any, source_name: str) -> float:
    """Largest |Keras 3 - tf_keras| output difference on sample inputs; refuse a mismatch."""
    import keras

    inputs = sample_inputs(model3)
    feed = inputs if len(inputs) > 1 else inputs[0]
    expected = [keras.ops.convert_to_numpy(o)
                for o in _outputs_as_numpy(model3(feed, training=False))]
    actual = _outputs_as_numpy(model2(feed, training=False))
    if [e.shape for e in expected] != [a.shape for a in actual]:
        raise _cannot_rebuild(source_name, f"the rebuilt model's outputs have shapes "
                              f"{[a.shape for a in actual]}, not {[e.shape for e in expected]}")
    worst = 0.0
    for e, a in zip(expected, actual):
        diff = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)), initial=0.0))
        tolerance = ATOL_SCALE * (1.0 + float(np.max(np.abs(e), initial=0.0)))
        if not diff <= tolerance:  # also catches NaN
            raise _cannot_rebuild(source_name, f"the rebuilt tf_keras model's outputs differ from "
                                  f"the Keras 3 model's by {diff:.3g} (tolerance {tolerance:.3g})")
        worst = max(worst, diff)
    return worst


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def rebuild_in_tf_keras(model3: Any, source_name: str) -> Rebuilt:
    """Rebuild a loaded Keras 3 model as a verified, equivalent tf_keras model.

    Raises ModelError (one line, naming the layer) when a layer or option has no tf_keras
    equivalent, when weights do not line up, or when the rebuilt outputs differ.
    """
    from quantlab.tfcompat import import_tensorflow

    import_tensorflow()
    import keras

    serialized = keras.saving.serialize_keras_object(model3)
    translated, notes = _translate(serialized, source_name)
    model2 = _build_tf_keras(translated, source_name)
    notes += copy_weights(model3, model2, source_name)
    diff = measure_output_diff(model3, model2, source_name)
    return Rebuilt(model2, diff, notes + (f"Rebuilt in tf_keras; outputs match the Keras 3 model "
                                          f"within {diff:.2g} on {SAMPLE_BATCH} samples.",))
