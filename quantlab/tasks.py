"""What a worker process does: prepare a workload, then produce and measure one variant.

Runs inside pool workers (see pool.py), where importing TensorFlow is expected. Each function takes
a JSON-able payload and returns a JSON-able dict, so results can be cached and stored as they are.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cache import ArtifactCache
from .config import MeasureSettings, TechniqueSpec, TrainSettings
from .errors import ModelError, TechniqueError
from .keras_copy import clone_with_weights
from .tfcompat import library_versions
from .workloads import Dataset, baseline_key, load_builtin_dataset, train_baseline

Emit = Callable[[dict], None]

# Worker-local memory of loaded datasets and models, keyed by path: a worker serves many variants.
_MEMO: dict[str, Any] = {}


def run_task(payload: dict, emit: Emit, shared_lock: Any = None) -> dict:
    """Entry point for pool workers."""
    if payload["kind"] == "prepare":
        return prepare_workload(payload, emit)
    if payload["kind"] == "variant":
        return measure_variant(payload, emit, shared_lock)
    raise ValueError(f"unknown task kind {payload['kind']!r}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(settings: MeasureSettings) -> dict[str, Any]:
    return {"versions": library_versions(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "num_threads": settings.num_threads, "python": platform.python_version(),
            "platform": platform.platform()}


# --- prepare ------------------------------------------------------------------------------------


def _load_dataset(path: str) -> Dataset:
    if path not in _MEMO:
        _MEMO[path] = Dataset.load(Path(path))
    return _MEMO[path]


def _load_keras(path: str) -> Any:
    """Load a Keras file QuantLab itself wrote into the cache (uploads were re-saved after checks)."""
    if path not in _MEMO:
        from .tfcompat import import_tensorflow

        _, tf_keras = import_tensorflow()
        _MEMO[path] = tf_keras.models.load_model(path, compile=False)
    return _MEMO[path]


def prepare_workload(payload: dict, emit: Emit) -> dict:
    """Load or build the dataset and the baseline model, and the float reference outputs."""
    cache = ArtifactCache(Path(payload["cache_dir"]))
    model_ref, dataset_ref = payload["model"], payload["dataset"]
    emit({"stage": "prepare", "message": f"loading dataset {dataset_ref['name']}"})
    if dataset_ref["path"]:
        from .uploads import load_uploaded_dataset
        dataset = load_uploaded_dataset(Path(dataset_ref["path"]))
    else:
        dataset = load_builtin_dataset(dataset_ref["name"], cache.root)
    notes: list[str] = []
    trained_seconds = None
    keras3_path: str | None = None
    io: dict | None = None
    if model_ref["path"] is None:
        if dataset_ref["path"]:
            from .uploads import check_dataset_for_builtin_model
            check_dataset_for_builtin_model(dataset)
        train = TrainSettings.from_dict(payload["train"])
        model_hash = baseline_key(model_ref["name"], dataset.hash, train)
        model_path = cache.path("models", model_hash, ".keras")
        kind = "keras"
        if not model_path.exists():
            emit({"stage": "train baseline", "message": f"training {model_ref['name']}"})
            started = time.perf_counter()
            model = train_baseline(model_ref["name"], dataset, train, on_progress=emit)
            trained_seconds = time.perf_counter() - started
            _save_keras(model, model_path)
    else:
        from .uploads import prepare_uploaded_model
        emit({"stage": "prepare", "message": f"checking {model_ref['name']}"})
        prepared = prepare_uploaded_model(Path(model_ref["path"]), model_ref["hash"], dataset, cache,
                                          payload.get("label_output"))
        model_hash, model_path, kind = model_ref["hash"], prepared.path, prepared.kind
        dataset = prepared.dataset
        notes.extend(prepared.notes)
        keras3_path = str(prepared.keras3_path) if prepared.keras3_path else None
        io = prepared.io

    dataset_hash = dataset.hash
    dataset_path = cache.path("datasets", f"{dataset.name}-{dataset_hash}", ".npz")
    if not dataset_path.exists():
        dataset_path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save(dataset_path)
    reference_path = cache.path("references", f"{model_hash}-{dataset_hash}", ".npy")
    described = {"model_kind": kind, "model_path": str(model_path), "keras3_path": keras3_path,
                 "io": io}
    float_model = float_model_of(described) if kind in ("keras", "savedmodel") else None
    if float_model is not None and not reference_path.exists():
        emit({"stage": "prepare", "message": f"computing the float reference outputs "
                                             f"({float_model.framework})"})
        if io:  # every output kept; the label output is the reference the row's numbers use
            outputs = float_model.predict_all(dataset.x_test)
            label = [o["name"] for o in io["outputs"]].index(io["label_output"])
            _save_array(reference_path.with_suffix(".all.npz"), outputs=outputs)
            reference = outputs[label]
        else:
            reference = float_model.predict(dataset.x_test)
        _save_array(reference_path, reference=reference)
    if not dataset.has_labels:
        notes.append("no labels: variants are compared on fidelity to the float model (top-1 "
                     "agreement, SQNR); accuracy is not measured")
    return {**described,
        "float_framework": float_model.framework if float_model else None,
        "input_dtype": float_model.input_dtype if float_model else _tflite_input_dtype(model_path),
        "layers": _layer_list(kind, str(model_path)), "has_labels": dataset.has_labels,
        "model_name": model_ref["name"], "model_hash": model_hash, "dataset_name": dataset.name, "dataset_path": str(dataset_path),
        "dataset_hash": dataset_hash, "dataset_source": dataset.source,
        "split_sizes": dataset.split_sizes, "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "reference_path": str(reference_path) if reference_path.exists() else None,
        "train_seconds": trained_seconds, "notes": notes,
    }


def _save_array(path: Path, *, reference: np.ndarray | None = None,
                outputs: list[np.ndarray] | None = None) -> None:
    """Write a reference .npy (or every output as .npz) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    if outputs is not None:
        np.savez(tmp, **{f"output_{k}": o for k, o in enumerate(outputs)})
    else:
        np.save(tmp, reference)
    tmp.replace(path)


