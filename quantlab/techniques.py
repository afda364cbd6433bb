"""The technique registry: technique id -> its parameters and how it produces a .tflite model.

Listing techniques and checking parameters import no TensorFlow; producing a model does, and runs
in a worker process (see runner.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .config import TechniqueSpec
from .errors import QuantLabError, TechniqueError

PTQ_MODES = ("float32", "dynamic", "float16", "int8-fallback", "int8-only", "uint8-only", "int16x8")


@dataclass(frozen=True)
class Param:
    """A technique parameter: its default, its type, and the values it accepts."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def kind(self) -> str:
        if self.choices:
            return "choice"
        return type(self.default).__name__  # int, float or bool

    def coerce(self, value: Any, technique: str) -> Any:
        """Check and convert `value`; raise a TechniqueError that names the accepted values."""
        where = f"{technique}: parameter {self.name}"
        if self.choices:
            if value not in self.choices:
                raise TechniqueError(f"{where} must be one of {', '.join(map(str, self.choices))}, "
                                     f"not {value!r}")
            return value
        try:
            if isinstance(self.default, bool):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "1", "yes")
                converted: Any = bool(value)
            elif isinstance(self.default, int):
                converted = int(value)
                if converted != float(value):
                    raise ValueError(value)
            else:
                converted = float(value)
        except (TypeError, ValueError):
            raise TechniqueError(f"{where} must be a {self.kind}, not {value!r}") from None
        if self.minimum is not None and converted < self.minimum or \
                self.maximum is not None and converted > self.maximum:
            raise TechniqueError(f"{where} must be between {self.minimum} and {self.maximum}, "
                                 f"not {value!r}")
        return converted

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "default": self.default, "help": self.help, "kind": self.kind,
                "choices": list(self.choices), "minimum": self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class Produced:
    """What a technique made: the .tflite bytes (None for the Keras baseline) and facts about it."""

    tflite: bytes | None
    details: dict[str, Any] = field(default_factory=dict)
    keras_model: Any = None


@dataclass(frozen=True)
class BuildContext:
    """What a technique may use: the baseline (loaded lazily), the dataset, a progress channel."""

    load_keras_model: Callable[[], Any]
    make_converter: Callable[..., tuple[Any, list[str]]]  # (model or None, mode) -> converter, notes
    dataset: Any
    on_progress: Callable[[dict], None] = lambda event: None
    cache: Any = None
    manifest: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Technique:
    id: str
    family: str
    label: str
    description: str
    produce: Callable[[BuildContext, dict], Produced] = field(repr=False)
    params: tuple[Param, ...] = ()
    needs_calibration: bool = False
    fine_tunes: bool = False
    integer_only: bool = False
    sources: tuple[str, ...] = ("keras", "savedmodel")  # the model kinds it can start from

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Parameters with defaults filled in, each checked; unknown names are refused."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise TechniqueError(f"{self.id} has no parameter {unknown[0]!r}; it accepts: {accepted}")
        return {name: p.coerce(given[name], self.id) if name in given else p.default
                for name, p in known.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "label": self.label,
                "description": self.description, "params": [p.to_dict() for p in self.params],
                "needs_calibration": self.needs_calibration, "fine_tunes": self.fine_tunes,
                "integer_only": self.integer_only, "sources": list(self.sources)}


# --- post-training quantization ---------------------------------------------------------------


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
        if calibration is None or len(calibration) == 0:
            raise TechniqueError(f"{mode} needs representative (calibration) data; "
                                 f"provide x_calib or x_train in the dataset")
        converter.representative_dataset = (representative_inputs(calibration, inputs) if inputs
                                             else representative_dataset(calibration, input_dtype))
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


