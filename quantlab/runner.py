"""Sweep orchestration: what is cached, what runs in workers, and one store row per variant.

A warm re-run of the same sweep imports no TensorFlow here: every key is computed from names,
file hashes and settings, and every cached result is read from JSON.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import predictions, uncertainty
from .applicability import refusal
from .cache import ArtifactCache
from .config import ENGINE_VERSION, PREPARE_VERSION, SweepSpec, TechniqueSpec, content_hash
from .errors import QuantLabError
from .pool import PoolLimits, WorkerPool, default_worker_count
from .store import Store, new_id
from .techniques import get_technique
from .workloads import BUILTIN_DATASETS, BUILTIN_MODELS

OnEvent = Callable[[dict], None]


@dataclass(frozen=True)
class InputRef:
    """A built-in name, or a user file with the hash of its content."""

    name: str
    path: str | None = None
    hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "hash": self.hash}

    @property
    def identity(self) -> dict[str, Any]:
        """What determines the work: the name for built-ins, the content for files."""
        return {"builtin": self.name} if self.path is None else {"file": self.hash}


def hash_path(path: Path) -> str:
    """SHA-256 of a file, or of every file (name and content) in a folder."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _resolve(text: str, builtins: dict, what: str, suffixes: str) -> InputRef:
    if text in builtins:
        return InputRef(text)
    path = Path(text)
    if not path.exists():
        raise QuantLabError(f"{what} {text!r} is neither a built-in {what} ({', '.join(builtins)}) "
                            f"nor an existing file; pass one of those names or a path to {suffixes}")
    return InputRef(path.name, str(path.resolve()), hash_path(path))


def resolve_model(text: str) -> InputRef:
    return _resolve(text, BUILTIN_MODELS, "model", "a .keras, .h5, SavedModel .zip/folder or .tflite file")


def resolve_dataset(text: str) -> InputRef:
    return _resolve(text, BUILTIN_DATASETS, "dataset", "a .npz file")


def guess_model_kind(ref: InputRef) -> str:
    """keras or tflite, from the name; a Keras 3 file turns out a savedmodel only once prepared."""
    return "tflite" if ref.path and ref.path.lower().endswith(".tflite") else "keras"


def result_key(manifest: dict, technique: TechniqueSpec, measure: dict) -> str:
    return content_hash({"engine": ENGINE_VERSION, "model": manifest["model_hash"],
                         "dataset": manifest["dataset_hash"], "technique": technique.to_dict(),
                         "measure": measure})


RAY_ADDRESS_ENV = "QUANTLAB_RAY_ADDRESS"  # the dashboard's sweeps run on Ray at this address


def ray_address_from_env() -> str | None:
    """The Ray address the dashboard was started with (QUANTLAB_RAY_ADDRESS), or None: the pool."""
    return os.environ.get(RAY_ADDRESS_ENV, "").strip() or None


@dataclass(frozen=True)
class SweepOptions:
    workers: int | None = None
    limits: PoolLimits = PoolLimits()
    source: str = "cli"
    remeasure: bool = False  # measure every variant again, ignoring cached results (e.g. a busy CPU)
    ray: str | None = None  # a Ray address (local, auto, host:port): run the tasks there, not in the pool
    plan_id: str | None = None  # the plan this sweep belongs to (python -m quantlab plan)


@dataclass
class SweepReport:
    sweep_id: str | None = None
    rows: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row.get("error")]


def check_spec(spec: SweepSpec, store: Store) -> tuple[InputRef, InputRef]:
    """The cheap checks made before anything is written; returns the model and dataset references."""
    model_ref, dataset_ref = resolve_model(spec.model), resolve_dataset(spec.dataset)
    if not spec.techniques:
        raise QuantLabError("no techniques selected; pick at least one technique to run")
    for technique in spec.techniques:
        get_technique(technique.id).resolve(technique.params)
    if dataset_ref.path:
        from .uploads import check_dataset_file
        check_dataset_file(Path(dataset_ref.path))
    store.require_writable()
    return model_ref, dataset_ref


