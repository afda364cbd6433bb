"""The LiteRT Quantizer family: int4 and int8 weights (weight-only or dynamic), static w8a8 / w8a16 /
w4a8, and any recipe JSON, applied to the float32 .tflite of the model (litert-quantizer 0.11).

A recipe is the quantizer's own JSON: a list of rules `{regex, operation, algorithm_key, op_config}`
matched on op output tensor names, the later rule winning. Building and checking a recipe imports no
TensorFlow (the quantizer needs none); quantizing runs in a worker, on the float32 conversion that is
converted once per model and cached.

Measured on a small conv + dense model with the quantizer 0.11 (probe kept in the tests): blockwise
granularity applies to dynamic recipes on fully connected (and embedding) ops only, and needs the
input dimension to divide by the block size; gptq and hadamard quantize fully connected ops only
(convolutions stay float under them); min_max and octav quantize both.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import TechniqueError
from .techniques import BuildContext, Param, Produced, Technique

QUANTIZER_PACKAGE = "litert-quantizer"
GRANULARITIES = {"channel": "CHANNELWISE", "tensor": "TENSORWISE", "block32": "BLOCKWISE_32",
                 "block64": "BLOCKWISE_64", "block128": "BLOCKWISE_128", "block256": "BLOCKWISE_256"}
ALGORITHMS = {"min_max": "min_max_uniform_quantize", "octav": "OCTAV", "gptq": "GPTQ",
              "hadamard": "HADAMARD_ROTATION"}
FULLY_CONNECTED_ONLY = {"gptq", "hadamard"}
NO_QUANTIZE = "no_quantize"
INTEGER_TYPES = {"INT4", "INT8", "INT16", "UINT8"}
PLUMBING_OPS = {"QUANTIZE", "DEQUANTIZE"}
VALIDATION_SAMPLES = 16
MAX_RECIPE_BYTES = 1 << 20
ALL_OPS = "*"


@dataclass(frozen=True)
class Scheme:
    """What one lq technique asks the quantizer for."""

    kind: str                    # weight_only | dynamic | static
    weight_bits: int
    activation_bits: int | None = None

    @property
    def calibrated(self) -> bool:
        return self.kind == "static"


SCHEMES = {
    "lq-int8-weight-only": Scheme("weight_only", 8),
    "lq-int4-weight-only": Scheme("weight_only", 4),
    "lq-int4-dynamic": Scheme("dynamic", 4),
    "lq-w8a8": Scheme("static", 8, 8),
    "lq-w8a16": Scheme("static", 8, 16),
    "lq-w4a8": Scheme("static", 4, 8),
}


# --- recipes (no TensorFlow, no quantizer import) -------------------------------------------------


def op_config(scheme: Scheme, granularity: str) -> dict[str, Any]:
    """The quantizer's op_config for a scheme, as its recipe JSON spells it."""
    weights = {"num_bits": scheme.weight_bits, "symmetric": True,
               "granularity": GRANULARITIES[granularity], "dtype": "INT"}
    config: dict[str, Any] = {"weight_tensor_config": weights, "compute_precision": "INTEGER",
                              "explicit_dequantize": False, "skip_checks": False,
                              "min_weight_elements": 0}
    if scheme.kind == "weight_only":
        config.update(compute_precision="FLOAT", explicit_dequantize=True)
    if scheme.kind == "static":
        config["activation_tensor_config"] = {"num_bits": scheme.activation_bits,
                                              "symmetric": scheme.activation_bits == 16,
                                              "granularity": "TENSORWISE", "dtype": "INT"}
    return config


def rule(regex: str, config: Mapping[str, Any] | None, algorithm: str = "min_max") -> dict[str, Any]:
    """One recipe rule; `config=None` keeps the matching ops float."""
    if config is None:
        return {"regex": regex, "operation": ALL_OPS, "algorithm_key": NO_QUANTIZE,
                "op_config": {"compute_precision": "FLOAT", "explicit_dequantize": False,
                              "skip_checks": False, "min_weight_elements": 0}}
    return {"regex": regex, "operation": ALL_OPS, "algorithm_key": ALGORITHMS[algorithm],
            "op_config": dict(config)}


