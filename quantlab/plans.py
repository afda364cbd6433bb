"""Plans: models x datasets x techniques (x thread counts) as many sweeps, from one TOML file.

    name = "zoo"                                  # optional; the plan id is name + content hash
    models = ["seed-cnn", "models/mine.keras"]
    datasets = ["digits-28"]
    techniques = ["float32", "dynamic", "int8-only"]   # or "all", or "id:param=value,..." text
    threads = [1, 2, 4]                           # optional: one sweep per LiteRT thread count
    epochs = 3                                    # optional: baseline training epochs
    min_runs = 20                                 # optional latency settings
    min_seconds = 0.5

A model or dataset that is not a built-in name is a path; a relative one is looked for next to the
plan file first, then from the current folder.

On Ray the sweeps run side by side (each one's variants are Ray tasks); on the pool, one after the
other. Every sweep is stored with the plan id, so a plan re-run (all cached) and the Compare page's
plan filter find them.
"""

from __future__ import annotations

import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .cache import ArtifactCache
from .config import MeasureSettings, SweepSpec, TrainSettings, content_hash
from .errors import QuantLabError
from .store import Store

PLAN_KEYS = {"name", "models", "datasets", "techniques", "threads", "epochs", "min_runs", "min_seconds"}
MAX_PARALLEL_SWEEPS = 8  # on Ray: sweeps submitted at once (their tasks queue on the cluster)


@dataclass(frozen=True)
class Plan:
    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    techniques: str
    threads: tuple[int, ...] = (1,)
    epochs: int = TrainSettings.epochs
    min_runs: int = MeasureSettings.min_runs
    min_seconds: float = MeasureSettings.min_seconds

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "models": list(self.models), "datasets": list(self.datasets),
                "techniques": self.techniques, "threads": list(self.threads), "epochs": self.epochs,
                "min_runs": self.min_runs, "min_seconds": self.min_seconds}

    @property
    def plan_id(self) -> str:
        """The same plan file gives the same id, so its re-runs are found together."""
        return f"{self.name}-{content_hash(self.to_dict(), 8)}"

    def sweep_specs(self) -> list[SweepSpec]:
        from .runner import guess_model_kind, resolve_model
        from .techniques import parse_technique_list

        specs = []
        for model in self.models:
            kind = guess_model_kind(resolve_model(model))
            for dataset in self.datasets:
                for threads in self.threads:
                    specs.append(SweepSpec(
                        model=model, dataset=dataset, techniques=parse_technique_list(self.techniques, kind),
                        train=TrainSettings(epochs=self.epochs),
                        measure=MeasureSettings(num_threads=threads, min_runs=self.min_runs,
                                                min_seconds=self.min_seconds)))
        return specs


def _strings(data: dict, key: str, path: Path) -> tuple[str, ...]:
    value = data.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise QuantLabError(f"{path}: `{key}` must be a non-empty list of names, e.g. {key} = [\"...\"]")
    return tuple(value)


def _resolve_next_to(plan_path: Path, entries: tuple[str, ...], builtins: Mapping[str, Any]) -> tuple[str, ...]:
    """Relative paths found next to the plan file, as such; built-in names and the rest unchanged."""
    def place(entry: str) -> str:
        beside = Path(plan_path).parent / entry
        if entry in builtins or Path(entry).is_absolute() or not beside.exists():
            return entry
        return str(beside)
    return tuple(place(entry) for entry in entries)