def convert_model(context: BuildContext, model: Any, mode: str, *,
                  weights: str = "per-channel") -> tuple[bytes, list[str]]:
    """Convert `model` (a Keras model, or None for the context's own source) in one PTQ mode; the
    .tflite bytes and notes on how (see keras_convert)."""
    converter, notes = context.make_converter(model, mode)
    configure_converter(converter, mode, context.dataset.x_calib, weights=weights,
                        input_dtype=context.manifest.get("input_dtype") or "float32",
                        inputs=(context.manifest.get("io") or {}).get("inputs"))
    try:
        return converter.convert(), notes
    except Exception as error:  # noqa: BLE001 - ConverterError, ValueError, RuntimeError...
        raise converter_failure(mode, error) from None


_QUOTED_OP = re.compile(r"op[:\s]+'([^']+)'|'(tf\.[A-Za-z0-9_]+)'")


def converter_failure(mode: str, error: BaseException) -> TechniqueError:
    """The converter's many-line failure as one line naming the op, and what to try instead."""
    text = " ".join(str(error).split())
    match = _QUOTED_OP.search(text)
    op = next((g for g in match.groups() if g), None) if match else None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    where = f" on op {op}" if op else ""
    return TechniqueError(f"{mode}: the TFLite converter failed{where} ({first}); try dynamic or "
                          f"float16, which keep float kernels, or int8-fallback, which lets such an "
                          f"op stay float")


def io_details(mode: str, input_dtype: str | None) -> dict[str, Any]:
    """What integer-only I/O did to an input that is already integer (token ids stay as they are)."""
    if mode in ("int8-only", "uint8-only") and input_dtype and input_dtype.startswith(("int", "uint")):
        return {"io_note": f"the {input_dtype} input stays {input_dtype} (token ids are not "
                           f"quantized); integer-only I/O applies to float inputs and the output"}
    return {}


def conversion_details(context: BuildContext, mode: str, notes: list[str]) -> dict[str, Any]:
    details: dict[str, Any] = io_details(mode, context.manifest.get("input_dtype"))
    if notes:
        details["conversion_notes"] = notes
    return details


def _ptq(mode: str) -> Callable[[BuildContext, dict], Produced]:
    def produce(context: BuildContext, params: dict) -> Produced:
        weights = params.get("weights", "per-channel")
        tflite, notes = convert_model(context, None, mode, weights=weights)
        return Produced(tflite=tflite, details={"conversion": mode, "weights": weights,
                                                **conversion_details(context, mode, notes)})
    return produce


WEIGHTS_PARAM = Param("weights", "per-channel",
                      "int8 kernel scales: one per output channel, or one per tensor (what some "
                      "older DSP/NPU delegates require; can cost accuracy)",
                      choices=WEIGHT_GRANULARITIES)


def _baseline(context: BuildContext, params: dict) -> Produced:
    """The float model itself, measured in its own framework by the worker (see float_models)."""
    return Produced(tflite=None)


def _as_uploaded(context: BuildContext, params: dict) -> Produced:
    from pathlib import Path

    return Produced(tflite=Path(context.manifest["model_path"]).read_bytes(),
                    details={"conversion": "none: the uploaded .tflite as it is"})


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    if technique.id in _REGISTRY:
        raise ValueError(f"technique {technique.id} registered twice")
    _REGISTRY[technique.id] = technique
    return technique