def float_model_of(manifest: dict) -> Any:
    """The workload's float model in its own framework (see float_models), memoized per worker."""
    from . import float_models

    key = f"float:{manifest.get('keras3_path') or manifest['model_path']}"
    if key not in _MEMO:
        if manifest.get("keras3_path"):
            path = Path(manifest["keras3_path"])
            _MEMO[key] = float_models.keras_float_model(float_models.load_keras3(path), path, "keras3",
                                                        manifest.get("io"))
        elif manifest["model_kind"] == "keras":
            path = Path(manifest["model_path"])
            _MEMO[key] = float_models.keras_float_model(_load_keras(str(path)), path, "tf_keras",
                                                        manifest.get("io"))
        else:
            _MEMO[key] = float_models.saved_model_float_model(Path(manifest["model_path"]))
    return _MEMO[key]


def _layer_list(kind: str, model_path: str) -> list[dict[str, str]]:
    """Name and class of each top-level layer of a tf_keras model (what applicability checks read)."""
    if kind != "keras":
        return []
    from .keras_convert import recurrent_layers

    model = _load_keras(model_path)
    recurrent = {layer["layer"]: layer for layer in recurrent_layers(model)}
    return [{"layer": layer.name, "class": type(layer).__name__,
             **{key: value for key, value in recurrent.get(layer.name, {}).items()
                if key in ("cell", "masked")}}
            for layer in model.layers]


def _tflite_input_dtype(model_path: Path) -> str | None:
    from .measure import inspect_tflite

    try:
        return inspect_tflite(Path(model_path).read_bytes()).inputs[0]["dtype"]
    except (OSError, IndexError):
        return None


