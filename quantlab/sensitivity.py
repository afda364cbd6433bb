"""Worker-side TensorFlow work for the Lab page, and the `int8-selective` technique.

Three tasks, each a JSON-able payload in and a JSON-able dict out (see `run_task`):

- ``lab-extract``: every layer's weights, and every layer's output on the calibration split, saved
  once as .npz under cache/lab/ (paths from quantlab.lab) so the page works from numpy only;
- ``lab-evaluate``: test accuracy of the Keras model with fake-quantized weights (and optionally
  fake-quantized activations), quantized with quantlab.calibrate exactly as the page shows;
- ``lab-sensitivity``: TFLite's QuantizationDebugger on the int8 (float fallback) conversion: per
  layer, the RMSE between the float and the dequantized int8 output, divided by the output's scale.

Importing this module imports no TensorFlow (the parent process passes `run_task` to a worker pool);
every function that needs TensorFlow imports it through quantlab.tfcompat when called.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cache import ArtifactCache
from .calibrate import fake_quantize, find_ranges, quantize_rows
from .errors import ModelError, QuantLabError
from .keras_flatten import flat_layers
from .workloads import Dataset

Emit = Callable[[dict], None]

LAB_TASK_KINDS = ("lab-extract", "lab-evaluate", "lab-sensitivity")
# An activation with more values than this keeps fewer calibration samples (the count is recorded).
MAX_ACTIVATION_VALUES = 4_000_000
MIN_ACTIVATION_SAMPLES = 16
EVALUATE_BATCH = 500
# Keras kernels whose per-channel axis is not the last one (TFLite quantizes per output channel).
CHANNEL_AXIS_BY_CLASS = {"DepthwiseConv2D": -2, "Conv2DTranspose": -2, "Conv3DTranspose": -2}


def run_task(payload: dict, emit: Emit, shared_lock: Any = None) -> dict:
    """Entry point for pool workers running Lab tasks."""
    kind = payload.get("kind")
    if kind == "lab-extract":
        return extract_tensors(payload, emit)
    if kind == "lab-evaluate":
        return evaluate_fake_quant(payload, emit)
    if kind == "lab-sensitivity":
        return layer_sensitivity(payload, emit)
    raise ValueError(f"unknown lab task kind {kind!r}; use one of {', '.join(LAB_TASK_KINDS)}")


# --- loading ------------------------------------------------------------------------------------


def load_model(manifest: dict) -> Any:
    """A fresh copy of the workload's tf_keras model (fresh: evaluation changes its weights)."""
    from .tfcompat import import_tensorflow

    if manifest.get("model_kind") != "keras":
        raise ModelError(f"{manifest.get('model_name')} is not a tf_keras model "
                         f"({manifest.get('model_kind')}); the Lab reads layers from tf_keras models only")
    _, tf_keras = import_tensorflow()
    return tf_keras.models.load_model(manifest["model_path"], compile=False)


def load_dataset(manifest: dict) -> Dataset:
    return Dataset.load(Path(manifest["dataset_path"]))


def channel_axis(layer: Any, weight: np.ndarray) -> int:
    return CHANNEL_AXIS_BY_CLASS.get(layer.__class__.__name__, -1) if weight.ndim >= 2 else -1


def is_quantized_weight(weight: np.ndarray) -> bool:
    """Kernels (2 or more axes) are quantized; biases and batch-norm vectors stay float, as in TFLite."""
    return weight.ndim >= 2


FOLDABLE_CLASSES = ("Conv2D", "DepthwiseConv2D", "Dense")


def batch_norm_followers(model: Any) -> dict[str, Any]:
    """{layer name: BatchNormalization layer} for every Conv2D/DepthwiseConv2D/Dense with no activation
    of its own whose output goes to a batch norm and nowhere else: the pairs TFLite's converter folds
    into one kernel (it does not fold across an activation)."""
    pairs = {}
    for layer in flat_layers(model):
        if layer.__class__.__name__ != "BatchNormalization":
            continue
        try:  # tf_keras graph internals: a model it cannot read is simply not folded
            producers = layer._inbound_nodes[0].inbound_layers
            producer = producers[0] if isinstance(producers, (list, tuple)) else producers
            consumers = len(producer._outbound_nodes)
        except (AttributeError, IndexError, TypeError):
            continue
        activation = getattr(getattr(producer, "activation", None), "__name__", "linear")
        if producer.__class__.__name__ in FOLDABLE_CLASSES and consumers == 1 and activation == "linear":
            pairs[producer.name] = layer
    return pairs


