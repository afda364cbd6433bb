"""Content-addressed artifacts under the cache folder, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CACHE_DIR = Path("cache")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ArtifactCache:
    """Files keyed by a content hash of everything that determines them.

    results/<key>.json   a measured variant (what a warm run reports without any work)
    artifacts/<key>.*    the .tflite or Keras file a variant produced
    prepared/<key>.json  a prepared workload: dataset and baseline paths and hashes
    models/<key>.keras   trained baselines and fine-tuned models
    datasets/            built-in datasets, split and saved as .npz
    """

    root: Path = DEFAULT_CACHE_DIR

    def __post_init__(self) -> None:
        # Absolute, so that paths stored in rows and manifests mean the same file from any folder.
        object.__setattr__(self, "root", Path(self.root).resolve())

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return Path(self.root) / kind / f"{key}{suffix}"

    def read_json(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self.path(kind, key, ".json")
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            path.unlink(missing_ok=True)  # a damaged entry is recomputed, never trusted
            return None

    def write_json(self, kind: str, key: str, value: dict[str, Any]) -> Path:
        path = self.path(kind, key, ".json")
        write_atomically(path, json.dumps(value, sort_keys=True, default=str).encode())
        return path

    def write_bytes(self, kind: str, key: str, suffix: str, data: bytes) -> Path:
        path = self.path(kind, key, suffix)
        write_atomically(path, data)
        return path
