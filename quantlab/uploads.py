"""User files as workloads: a checked .npz becomes a Dataset, a checked model file a cached model.

The checks themselves live in safe_load.py; this module decides what an accepted file becomes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache import ArtifactCache, write_atomically
from .config import PREPARE_VERSION
from .errors import DatasetError, ModelError
from .safe_load import (PER_INPUT_ARRAY, load_keras_model, load_npz_dataset, load_tflite_bytes,
                        validate_dataset_for_model)
from .workloads import CALIBRATION_SIZE, SPLIT_SEED, Dataset


def check_dataset_file(path: Path) -> None:
    """Refuse a bad .npz before any work starts (no TensorFlow needed)."""
    load_npz_dataset(path)


UNLABELLED = -1  # the label of every sample of a dataset given without labels


def pack_inputs(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """x_<split>_<input> arrays packed side by side into one x_<split> row per sample (float32),
    and the layout ([name, per-sample shape] in packing order) that unpacks them; unchanged, "" when
    the arrays are for one input."""
    names = sorted({key.split("_", 2)[2] for key in arrays if PER_INPUT_ARRAY.match(key)})
    if not names:
        return arrays, ""
    packed = {key: value for key, value in arrays.items() if not PER_INPUT_ARRAY.match(key)}
    for split in ("test", "calib", "train"):
        present = [n for n in names if f"x_{split}_{n}" in arrays]
        if not present:
            continue
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise DatasetError(f"x_{split} is given for inputs {', '.join(present)} but not for "
                               f"{', '.join(missing)}; save x_{split}_<input> for every input")
        parts = [arrays[f"x_{split}_{n}"] for n in names]
        packed[f"x_{split}"] = np.concatenate([p.reshape(len(p), -1).astype(np.float32) for p in parts], axis=1)
    layout = json.dumps([[n, list(arrays[f"x_test_{n}"].shape[1:])] for n in names])
    return packed, layout


def dataset_from_arrays(name: str, arrays: dict[str, np.ndarray], notes: tuple[str, ...] = (),
                        layout: str = "") -> Dataset:
    """Split user arrays: test as given; calibration from x_calib, else from train, else from test.

    Without y_test every label is UNLABELLED (-1): the dataset `has_labels` is False.
    """
    x_test = arrays["x_test"].astype(np.float32)
    if "y_test" in arrays:
        y_test = arrays["y_test"].astype(np.int64)
    else:
        y_test = np.full(len(x_test), UNLABELLED, dtype=np.int64)
    x_train = arrays.get("x_train", x_test[:0]).astype(np.float32)
    y_train = arrays.get("y_train", y_test[:0]).astype(np.int64)
    source = "; ".join((f"uploaded {name}", *notes))
    if "y_test" not in arrays:
        source += "; no labels (compared on fidelity to the float model)"
    if "x_calib" in arrays:
        x_calib = arrays["x_calib"].astype(np.float32)
        y_calib = np.full(len(x_calib), -1, dtype=np.int64)  # calibration needs no labels
    elif len(x_train) >= 2 * CALIBRATION_SIZE:
        order = np.random.default_rng(SPLIT_SEED).permutation(len(x_train))
        calib, train = order[:CALIBRATION_SIZE], order[CALIBRATION_SIZE:]
        x_calib, y_calib, x_train, y_train = x_train[calib], y_train[calib], x_train[train], y_train[train]
    elif len(x_train):
        x_calib, y_calib = x_train, y_train
        source += "; calibration set = the train split (no x_calib given)"
    else:
        x_calib, y_calib = x_test[:CALIBRATION_SIZE], y_test[:CALIBRATION_SIZE]
        source += "; calibration set drawn from the test split (no x_calib or x_train given)"
    num_classes = int(max(y_test.max(), y_train.max() if len(y_train) else 0)) + 1
    return Dataset(name=name, source=source, num_classes=num_classes, x_train=x_train, y_train=y_train,
                   x_calib=x_calib, y_calib=y_calib, x_test=x_test, y_test=y_test, layout=layout)


def load_uploaded_dataset(path: Path) -> Dataset:
    notes: list[str] = []
    arrays = load_npz_dataset(path, notes=notes)
    arrays, layout = pack_inputs(arrays)
    for key in [k for k in arrays if k.startswith("x_")]:
        if not layout and arrays[key].ndim == 4 and arrays[key].shape[-1] == 1:
            arrays[key] = arrays[key][..., 0]  # (N, H, W, 1) images are stored as (N, H, W)
    return dataset_from_arrays(path.stem, arrays, tuple(notes), layout)


def fit_dataset_to_model(dataset: Dataset, input_shape: tuple[int, ...], num_classes: int,
                         label_output: str | None = None) -> Dataset:
    """The dataset reshaped for the model's input (a missing channel of 1 added), labels checked
    (against `label_output`'s units when the model has several outputs)."""
    if dataset.layout:  # several inputs, packed: their sizes were checked against the model's inputs
        arrays = {"y_test": dataset.y_test, "y_train": dataset.y_train}
        validate_dataset_for_model(arrays, (), num_classes, label_output)
        return Dataset(name=dataset.name, source=dataset.source, num_classes=num_classes,
                       x_train=dataset.x_train, y_train=dataset.y_train, x_calib=dataset.x_calib,
                       y_calib=dataset.y_calib, x_test=dataset.x_test, y_test=dataset.y_test,
                       layout=dataset.layout)
    arrays = {k: getattr(dataset, k) for k in ("x_train", "x_calib", "x_test")}
    arrays.update(y_test=dataset.y_test, y_train=dataset.y_train)
    fitted = validate_dataset_for_model(arrays, input_shape, num_classes, label_output)
    return Dataset(name=dataset.name, source=dataset.source, num_classes=num_classes,
                   x_train=fitted["x_train"], y_train=dataset.y_train, x_calib=fitted["x_calib"],
                   y_calib=dataset.y_calib, x_test=fitted["x_test"], y_test=dataset.y_test)


def check_dataset_for_builtin_model(dataset: Dataset) -> None:
    if not dataset.has_labels:
        raise DatasetError(f"{dataset.name} has no labels (no y_test), and built-in models are "
                           f"trained on your data; add y_test and y_train, or upload your own model")
    if len(dataset.x_train) == 0:
        raise DatasetError(f"{dataset.name} has no train split (x_train, y_train), and built-in models are "
                           f"trained on your data; add x_train and y_train, or upload your own model")
    if len(dataset.input_shape) != 2:
        raise DatasetError(f"{dataset.name}: built-in models take grayscale images of shape (N, H, W), "
                           f"not samples of shape {dataset.input_shape}; reshape the arrays or "
                           f"upload your own model")


@dataclass(frozen=True)
class PreparedModel:
    """An accepted upload, copied into the cache as something QuantLab itself wrote."""

    path: Path
    kind: str  # keras | savedmodel | tflite
    dataset: Dataset
    notes: tuple[str, ...] = ()
    keras3_path: Path | None = None  # a Keras 3 upload's own file: its baseline runs in Keras 3
    io: dict | None = None  # several inputs or outputs: {"inputs", "outputs", "label_output"}


def model_io_plan(loaded: Any, dataset: Dataset, label_output: str | None) -> tuple[dict | None, int]:
    """For a model with several inputs or outputs: how each input unpacks from the dataset's packed
    rows (name, shape, dtype, offset, size), the outputs, and the output the labels belong to; and
    that output's classes. (None, classes) for a one-input, one-output model."""
    inputs, outputs = list(loaded.inputs), list(loaded.outputs)
    if label_output and len(outputs) <= 1:
        raise DatasetError(f"--label-output {label_output}: {loaded.source_name} has one output; "
                           f"leave the label output unset")
    if len(inputs) <= 1 and len(outputs) <= 1:
        if dataset.layout:
            raise DatasetError(f"{dataset.name} has arrays for several inputs but "
                               f"{loaded.source_name} has one input; save x_test (and x_calib, "
                               f"x_train) for it")
        return None, loaded.num_classes
    classifiers = {o["name"]: o for o in outputs if len(o["shape"]) == 1 and (o["shape"][0] or 0) >= 2}
    label = label_output or next(iter(classifiers), None)
    if label not in classifiers:
        names = ", ".join(classifiers) or "none"
        raise DatasetError(f"label output {label!r} is not a classifier output of "
                           f"{loaded.source_name} (classifier outputs: {names}); pick one of them")
    plan: dict[str, Any] = {"outputs": outputs, "label_output": label, "inputs": None}
    if len(inputs) > 1:
        if not dataset.layout:
            names = ", ".join(f"x_test_{i['name']}" for i in inputs)
            raise DatasetError(f"{loaded.source_name} has {len(inputs)} inputs; save one array per "
                               f"input and split: {names} (and x_calib_<name>, x_train_<name>)")
        layout = json.loads(dataset.layout)
        offsets, offset = {}, 0
        for name, shape in layout:
            size = int(np.prod(shape, dtype=np.int64))
            offsets[name] = (offset, size)
            offset += size
        wanted = [i["name"] for i in inputs]
        if set(offsets) != set(wanted):
            raise DatasetError(f"{dataset.name} has arrays for inputs {', '.join(sorted(offsets))}, "
                               f"the model's inputs are {', '.join(wanted)}; name the arrays "
                               f"x_test_<input name> after the model's inputs")
        plan["inputs"] = []
        for spec in inputs:
            start, size = offsets[spec["name"]]
            expected = int(np.prod(spec["shape"], dtype=np.int64))
            if size != expected:
                raise DatasetError(f"x_test_{spec['name']} has {size} values per sample, the "
                                   f"model's input {spec['name']!r} takes {tuple(spec['shape'])} "
                                   f"({expected} values); reshape the array")
            plan["inputs"].append({**spec, "offset": start, "size": size})
    elif dataset.layout:
        raise _several_inputs_for_one(dataset, loaded.source_name)
    classes = int(classifiers[label]["shape"][0])
    return plan, classes


def prepare_uploaded_model(path: Path, file_hash: str, dataset: Dataset, cache: ArtifactCache,
                           label_output: str | None = None) -> PreparedModel:
    """Check an uploaded model safely, fit the dataset to it, and keep a trusted copy in the cache."""
    if path.suffix.lower() == ".tflite":
        data = load_tflite_bytes(path)
        from .measure import inspect_tflite

        inspection = inspect_tflite(data)
        _check_tflite_io(path.name, len(inspection.inputs), len(inspection.outputs), dataset, label_output)
        shape = tuple(inspection.inputs[0]["shape"][1:])
        classes = int(inspection.outputs[0]["shape"][-1])
        target = cache.path("models", f"upload-{file_hash}", ".tflite")
        write_atomically(target, data)
        return PreparedModel(target, "tflite", fit_dataset_to_model(dataset, shape, classes),
                             ("a .tflite upload is measured as it is; there is no float model to agree with",))
    workdir = cache.path("uploads-work", file_hash, "")
    loaded = load_keras_model(path, workdir)
    io, classes = model_io_plan(loaded, dataset, label_output)
    shape = (int(dataset.x_test.shape[1]),) if io and io["inputs"] else loaded.input_shape
    several_outputs = bool(io) and len(io["outputs"]) > 1  # only then is there an output to choose
    fitted = fit_dataset_to_model(dataset, shape, classes, io["label_output"] if several_outputs else None)
    from .tasks import copy_into_cache

    keras3_path = None
    if loaded.keras3_file is not None:
        keras3_path = cache.path("models", f"upload-{file_hash}-keras3", loaded.keras3_file.suffix)
        if not keras3_path.exists():
            copy_into_cache(loaded.keras3_file, keras3_path)
    if loaded.kind == "tf_keras":
        # The prepared copy depends on how QuantLab prepares (a mixed-precision model becomes float32).
        target = cache.path("models", f"upload-{file_hash}-p{PREPARE_VERSION}", ".keras")
        _save_model(loaded.keras_model, target)
        return PreparedModel(target, "keras", fitted, tuple(loaded.notes), keras3_path, io)

    target = cache.path("models", f"upload-{file_hash}", "")
    if not target.exists():
        copy_into_cache(Path(loaded.saved_model_dir), target)
    reference = "the Keras 3 model" if keras3_path else "the SavedModel's serving signature in TensorFlow"
    notes = (*loaded.notes, f"post-training techniques only; {reference} is the float reference")
    if io:
        raise DatasetError(f"{loaded.source_name}: a SavedModel with several inputs or outputs is "
                           f"not measured yet; upload it as a tf_keras or Keras 3 model")
    return PreparedModel(target, "savedmodel", fitted, notes, keras3_path)


def _several_inputs_for_one(dataset: Dataset, model_name: str) -> DatasetError:
    return DatasetError(f"{dataset.name} has arrays for several inputs but {model_name} has one input; "
                        f"save x_test for it")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _check_tflite_io(name: str, inputs: int, outputs: int, dataset: Dataset, label_output: str | None) -> None:
    """What a .tflite upload can be measured with, checked before any work: one input and one output
    (several are matched by name only for Keras models), data for one input, no label output to pick."""
    if inputs > 1 or outputs > 1:
        raise ModelError(f"{name} has {_count(inputs, 'input')} and {_count(outputs, 'output')}; a .tflite "
                         f"is measured with one of each so far: upload the Keras model, whose inputs and "
                         f"outputs QuantLab matches by name")
    if dataset.layout:
        raise _several_inputs_for_one(dataset, name)
    if label_output:
        raise ModelError(f"{name} has one output, so there is no label output to choose; leave the "
                         f"label output ({label_output!r}) empty")


def _save_model(model: Any, target: Path) -> None:
    from .tasks import _save_keras

    if not target.exists():
        _save_keras(model, target)
