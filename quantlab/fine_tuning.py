"""The tensorflow-model-optimization family: quantization-aware training, clustering, pruning and
their combinations; the training itself is in quantlab.finetune."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

import numpy as np

from .errors import TechniqueError
from .keras_convert import keras_converter, set_representative_data
from .keras_flatten import inline_nested_models
from .ptq import conversion_details, convert_model
from .techniques import BuildContext, Param, Produced, Technique


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


def fine_tuned_suffix(technique_id: str) -> str:
    """How a fine-tuned model is kept in the cache. A quantization-aware model saved as .keras did not
    load back ("Layer 'quantize_layer' expected 5 variables, but received 3"), so the next variant
    sharing it failed; as HDF5, as tfmot's own guide saves it, it loads with the same outputs."""
    return ".h5" if _is_qat(technique_id) else ".keras"


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
    model_path = context.cache.path("models", f"ft-{key}", fine_tuned_suffix(technique_id))
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
    # A small train split is also the calibration set (uploads.dataset_from_arrays): scoring on it
    # would be training accuracy, so there is then no held-out validation.
    calibration_is_train = len(dataset.x_calib) == len(dataset.x_train) and \
        np.array_equal(dataset.x_calib, dataset.x_train)
    has_labels = len(dataset.y_calib) and int(dataset.y_calib.min()) >= 0 and not calibration_is_train
    model, inlined = inline_nested_models(tf_keras, context.load_keras_model())
    io = manifest.get("io")
    result = TECHNIQUES[technique_id](
        model, *keras_arrays(model, dataset.x_train, dataset.y_train, io), **fit_params,
        **(dict(zip(("x_val", "y_val"), keras_arrays(model, dataset.x_calib, dataset.y_calib, io)))
           if has_labels else {"x_val": None, "y_val": None}),
        on_progress=context.on_progress)
    stats = {**result.stats, "validation_split": "calibration" if has_labels else None,
             **({"inlined": inlined} if inlined else {}),
             **({"validation_note": "no held-out validation: the calibration set is the train split "
                                    "(add x_calib, or 400+ train samples, to validate)"}
                if calibration_is_train else {})}
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Sweeps that differ only in thread count share the fine-tune and may train it side by side.
    unique = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = model_path.with_name(f".{model_path.stem}.{unique}.tmp{model_path.suffix}")
    with _quantize_scope(technique_id):
        result.model.save(tmp)
    tmp.replace(model_path)
    context.cache.write_json("models", f"ft-{key}", stats)
    return result.model, {**stats, "fine_tune_cached": False}


def keras_arrays(model: Any, x: Any, y: Any, io: dict | None) -> tuple[Any, Any]:
    """A split as Keras takes it: packed samples of a model with several inputs unpacked into one
    array per input (in the model's input order, matched by name), and the labels of a model with
    several outputs as {labelled output: class ids}."""
    if not io:
        return x, y
    specs = {spec["name"]: spec for spec in io.get("inputs") or []}
    if len(model.inputs) > 1:
        flat = np.asarray(x).reshape(len(x), -1)
        missing = [name for name in model.input_names if name not in specs]
        if missing:
            raise TechniqueError(f"the dataset has no arrays for input {missing[0]!r}; name them "
                                 f"x_train_{missing[0]} and x_calib_{missing[0]}")
        x = [flat[:, specs[n]["offset"]:specs[n]["offset"] + specs[n]["size"]]
             .reshape(len(flat), *specs[n]["shape"]).astype(specs[n]["dtype"]) for n in model.input_names]
    if len(model.outputs) > 1:
        label = io.get("label_output") or model.output_names[0]
        y = {label: y}
    return x, y


def convert_qat_model(model: Any, io: str, context: BuildContext) -> tuple[bytes, list[str]]:
    """Convert a quantization-aware model: its learned ranges make it int8 without calibration.

    Integer I/O needs the input's range too, which the converter takes from a representative
    dataset (without one it refused: "For full integer quantization, a `representative_dataset`
    must be specified"); the calibration split serves, and the learned ranges inside stay as they are.
    Returns the .tflite and the conversion's notes (a layer that needs batch 1, see keras_convert).
    """
    from .tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    converter, notes = keras_converter(model, "qat")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if io == "int8":
        set_representative_data(converter, context.dataset.x_calib,
                                input_dtype=context.manifest.get("input_dtype") or "float32",
                                inputs=(context.manifest.get("io") or {}).get("inputs"),
                                refusal="io=int8 needs calibration samples for the input's range; provide "
                                        "x_calib or x_train in the dataset, or use io=float")
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert(), notes


def _fine_tune(technique_id: str) -> Callable[[BuildContext, dict], Produced]:
    def produce(context: BuildContext, params: dict) -> Produced:
        fit_params = {k: v for k, v in params.items() if k not in _CONVERSION_PARAMS}
        model, stats = fine_tuned_model(context, technique_id, fit_params)
        extra: dict[str, Any] = {}
        if _is_qat(technique_id):
            tflite, notes = convert_qat_model(model, params["io"], context)
            conversion = f"quantization-aware int8 ({params['io']} I/O)"
            extra = {"conversion_notes": notes} if notes else {}
        else:
            tflite, notes = convert_model(context, model, params["then"])
            conversion = params["then"]
            extra = conversion_details(context, params["then"], notes)
        return Produced(tflite=tflite, details={"conversion": conversion, "fine_tune": stats, **extra})
    return produce


TECHNIQUES: list[Technique] = [
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
]
