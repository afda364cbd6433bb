"""The technique registry: technique id -> its parameters and how it produces a .tflite model.

Each family declares its techniques in its own module (quantlab.ptq: the converter's post-training
modes; quantlab.fine_tuning: tensorflow-model-optimization; quantlab.litert_quant: the LiteRT
Quantizer), loaded on first use. Listing techniques and checking parameters import no TensorFlow;
producing a model does, and runs in a worker process (see runner.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .config import TechniqueSpec
from .errors import QuantLabError, TechniqueError

@dataclass(frozen=True)
class Param:
    """A technique parameter: its default, its type, and the values it accepts."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    parse: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)  # text params

    @property
    def kind(self) -> str:
        if self.choices:
            return "choice"
        if isinstance(self.default, str):
            return "text"
        return type(self.default).__name__  # int, float or bool

    def coerce(self, value: Any, technique: str) -> Any:
        """Check and convert `value`; raise a TechniqueError that names the accepted values."""
        where = f"{technique}: parameter {self.name}"
        if self.choices:
            if value not in self.choices:
                raise TechniqueError(f"{where} must be one of {', '.join(map(str, self.choices))}, "
                                     f"not {value!r}")
            return value
        if isinstance(self.default, str):
            if not isinstance(value, str):
                raise TechniqueError(f"{where} must be text, not {value!r}")
            return self.parse(value) if self.parse else value
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
    check: Callable[[dict], None] | None = field(default=None, repr=False)  # refuses bad combinations
    in_all: bool = True                                   # part of `--techniques all`

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Parameters with defaults filled in, each checked; unknown names are refused."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise TechniqueError(f"{self.id} has no parameter {unknown[0]!r}; it accepts: {accepted}")
        resolved = {name: p.coerce(given[name], self.id) if name in given else p.default
                    for name, p in known.items()}
        if self.check:
            self.check(resolved)
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "label": self.label,
                "description": self.description, "params": [p.to_dict() for p in self.params],
                "needs_calibration": self.needs_calibration, "fine_tunes": self.fine_tunes,
                "integer_only": self.integer_only, "sources": list(self.sources)}


_REGISTRY: dict[str, Technique] = {}
FAMILY_MODULES = ("ptq", "fine_tuning", "litert_quant")   # registration order is listing order


def register(technique: Technique) -> Technique:
    if technique.id in _REGISTRY:
        raise ValueError(f"technique {technique.id} registered twice")
    _REGISTRY[technique.id] = technique
    return technique


_LOADING = threading.Lock()


def _registry() -> dict[str, Technique]:
    """Every family's techniques, registered in FAMILY_MODULES order on first use (each family module
    lists its own in TECHNIQUES), whichever module was imported first."""
    if _REGISTRY:
        return _REGISTRY
    from importlib import import_module

    with _LOADING:
        if not _REGISTRY:
            for technique in [t for name in FAMILY_MODULES
                              for t in import_module(f"{__package__}.{name}").TECHNIQUES]:
                register(technique)
    return _REGISTRY


def all_techniques() -> list[Technique]:
    return list(_registry().values())


def get_technique(technique_id: str) -> Technique:
    try:
        return _registry()[technique_id]
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
        defaults = {p.name: p.default for p in get_technique(technique_id).params}
    except QuantLabError:
        defaults = {}
    changed = {k: v for k, v in params.items() if defaults.get(k) != v}
    if not changed:
        return technique_id
    return f"{technique_id}({', '.join(f'{k}={short_value(v)}' for k, v in changed.items())})"


LONG_VALUE = 40


def short_value(value: Any) -> str:
    """A parameter value for a label: a long text (a recipe) as `#` and the first 8 hex digits of
    its hash, so that two recipes stay apart and a label stays one short line."""
    text = str(value)
    if len(text) <= LONG_VALUE:
        return text
    import hashlib

    return "#" + hashlib.sha256(text.encode()).hexdigest()[:8]


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
        return tuple(resolve_spec(TechniqueSpec(t.id)) for t in techniques_for(model_kind) if t.in_all)
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


