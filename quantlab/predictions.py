"""Per-sample top-1 predictions kept beside each result, so two variants can be paired sample by sample.

predictions/<result_key>.npy                    a variant's top-1 class per test sample
predictions/<model_hash>-<dataset_hash>.float.npy   the float reference model's top-1 per sample
predictions/<dataset_hash>.labels.npy           the test labels (absent for a dataset without labels)

Classes are stored in the smallest integer type that holds them (uint8 up to 256 classes): 450
samples take 450 bytes. A row's details name its files under `predictions`.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .cache import ArtifactCache, write_atomically

KIND = "predictions"


def top1(outputs: Any) -> np.ndarray:
    """The top-1 class per sample (argmax over each sample's outputs), in a compact integer type."""
    values = np.asarray(outputs)
    classes = values.reshape(len(values), -1)
    return compact(classes.argmax(axis=1), classes.shape[1])


def compact(classes: Any, num_classes: int | None = None) -> np.ndarray:
    """Class indices in uint8, int16 or int32, whichever holds `num_classes` (default: the largest)."""
    classes = np.asarray(classes).reshape(-1)
    largest = int(num_classes if num_classes is not None else (classes.max() + 1 if classes.size else 1))
    dtype = np.uint8 if largest <= 256 else np.int16 if largest <= 32768 else np.int32
    return classes.astype(dtype)


def save(path: Path, classes: np.ndarray) -> Path:
    """Write one .npy atomically (readers see the old file or the whole new one)."""
    buffer = io.BytesIO()
    np.save(buffer, classes, allow_pickle=False)
    write_atomically(path, buffer.getvalue())
    return path


def save_variant(cache: ArtifactCache, result_key: str, outputs: Any) -> Path:
    return save(cache.path(KIND, result_key, ".npy"), top1(outputs))


def save_workload(cache: ArtifactCache, model_hash: str, dataset_hash: str, reference: Any | None,
                  labels: Any | None, num_classes: int | None) -> dict[str, str | None]:
    """The float reference's top-1 and the labels, written once per workload; returns their paths."""
    paths: dict[str, str | None] = {"float_top1": None, "labels": None}
    if reference is not None:
        path = cache.path(KIND, f"{model_hash}-{dataset_hash}", ".float.npy")
        if not path.exists():
            save(path, top1(reference))
        paths["float_top1"] = str(path)
    if labels is not None:
        path = cache.path(KIND, dataset_hash, ".labels.npy")
        if not path.exists():
            save(path, compact(labels, num_classes))
        paths["labels"] = str(path)
    return paths


def files_of(details: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The prediction files a row's details name: top1, float_top1, labels (None when not kept)."""
    named = (details or {}).get(KIND) if isinstance(details, Mapping) else None
    named = named if isinstance(named, Mapping) else {}
    return {key: named.get(key) for key in ("top1", "float_top1", "labels")}


def all_present(details: Mapping[str, Any] | None) -> bool:
    """True when a row's own top-1 file is named and exists (what a cached result must have)."""
    path = files_of(details)["top1"]
    return bool(path) and Path(path).exists()


def load(path: str | None) -> np.ndarray | None:
    """A kept prediction file, or None when it is not named or no longer exists (memoized)."""
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return _load(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=512)
def _load(path: str, mtime_ns: int, size: int) -> np.ndarray | None:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    values.setflags(write=False)
    return values