for _technique in (
    Technique("baseline", "baseline", "Float baseline",
              "the float model itself, measured in its own framework (tf_keras, Keras 3, or a "
              "SavedModel's serving signature in TensorFlow): the reference", _baseline),
    Technique("as-uploaded", "uploaded", "Uploaded .tflite",
              "a ready TensorFlow Lite file, measured as it is (no float reference to agree with)",
              _as_uploaded, sources=("tflite",)),
    Technique("float32", "float", "TFLite float32",
              "plain conversion, no quantization: the TFLite reference", _ptq("float32")),
    Technique("dynamic", "ptq", "Dynamic range",
              "int8 weights, float activations quantized on the fly; no data needed (~4x smaller)",
              _ptq("dynamic")),
    Technique("float16", "ptq", "Float16",
              "float16 weights (~2x smaller); GPU delegates run them natively", _ptq("float16")),
    Technique("int8-fallback", "ptq", "Full integer, float fallback",
              "int8 weights and activations from calibration data; float input/output, float ops "
              "where no int8 kernel exists", _ptq("int8-fallback"), params=(WEIGHTS_PARAM,), needs_calibration=True),
    Technique("int8-only", "ptq", "Integer only (int8 I/O)",
              "every op int8, int8 input/output: for Edge TPU and microcontrollers",
              _ptq("int8-only"), params=(WEIGHTS_PARAM,), needs_calibration=True, integer_only=True),
    Technique("uint8-only", "ptq", "Integer only (uint8 I/O)",
              "every op int8, uint8 input/output: for older accelerators that expect uint8",
              _ptq("uint8-only"), params=(WEIGHTS_PARAM,), needs_calibration=True, integer_only=True),
    Technique("int16x8", "ptq", "16x8 (int16 activations)",
              "int16 activations, int8 weights: better accuracy than int8, reference kernels (slow)",
              _ptq("int16x8"), needs_calibration=True, integer_only=True),
):
    register(_technique)


def all_techniques() -> list[Technique]:
    return list(_REGISTRY.values())


def get_technique(technique_id: str) -> Technique:
    try:
        return _REGISTRY[technique_id]
    except KeyError:
        raise TechniqueError(f"unknown technique {technique_id!r}; run `python -m quantlab techniques` "
                             f"to list them ({', '.join(_REGISTRY)})") from None


def params_dict(params: Mapping[str, Any] | str | None) -> dict | None:
    """Parameters as a dict, from a dict or the JSON text a stored row holds; None if unreadable."""
    if isinstance(params, str):
        try:
            params = json.loads(params or "{}")
        except ValueError:
            return None
    if params is None:
        return {}
    return dict(params) if isinstance(params, Mapping) else None


def params_text(params: Mapping[str, Any] | str | None) -> str:
    """`bits=8, weights=per-tensor` (empty for none; unreadable text as it is)."""
    parsed = params_dict(params)
    if parsed is None:
        return str(params)
    return ", ".join(f"{k}={v}" for k, v in parsed.items())


def variant_label(technique_id: str, params: Mapping[str, Any] | str | None) -> str:
    """`dynamic`, or `prune(target_sparsity=0.8)` when parameters differ from the defaults.

    `params` may be the JSON text a stored row holds.
    """
    params = params_dict(params) or {}
    try:
        defaults = get_technique(technique_id).resolve({})
    except QuantLabError:
        defaults = {}
    changed = {k: v for k, v in params.items() if defaults.get(k) != v}
    if not changed:
        return technique_id
    return f"{technique_id}({', '.join(f'{k}={v}' for k, v in changed.items())})"


def resolve_spec(spec: TechniqueSpec) -> TechniqueSpec:
    """The spec with every parameter filled in and checked: equal work gives an equal spec."""
    return TechniqueSpec(spec.id, get_technique(spec.id).resolve(spec.params))


def techniques_for(model_kind: str) -> list[Technique]:
    """The techniques that can start from a model of this kind (keras, savedmodel or tflite)."""
    return [t for t in all_techniques() if model_kind in t.sources]


def parse_technique_list(text: str, model_kind: str = "keras") -> tuple[TechniqueSpec, ...]:
    """`all` or `id,id,...` (an id may carry parameters: `prune:target_sparsity=0.8`)."""
    text = (text or "all").strip()
    if text == "all":
        return tuple(resolve_spec(TechniqueSpec(t.id)) for t in techniques_for(model_kind))
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        technique_id, _, rest = item.partition(":")
        params = {}
        for assignment in filter(None, rest.split(";")):
            name, sep, value = assignment.partition("=")
            if not sep:
                raise TechniqueError(f"cannot read parameter {assignment!r} of {technique_id}; "
                                     f"write it as name=value, e.g. prune:target_sparsity=0.8")
            params[name.strip()] = value.strip()
        specs.append(resolve_spec(TechniqueSpec(technique_id.strip(), params)))
    if not specs:
        raise TechniqueError("no techniques given; use --techniques all or a list such as dynamic,float16")
    return tuple(dict.fromkeys(specs))