def check_scheme_params(technique_id: str, params: Mapping[str, Any]) -> None:
    """Refuse, before any work, a granularity the scheme's ops cannot take."""
    scheme = SCHEMES[technique_id]
    granularity = params.get("granularity", "channel")
    if granularity.startswith("block") and scheme.kind != "dynamic":
        raise TechniqueError(f"{technique_id}: {granularity} granularity applies to dynamic recipes "
                             f"on fully connected and embedding ops only (LiteRT Quantizer 0.11); "
                             f"use lq-int4-dynamic:granularity={granularity}, or channel / tensor")


def scheme_recipe(technique_id: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The recipe an lq technique stands for: one rule over every supported op."""
    check_scheme_params(technique_id, params)
    config = op_config(SCHEMES[technique_id], params.get("granularity", "channel"))
    return [rule(".*", config, params.get("algorithm", "min_max"))]


def layer_regex(layer: str) -> str:
    """A regex matching the op output tensors of one Keras layer (`model/<layer>/...`), and not
    those of a layer whose name merely starts the same (`dense` is not `dense_1`)."""
    return rf"(^|/){re.escape(layer)}(/|;|$)"


def mixed_precision_recipe(weight_bits: Mapping[str, int], default_bits: int = 8,
                           activation_bits: int | None = None,
                           algorithm: str = "min_max") -> tuple[list[dict[str, Any]], list[str]]:
    """The Lab's per-layer bit widths (32 = float) as a recipe, and notes on what was adapted.

    The quantizer takes 2, 4, 8 or 16 weight bits: a Lab width between those is rounded up (more
    bits, never fewer), which the notes say. Without activations the rules are weight-only, so the
    ops compute in float on dequantized weights, as the Lab's fake quantization does; with
    `activation_bits` they are static (calibrated) rules.
    """
    notes: list[str] = []

    def supported(bits: int, layer: str) -> int:
        chosen = next(b for b in (2, 4, 8, 16) if b >= bits)
        if chosen != bits:
            notes.append(f"{layer}: {bits} bits rounded up to {chosen} (the quantizer takes 2, 4, 8 or 16)")
        return chosen

    def config(bits: int) -> dict[str, Any]:
        if activation_bits:
            return op_config(Scheme("static", bits, activation_bits), "channel")
        return op_config(Scheme("weight_only", bits), "channel")

    rules = [rule(".*", config(supported(default_bits, "every other layer")), algorithm)]
    for layer, bits in sorted(weight_bits.items()):
        if int(bits) >= 32:
            rules.append(rule(layer_regex(layer), None))
        elif int(bits) != default_bits:
            rules.append(rule(layer_regex(layer), config(supported(int(bits), layer)), algorithm))
    return rules, notes


def scope_regex(tensor_name: str) -> str:
    """A regex for the op behind a TFLite tensor name: its layer when the name carries one
    (`sequential/conv2d/Relu;...`), else the exact name (`StatefulPartitionedCall:0`)."""
    first = tensor_name.split(";")[0]
    if first.count("/") >= 2:
        return layer_regex(layer_of(first))
    return rf"(?:^|;){re.escape(first)};"


def keep_float_recipe(tensor_names: Iterable[str], technique_id: str = "lq-w8a8") -> list[dict[str, Any]]:
    """A scheme over every op, with the ops behind `tensor_names` (the Lab's most sensitive layers)
    kept float by no_quantize rules after it."""
    rules = scheme_recipe(technique_id, {})
    return rules + [rule(scope_regex(name), None) for name in dict.fromkeys(tensor_names)]


def canonical_recipe(recipe: Any) -> str:
    """A recipe as compact, key-sorted JSON text: equal recipes give equal text (and cache keys)."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def read_recipe(value: Any) -> str:
    """A recipe given as JSON text or as the path of a .json file, checked, as canonical JSON."""
    text = str(value or "").strip()
    if not text:
        raise TechniqueError("lq-recipe needs a recipe: lq-recipe:recipe=path/to/recipe.json (a "
                             "LiteRT Quantizer recipe, a JSON list of rules)")
    if not text.startswith(("[", "{")):
        path = Path(text).expanduser()
        try:
            if path.stat().st_size > MAX_RECIPE_BYTES:
                raise TechniqueError(f"lq-recipe: {path} is larger than 1 MB; a recipe is a short list "
                                     f"of rules")
            text = path.read_text()
        except OSError as error:
            raise TechniqueError(f"lq-recipe: cannot read {path} ({error.strerror or error}); give the "
                                 f"path of a recipe .json file") from None
    try:
        recipe = json.loads(text)
    except ValueError as error:
        raise TechniqueError(f"lq-recipe: the recipe is not JSON ({error}); write it as the quantizer "
                             f"saves it: a list of {{regex, operation, algorithm_key, op_config}}") from None
    check_recipe(recipe)
    return canonical_recipe(recipe)


def check_recipe(recipe: Any) -> None:
    """A recipe the quantizer will accept: a non-empty list of rules with known algorithms."""
    if isinstance(recipe, dict):
        raise TechniqueError("lq-recipe: the recipe is one object; a recipe is a list of rules, "
                             "[{regex, operation, algorithm_key, op_config}, ...]")
    if not isinstance(recipe, list) or not recipe:
        raise TechniqueError("lq-recipe: the recipe must be a non-empty list of rules")
    known = set(ALGORITHMS.values()) | {NO_QUANTIZE, "float_casting", "MSE", "OSCAR",
                                        "DECOMPOSED_HADAMARD_ROTATION", "dequantized_weight_recovery"}
    for index, item in enumerate(recipe):
        missing = [k for k in ("regex", "operation", "algorithm_key", "op_config")
                   if not isinstance(item, dict) or k not in item]
        if missing:
            raise TechniqueError(f"lq-recipe: rule {index} has no {missing[0]!r}; each rule needs "
                                 f"regex, operation, algorithm_key and op_config")
        if item["algorithm_key"] not in known:
            raise TechniqueError(f"lq-recipe: rule {index} asks for algorithm "
                                 f"{item['algorithm_key']!r}; use one of {', '.join(sorted(known))}")
        try:
            re.compile(str(item["regex"]))
        except re.error as error:
            raise TechniqueError(f"lq-recipe: rule {index} has an invalid regex ({error})") from None


def _recipe_needs_calibration(recipe: list[dict[str, Any]]) -> bool:
    """Whether a rule quantizes activations (static) or runs an algorithm that calibrates (gptq)."""
    return any("activation_tensor_config" in (r.get("op_config") or {}) or r.get("algorithm_key") == "GPTQ"
               for r in recipe)


def recipe_of(technique_id: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    if technique_id == "lq-recipe":
        return json.loads(read_recipe(params.get("recipe")))
    return scheme_recipe(technique_id, params)


# --- the model: its float32 conversion, its ops ---------------------------------------------------


def float_tflite(context: BuildContext, calibrated: bool = False) -> tuple[bytes, list[str]]:
    """The float32 .tflite the recipes apply to (the upload itself, or the model's conversion,
    converted once per model, layout and engine version and kept in the cache), and notes on how.

    For a calibrated recipe the model is laid out as the converter's calibrated modes lay it out:
    GRU and SimpleRNN layers unrolled, since calibrating through a rolled WHILE loop fails (measured:
    the quantizer's calibration reads "Tensor data is null" inside the loop)."""
    from .config import ENGINE_VERSION, content_hash
    from .ptq import converter_failure

    manifest = context.manifest
    if manifest.get("model_kind") == "tflite":
        data = Path(manifest["model_path"]).read_bytes()
        if not is_float_model(data):
            raise TechniqueError(f"{manifest.get('model_name', 'the model')} is already quantized; the "
                                 f"LiteRT Quantizer starts from a float .tflite: upload the float model")
        return data, []
    layout = "int8-fallback" if calibrated else "float32"    # the converter's layout, no quantization
    key = content_hash({"engine": ENGINE_VERSION, "model": manifest["model_hash"], "conversion": "float32",
                        "layout": layout})
    notes_key = f"float32-{key}"
    path = context.cache.path("models", notes_key, ".tflite") if context.cache else None
    if path is not None and path.exists():
        return path.read_bytes(), list((context.cache.read_json("models", notes_key) or {}).get("notes", []))
    converter, notes = context.make_converter(None, layout)
    try:
        data = converter.convert()
    except Exception as error:  # noqa: BLE001 - ConverterError, ValueError, RuntimeError...
        raise converter_failure("float32", error) from None
    if path is not None:
        context.cache.write_json("models", notes_key, {"notes": notes})
        context.cache.write_bytes("models", notes_key, ".tflite", data)
    return data, notes


def _read_model(data: bytes) -> Any:
    from litert_quantizer.utils import tfl_flatbuffer_utils

    return tfl_flatbuffer_utils.read_model(bytes(data))


def _type_names() -> dict[int, str]:
    from litert_quantizer.utils import tfl_flatbuffer_utils

    return {code: name for code, name in tfl_flatbuffer_utils.TENSOR_CODE_TO_TYPE.items()
            if isinstance(code, int)}


def tensor_type_counts(data: bytes) -> dict[str, int]:
    """How many tensors of each type the .tflite holds (INT4 where weights are 4-bit)."""
    names = _type_names()
    counts: dict[str, int] = {}
    for subgraph in _read_model(data).subgraphs:
        for tensor in subgraph.tensors:
            name = names.get(tensor.type, str(tensor.type))
            counts[name] = counts.get(name, 0) + 1
    return counts


def is_float_model(data: bytes) -> bool:
    return not set(tensor_type_counts(data)) & INTEGER_TYPES


def _op_names(model: Any) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    builtin = {value: name for name, value in vars(schema.BuiltinOperator).items()
               if isinstance(value, int) and not name.startswith("_")}
    names = []
    for code in model.operatorCodes:
        number = max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))
        names.append(builtin.get(number, str(number)))
    return names


def op_outputs(data: bytes) -> list[dict[str, Any]]:
    """Each compute op's output tensor name (what recipe regexes match) and the Keras layer it belongs
    to. The model's output op is named after the signature (`StatefulPartitionedCall:0`), not its
    layer: its layer is read from the weights it takes (`sequential/dense_1/MatMul`)."""
    from litert_quantizer.utils import tfl_flatbuffer_utils

    model = _read_model(data)
    names = _op_names(model)
    found = []
    for subgraph in model.subgraphs:
        tensor_names = [tfl_flatbuffer_utils.get_tensor_name(t) for t in subgraph.tensors]
        activations = {int(t) for op in subgraph.operators for t in op.outputs} | \
            {int(t) for t in subgraph.inputs}
        for op in subgraph.operators:
            if names[op.opcodeIndex] in PLUMBING_OPS or not len(op.outputs):
                continue
            output = tensor_names[op.outputs[0]]
            weights = [tensor_names[t] for t in op.inputs if int(t) >= 0 and int(t) not in activations]
            layer = layer_of(output) if "/" in output else next(
                (layer_of(name) for name in weights if name.count("/") >= 2), output)
            found.append({"op": names[op.opcodeIndex], "output": output, "layer": layer})
    return found


def bind_layer_rules(recipe: list[dict[str, Any]], float_model: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """The recipe with each layer rule also matching that layer's op when the op's output is not named
    after the layer (the model's last op), and notes saying which rules were widened. The quantizer
    matches a rule on the op's scope: its output names, each followed by `;`."""
    ops = op_outputs(float_model)
    bound, notes = [], []
    for index, item in enumerate(recipe):
        pattern = re.compile(str(item["regex"]))
        missed = [op["output"] for op in ops
                  if not pattern.search(op["output"]) and pattern.search(f"/{op['layer']}/")]
        if missed and item["regex"] not in (".*", ""):
            item = {**item, "regex": f"(?:{item['regex']})|" + "|".join(f"(?:^|;){re.escape(m)};" for m in missed)}
            notes.append(f"rule {index} ({recipe[index]['regex']}) also matches {', '.join(missed)}: the op "
                         f"of that layer is named after the model's output")
        bound.append(item)
    return bound, notes


def op_coverage(data: bytes) -> dict[str, Any]:
    """Which compute ops of a quantized .tflite run on integer weights or activations, by op type.

    An op counts as quantized when one of its tensors is integer (int4/int8/int16) or it reads a
    constant weight through a DEQUANTIZE (weight-only); an op reading a dequantized activation is
    float. QUANTIZE / DEQUANTIZE themselves are not counted.
    """
    model = _read_model(data)
    names, types = _op_names(model), _type_names()
    by_type: dict[str, dict[str, int]] = {}
    for subgraph in model.subgraphs:
        produced_by = {}
        for op in subgraph.operators:
            for tensor in op.outputs:
                produced_by[int(tensor)] = names[op.opcodeIndex]
        activations = set(produced_by) | {int(t) for t in subgraph.inputs}
        dequantized = {int(op.outputs[0]) for op in subgraph.operators      # weight-only weights
                       if names[op.opcodeIndex] == "DEQUANTIZE" and int(op.inputs[0]) not in activations
                       and types.get(subgraph.tensors[op.inputs[0]].type) in INTEGER_TYPES}
        for op in subgraph.operators:
            name = names[op.opcodeIndex]
            if name in PLUMBING_OPS:
                continue
            tensors = [int(t) for t in list(op.inputs) + list(op.outputs) if int(t) >= 0]
            quantized = any(types.get(subgraph.tensors[t].type) in INTEGER_TYPES for t in tensors) or \
                any(t in dequantized for t in tensors)
            entry = by_type.setdefault(name, {"quantized": 0, "total": 0})
            entry["total"] += 1
            entry["quantized"] += int(quantized)
    quantized = sum(e["quantized"] for e in by_type.values())
    total = sum(e["total"] for e in by_type.values())
    return {"quantized_ops": quantized, "total_ops": total, "by_type": by_type,
            "summary": coverage_text(quantized, total, by_type)}


def coverage_text(quantized: int, total: int, by_type: Mapping[str, Mapping[str, int]]) -> str:
    """`quantized 3 of 5 ops (FULLY_CONNECTED 2/2, CONV_2D 1/1; MAX_POOL_2D float)`."""
    parts = [f"{name} {e['quantized']}/{e['total']}" for name, e in by_type.items() if e["quantized"]]
    kept = [name for name, e in by_type.items() if not e["quantized"]]
    text = f"quantized {quantized} of {total} ops"
    if parts or kept:
        text += " (" + ", ".join(parts) + ("; " if parts and kept else "") + \
            (", ".join(kept) + " float" if kept else "") + ")"
    return text


# --- running the quantizer (in a worker) ----------------------------------------------------------


def signature_inputs(data: bytes) -> tuple[str, list[str]]:
    """The serving signature's key and input names of a .tflite."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=bytes(data)).get_signature_list()
    if not signatures:
        raise TechniqueError("the float .tflite has no signature; the LiteRT Quantizer calibrates and "
                             "validates through one (convert the model with a serving signature)")
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    return key, sorted(signatures[key]["inputs"])


def signature_samples(x: np.ndarray, names: list[str], manifest: Mapping[str, Any],
                      limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """One {input name: batch-of-1 array} per sample, in each input's own dtype."""
    rows = np.asarray(x)[:limit] if limit else np.asarray(x)
    specs = (manifest.get("io") or {}).get("inputs")
    if specs:
        by_name = {spec["name"]: spec for spec in specs}
        if set(by_name) != set(names):
            by_name = dict(zip(names, specs))   # the converter kept the order, not the names
        flat = rows.reshape(len(rows), -1)
        return [{name: flat[i, spec["offset"]:spec["offset"] + spec["size"]]
                 .reshape(1, *spec["shape"]).astype(spec["dtype"]) for name, spec in by_name.items()}
                for i in range(len(rows))]
    dtype = manifest.get("input_dtype") or "float32"
    return [{names[0]: np.asarray(sample, dtype=dtype)[None]} for sample in rows]


@contextlib.contextmanager
def _quiet() -> Iterable[None]:
    """The quantizer prints size reports to stdout and progress bars to stderr: keep them off logs."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


RANGES = ("moving-average", "min-max")


def calibrate(float_model: bytes, recipe: list[dict[str, Any]], samples: list[dict], signature: str,
              ranges: str) -> dict:
    """Activation ranges on the calibration samples. `moving-average` is the quantizer's default (an
    exponential moving average, smoothing 0.95, of each sample's min/max: outliers are clipped);
    `min-max` keeps the extremes over all samples, as TensorFlow's converter does."""
    from litert_quantizer import calibrator, recipe_manager
    from litert_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    update = qsv_utils.min_max_update if ranges == "min-max" else qsv_utils.moving_average_update
    calib = calibrator.Calibrator(bytes(float_model), num_threads=1, qsv_update_func=update) \
        if ranges == "min-max" else calibrator.Calibrator(bytes(float_model), num_threads=1)
    calib.calibrate({signature: samples}, manager)
    return calib.get_model_qsvs()


def quantize(float_model: bytes, recipe: list[dict[str, Any]], calibration: list[dict] | None = None,
             validation: list[dict] | None = None, signature: str = "serving_default",
             ranges: str = "moving-average") -> tuple[bytes, dict]:
    """Apply `recipe` to a float .tflite; the quantized bytes and what the quantizer reported."""
    from litert_quantizer import quantizer

    with _quiet():
        qt = quantizer.Quantizer(bytes(float_model))
        try:
            qt.load_quantization_recipe(recipe)
        except (ValueError, KeyError, TypeError) as error:
            raise TechniqueError(f"the LiteRT Quantizer refused the recipe: {_first_line(error)}") from None
        calibrated = bool(qt.need_calibration)
        try:
            result = None
            if calibrated:
                if not calibration:
                    raise TechniqueError("this recipe quantizes activations and needs calibration data; "
                                         "provide x_calib or x_train in the dataset")
                result = calibrate(float_model, recipe, calibration, signature, ranges)
            quantized = qt.quantize(result, enable_progress_report=False)
        except TechniqueError:
            raise
        except Exception as error:  # noqa: BLE001 - the quantizer raises ValueError, RuntimeError...
            if "Tensor data is null" in str(error):
                raise TechniqueError("the LiteRT Quantizer's calibration could not read an intermediate "
                                     "tensor (its XNNPACK interpreter leaves some unused outputs, such as "
                                     "a recurrent cell's, unallocated); use a weight-only or dynamic lq "
                                     "technique, or the converter's int8-fallback") from None
            raise TechniqueError(f"the LiteRT Quantizer failed: {_first_line(error)}") from None
        data = bytes(quantized.quantized_model)
        report: dict[str, Any] = {"calibrated": calibrated}
        if calibrated:
            report["ranges"] = ranges
        if validation:
            layers = {op["output"]: op["layer"] for op in op_outputs(float_model)}
            report["validation"] = validation_rows(qt, {signature: validation}, layers)
    return data, report


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def layer_of(tensor_name: str) -> str:
    """`sequential/dense_1/MatMul;...` -> `dense_1`: the Keras layer an op's output belongs to."""
    first = tensor_name.split(";")[0]
    parts = [p for p in first.split("/") if p]
    return parts[1] if len(parts) > 2 else parts[-1] if parts else tensor_name


def _db(ratio: float) -> float | None:
    if ratio is None or not math.isfinite(ratio) or ratio <= 0 or ratio > 1e12:
        return None
    return round(10 * math.log10(ratio), 3)


def validation_rows(qt: Any, test_data: dict, layers: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The quantizer's tensor-by-tensor comparison with the float model (output and intermediate
    activations, in model order): MSE, SNR in dB, cosine similarity."""
    from litert_quantizer import quantizer

    metrics = [quantizer.ValidationErrorMetric.MSE, quantizer.ValidationErrorMetric.SNR,
               quantizer.ValidationErrorMetric.COSINE_SIMILARITY]
    try:
        comparison = qt.validate(test_data, error_metrics=metrics, num_threads=1)
    except Exception as error:  # noqa: BLE001 - validation is a report; its failure is said, not fatal
        return [{"error": f"the quantizer's validation failed: {_first_line(error)}"}]
    rows = []
    for key in comparison.available_signature_keys():
        result = comparison.get_signature_comparison_result(key)
        for kind, tensors in (("intermediate", result.intermediate_tensors), ("output", result.output_tensors)):
            for name, values in tensors.items():
                rows.append({"tensor": name, "layer": (layers or {}).get(name) or layer_of(name), "kind": kind,
                             "mse": float(values.get("mse", math.nan)),
                             "snr_db": _db(values.get("snr")),
                             "cosine": float(values.get("cosine_similarity", math.nan))})
    return rows


def quantizer_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(QUANTIZER_PACKAGE)
    except metadata.PackageNotFoundError:
        return "not installed"


def _produce(technique_id: str) -> Callable[[BuildContext, dict], Produced]:
    def produce(context: BuildContext, params: dict) -> Produced:
        recipe = recipe_of(technique_id, params)
        context.on_progress({"stage": "convert", "message": "float32 conversion for the quantizer"})
        float_model, conversion_notes = float_tflite(context, _recipe_needs_calibration(recipe))
        recipe, recipe_notes = bind_layer_rules(recipe, float_model)
        signature, names = signature_inputs(float_model)
        dataset = context.dataset
        calibration = signature_samples(dataset.x_calib, names, context.manifest) \
            if len(dataset.x_calib) else None
        validation = signature_samples(dataset.x_test, names, context.manifest, limit=VALIDATION_SAMPLES) \
            if len(dataset.x_test) else None
        context.on_progress({"stage": "convert", "message": "LiteRT Quantizer"})
        data, report = quantize(float_model, recipe, calibration, validation, signature,
                                params.get("ranges", "moving-average"))
        coverage = op_coverage(data)
        details = {"conversion": f"LiteRT Quantizer {quantizer_version()}: {coverage['summary']}",
                   "recipe": recipe, "quantizer_version": quantizer_version(),
                   "op_coverage": coverage, "tensor_types": tensor_type_counts(data),
                   "float32_bytes": len(float_model), **report}
        if recipe_notes:
            details["recipe_notes"] = recipe_notes
        if conversion_notes:
            details["conversion_notes"] = conversion_notes
        if coverage["quantized_ops"] == 0:
            details["warning"] = (f"the recipe quantized 0 of {coverage['total_ops']} ops: this is the "
                                  f"float model (blockwise recipes change fully connected and "
                                  f"embedding ops only)")
        return Produced(tflite=data, details=details)
    return produce


GRANULARITY = Param("granularity", "channel",
                    "weight scales: one per output channel, one per tensor, or one per block of 32..256 "
                    "input values (blockwise: dynamic recipes on fully connected / embedding ops)",
                    choices=tuple(GRANULARITIES))
ALGORITHM = Param("algorithm", "min_max",
                  "how weight ranges are found: min_max, octav (clipping search), gptq or hadamard "
                  "(these two quantize fully connected ops only)", choices=tuple(ALGORITHMS))
RANGE_PARAM = Param("ranges", "moving-average",
                    "activation ranges from calibration: the quantizer's moving average of each sample's "
                    "min/max (clips outliers), or the extremes over all samples (as the converter)",
                    choices=RANGES)
RECIPE = Param("recipe", "", "a LiteRT Quantizer recipe: the path of its .json file, or the JSON itself",
               parse=read_recipe)

_SOURCES = ("keras", "savedmodel", "tflite")
TECHNIQUES: list[Technique] = []
for _id, _label, _description in (
    ("lq-int8-weight-only", "LiteRT int8 weight-only",
     "int8 weights dequantized to float before each op: ~4x smaller, float compute keeps accuracy"),
    ("lq-int4-weight-only", "LiteRT int4 weight-only",
     "int4 weights dequantized to float before each op: ~8x smaller weights, float compute"),
    ("lq-int4-dynamic", "LiteRT int4 dynamic",
     "int4 weights, activations quantized on the fly: the smallest file the converter cannot make"),
    ("lq-w8a8", "LiteRT static w8a8",
     "int8 weights and activations, calibrated on the calibration split (LiteRT Quantizer)"),
    ("lq-w8a16", "LiteRT static w8a16",
     "int8 weights, int16 activations, calibrated: closer to float than w8a8"),
    ("lq-w4a8", "LiteRT static w4a8",
     "int4 weights, int8 activations, calibrated: int4 size with integer activations"),
):
    TECHNIQUES.append(Technique(_id, "litert", _label, _description, _produce(_id),
                       params=(GRANULARITY, ALGORITHM, RANGE_PARAM) if SCHEMES[_id].calibrated
                       else (GRANULARITY, ALGORITHM), needs_calibration=SCHEMES[_id].calibrated,
                       sources=_SOURCES,
                       check=lambda params, _tid=_id: check_scheme_params(_tid, params)))

TECHNIQUES.append(Technique(
    "lq-recipe", "litert", "LiteRT recipe",
    "any LiteRT Quantizer recipe JSON (per-op rules by regex; the Lab's mixed precision makes one)",
    _produce("lq-recipe"), params=(RECIPE, RANGE_PARAM), sources=_SOURCES, in_all=False,
    check=lambda params: None if params["recipe"] else read_recipe("")))