def batch_norm_scale(batch_norm: Any) -> np.ndarray:
    """gamma / sqrt(moving variance + epsilon): what folding multiplies each output channel by."""
    variance = np.asarray(batch_norm.moving_variance.numpy(), dtype=np.float64)
    gamma = (np.asarray(batch_norm.gamma.numpy(), dtype=np.float64) if batch_norm.scale
             else np.ones_like(variance))
    return gamma / np.sqrt(variance + batch_norm.epsilon)


def _fold_factor(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The batch norm's per-channel scale shaped to multiply `kernel` (zero scales left unfolded).

    The output channels are the last axis (Conv2D, Dense) or the last two (DepthwiseConv2D: input
    channel x depth multiplier, channel = input * multiplier + m)."""
    factor = np.where(np.abs(scale) > 1e-12, scale, 1.0)
    if kernel.shape[-1] == factor.size:
        return factor.reshape((1,) * (kernel.ndim - 1) + (-1,))
    if kernel.ndim >= 2 and kernel.shape[-2] * kernel.shape[-1] == factor.size:
        return factor.reshape((1,) * (kernel.ndim - 2) + kernel.shape[-2:])
    raise ValueError(f"a batch norm over {factor.size} channels does not follow a kernel of shape "
                     f"{kernel.shape}")


def fold_kernel(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The kernel TFLite quantizes: this one times the batch norm's scale per output channel."""
    return (kernel.astype(np.float64) * _fold_factor(kernel, scale)).astype(np.float32)


def fold_quantize(kernel: np.ndarray, scale: np.ndarray, config: Any) -> np.ndarray:
    """Quantize the folded kernel (kernel x scale per output channel), then divide the scale back out.

    The layer then feeds its batch norm exactly what the folded, quantized kernel would produce, so
    the model keeps its structure.
    """
    factor = _fold_factor(kernel, scale)
    folded = kernel.astype(np.float64) * factor
    return (fake_quantize(folded, config).values / factor).astype(kernel.dtype)


def weight_name(variable: Any) -> str:
    return str(variable.name).split("/")[-1].split(":")[0]


# --- running the graph with a hook ----------------------------------------------------------------


def forward(model: Any, x: np.ndarray, on_output: Callable[[str, np.ndarray], np.ndarray | None]
            ) -> np.ndarray:
    """Run `model` on `x` layer by layer (eagerly), passing every layer's output through `on_output`.

    `on_output(name, value)` sees the model input (under the input layer's name) and each layer's
    output, and returns the value to feed on (or None to leave it). This mirrors tf_keras's own
    Functional._run_internal_graph, so the result equals model(x) when on_output changes nothing.
    """
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    if not hasattr(model, "_nodes_by_depth"):
        raise ModelError(f"{model.name} has no layer graph (a subclassed model); the Lab needs a "
                         f"Sequential or Functional tf_keras model")

    def hook(name: str, value: Any) -> Any:
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        changed = on_output(name, array)
        return tf.constant(array if changed is None else np.asarray(changed, dtype=array.dtype))

    usage = model._tensor_usage_count
    tensors: dict[str, list[Any]] = {}
    if len(model.inputs) != 1:
        raise ModelError(f"{model.name} has {len(model.inputs)} inputs; the Lab handles one-input models")
    reference = model.inputs[0]
    input_name = reference.name.split(":")[0] if getattr(reference, "name", None) else "input"
    tensors[str(id(reference))] = [hook(input_name, np.asarray(x, dtype=np.float32))] * usage[str(id(reference))]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            outputs = tf.nest.flatten(node.layer(*args, **kwargs))
            for index, (tensor_id, value) in enumerate(zip(node.flat_output_ids, outputs)):
                name = node.layer.name if len(outputs) == 1 else f"{node.layer.name}:{index}"
                tensors[tensor_id] = [hook(name, value)] * usage[tensor_id]
    return np.asarray(tensors[str(id(model.outputs[0]))].pop(), dtype=np.float32)


def forward_batched(model: Any, x: np.ndarray, on_output: Callable[[str, np.ndarray], np.ndarray | None],
                    batch: int = EVALUATE_BATCH) -> np.ndarray:
    parts = [forward(model, x[start:start + batch], on_output) for start in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


# --- extract ------------------------------------------------------------------------------------


def extract_tensors(payload: dict, emit: Emit) -> dict:
    """Save the workload's weights and its activations on the calibration split as .npz files."""
    from . import lab_files as lab

    manifest = payload["manifest"]
    cache = ArtifactCache(Path(payload["cache_dir"]))
    emit({"stage": "lab", "message": "loading the model"})
    model = load_model(manifest)
    dataset = load_dataset(manifest)

    weights, weight_meta = {}, []
    for layer in flat_layers(model):
        for variable, value in zip(layer.weights, layer.get_weights()):
            value = np.asarray(value, dtype=np.float32)
            key = f"t{len(weight_meta)}"
            weights[key] = value
            weight_meta.append({
                "key": key, "name": f"{layer.name}/{weight_name(variable)}", "layer": layer.name,
                "layer_class": layer.__class__.__name__, "kind": "weight", "role": weight_name(variable),
                "shape": list(value.shape), "size": int(value.size), "channel_axis": channel_axis(layer, value),
                "quantized": is_quantized_weight(value), "trainable": bool(variable.trainable),
            })
    for name, batch_norm in batch_norm_followers(model).items():  # what TFLite really quantizes
        kernel_meta = next(m for m in weight_meta if m["layer"] == name and m["quantized"])
        folded = fold_kernel(weights[kernel_meta["key"]], batch_norm_scale(batch_norm))
        key = f"t{len(weight_meta)}"
        weights[key] = folded
        weight_meta.append({**kernel_meta, "key": key, "role": lab.FOLDED_ROLE, "trainable": False,
                            "name": f"{kernel_meta['name']} folded with {batch_norm.name}"})
    emit({"stage": "lab", "message": "running the calibration split through the model"})
    classes = {layer.name: layer.__class__.__name__ for layer in flat_layers(model)}
    activations, activation_meta = {}, []
    calibration = np.asarray(dataset.x_calib, dtype=np.float32)

    def keep(name: str, value: np.ndarray) -> None:
        per_sample = max(1, int(np.prod(value.shape[1:], dtype=np.int64)))
        samples = len(value)
        if value.size > MAX_ACTIVATION_VALUES:
            samples = max(MIN_ACTIVATION_SAMPLES, MAX_ACTIVATION_VALUES // per_sample)
        key = f"t{len(activation_meta)}"
        kept = np.ascontiguousarray(value[:samples], dtype=np.float32)
        activations[key] = kept
        activation_meta.append({
            "key": key, "name": name, "layer": name, "layer_class": classes.get(name, "Input"),
            "kind": "activation", "role": "output", "shape": list(kept.shape), "size": int(kept.size),
            "channel_axis": -1, "quantized": True, "samples": int(samples), "calibration_samples": len(value),
        })

    forward(model, calibration, keep)
    weights_file = lab.weights_path(cache, manifest)
    activations_file = lab.activations_path(cache, manifest)
    lab.save_tensors(weights_file, weights, weight_meta, manifest)
    lab.save_tensors(activations_file, activations, activation_meta, manifest)
    return {"weights_path": str(weights_file), "activations_path": str(activations_file),
            "weights": weight_meta, "activations": activation_meta}


# --- fake-quantized evaluation --------------------------------------------------------------------


def evaluate_fake_quant(payload: dict, emit: Emit) -> dict:
    """Accuracy on the test split with every kernel fake-quantized at its layer's bit width.

    Kernels are quantized with the request's settings (quantlab.calibrate.fake_quantize); biases and
    batch-norm vectors stay float. A kernel followed only by a batch norm is folded first, as TFLite
    does (`fold_quantize`): its quantization grid is that of the folded kernel. With `activations`, the model input and every layer's output are
    fake-quantized per tensor with ranges the request's calibrator finds on the float activations of
    the calibration split, the way TFLite calibrates.
    """
    from .lab_files import FakeQuantRequest
    from .measure import accuracy, agreement

    manifest = payload["manifest"]
    request = FakeQuantRequest.from_dict(payload["request"])
    started = time.perf_counter()
    model = load_model(manifest)
    dataset = load_dataset(manifest)
    x_test = np.asarray(dataset.x_test, dtype=np.float32)
    emit({"stage": "lab", "message": "float reference on the test split"})
    float_outputs = forward_batched(model, x_test, lambda name, value: None)

    layers = {layer.name: layer for layer in flat_layers(model)}
    unknown = sorted(set(request.weight_bits) - set(layers))
    if unknown:
        raise QuantLabError(f"the model has no layer {unknown[0]!r}; pick bit widths for its own layers")
    followers = batch_norm_followers(model)
    quantized_layers, folded_layers = [], []
    for name, bits in request.weight_bits.items():
        if int(bits) >= 32:
            continue
        layer = layers[name]
        values = layer.get_weights()
        changed = False
        for index, value in enumerate(values):
            if not is_quantized_weight(value):
                continue
            config = request.weight_config(int(bits), channel_axis(layer, value))
            if name in followers and index == 0:
                values[index] = fold_quantize(value, batch_norm_scale(followers[name]), config)
                folded_layers.append(name)
            else:
                values[index] = fake_quantize(value, config).values.astype(value.dtype)
            changed = True
        if changed:
            layer.set_weights(values)
            quantized_layers.append(name)

    ranges: dict[str, tuple[float, float]] = {}
    if request.activations:
        emit({"stage": "lab", "message": "activation ranges from the calibration split"})
        config = request.activation_config()

        def record(name: str, value: np.ndarray) -> None:
            low, high = find_ranges(value.astype(np.float64).reshape(1, -1), config.calibrator,
                                    bits=config.bits, symmetric=config.symmetric,
                                    percentile=config.percentile)
            ranges[name] = (float(low[0]), float(high[0]))

        forward(model, np.asarray(dataset.x_calib, dtype=np.float32), record)

        def quantize(name: str, value: np.ndarray) -> np.ndarray | None:
            if name not in ranges:
                return None
            low, high = ranges[name]
            rows = value.astype(np.float64).reshape(1, -1)
            out = quantize_rows(rows, np.array([low]), np.array([high]), config.bits, config.symmetric)
            return out.reshape(value.shape)

        hook: Callable[[str, np.ndarray], np.ndarray | None] = quantize
    else:
        hook = lambda name, value: None  # noqa: E731
    emit({"stage": "lab", "message": "evaluating the fake-quantized model"})
    outputs = forward_batched(model, x_test, hook)
    return {
        # without labels y_test is a placeholder: no accuracy (the tiles show agreement and "no labels")
        "accuracy": accuracy(outputs, dataset.y_test) if dataset.has_labels else None,
        "float_accuracy": accuracy(float_outputs, dataset.y_test) if dataset.has_labels else None,
        "agreement": agreement(outputs, float_outputs),
        "test_samples": int(len(x_test)),
        "quantized_layers": quantized_layers,
        "folded_layers": folded_layers,
        "activation_ranges": {k: list(v) for k, v in ranges.items()},
        "request": request.to_dict(),
        "seconds": time.perf_counter() - started,
    }


# --- per-layer sensitivity (TFLite's QuantizationDebugger) ----------------------------------------


def make_debugger(converter: Any, calibration: np.ndarray, input_dtype: str = "float32",
                  inputs: list[dict] | None = None, input_order: list[str] | None = None) -> Any:
    """A QuantizationDebugger on the int8 (float fallback) conversion of `converter`'s model, fed
    one calibration sample at a time in the input's dtype, as the converter is calibrated.

    A model with several inputs (`inputs`: the packed layout, see uploads.model_io_plan) is
    calibrated by input name; the debugger itself feeds inputs by position, in `input_order` (the
    .tflite's input names, in its order)."""
    from .keras_convert import configure_converter, representative_dataset, representative_inputs
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    configure_converter(converter, "int8-fallback", calibration, input_dtype=input_dtype, inputs=inputs)
    if inputs:
        named = representative_inputs(calibration, inputs)
        order = input_order or [spec["name"] for spec in inputs]

        def positional() -> Any:
            for sample in named():
                yield [sample[name] for name in order]
        return tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=positional)
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative_dataset(calibration, input_dtype))


def tflite_input_order(data: bytes, names: list[str]) -> list[str]:
    """The Keras input names in the order of the .tflite's input tensors (`serving_default_<name>:0`)."""
    from ai_edge_litert.interpreter import Interpreter

    order = []
    for detail in Interpreter(model_content=data).get_input_details():
        tensor = detail["name"].removeprefix("serving_default_").split(":")[0]
        match = next((n for n in names if n == tensor), None)
        if match is None:
            raise ModelError(f"cannot tell which model input the .tflite input {detail['name']!r} is; "
                             f"name the model's inputs (keras.Input(name=...))")
        order.append(match)
    return order


def debugger_layers(debugger: Any) -> list[dict]:
    """Run the debugger; one dict per quantized layer output, in graph order, with rmse/scale.

    rmse/scale = sqrt(mean squared error between the float and the dequantized output) / the output's
    quantization scale: about 1/sqrt(12) = 0.29 for pure rounding error, more when clipping or
    accumulated error adds to it (TensorFlow's "Inspecting Quantization Errors" guide).
    """
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    layers = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"])
        mse = float(row["mean_squared_error"])
        rmse_scale = math.sqrt(mse) / scale if scale > 0 and mse >= 0 else math.nan
        layers.append({
            "op_name": row["op_name"], "tensor_idx": int(row["tensor_idx"]), "tensor_name": row["tensor_name"],
            "scale": scale, "zero_point": int(float(row["zero_point"])), "mean_squared_error": mse,
            "rmse_scale": rmse_scale if math.isfinite(rmse_scale) else None,
            "mean_error": float(row["mean_error"]), "max_abs_error": float(row["max_abs_error"]),
            "stddev": float(row["stddev"]), "num_elements": float(row["num_elements"]),
        })
    return layers


def rank_layers(layers: list[dict]) -> list[str]:
    """Tensor names, most sensitive (largest rmse/scale) first; layers without a value are left out."""
    scored = [(layer["rmse_scale"], -index, layer["tensor_name"]) for index, layer in enumerate(layers)
              if layer.get("rmse_scale") is not None]
    return [name for _, _, name in sorted(scored, reverse=True)]


def converter_for(manifest: dict) -> Any:
    """The int8 (float fallback) converter of the workload's model (see keras_convert)."""
    from .keras_convert import keras_converter
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    if manifest.get("model_kind") == "savedmodel":
        return tf.lite.TFLiteConverter.from_saved_model(manifest["model_path"])
    return keras_converter(load_model(manifest), "int8-fallback")[0]


def layer_sensitivity(payload: dict, emit: Emit) -> dict:
    """Per-layer rmse/scale of the int8 (float fallback) conversion, measured on the calibration split."""
    from .tfcompat import library_versions

    manifest = payload["manifest"]
    started = time.perf_counter()
    dataset = load_dataset(manifest)
    emit({"stage": "lab", "message": "running TFLite's quantization debugger"})
    layers = debugger_layers(make_debugger(converter_for(manifest), dataset.x_calib,
                                           manifest.get("input_dtype") or "float32"))
    return {"layers": layers, "ranking": rank_layers(layers), "conversion": "int8-fallback",
            "calibration_samples": int(len(dataset.x_calib)), "versions": library_versions(),
            "model_hash": manifest["model_hash"], "dataset_hash": manifest["dataset_hash"],
            "seconds": time.perf_counter() - started}


def produce_selective(context: Any, keep_float: int) -> tuple[bytes, dict]:
    """The int8 (float fallback) model with the `keep_float` most sensitive layers denylisted (float).

    The ranking comes from the QuantizationDebugger on the calibration split; the denylisted layers
    are the tensor names it reports, which is what QuantizationDebugOptions(denylisted_nodes=...)
    takes.
    """
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    calibration = context.dataset.x_calib
    inputs = (context.manifest.get("io") or {}).get("inputs")
    order = None
    if inputs:   # the debugger feeds by position: learn the .tflite's input order from a float conversion
        float_converter, _ = context.make_converter(None, "float32")
        order = tflite_input_order(float_converter.convert(), [spec["name"] for spec in inputs])
    converter, notes = context.make_converter(None, "int8-fallback")
    debugger = make_debugger(converter, calibration, context.manifest.get("input_dtype") or "float32",
                             inputs=inputs, input_order=order)
    layers = debugger_layers(debugger)
    ranking = rank_layers(layers)
    kept = ranking[:max(0, int(keep_float))]
    try:
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=kept or None)
    except ValueError:
        # With every layer denylisted no debug (NumericVerify) op is left and the debugger refuses to
        # re-initialise its statistics; the options are stored before that, and the non-debug model
        # below does not need the statistics.
        if len(kept) < len(ranking):
            raise
    model = debugger.get_nondebug_quantized_model()
    by_name = {layer["tensor_name"]: layer for layer in layers}
    details = {
        "conversion": f"int8-fallback with the {len(kept)} most sensitive layer(s) kept in float "
                      f"(QuantizationDebugger rmse/scale on {len(calibration)} calibration samples)",
        "kept_float": [{"tensor_name": name, "op_name": by_name[name]["op_name"],
                        "rmse_scale": by_name[name]["rmse_scale"]} for name in kept],
        "sensitivity": layers,
    }
    if notes:
        details["conversion_notes"] = notes
    return model, details