def unsupported_techniques() -> dict[str, str]:
    """Techniques QuantLab knows of but cannot run with these library versions, with the reason."""
    from .finetune import UNSUPPORTED

    return dict(UNSUPPORTED)


# --- int8 with the most sensitive layers kept in float (quantlab.sensitivity) --------------------


def _int8_selective(context: BuildContext, params: dict) -> Produced:
    from .sensitivity import produce_selective

    tflite, details = produce_selective(context, params["keep_float"])
    return Produced(tflite=tflite, details=details)


register(Technique(
    "int8-selective", "ptq", "Int8, sensitive layers in float",
    "int8 with float fallback, except the N layers with the largest quantization error (TFLite's "
    "QuantizationDebugger: RMSE / scale on the calibration data), which stay float",
    _int8_selective,
    params=(Param("keep_float", 2, "how many of the most sensitive layers stay float", minimum=0,
                  maximum=1000),),
    needs_calibration=True))


# --- training-aware techniques (tensorflow-model-optimization; see finetune.py) -------------------

THEN_MODES = ("float32", "dynamic", "float16", "int8-fallback", "int8-only")
QAT_IO = ("float", "int8")
_CONVERSION_PARAMS = ("then", "io")


def _epochs(default: int) -> Param:
    return Param("epochs", default, "fine-tuning epochs on the train split", minimum=1, maximum=50)


LEARNING_RATE = Param("learning_rate", 1e-4, "fine-tuning learning rate (Adam)", minimum=1e-7, maximum=1.0)
CLUSTERS = Param("number_of_clusters", 16, "distinct weight values per kernel", minimum=2, maximum=256)
CENTROIDS = Param("centroid_init", "kmeans++", "how cluster centroids start",
                  choices=("linear", "kmeans++", "density-based", "random"))
SPARSITY = Param("target_sparsity", 0.5, "share of weights set to zero", minimum=0.05, maximum=0.95)
SCHEDULE = Param("schedule", "constant", "pruning schedule", choices=("constant", "polynomial"))
THEN = Param("then", "float32", "conversion after fine-tuning", choices=THEN_MODES)
IO = Param("io", "float", "float input/output, or integer-only with int8 input/output", choices=QAT_IO)


def _is_qat(technique_id: str) -> bool:
    return technique_id.endswith("-int8")


def _quantize_scope(technique_id: str) -> Any:
    """Saving and loading a QAT model needs tfmot's custom objects in scope."""
    from contextlib import nullcontext

    if not _is_qat(technique_id):
        return nullcontext()
    from .tfcompat import import_tensorflow

    import_tensorflow()
    import tensorflow_model_optimization as tfmot

    return tfmot.quantization.keras.quantize_scope()


def fine_tuned_model(context: BuildContext, technique_id: str, fit_params: dict) -> tuple[Any, dict]:
    """The fine-tuned Keras model and its stats, from the cache when this exact run was done before."""
    from .config import ENGINE_VERSION, content_hash
    from .finetune import TECHNIQUES
    from .tfcompat import import_tensorflow

    manifest = context.manifest
    if manifest.get("model_kind") != "keras":
        raise TechniqueError(f"{technique_id} fine-tunes a tf_keras model; {manifest.get('model_name')} "
                             f"is not one: upload the tf_keras model or use post-training techniques")
    key = content_hash({"engine": ENGINE_VERSION, "model": manifest["model_hash"],
                        "dataset": manifest["dataset_hash"], "technique": technique_id, "params": fit_params})
    model_path = context.cache.path("models", f"ft-{key}", ".keras")
    cached_stats = context.cache.read_json("models", f"ft-{key}")
    _, tf_keras = import_tensorflow()
    if model_path.exists() and cached_stats is not None:
        with _quantize_scope(technique_id):
            model = tf_keras.models.load_model(model_path, compile=False)
        return model, {**cached_stats, "fine_tune_cached": True}
    dataset = context.dataset
    if len(dataset.x_train) == 0:
        raise TechniqueError(f"{technique_id} fine-tunes on a train split and the dataset has none; "
                             f"add x_train and y_train to the .npz")
    has_labels = len(dataset.y_calib) and int(dataset.y_calib.min()) >= 0
    result = TECHNIQUES[technique_id](
        context.load_keras_model(), dataset.x_train, dataset.y_train, **fit_params,
        x_val=dataset.x_calib if has_labels else None, y_val=dataset.y_calib if has_labels else None,
        on_progress=context.on_progress)
    stats = {**result.stats, "validation_split": "calibration" if has_labels else None}
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(f".{model_path.stem}.tmp.keras")
    with _quantize_scope(technique_id):
        result.model.save(tmp)
    tmp.replace(model_path)
    context.cache.write_json("models", f"ft-{key}", stats)
    return result.model, {**stats, "fine_tune_cached": False}


