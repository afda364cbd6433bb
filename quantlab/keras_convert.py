"""A TFLiteConverter for a tf_keras model, prepared for what users' models need.

Runs in worker processes (imports TensorFlow). Measured with TF 2.21 on small user-style models:

- Recurrent layers (LSTM, GRU, SimpleRNN, Bidirectional) do not convert from `from_keras_model`
  ("'tf.TensorListReserve' op requires element_shape to be static"). Through a concrete function
  with the batch dimension fixed at 1 they do, and an LSTM becomes one fused
  UNIDIRECTIONAL_SEQUENCE_LSTM op, which the converter quantizes to int8.
- A GRU or SimpleRNN has no fused kernel: it converts to a WHILE loop, and the converter's
  calibration (every int8 and 16x8 mode) crashed the process (segmentation fault) on that loop.
  Unrolled over its time steps (`unroll=True`, same weights) it calibrates and converts.
- An LSTM fed a mask (padded tokens from `Embedding(mask_zero=True)`, a `Masking` layer) is not
  fused: it too is a WHILE loop, and int8 calibration crashed on it; unrolled, it converts.
- 16x8 refuses the fused LSTM ("Quantization to 16x8-bit not yet supported for op:
  'UNIDIRECTIONAL_SEQUENCE_LSTM'"); the unrolled LSTM converts.
- A GroupNormalization converted with a dynamic batch gives a BROADCAST_TO that LiteRT cannot
  prepare ("Output shape must be broadcastable from input shape"), in float32 and while
  calibrating; with the batch fixed at 1 it converts, calibrates and matches Keras.
- Conv1DTranspose with a dynamic batch aborted LiteRT (SIGABRT) at the first int16x8 invoke; with
  the batch fixed at 1 it runs in every mode.
- A ConvLSTM2D cannot be unrolled ("Unrolling is not possible with convolutional RNNs") and
  calibrating its loop crashed the converter (segmentation fault): the calibrated modes refuse it,
  naming the layer; dynamic and float16 convert it.
- An integer input (token ids into an Embedding) must be calibrated with samples of its own dtype;
  integer-only I/O keeps it int32 (only float inputs become int8 / uint8).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import TechniqueError
from .keras_copy import clone_with_weights

RECURRENT_CLASSES = frozenset({"LSTM", "GRU", "SimpleRNN", "RNN", "Bidirectional", "ConvLSTM1D",
                               "ConvLSTM2D", "ConvLSTM3D"})
# Recurrent layers TFLite fuses into one op (calibration works on the rolled layer).
FUSED_RECURRENT_CLASSES = frozenset({"LSTM"})
CALIBRATED_MODES = frozenset({"int8-fallback", "int8-only", "uint8-only", "int16x8"})
# Layers whose dynamic-batch conversion LiteRT cannot run (see the module docstring): batch 1.
FIXED_BATCH_CLASSES = frozenset({"GroupNormalization", "Conv1DTranspose"})
# Convolutional recurrent layers: Keras cannot unroll them, and calibrating their loop crashed the
# converter (segmentation fault), so no calibrated mode can convert them.
CONV_RECURRENT_CLASSES = frozenset({"ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"})


def _inner_class(layer: Any) -> str:
    """The class of a recurrent layer, or of the layer a Bidirectional wraps."""
    inner = getattr(layer, "forward_layer", None) or getattr(layer, "layer", None)
    return type(inner).__name__ if type(layer).__name__ == "Bidirectional" and inner is not None \
        else type(layer).__name__


def recurrent_layers(model: Any) -> list[dict[str, str]]:
    """Each recurrent layer of the model: name, class, and the recurrent class inside a wrapper."""
    found = []
    for layer in getattr(model, "layers", []):
        kind = type(layer).__name__
        if kind in RECURRENT_CLASSES:
            masked = {"masked": True} if _input_mask(layer) is not None else {}
            found.append({"layer": layer.name, "class": kind, "cell": _inner_class(layer), **masked})
    return found


def _input_mask(layer: Any) -> Any:
    """The mask a layer receives (padded tokens from Embedding(mask_zero=True), Masking), or None."""
    try:
        return layer.input_mask
    except (AttributeError, RuntimeError, ValueError):  # a layer called on several inputs
        return None


def _all_layers(model: Any) -> list[Any]:
    """Every layer, with the layers of nested models (a backbone inside a classifier) and the layer
    inside a wrapper (tfmot's QuantizeWrapper, PruneLowMagnitude) in place."""
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        inner = getattr(layer, "layer", None)
        if inner is not None and not isinstance(inner, str):
            found.append(inner)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found


def fixed_batch_layers(model: Any) -> list[str]:
    """The layers (nested ones too) that convert only with the batch fixed at 1."""
    return [layer.name for layer in _all_layers(model) if type(layer).__name__ in FIXED_BATCH_CLASSES]


def layers_to_unroll(model: Any, mode: str) -> list[dict[str, str]]:
    """The recurrent layers that must be unrolled for `mode` to convert (see the module docstring)."""
    if mode not in CALIBRATED_MODES:
        return []
    return [layer for layer in recurrent_layers(model)
            if mode == "int16x8" or layer["cell"] not in FUSED_RECURRENT_CLASSES
            or layer.get("masked")]


def _set_unroll(config: dict) -> dict:
    config = dict(config)
    if "layer" in config and isinstance(config["layer"], dict):  # Bidirectional
        config["layer"] = {**config["layer"], "config": _set_unroll(config["layer"]["config"])}
    if "backward_layer" in config and isinstance(config["backward_layer"], dict):
        config["backward_layer"] = {**config["backward_layer"],
                                    "config": _set_unroll(config["backward_layer"]["config"])}
    if "unroll" in config or "cell" in config or "units" in config:
        config["unroll"] = True
    return config


def unrolled_copy(model: Any, names: set[str]) -> Any:
    """A copy of the model with the named recurrent layers unrolled (same weights, same outputs)."""
    from .tfcompat import import_tensorflow

    _, keras = import_tensorflow()

    def clone(layer: Any) -> Any:
        if layer.name not in names:
            return layer.__class__.from_config(layer.get_config())
        return layer.__class__.from_config(_set_unroll(layer.get_config()))

    return clone_with_weights(keras, model, clone)


def conv_recurrent_refusal(layers: list[dict[str, str]], mode: str, technique: str = "") -> str | None:
    """Why `mode` (converting for `technique`) cannot calibrate the first convolutional recurrent
    layer of `layers`, or None."""
    for layer in layers:
        if layer.get("class") in CONV_RECURRENT_CLASSES and mode in CALIBRATED_MODES:
            return (f"{technique or mode}: layer {layer['layer']!r} ({layer['class']}) cannot be "
                    f"calibrated: Keras cannot unroll a convolutional RNN and calibrating its loop "
                    f"crashes the TFLite converter; use dynamic or float16, which need no calibration")
    return None


def _check_fixed_steps(model: Any, layers: list[dict[str, str]]) -> None:
    if not layers:
        return
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        first = layers[0]
        raise TechniqueError(f"layer {first['layer']!r} ({first['class']}) must be unrolled to "
                             f"calibrate, which needs a fixed number of time steps, but the input "
                             f"shape is {shape}: re-save the model with a fixed sequence length, or "
                             f"use dynamic or float16")


def fixed_batch_function(model: Any) -> Any:
    """The model's forward pass as a concrete function whose inputs have batch dimension 1."""
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    specs = [tf.TensorSpec([1, *inp.shape[1:]], inp.dtype, name=inp.name.split(":")[0])
             for inp in model.inputs]
    if len(specs) == 1:
        return tf.function(lambda x: model(x, training=False)).get_concrete_function(specs[0])
    return tf.function(lambda *xs: model(list(xs), training=False)).get_concrete_function(*specs)


def keras_converter(model: Any, mode: str) -> tuple[Any, list[str]]:
    """A TFLiteConverter for `model` converted in `mode`, and notes on what was done to it.

    Models use `from_keras_model` (dynamic batch, so evaluation can batch), except those with
    recurrent layers or FIXED_BATCH_CLASSES: they go through a fixed-batch concrete function,
    recurrent layers unrolled where `mode` needs it.
    """
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    recurrent, fixed = recurrent_layers(model), fixed_batch_layers(model)
    if not recurrent and not fixed:
        return tf.lite.TFLiteConverter.from_keras_model(model), []
    why = []
    if recurrent:
        why.append(f"recurrent layer(s): {', '.join(layer['layer'] for layer in recurrent)}")
    if fixed:
        why.append(f"LiteRT cannot run {', '.join(fixed)} with a dynamic batch")
    notes = [f"converted through a concrete function with batch 1 ({'; '.join(why)}); the .tflite "
             f"takes one sample per invoke"]
    unroll = layers_to_unroll(model, mode)
    if reason := conv_recurrent_refusal(unroll, mode):
        raise TechniqueError(reason)
    _check_fixed_steps(model, unroll)
    if unroll:
        model = unrolled_copy(model, {layer["layer"] for layer in unroll})
        steps = model.inputs[0].shape[1]
        why = ("16x8 has no fused LSTM kernel" if mode == "int16x8"
               else "calibrating a rolled loop (GRU, SimpleRNN, or an LSTM fed a mask, which "
                    "is not fused) crashes the converter")
        notes.append(f"unrolled over {steps} time steps for {mode} ({why}): "
                     f"{', '.join(layer['layer'] for layer in unroll)}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fixed_batch_function(model)], model)
    return converter, notes


def input_dtype(model: Any) -> str:
    """The numpy name of the model's (first) input dtype, e.g. float32 or int32."""
    return np.dtype(model.inputs[0].dtype.as_numpy_dtype).name


# --- one post-training quantization mode --------------------------------------------------------

PTQ_MODES = ("float32", "dynamic", "float16", "int8-fallback", "int8-only", "uint8-only", "int16x8")


def representative_dataset(x: np.ndarray, dtype: str = "float32") -> Callable[[], Any]:
    """The calibration samples, one at a time and in the model input's dtype, as the converter
    expects (token ids into an Embedding are calibrated as int32, not float32)."""
    def generate() -> Any:
        for sample in x:
            yield [np.asarray(sample, dtype=dtype)[None]]
    return generate


WEIGHT_GRANULARITIES = ("per-channel", "per-tensor")


def representative_inputs(x: np.ndarray, inputs: list[dict]) -> Callable[[], Any]:
    """Calibration samples of a model with several inputs: one dict {input name: sample} each, the
    form the converter matches to the signature's inputs by name."""
    def generate() -> Any:
        for row in np.asarray(x).reshape(len(x), -1):
            yield {spec["name"]: row[spec["offset"]:spec["offset"] + spec["size"]]
                   .reshape(1, *spec["shape"]).astype(spec["dtype"]) for spec in inputs}
    return generate


def set_representative_data(converter: Any, calibration: np.ndarray | None, *, input_dtype: str,
                            inputs: list[dict] | None, refusal: str) -> None:
    """Give the converter the calibration samples (one dict by input name for several inputs), or
    refuse with `refusal` when there are none."""
    if calibration is None or len(calibration) == 0:
        raise TechniqueError(refusal)
    converter.representative_dataset = (representative_inputs(calibration, inputs) if inputs
                                         else representative_dataset(calibration, input_dtype))


def configure_converter(converter: Any, mode: str, calibration: np.ndarray | None, *,
                        weights: str = "per-channel", input_dtype: str = "float32",
                        inputs: list[dict] | None = None) -> Any:
    """Set a TFLiteConverter up for one post-training quantization mode.

    `weights="per-tensor"` gives each int8 kernel one scale instead of one per output channel, as
    some older DSP/NPU delegates require; it uses the converter's `_experimental_disable_per_channel`.
    """
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    if mode not in PTQ_MODES:
        raise TechniqueError(f"unknown conversion mode {mode!r}; use one of {', '.join(PTQ_MODES)}")
    if mode == "float32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in ("int8-fallback", "int8-only", "uint8-only", "int16x8"):
        set_representative_data(converter, calibration, input_dtype=input_dtype, inputs=inputs,
                                refusal=f"{mode} needs representative (calibration) data; "
                                        f"provide x_calib or x_train in the dataset")
    if weights not in WEIGHT_GRANULARITIES:
        raise TechniqueError(f"weights must be one of {', '.join(WEIGHT_GRANULARITIES)}, not {weights!r}")
    if weights == "per-tensor":
        converter._experimental_disable_per_channel = True
    if mode in ("int8-only", "uint8-only"):
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = tf.int8 if mode == "int8-only" else tf.uint8
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    if mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return converter
