"""Which techniques can apply to a prepared workload, and why not: decided before any worker starts.

Reads only the manifest a prepare task wrote (model kind, layer classes, input dtype, labels, split
sizes): no TensorFlow. What can only be known by trying (a layer tfmot cannot wrap, a converter
limit) is still refused by the technique itself, in one line naming the layer.
"""

from __future__ import annotations

from typing import Any

from .keras_convert import (CALIBRATED_MODES, CONV_RECURRENT_CLASSES, RECURRENT_CLASSES,
                             conv_recurrent_refusal)
from .techniques import Technique, get_technique

_KIND_WORDS = {"keras": "a tf_keras model", "savedmodel": "a SavedModel (or a Keras 3 model "
               "exported to one)", "tflite": "a TensorFlow Lite file"}
QAT_TECHNIQUES = frozenset({"qat-int8", "cqat-int8", "pqat-int8"})
# The converter modes each technique calibrates (int8-selective calibrates as int8-fallback does).
CALIBRATED_TECHNIQUES = {mode: mode for mode in CALIBRATED_MODES} | {"int8-selective": "int8-fallback"}
UNROLLED_CLASSES = frozenset({"GRU", "SimpleRNN"})   # no fused kernel: a rolled loop, or unrolled cells
# Layers whose int16x8 conversion kills the process at its first invoke() (SIGABRT, no message),
# measured with ai-edge-litert 2.3 on a model of that layer alone and in a Transformer encoder: refused
# from the config before any work. ptq.refuse_int16_abort catches the cause in any converted file.
INT16X8_ABORTS = frozenset({"LayerNormalization"})


def _recurrent(manifest: dict) -> list[dict[str, str]]:
    return [layer for layer in manifest.get("layers") or [] if layer.get("class") in RECURRENT_CLASSES]


def refusal(technique: Technique | str, manifest: dict) -> str | None:
    """Why `technique` cannot run on the workload `manifest` describes, or None when it may."""
    technique = get_technique(technique) if isinstance(technique, str) else technique
    kind = manifest.get("model_kind", "keras")
    name = manifest.get("model_name", "the model")
    if kind not in technique.sources:
        needs = " or ".join(_KIND_WORDS[k] for k in technique.sources)
        return f"{technique.id} cannot run on {name} ({_KIND_WORDS[kind]}); it needs {needs}"
    if technique.family == "litert" and technique.needs_calibration:
        # the quantizer calibrates the float32 .tflite made for calibration (int8-fallback's graph)
        if reason := conv_recurrent_refusal(_recurrent(manifest), "int8-fallback", technique.id):
            return reason
        for layer in _recurrent(manifest):
            if layer.get("class") in UNROLLED_CLASSES or layer.get("masked"):   # a loop, not one op
                fed = ", fed a mask" if layer.get("masked") else ""
                return (f"{technique.id}: layer {layer['layer']!r} ({layer['class']}{fed}) cannot be "
                        f"calibrated by the LiteRT Quantizer 0.11 (its XNNPACK calibration leaves a "
                        f"tensor of the unrolled cell unallocated: \"Tensor data is null\"); use "
                        f"int8-fallback or int8-only, or lq-int4-dynamic / a weight-only lq technique")
    mode = CALIBRATED_TECHNIQUES.get(technique.id, "")
    if reason := conv_recurrent_refusal(_recurrent(manifest), mode, technique.id):
        return reason
    if technique.id == "int16x8":
        for layer in manifest.get("layers") or []:
            if layer.get("class") in INT16X8_ABORTS:
                return (f"int16x8: layer {layer['layer']!r} ({layer['class']}) converts to ops whose "
                        f"16-bit kernels abort LiteRT at the first invoke (SIGABRT); use int8-fallback "
                        f"or int8-only, or lq-w8a16 (the LiteRT Quantizer's 16-bit activations)")
    if not technique.fine_tunes:
        return None
    if manifest.get("has_labels") is False:
        return (f"{technique.id} fine-tunes on labelled data and the dataset has no labels; add "
                f"y_test, x_train and y_train to fine-tune, or use post-training techniques")
    if not (manifest.get("split_sizes") or {}).get("train"):
        return (f"{technique.id} fine-tunes on a train split and the dataset has none; add x_train "
                f"and y_train to the .npz")
    if technique.id in QAT_TECHNIQUES:
        for layer in _recurrent(manifest):
            instead = ("dynamic or float16" if layer.get("class") in CONV_RECURRENT_CLASSES  # no calibration
                       else "int8-fallback, dynamic")
            return (f"{technique.id}: layer {layer['layer']!r} ({layer['class']}) has no "
                    f"quantization-aware training in tensorflow-model-optimization 0.8.1; use "
                    f"{instead}, or prune / cluster for this model")
    return None


