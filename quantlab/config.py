"""Configuration types: frozen dataclasses that round-trip to JSON and hash by content."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import QuantLabError

# Bump when a change in QuantLab alters what an artifact or a measurement would be.
ENGINE_VERSION = "3"  # 3: recurrent and int-input conversions, baselines in their own framework, oneDNN off
# Bump when preparing an uploaded model (the checked copy every variant starts from) changes; cached
# results stay, the workload is prepared again. 2: mixed-precision models are prepared as float32.
PREPARE_VERSION = "2"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(value: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def hash_bytes(data: bytes, length: int = 16) -> str:
    return hashlib.sha256(data).hexdigest()[:length]


@dataclass(frozen=True)
class TechniqueSpec:
    """One technique with its parameters, e.g. TechniqueSpec("prune", {"target_sparsity": 0.5})."""

    id: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(sorted(dict(self.params).items())))

    def __hash__(self) -> int:
        return hash((self.id, canonical_json(self.params)))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TechniqueSpec":
        return cls(id=str(data["id"]), params=dict(data.get("params") or {}))

    @property
    def key(self) -> str:
        return content_hash(self.to_dict())


def _check_at_least(name: str, value: Any, lowest: int) -> None:
    """Settings come from the CLI, a plan file or the dashboard: refuse a value no run can use."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise QuantLabError(f"{name} must be a whole number of at least {lowest}, not {value!r}")


def _check_finite(name: str, value: Any, lowest: float, strictly: bool = False) -> None:
    """A finite number above `lowest` (or at least `lowest`)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < lowest or (strictly and value == lowest):
        raise QuantLabError(f"{name} must be a finite number {'above' if strictly else 'of at least'} "
                            f"{lowest:g}, not {value!r}")


@dataclass(frozen=True)
class TrainSettings:
    """How a built-in baseline is trained; part of the baseline's cache key."""

    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 0.002
    seed: int = 0

    def __post_init__(self) -> None:
        _check_at_least("epochs", self.epochs, 1)
        _check_at_least("batch_size", self.batch_size, 1)
        _check_finite("learning_rate", self.learning_rate, 0, strictly=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainSettings":
        return cls(**{k: data[k] for k in ("epochs", "batch_size", "learning_rate", "seed") if k in data})


@dataclass(frozen=True)
class MeasureSettings:
    """How every variant is measured; part of each result's cache key."""

    num_threads: int = 1
    warmup_runs: int = 10
    min_runs: int = 50
    min_seconds: float = 1.0

    def __post_init__(self) -> None:
        _check_at_least("num_threads", self.num_threads, 1)
        _check_at_least("warmup_runs", self.warmup_runs, 0)
        _check_at_least("min_runs", self.min_runs, 1)
        _check_finite("min_seconds", self.min_seconds, 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MeasureSettings":
        names = ("num_threads", "warmup_runs", "min_runs", "min_seconds")
        return cls(**{k: data[k] for k in names if k in data})


@dataclass(frozen=True)
class SweepSpec:
    """A model, a dataset and the techniques to run on them."""

    model: str
    dataset: str
    techniques: tuple[TechniqueSpec, ...]
    train: TrainSettings = TrainSettings()
    measure: MeasureSettings = MeasureSettings()
    label_output: str | None = None  # a model with several outputs: the one the labels belong to

    def to_dict(self) -> dict[str, Any]:
        data = {
            "model": self.model,
            "dataset": self.dataset,
            "techniques": [t.to_dict() for t in self.techniques],
            "train": self.train.to_dict(),
            "measure": self.measure.to_dict(),
        }
        if self.label_output:
            data["label_output"] = self.label_output
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepSpec":
        return cls(
            model=data["model"],
            dataset=data["dataset"],
            techniques=tuple(TechniqueSpec.from_dict(t) for t in data["techniques"]),
            train=TrainSettings.from_dict(data.get("train", {})),
            measure=MeasureSettings.from_dict(data.get("measure", {})),
            label_output=data.get("label_output") or None,
        )