def _save_keras(model: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    from .tfcompat import import_tensorflow

    _, tf_keras = import_tensorflow()
    deployable = clone_with_weights(tf_keras, model)  # uncompiled: no optimizer state in the file
    deployable.save(tmp)
    tmp.replace(path)


# --- variants -----------------------------------------------------------------------------------


def _make_converter(manifest: dict) -> Callable[..., tuple[Any, list[str]]]:
    def make(model: Any = None, mode: str = "float32") -> tuple[Any, list[str]]:
        from .keras_convert import keras_converter
        from .tfcompat import import_tensorflow

        tf, _ = import_tensorflow()
        if model is not None:
            return keras_converter(model, mode)
        if manifest["model_kind"] == "keras":
            return keras_converter(_load_keras(manifest["model_path"]), mode)
        if manifest["model_kind"] == "savedmodel":
            return tf.lite.TFLiteConverter.from_saved_model(manifest["model_path"]), []
        raise ModelError(f"{manifest['model_name']} is a TensorFlow Lite file; it can be measured "
                         f"as it is but not converted again: upload the Keras model to convert it")
    return make


def measure_call_latency(call: Callable[[Any], Any], sample: Any, settings: MeasureSettings) -> dict:
    """Batch-1 latency of a TensorFlow callable (result read back), same run counts as TFLite."""
    for _ in range(max(1, settings.warmup_runs)):
        call(sample)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < settings.min_runs or time.perf_counter() - started < settings.min_seconds:
        t0 = time.perf_counter()
        call(sample)
        times.append((time.perf_counter() - t0) * 1000)
    samples = np.asarray(times)
    return {"p50_ms": float(np.percentile(samples, 50)), "p90_ms": float(np.percentile(samples, 90)),
            "mean_ms": float(samples.mean()), "std_ms": float(samples.std()), "runs": len(times),
            "num_threads": None, "samples_ms": [round(t, 4) for t in times]}


def measure_variant(payload: dict, emit: Emit, shared_lock: Any = None) -> dict:
    """Produce one variant and measure size, accuracy, agreement, SQNR, latency and ops."""
    from . import measure, predictions, uncertainty
    from .techniques import BuildContext, get_technique

    manifest = payload["manifest"]
    spec = TechniqueSpec.from_dict(payload["technique"])
    settings = MeasureSettings.from_dict(payload["measure"])
    cache = ArtifactCache(Path(payload["cache_dir"]))
    technique = get_technique(spec.id)
    if manifest["model_kind"] not in technique.sources:
        raise TechniqueError(f"{spec.id} cannot run on {manifest['model_name']} "
                             f"({_KIND_WORDS[manifest['model_kind']]}); it needs "
                             f"{' or '.join(_KIND_WORDS[k] for k in technique.sources)}")
    dataset = _load_dataset(manifest["dataset_path"])
    reference = np.load(manifest["reference_path"]) if manifest.get("reference_path") else None
    context = BuildContext(load_keras_model=lambda: _load_keras(manifest["model_path"]),
                           make_converter=_make_converter(manifest), dataset=dataset,
                           on_progress=emit, cache=cache, manifest=manifest)

    emit({"stage": "convert", "message": f"producing {spec.id}"})
    started = time.perf_counter()
    produced = technique.produce(context, dict(spec.params))
    conversion_seconds = time.perf_counter() - started
    details: dict[str, Any] = {"split_sizes": manifest["split_sizes"], **produced.details}
    row: dict[str, Any] = {"conversion_seconds": conversion_seconds}

    emit({"stage": "measure", "message": f"measuring {spec.id}"})
    io = manifest.get("io")
    every_output: list[np.ndarray] | None = None
    if produced.tflite is None:
        float_model = float_model_of(manifest)
        if io:
            every_output = float_model.predict_all(dataset.x_test)
            outputs = every_output[_label_index(io)]
        else:
            outputs = float_model.predict(dataset.x_test)
        artifact = float_model.path
        row["conversion_seconds"] = None
        with _held(shared_lock) as held:
            latency = measure_call_latency(float_model.call, float_model.sample(dataset.x_test), settings)
        model_bytes, gzip_bytes = float_model.artifact_bytes()
        row.update(model_bytes=model_bytes, gzip_bytes=gzip_bytes,
                   latency_method=float_model.latency_method, input_dtype=float_model.input_dtype,
                   output_dtype="float32", float_ops=None, total_ops=None)
        details["keras_layers"] = list(float_model.layers)
        details["float_framework"] = float_model.framework
    else:
        artifact = cache.write_bytes("artifacts", payload["result_key"], ".tflite", produced.tflite)
        if io:
            every_output = measure.predict_tflite_io(produced.tflite, dataset.x_test, io,
                                                     num_threads=settings.num_threads)
            outputs = every_output[_label_index(io)]
            with _held(shared_lock) as held:
                latency = measure.measure_latency_io(produced.tflite, dataset.x_test, io, settings).to_dict()
        else:
            outputs = measure.predict_tflite(produced.tflite, dataset.x_test, num_threads=settings.num_threads)
            with _held(shared_lock) as held:
                latency = measure.measure_latency(produced.tflite, dataset.x_test[0], settings).to_dict()
        inspection = measure.inspect_tflite(produced.tflite)
        details["inspection"] = inspection.to_dict()
        row.update(model_bytes=len(produced.tflite), gzip_bytes=measure.gzip_size(produced.tflite),
                   latency_method=measure.LATENCY_METHOD,
                   input_dtype=inspection.inputs[0]["dtype"], output_dtype=inspection.outputs[0]["dtype"],
                   float_ops=inspection.float_ops, total_ops=inspection.total_ops)
    if shared_lock is not None and not held.acquired:
        details["latency_note"] = (f"timed without the workers' shared lock (not free after "
                                   f"{held.wait:.0f} s): another measurement may have overlapped")
    details["predictions"] = {
        "top1": str(predictions.save_variant(cache, payload["result_key"], outputs)),
        **predictions.save_workload(cache, manifest["model_hash"], manifest["dataset_hash"], reference,
                                    dataset.y_test if dataset.has_labels else None,
                                    manifest.get("num_classes"))}
    if io and every_output is not None:
        details["outputs"] = _per_output_fidelity(io, every_output, manifest)
    details["latency_samples_ms"] = latency.pop("samples_ms", [])
    details["latency_others_cpu_share"] = latency.pop("others_cpu_share", None)
    if not dataset.has_labels:
        details.update(labels=False, label_note="no labels in the dataset: accuracy is not measured; "
                                                "compare on agreement with the float model")
    row.update(
        accuracy=measure.accuracy(outputs, dataset.y_test) if dataset.has_labels else None,
        agreement=measure.agreement(outputs, reference) if reference is not None else None,
        sqnr_db=measure.sqnr_db(outputs, reference) if reference is not None else None,
        latency_p50_ms=latency["p50_ms"], latency_p90_ms=latency["p90_ms"],
        latency_mean_ms=latency["mean_ms"], latency_std_ms=latency["std_ms"],
        latency_runs=latency["runs"], num_threads=latency.get("num_threads"),
        artifact_path=str(artifact),
        measured_at=datetime.now(timezone.utc).isoformat(),
        provenance=provenance(settings), details=details,
    )
    row.update(uncertainty.row_intervals(row))  # in the body, so a warm run reads them from the cache
    return row


def _label_index(io: dict) -> int:
    return [o["name"] for o in io["outputs"]].index(io["label_output"])


def _per_output_fidelity(io: dict, outputs: list[np.ndarray], manifest: dict) -> list[dict]:
    """Agreement (for class outputs) and SQNR of every output against the float model's."""
    from . import measure

    path = Path(manifest["reference_path"]).with_suffix(".all.npz") if manifest.get("reference_path") else None
    references = None
    if path is not None and path.exists():
        with np.load(path) as data:
            references = [data[f"output_{k}"] for k in range(len(outputs))]
    rows = []
    for k, head in enumerate(io["outputs"]):
        entry: dict[str, Any] = {"output": head["name"], "labels": head["name"] == io["label_output"]}
        if references is not None:
            classes = len(head["shape"]) == 1 and (head["shape"][0] or 0) >= 2
            entry["agreement"] = measure.agreement(outputs[k], references[k]) if classes else None
            entry["sqnr_db"] = measure.sqnr_db(outputs[k].reshape(references[k].shape), references[k])
        rows.append(entry)
    return rows


_KIND_WORDS = {"keras": "a tf_keras model", "savedmodel": "a SavedModel",
               "tflite": "a TensorFlow Lite file"}


LATENCY_LOCK_WAIT_SECONDS = 300.0


class _held:
    """Hold the pool's shared lock (if any) so that two latency measurements never overlap.

    After `wait` seconds the measurement goes ahead without it (a lock lost with a killed worker
    must not stop every later variant); `acquired` says which happened, and the row records it.
    """

    def __init__(self, lock: Any, wait: float = LATENCY_LOCK_WAIT_SECONDS) -> None:
        self.lock, self.wait, self.acquired = lock, wait, False

    def __enter__(self) -> "_held":
        if self.lock is not None:
            self.acquired = bool(self.lock.acquire(timeout=self.wait))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.acquired:
            self.lock.release()


def copy_into_cache(source: Path, target: Path) -> Path:
    """Copy a file or folder into the cache atomically (rename of a finished temporary copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if source.is_dir():
        shutil.copytree(source, tmp)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target