def refusals(manifest: dict, technique_ids: Any) -> dict[str, str]:
    """{technique id: reason} for each of `technique_ids` that cannot run on the workload."""
    found = {}
    for technique_id in technique_ids:
        reason = refusal(technique_id, manifest)
        if reason:
            found[technique_id] = reason
    return found


def _config_layers(config: dict) -> list[dict[str, str]]:
    """Name and class of each top-level layer in a Keras model config (tf_keras or Keras 3)."""
    layers = (config.get("config") or {}).get("layers") or []
    found = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or layer.get("class_name") == "InputLayer":
            continue
        inner = layer.get("config") or {}
        entry = {"layer": str(inner.get("name", "?")), "class": str(layer.get("class_name"))}
        wrapped = inner.get("layer") if isinstance(inner.get("layer"), dict) else None
        if entry["class"] == "Bidirectional" and wrapped:
            entry["cell"] = str(wrapped.get("class_name"))
        found.append(entry)
    return found


def describe_model_file(path: Any) -> dict:
    """What the Run page can know of an uploaded Keras file before any worker starts, read from its
    config alone (no TensorFlow, nothing deserialized): a manifest-like dict for `refusal`.

    A SavedModel (zip or folder) or a .tflite gives only its kind; a file that cannot be read gives {}.
    """
    from pathlib import Path

    from .errors import QuantLabError
    from .safe_load import inspect_h5_config, inspect_keras_archive

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return {"model_kind": "tflite", "model_name": path.name}
    try:
        if suffix in (".h5", ".hdf5"):
            info = inspect_h5_config(path)
        elif suffix == ".keras":
            info = inspect_keras_archive(path)
        else:
            return {"model_kind": _saved_model_kind(path), "model_name": path.name}
    except QuantLabError:
        return {}
    kind = "keras"  # a Keras 3 file is rebuilt in tf_keras when it prepares (or refused then, by layer)
    return {"model_kind": kind, "model_name": path.name, "layers": _config_layers(info["config"]),
            "output_names": _config_outputs(info["config"]), "keras_major": info.get("keras_major"),
            "input_shape": _config_input_shape(info["config"])}


def _saved_model_kind(path: Any) -> str:
    """"keras" for a SavedModel tf_keras wrote (its keras_metadata.pb lets tf_keras rebuild the
    layers, so every technique may run), "savedmodel" for a plain one (post-training only). A
    rebuild that still fails when the model is prepared is refused then, by the technique."""
    import zipfile

    if path.is_dir():
        return "keras" if (path / "keras_metadata.pb").is_file() else "savedmodel"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "keras"  # not readable here: the upload checks say why
    return "keras" if any(name.rsplit("/", 1)[-1] == "keras_metadata.pb" for name in names) else "savedmodel"


def _config_input_shape(config: dict) -> list[int | None] | None:
    """The per-sample input shape of a one-input model, from its config (tf_keras writes
    `batch_input_shape`, Keras 3 `batch_shape`); None for several inputs or when it is not written."""
    layers = (config.get("config") or {}).get("layers") or []
    shapes = []
    for index, layer in enumerate(layers if isinstance(layers, list) else []):
        inner = (layer.get("config") or {}) if isinstance(layer, dict) else {}
        if layer.get("class_name") == "InputLayer" or (index == 0 and "batch_input_shape" in inner):
            shapes.append(inner.get("batch_input_shape") or inner.get("batch_shape"))
    if len(shapes) != 1 or not isinstance(shapes[0], list) or len(shapes[0]) < 2:
        return None
    per_sample = shapes[0][1:]
    return per_sample if all(d is None or isinstance(d, int) for d in per_sample) else None


def _config_outputs(config: dict) -> list[str]:
    """The output layer names a Functional config lists (one unnamed output for a Sequential)."""
    outputs = (config.get("config") or {}).get("output_layers")
    if isinstance(outputs, list) and outputs and not isinstance(outputs[0], list):
        outputs = [outputs]  # a single output written as [name, node, index]
    names = []
    for entry in outputs if isinstance(outputs, list) else []:
        if isinstance(entry, list) and entry and isinstance(entry[0], str):
            names.append(entry[0])
    return names
