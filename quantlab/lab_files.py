"""The Lab's files and requests, shared by its page engine (quantlab.lab) and its TensorFlow worker
(quantlab.sensitivity): where each cached file lives, the tensors .npz format, and FakeQuantRequest.

An engine module: it imports no page engine, so the worker never reaches back into the dashboard.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .cache import ArtifactCache, write_atomically
from .calibrate import KMEANS_MAX_BITS, SUPPORTED_BITS, WEIGHT_BITS, QuantConfig
from .config import ENGINE_VERSION, content_hash
from .errors import QuantLabError

LAB_DIR = "lab"
LAB_FORMAT = 2                       # bump when the .npz / .json layout below changes (2: folded kernels)
FOLDED_ROLE = "folded kernel"        # a kernel times its batch norm's scale: what TFLite quantizes
EVALUATION_VERSION = 2               # bump when fake-quant evaluation changes (2: batch norm folded)

# --- where things live ----------------------------------------------------------------------------


def lab_file(cache: ArtifactCache, name: str) -> Path:
    return Path(cache.root) / LAB_DIR / name


def weights_path(cache: ArtifactCache, manifest: Mapping[str, Any]) -> Path:
    return lab_file(cache, f"weights-{manifest['model_hash']}.npz")


def activations_path(cache: ArtifactCache, manifest: Mapping[str, Any]) -> Path:
    return lab_file(cache, f"activations-{manifest['model_hash']}-{manifest['dataset_hash']}.npz")


def sensitivity_path(cache: ArtifactCache, manifest: Mapping[str, Any]) -> Path:
    key = content_hash({"format": LAB_FORMAT, "engine": ENGINE_VERSION, "model": manifest["model_hash"],
                        "dataset": manifest["dataset_hash"], "conversion": "int8-fallback"})
    return lab_file(cache, f"sensitivity-{key}.json")


def evaluation_path(cache: ArtifactCache, manifest: Mapping[str, Any], request: "FakeQuantRequest") -> Path:
    key = content_hash({"format": LAB_FORMAT, "evaluation": EVALUATION_VERSION, "engine": ENGINE_VERSION,
                        "model": manifest["model_hash"], "dataset": manifest["dataset_hash"],
                        "request": request.to_dict()})
    return lab_file(cache, f"evaluate-{key}.json")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        Path(path).unlink(missing_ok=True)   # a damaged entry is recomputed, never trusted
        return None


def write_json(path: Path, value: Mapping[str, Any]) -> Path:
    write_atomically(Path(path), json.dumps(value, sort_keys=True, default=str).encode())
    return Path(path)


# --- tensors (.npz written by the worker, read here) ----------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One extracted tensor: a layer's weight, or a layer's output on the calibration split."""

    key: str
    name: str
    layer: str
    layer_class: str
    kind: str            # weight | activation
    role: str            # kernel, bias, ... or output
    shape: tuple[int, ...]
    size: int
    channel_axis: int
    quantized: bool      # quantized by TFLite (kernels, activations) or kept float (biases)
    samples: int | None = None

    @property
    def label(self) -> str:
        shape = "×".join(map(str, self.shape))
        return f"{self.name} ({self.layer_class}, {shape})"

    @property
    def channels(self) -> int:
        return int(self.shape[self.channel_axis]) if self.shape else 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorInfo":
        return cls(key=data["key"], name=data["name"], layer=data["layer"], layer_class=data["layer_class"],
                   kind=data["kind"], role=data["role"], shape=tuple(int(d) for d in data["shape"]),
                   size=int(data["size"]), channel_axis=int(data["channel_axis"]),
                   quantized=bool(data["quantized"]), samples=data.get("samples"))