def convert_qat_model(model: Any, io: str) -> bytes:
    """Convert a quantization-aware model: its learned ranges make it int8 without calibration."""
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if io == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def _fine_tune(technique_id: str) -> Callable[[BuildContext, dict], Produced]:
    def produce(context: BuildContext, params: dict) -> Produced:
        fit_params = {k: v for k, v in params.items() if k not in _CONVERSION_PARAMS}
        model, stats = fine_tuned_model(context, technique_id, fit_params)
        extra: dict[str, Any] = {}
        if _is_qat(technique_id):
            tflite = convert_qat_model(model, params["io"])
            conversion = f"quantization-aware int8 ({params['io']} I/O)"
        else:
            tflite, notes = convert_model(context, model, params["then"])
            conversion = params["then"]
            extra = conversion_details(context, params["then"], notes)
        return Produced(tflite=tflite, details={"conversion": conversion, "fine_tune": stats, **extra})
    return produce


for _technique in (
    Technique("qat-int8", "qat", "Quantization-aware training",
              "fine-tune with fake quantization (quantize_model), then int8: recovers accuracy PTQ loses",
              _fine_tune("qat-int8"), params=(_epochs(1), LEARNING_RATE, IO), fine_tunes=True,
              sources=("keras",)),
    Technique("cluster", "cluster", "Weight clustering",
              "k shared values per kernel (cluster_weights), fine-tune, strip: far smaller gzipped",
              _fine_tune("cluster"), params=(CLUSTERS, CENTROIDS, _epochs(1), LEARNING_RATE, THEN),
              fine_tunes=True, sources=("keras",)),
    Technique("prune", "prune", "Magnitude pruning",
              "zero the smallest weights to a target sparsity, fine-tune, strip: smaller gzipped",
              _fine_tune("prune"), params=(SPARSITY, SCHEDULE, _epochs(2), LEARNING_RATE, THEN),
              fine_tunes=True, sources=("keras",)),
    Technique("cqat-int8", "qat", "Cluster-preserving QAT",
              "clustering, then quantization-aware training that keeps the clusters, then int8",
              _fine_tune("cqat-int8"), params=(CLUSTERS, CENTROIDS, _epochs(1), LEARNING_RATE, IO),
              fine_tunes=True, sources=("keras",)),
    Technique("pqat-int8", "qat", "Pruning-preserving QAT",
              "pruning, then quantization-aware training that keeps the zeros, then int8",
              _fine_tune("pqat-int8"), params=(SPARSITY, SCHEDULE, _epochs(1), LEARNING_RATE, IO),
              fine_tunes=True, sources=("keras",)),
    Technique("prune-cluster", "cluster", "Sparsity-preserving clustering",
              "pruning, then clustering that keeps the zeros",
              _fine_tune("prune-cluster"),
              params=(SPARSITY, SCHEDULE, CLUSTERS, CENTROIDS, _epochs(1), LEARNING_RATE, THEN),
              fine_tunes=True, sources=("keras",)),
):
    register(_technique)