def run_sweep(spec: SweepSpec, *, store: Store, cache: ArtifactCache, on_event: OnEvent | None = None,
              options: SweepOptions = SweepOptions(), cancel: threading.Event | None = None) -> SweepReport:
    """Run every technique of `spec`, reuse what is cached, and store one row per variant.

    Bad input raises a QuantLabError before anything is written. A variant that fails gets a row
    with `error` set; the others go on.
    """
    emit = on_event or (lambda event: None)
    model_ref, dataset_ref = check_spec(spec, store)

    pool: WorkerPool | None = None
    stop = cancel.is_set if cancel is not None else None
    measure_settings = spec.measure.to_dict()
    report: SweepReport | None = None
    try:
        identity = {"engine": ENGINE_VERSION, "prepare": PREPARE_VERSION, "model": model_ref.identity,
                    "dataset": dataset_ref.identity, "train": spec.train.to_dict()}
        if spec.label_output:
            identity["label_output"] = spec.label_output
        prepare_key = content_hash(identity)
        # Sweeps of one workload side by side in this process (a plan's thread counts, the
        # dashboard) prepare it once: the others wait here and read the manifest it cached.
        preparing = _preparing_lock(prepare_key)
        preparing.acquire()
        try:
            manifest, pool = _prepared_manifest(spec, cache, prepare_key, model_ref, dataset_ref, options,
                                                emit, stop)
        finally:
            preparing.release()
        if manifest is None:  # cancelled while preparing: nothing was stored
            emit({"type": "sweep-done", "sweep_id": None, "rows": 0})
            return SweepReport()
        pending = spec.techniques
        report = SweepReport(store.start_sweep(manifest["model_name"], manifest["dataset_name"],
                                               spec.to_dict(), options.source, plan_id=options.plan_id))
        emit({"type": "sweep-start", "sweep_id": report.sweep_id, "total": len(pending),
              "manifest": manifest})

        def announce(row: dict) -> None:
            report.rows.append(row)
            emit({"type": "variant-failed" if row["error"] else "variant-done", "technique": row["technique"],
                  "cached": row["cached"], "row": row, "done": len(report.rows), "total": len(pending)})

        def record(technique: TechniqueSpec, key: str, body: dict, error: str | None) -> None:
            row = _make_row(report.sweep_id, manifest, technique, key, body, False, error)
            store.insert_result(row)
            announce(row)

        to_run: list[tuple[str, dict]] = []
        keyed: dict[str, TechniqueSpec] = {}
        cached_rows: list[dict] = []
        refused: list[dict] = []
        for technique in pending:
            key = result_key(manifest, technique, measure_settings)
            reason = refusal(technique.id, manifest)
            if reason:  # known from the manifest: no worker, no conversion
                refused.append(_make_row(report.sweep_id, manifest, technique, key,
                                         {"details": {"error_kind": "refused", "before_work": True}},
                                         False, reason))
                continue
            body = None if options.remeasure else cache.read_json("results", key)
            # A result cached before per-sample predictions were kept is measured again, once.
            if body is not None and Path(body.get("artifact_path", "")).exists() \
                    and predictions.all_present(body.get("details")):
                cached_rows.append(_make_row(report.sweep_id, manifest, technique, key, body, True, None))
                continue
            keyed[key] = technique
            to_run.append((key, {"kind": "variant", "cache_dir": str(cache.root), "manifest": manifest,
                                 "technique": technique.to_dict(), "measure": measure_settings,
                                 "result_key": key}))
        store.insert_results(cached_rows + refused)  # one transaction: a warm sweep opens the store three times
        for row in cached_rows + refused:
            announce(row)
        if to_run:
            pool = pool or _make_pool(options, len(to_run), cache)
            for key, _ in to_run:
                emit({"type": "variant-queued", "technique": keyed[key].id})

            def forward(key: str, event: dict) -> None:
                emit({"type": "progress", "technique": keyed[key].id, **event})

            executor = "ray" if options.ray else "pool"
            try:
                for outcome in pool.run(to_run, forward, stop=stop):
                    technique = keyed[outcome.task_id]
                    if outcome.ok:
                        outcome.result["provenance"] = with_node(outcome.result.get("provenance"), executor)
                        cache.write_json("results", outcome.task_id, outcome.result)
                        record(technique, outcome.task_id, outcome.result, error=None)
                    else:  # a QuantLab check said no (refused), or something broke (failed)
                        kind = "refused" if outcome.user_error else "failed"
                        record(technique, outcome.task_id, {"details": {"error_kind": kind},
                                                            "provenance": {"executor": executor}},
                               error=outcome.error)
            except QuantLabError:  # the Ray head was lost: rows so far stay, the sweep failed
                store.finish_sweep(report.sweep_id, "failed")
                raise
            for key in pool.stopped_tasks:  # killed mid-way by the cancel: no row, nothing cached
                emit({"type": "variant-cancelled", "technique": keyed[key].id,
                      "params": dict(keyed[key].params)})
        # A cancel that came after the last variant finished cancelled nothing: the sweep is done.
        cut_short = len(report.rows) < len(pending)
        store.finish_sweep(report.sweep_id, "cancelled" if cut_short else "done")
        emit({"type": "sweep-done", "sweep_id": report.sweep_id, "rows": len(report.rows)})
        return report
    except BaseException:
        if report is not None:   # a sweep that broke off never stays `running` in the store
            store.finish_sweep(report.sweep_id, "failed")
        raise
    finally:
        if pool is not None:
            pool.close()


_PREPARING: dict[str, threading.Lock] = {}
_PREPARING_GUARD = threading.Lock()