@dataclass(frozen=True, eq=False)
class LabTensors:
    """The tensors of one .npz file: what they are, and their values."""

    infos: tuple[TensorInfo, ...]
    arrays: Mapping[str, np.ndarray]
    path: str

    def get(self, name: str) -> np.ndarray:
        for info in self.infos:
            if info.name == name:
                return self.arrays[info.key]
        raise QuantLabError(f"no tensor named {name!r}; pick one of {', '.join(i.name for i in self.infos)}")

    def info(self, name: str) -> TensorInfo:
        for info in self.infos:
            if info.name == name:
                return info
        raise QuantLabError(f"no tensor named {name!r}; pick one of {', '.join(i.name for i in self.infos)}")

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.infos]


def save_tensors(path: Path, arrays: Mapping[str, np.ndarray], infos: Sequence[Mapping[str, Any]],
                 manifest: Mapping[str, Any]) -> Path:
    """Write tensors and their description as one .npz, atomically."""
    meta = {"format": LAB_FORMAT, "model_hash": manifest["model_hash"],
            "dataset_hash": manifest["dataset_hash"], "tensors": list(infos)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{threading.get_ident()}.tmp.npz")
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)
    return path


def load_tensors(path: Path) -> LabTensors:
    """Read a tensors .npz written by save_tensors (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        if meta.get("format") != LAB_FORMAT:
            raise QuantLabError(f"{Path(path).name} was written by another QuantLab version; "
                                f"delete it and extract the tensors again")
        infos = tuple(TensorInfo.from_dict(item) for item in meta["tensors"])
        arrays = {info.key: data[info.key] for info in infos}
    return LabTensors(infos, arrays, str(path))


def tensors_ready(cache: ArtifactCache, manifest: Mapping[str, Any]) -> bool:
    ok = True
    for path in (weights_path(cache, manifest), activations_path(cache, manifest)):
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as data:
                ok = ok and json.loads(str(data["__meta__"])).get("format") == LAB_FORMAT
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            return False
    return ok



# --- model level: what to fake-quantize ----------------------------------------------------------


@dataclass(frozen=True)
class FakeQuantRequest:
    """How to fake-quantize a model: bits per layer (32 = float) and the quantizer settings."""

    weight_bits: Mapping[str, int]
    symmetric: bool = True
    per_channel: bool = False
    calibrator: str = "max"
    percentile: float = 99.99
    method: str = "linear"
    activations: bool = False
    activation_bits: int = 8

    def __post_init__(self) -> None:
        bits = {}
        for layer, value in sorted(dict(self.weight_bits).items()):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value) or value != int(value) or int(value) not in WEIGHT_BITS:
                raise QuantLabError(f"layer {layer!r} has bit width {value!r}; choose one of "
                                    f"{', '.join(map(str, WEIGHT_BITS))}")
            bits[str(layer)] = int(value)
            if self.method == "kmeans" and KMEANS_MAX_BITS < value < 32:
                raise QuantLabError(f"layer {layer!r} has {value} bits but k-means goes up to "
                                    f"{KMEANS_MAX_BITS}; lower it, keep it float (32) or use linear")
        object.__setattr__(self, "weight_bits", bits)
        if int(self.activation_bits) not in SUPPORTED_BITS:
            raise QuantLabError(f"activation bit width {self.activation_bits} is not supported; choose one "
                                f"of {', '.join(map(str, SUPPORTED_BITS))}")
        self.weight_config(8, -1)   # check the settings once, with a clear error
        self.activation_config()

    def weight_config(self, bits: int, axis: int) -> QuantConfig:
        return QuantConfig(bits=bits, symmetric=self.symmetric,
                           per_channel=self.per_channel and self.method == "linear", axis=axis,
                           calibrator=self.calibrator, percentile=self.percentile, method=self.method)

    def activation_config(self) -> QuantConfig:
        """Per-tensor, asymmetric, linear (as TFLite's int8 activations), with the chosen calibrator."""
        return QuantConfig(bits=int(self.activation_bits), symmetric=False, per_channel=False,
                           calibrator=self.calibrator, percentile=self.percentile)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight_bits"] = dict(self.weight_bits)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FakeQuantRequest":
        names = ("weight_bits", "symmetric", "per_channel", "calibrator", "percentile", "method",
                 "activations", "activation_bits")
        return cls(**{k: data[k] for k in names if k in data})