def load_plan(path: Path) -> Plan:
    """Read and check a plan file; errors name the file and the key to fix."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QuantLabError(f"no plan file at {path}; pass a .toml file with models, datasets and techniques")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QuantLabError(f"{path} is not valid TOML ({str(exc).splitlines()[0]})") from None
    unknown = set(data) - PLAN_KEYS
    if unknown:
        raise QuantLabError(f"{path}: unknown keys {sorted(unknown)}; a plan has {sorted(PLAN_KEYS)}")
    techniques = data.get("techniques", "all")
    if isinstance(techniques, list):
        techniques = ",".join(str(t) for t in techniques)
    if not isinstance(techniques, str) or not techniques:
        raise QuantLabError(f"{path}: `techniques` must be \"all\" or a list of technique ids")
    threads = data.get("threads", [1])
    threads = [threads] if isinstance(threads, int) else threads
    if not isinstance(threads, list) or not threads or not all(isinstance(t, int) and t >= 1 for t in threads):
        raise QuantLabError(f"{path}: `threads` must be a list of thread counts of at least 1, e.g. [1, 2, 4]")
    settings = {key: data.get(key, default) for key, default in (
        ("epochs", TrainSettings.epochs), ("min_runs", MeasureSettings.min_runs),
        ("min_seconds", MeasureSettings.min_seconds))}
    try:  # checked here, where the file can be named, not when its sweeps start
        TrainSettings(epochs=settings["epochs"])
        MeasureSettings(min_runs=settings["min_runs"], min_seconds=float(settings["min_seconds"]))
    except QuantLabError as exc:
        raise QuantLabError(f"{path}: {exc}") from None
    except (TypeError, ValueError):  # float() of something else
        raise QuantLabError(f"{path}: min_seconds must be a number, not {settings['min_seconds']!r}") from None
    from .workloads import BUILTIN_DATASETS, BUILTIN_MODELS

    return Plan(name=str(data.get("name") or Path(path).stem),
                models=_resolve_next_to(path, _strings(data, "models", path), BUILTIN_MODELS),
                datasets=_resolve_next_to(path, _strings(data, "datasets", path), BUILTIN_DATASETS),
                techniques=techniques, threads=tuple(threads),
                epochs=settings["epochs"], min_runs=settings["min_runs"],
                min_seconds=float(settings["min_seconds"]))


@dataclass
class SweepResult:
    """One sweep of a plan, as the summary table shows it."""

    spec: SweepSpec
    sweep_id: str | None = None
    variants: int = 0
    cached: int = 0
    failed: int = 0
    seconds: float = 0.0
    error: str | None = None
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"model": Path(self.spec.model).name, "dataset": Path(self.spec.dataset).name,
                "threads": self.spec.measure.num_threads, "variants": self.variants, "cached": self.cached,
                "failed": self.failed, "seconds": round(self.seconds, 1), "sweep_id": self.sweep_id,
                "error": self.error}


@dataclass
class PlanReport:
    plan_id: str
    sweeps: list[SweepResult]
    seconds: float
    executor: str

    @property
    def ok(self) -> bool:
        return all(s.error is None for s in self.sweeps)


def run_plan(plan: Plan, *, store: Store, cache: ArtifactCache, ray: str | None = None,
             on_sweep: Callable[[int, int, SweepResult], None] | None = None,
             cancel: threading.Event | None = None, workers: int | None = None) -> PlanReport:
    """Run every sweep of `plan`: side by side on Ray (`ray` an address), in turn on the pool.

    A sweep that fails (bad input, lost head) is reported in its line and the others go on.
    """
    from .runner import SweepOptions, check_spec, run_sweep

    specs = plan.sweep_specs()
    for spec in specs:  # every input checked before any sweep starts
        check_spec(spec, store)
    from contextlib import nullcontext

    if ray:
        from .ray_executor import shared_connection
    options = SweepOptions(workers=workers, source="plan", ray=ray, plan_id=plan.plan_id)
    results = [SweepResult(spec) for spec in specs]
    finished = [0]
    guard = threading.Lock()

    def one(result: SweepResult) -> SweepResult:
        started = time.perf_counter()
        try:
            report = run_sweep(result.spec, store=store, cache=cache, options=options, cancel=cancel)
            result.sweep_id, result.rows = report.sweep_id, report.rows
            result.variants = len(report.rows)
            result.cached = sum(1 for r in report.rows if r["cached"] and not r["error"])
            result.failed = len(report.failed)
        except QuantLabError as exc:
            result.error = (str(exc).splitlines() or [type(exc).__name__])[0]
        result.seconds = time.perf_counter() - started
        with guard:
            finished[0] += 1
            if on_sweep:
                on_sweep(finished[0], len(results), result)
        return result

    started = time.perf_counter()
    with shared_connection() if ray else nullcontext():  # Ray, if started, once for every sweep
        if ray:
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_SWEEPS, len(results))) as threads:
                list(threads.map(one, results))
        else:
            for result in results:
                one(result)
    return PlanReport(plan.plan_id, results, time.perf_counter() - started, "ray" if ray else "pool")