def _preparing_lock(key: str) -> threading.Lock:
    with _PREPARING_GUARD:
        return _PREPARING.setdefault(key, threading.Lock())


def _prepared_manifest(spec: SweepSpec, cache: ArtifactCache, prepare_key: str, model_ref: InputRef,
                       dataset_ref: InputRef, options: SweepOptions, emit: OnEvent,
                       stop: Callable[[], bool] | None) -> tuple[dict | None, Any]:
    """The workload's manifest from the cache, or prepared now in a worker (None: cancelled), and
    the pool that prepared it (its workers, TensorFlow imported, go on with the variants)."""
    manifest = _cached_manifest(cache, prepare_key)
    if manifest is not None:
        return manifest, None
    pool = _make_pool(options, len(spec.techniques), cache)
    try:
        emit({"type": "prepare", "message": "preparing the model and the dataset"})
        payload = {"kind": "prepare", "cache_dir": str(cache.root), "model": model_ref.to_dict(),
                   "dataset": dataset_ref.to_dict(), "train": spec.train.to_dict(),
                   "label_output": spec.label_output}
        outcome = next(pool.run([("prepare", payload)],
                                lambda task, event: emit({"type": "progress", "technique": None,
                                                          **event}), stop=stop), None)
    except BaseException:
        pool.close()
        raise
    if outcome is None:
        return None, pool
    if not outcome.ok:
        pool.close()
        raise QuantLabError(outcome.error if outcome.user_error else
                            f"preparing {model_ref.name} on {dataset_ref.name} failed: {outcome.error}")
    cache.write_json("prepared", prepare_key, outcome.result)
    return outcome.result, pool


def _make_pool(options: SweepOptions, tasks: int, cache: ArtifactCache) -> Any:
    """The executor of the sweep's tasks: the local WorkerPool, or Ray when `options.ray` names one."""
    if options.ray:
        from .ray_executor import RayExecutor  # imports Ray lazily, only for --ray

        executor = RayExecutor(options.ray, cache.root, expected_tasks=tasks, limits=options.limits)
        executor.start()
        return executor
    from .tasks import run_task

    size = max(1, min(options.workers or default_worker_count(), max(tasks, 1)))
    pool = WorkerPool(run_task, size=size, limits=options.limits,
                      log_path=str(Path(cache.root) / "logs" / "workers.log"))
    pool.start()
    return pool


def with_node(provenance: dict | None, executor: str) -> dict:
    """Provenance that names the executor and the node (hostname, Ray node id, CPU model)."""
    provenance = dict(provenance or {})
    provenance.setdefault("executor", executor)
    if not provenance.get("node"):  # the pool's workers run here
        from .ray_executor import node_info  # no Ray import: node_info asks Ray only when running in it

        provenance["node"] = {**node_info(), "cpu_model": provenance.get("cpu_model") or node_info()["cpu_model"]}
    return provenance


def _cached_manifest(cache: ArtifactCache, key: str) -> dict | None:
    manifest = cache.read_json("prepared", key)
    if manifest is None:
        return None
    needed = [manifest.get("model_path"), manifest.get("dataset_path"), manifest.get("reference_path")]
    if all(path is None or Path(path).exists() for path in needed):
        return manifest
    return None


def _make_row(sweep_id: str | None, manifest: dict, technique: TechniqueSpec, key: str, body: dict,
              cached: bool, error: str | None) -> dict:
    """A complete store row: identity and provenance of the variant, then what was measured."""
    row = {
        "row_id": new_id(), "sweep_id": sweep_id, "recorded_at": datetime.now(timezone.utc),
        "result_key": key, "cached": cached, "error": error,
        "model_name": manifest["model_name"], "model_hash": manifest["model_hash"],
        "dataset_name": manifest["dataset_name"], "dataset_hash": manifest["dataset_hash"],
        "technique": technique.id, "family": get_technique(technique.id).family,
        "params": dict(technique.params),
    }
    measured = {k: v for k, v in body.items() if k not in row}
    row.update(measured)
    provenance = dict(row.get("provenance") or {})
    if not error:  # a result cached before rows named their executor was measured by the pool, here
        from .ray_executor import node_label

        provenance = with_node(provenance, "pool")
        row["node"] = node_label(provenance["node"])
    row["executor"] = provenance.get("executor")
    provenance.update({"result_key": key, "model_hash": manifest["model_hash"],
                       "dataset_hash": manifest["dataset_hash"], "technique": technique.to_dict(),
                       "engine_version": ENGINE_VERSION})
    if manifest.get("notes"):
        provenance["model_notes"] = list(manifest["notes"])
    row["provenance"] = provenance
    if error is None and body and not set(uncertainty.INTERVAL_COLUMNS) <= set(body):
        row.update(uncertainty.row_intervals(row))  # a body cached before its worker computed them
    return row
