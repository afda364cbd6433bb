"""Sweeps that run in the background of a long-lived process (the dashboard), one at a time.

`start_sweep` returns a SweepHandle at once and runs `runner.run_sweep` in a daemon thread that
belongs to the process, not to whoever asked: a dashboard page can be left and reopened, or a
browser tab reloaded, and the handle (found again with `get_sweep` or `list_sweeps`) still holds the
whole event log, the progress counts and every finished row. When `max_concurrent` sweeps are
running, a new one waits in a queue (its status says "queued" and how many are ahead).

A sweep on a Ray cluster (`auto` or `host:port`) runs in the long-lived child process of
`cluster_driver`, never in the server: Ray's client ends its whole process when the Ray node under
it dies. A Ray the server starts itself (`local`) is run in the server, which keeps it for the next
sweep.

No Streamlit here: the pages poll `SweepHandle.snapshot()`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .cache import ArtifactCache
from .cluster_driver import driver_for
from .config import SweepSpec
from .errors import QuantLabError, first_line
from . import runner
from .runner import SweepOptions, run_sweep
from .store import Store
from .techniques import variant_label

LOG = logging.getLogger(__name__)

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_EVENTS = 5000            # per sweep; progress events beyond this are dropped, results never
KEEP_FINISHED = 20           # finished handles remembered per process
DEFAULT_MAX_CONCURRENT = 1

PREPARING = "preparing the model and the dataset"   # runner's "prepare" event says so too

# What a variant is doing, as shown next to it.
VARIANT_STATES = ("waiting", "running", "done", "cached", "failed", "skipped")


@dataclass
class VariantProgress:
    """One technique of a sweep: its state, its latest message and, once finished, its row."""

    technique: str
    params: dict
    label: str
    state: str = "waiting"
    message: str = ""
    row: dict | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cached", "failed", "skipped")


@dataclass(frozen=True)
class SweepSnapshot:
    """A consistent copy of a handle's state, safe to read while the sweep goes on."""

    id: str
    label: str
    status: str
    error: str | None
    message: str
    sweep_id: str | None
    done: int
    total: int
    failed: int
    cached: int
    queue_position: int | None
    variants: tuple[VariantProgress, ...]
    rows: tuple[dict, ...]
    created_at: float
    started_at: float | None
    finished_at: float | None
    prepare_started_at: float | None = None   # the first "prepare" event (model, dataset)
    prepared_at: float | None = None          # "sweep-start": preparation over, variants begin
    model_notes: tuple[str, ...] = ()         # what preparing the model did to it, in words

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def preparing(self) -> bool:
        """Running, and still preparing the model and the dataset (no variant can finish yet)."""
        return self.status == "running" and self.prepare_started_at is not None and self.prepared_at is None

    @property
    def preparing_seconds(self) -> float:
        if self.prepare_started_at is None:
            return 0.0
        return (self.prepared_at or self.finished_at or time.time()) - self.prepare_started_at

    def progress_text(self) -> str:
        """The line under (or instead of) the progress bar: the preparation step and its seconds so
        far while there is nothing to count yet, then how many variants finished."""
        if self.preparing:
            step = PREPARING + (f" ({self.message})" if self.message and self.message != PREPARING else "")
            return (f"{step[:1].upper()}{step[1:]}: {self.preparing_seconds:.0f} s so far "
                    f"(then {self.total} variant{'s' if self.total != 1 else ''})")
        return f"{self.done} of {self.total} variants finished"

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def elapsed_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    def summary(self) -> str:
        """One line in words, e.g. "running: 3 of 8 variants (1 cached)"."""
        if self.status == "queued":
            ahead = self.queue_position or 0
            return (f"queued: waiting for {ahead} other sweep{'s' if ahead != 1 else ''} to finish"
                    if ahead else "queued: starting as soon as the running sweep finishes")
        if self.status == "failed":
            return f"failed: {self.error}"
        counts = f"{self.done} of {self.total} variants"
        extras = [f"{self.cached} cached"] if self.cached else []
        if self.failed:
            extras.append(f"{self.failed} failed")
        tail = f" ({', '.join(extras)})" if extras else ""
        if self.preparing:
            text = self.progress_text()
            return f"running: {text[:1].lower()}{text[1:]}"
        if self.status == "running":
            return f"running: {counts}{tail}" + (f"; {self.message}" if self.message else "")
        if self.status == "cancelled":
            return f"cancelled after {counts}{tail}"
        return f"done: {counts}{tail} in {self.elapsed_seconds:.0f} s"


class SweepHandle:
    """A sweep started in the background: its status, event log and rows, readable from any thread."""

    def __init__(self, spec: SweepSpec, store: Store, cache: ArtifactCache, options: SweepOptions,
                 label: str | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.spec = spec
        self.store = store
        self.cache = cache
        self.options = options
        self.label = label or f"{Path(spec.model).name} on {Path(spec.dataset).name}"
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._on_cancel: Callable[[SweepHandle], None] = lambda handle: None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = "queued"
        self.error: str | None = None
        self.message = ""
        self.sweep_id: str | None = None
        self.rows: list[dict] = []
        self.total = len(spec.techniques)
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.prepare_started_at: float | None = None
        self.prepared_at: float | None = None
        self.model_notes: tuple[str, ...] = ()
        self.queue_position: int | None = None
        self.variants = [VariantProgress(t.id, dict(t.params), variant_label(t.id, t.params)) for t in spec.techniques]

    # --- reading ------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def events(self, since: int = 0) -> list[dict]:
        """Events from position `since` on (positions count from the first event ever logged)."""
        with self._lock:
            return list(self._events[max(0, since):])

    def snapshot(self) -> SweepSnapshot:
        with self._lock:
            variants = tuple(VariantProgress(v.technique, dict(v.params), v.label, v.state, v.message, v.row)
                             for v in self.variants)
            rows = tuple(self.rows)
            return SweepSnapshot(
                id=self.id, label=self.label, status=self.status, error=self.error, message=self.message,
                sweep_id=self.sweep_id, done=len(rows), total=self.total,
                failed=sum(1 for r in rows if r.get("error")),
                cached=sum(1 for r in rows if r.get("cached") and not r.get("error")),
                queue_position=self.queue_position, variants=variants, rows=rows,
                created_at=self.created_at, started_at=self.started_at, finished_at=self.finished_at,
                prepare_started_at=self.prepare_started_at, prepared_at=self.prepared_at,
                model_notes=self.model_notes)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the sweep has finished (or `timeout` seconds); True if it has."""
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        """Stop now: the variants in progress are killed (no row), a queued sweep never starts."""
        self._cancel.set()
        with self._lock:
            self.message = "cancelling: stopping the variants in progress"
        self._on_cancel(self)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # --- updating (from the sweep's thread) ----------------------------------------------------

    def _log(self, event: dict) -> None:
        with self._lock:
            if len(self._events) < MAX_EVENTS or event.get("type") != "progress":
                self._events.append(event)
            self._apply(event)

    def _variant_for(self, technique: str | None, params: dict | None = None) -> VariantProgress | None:
        for variant in self.variants:
            if variant.technique == technique and not variant.finished and \
                    (params is None or variant.params == params):
                return variant
        if params is not None:
            return self._variant_for(technique, None)
        return None

    def _apply(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "prepare":
            self.message = str(event.get("message", ""))
            self.prepare_started_at = self.prepare_started_at or time.time()
        elif kind == "sweep-start":
            self.prepared_at = time.time()
            self.model_notes = tuple((event.get("manifest") or {}).get("notes") or ())
            self.sweep_id = event.get("sweep_id")
            self.total = int(event.get("total", self.total))
            self.message = ""
        elif kind == "variant-queued":
            variant = self._variant_for(event.get("technique"))
            if variant:
                variant.message = "waiting for a worker"
        elif kind == "progress":
            text = _progress_text(event)
            variant = self._variant_for(event.get("technique")) if event.get("technique") else None
            if variant:
                variant.state, variant.message = "running", text
            else:
                self.message = text
        elif kind in ("variant-done", "variant-failed"):
            row = event.get("row") or {}
            self.rows.append(row)
            variant = self._variant_for(event.get("technique"), dict(row.get("params") or {}))
            if variant:
                variant.row = row
                if kind == "variant-failed":
                    variant.state, variant.message = "failed", first_line(row.get("error"))
                else:
                    variant.state = "cached" if event.get("cached") else "done"
                    variant.message = "cached" if event.get("cached") else "measured"
        elif kind == "variant-cancelled":
            variant = self._variant_for(event.get("technique"), event.get("params"))
            if variant:
                variant.state, variant.message = "skipped", "stopped mid-way: the sweep was cancelled"
        elif kind == "sweep-done":
            self.message = ""

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def _run(self, on_finish: Callable[["SweepHandle"], None]) -> None:
        try:
            if self._cancel.is_set():
                self._end_unstarted()
                return
            if self.options.ray and self.options.ray != "local":  # a cluster: in the driver process
                finished_rows = driver_for(self.options.ray).run(
                    self.spec, self.store, self.cache, self.options, self._cancel, self._log)
            else:
                finished_rows = len(run_sweep(self.spec, store=self.store, cache=self.cache, on_event=self._log,
                                              options=self.options, cancel=self._cancel).rows)
            cut_short = finished_rows < len(self.spec.techniques)
            with self._lock:
                self.status = "cancelled" if self._cancel.is_set() and cut_short else "done"
                if self.status == "cancelled":
                    for variant in self.variants:
                        if not variant.finished:
                            variant.state, variant.message = "skipped", "not run: the sweep was cancelled"
                self.message = ""
        except QuantLabError as exc:
            self._fail(first_line(exc) or type(exc).__name__)
        except Exception as exc:  # a bug: keep the sweep's record readable, log the traceback
            LOG.exception("sweep %s crashed", self.id)
            self._fail(f"{type(exc).__name__}: {first_line(exc)} (an internal error; the traceback "
                       f"is in the server log)")
        finally:
            self._end()
            on_finish(self)

    def _end(self) -> None:
        with self._lock:
            self.finished_at, self.queue_position = time.time(), None
        self._finished.set()

    def _end_unstarted(self) -> None:
        """A queued sweep cancelled before it started: finished, nothing run."""
        with self._lock:
            self.status, self.started_at, self.finished_at, self.queue_position, self.message = \
                "cancelled", None, time.time(), None, ""
            for variant in self.variants:
                variant.state, variant.message = "skipped", "not run: the sweep was cancelled"
        self._finished.set()

    def _fail(self, message: str) -> None:
        with self._lock:
            self.status, self.error, self.message = "failed", message, ""
            for variant in self.variants:
                if not variant.finished:
                    variant.state, variant.message = "skipped", "not run: the sweep failed"


def _progress_text(event: dict) -> str:
    stage = str(event.get("stage") or "")
    if "epoch" in event:
        text = f"{stage} epoch {event['epoch']}/{event.get('epochs', '?')}".strip()
        loss = event.get("loss")
        return f"{text}, loss {loss:.4f}" if isinstance(loss, (int, float)) else text
    return str(event.get("message") or stage)


class SweepManager:
    """Starts sweeps in daemon threads, at most `max_concurrent` at a time; the rest wait in order."""

    def __init__(self, max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.max_concurrent = max(1, int(max_concurrent))
        self._lock = threading.Lock()
        self._handles: dict[str, SweepHandle] = {}
        self._queue: deque[SweepHandle] = deque()
        self._running: set[str] = set()

    def configure(self, *, max_concurrent: int | None = None) -> None:
        if max_concurrent is not None:
            with self._lock:
                self.max_concurrent = max(1, int(max_concurrent))
            self._start_queued()

    def start(self, spec: SweepSpec, store: Store, cache: ArtifactCache,
              options: SweepOptions | None = None, *, label: str | None = None) -> SweepHandle:
        """Check the spec, then run it now or queue it; returns its handle at once.

        A spec that cannot run (an unknown built-in or a missing file, an unknown technique, a bad
        uploaded dataset, a read-only store) gives a handle that has already failed, with the
        one-line reason as its error: nothing is queued or written.
        """
        handle = SweepHandle(spec, store, cache, options or SweepOptions(source="app", ray=runner.ray_address_from_env()), label)
        if handle.options.ray == "local":  # this server keeps the Ray it starts for its next sweeps
            from .ray_executor import keep_started_ray  # imports no Ray

            keep_started_ray()
        handle._on_cancel = self._cancel_queued
        try:
            check_spec(spec, store)
        except QuantLabError as exc:
            handle._fail(first_line(exc) or type(exc).__name__)
            handle._end()
            with self._lock:
                self._handles[handle.id] = handle
                self._forget_old()
            return handle
        with self._lock:
            self._handles[handle.id] = handle
            self._queue.append(handle)
            self._number_queue()
        self._start_queued()
        return handle

    def get(self, handle_id: str | None) -> SweepHandle | None:
        with self._lock:
            return self._handles.get(handle_id or "")

    def list(self) -> list[SweepHandle]:
        """Every remembered handle, newest first."""
        with self._lock:
            return sorted(self._handles.values(), key=lambda h: h.created_at, reverse=True)

    def active(self) -> list[SweepHandle]:
        return [h for h in self.list() if not h.finished]

    def running_twin(self, spec: SweepSpec | None, store: Store | None = None) -> SweepHandle | None:
        """The unfinished sweep of this very spec (into the same store, when given), if any."""
        if spec is None:
            return None
        return next((h for h in self.active() if h.spec == spec and not h.cancel_requested
                     and (store is None or Path(h.store.path) == Path(store.path))), None)

    def _number_queue(self) -> None:
        for position, handle in enumerate(self._queue):
            handle.queue_position = position + len(self._running)

    def _cancel_queued(self, handle: SweepHandle) -> None:
        with self._lock:
            if handle in self._queue:
                self._queue.remove(handle)
                self._number_queue()
                handle._end_unstarted()

    def _start_queued(self) -> None:
        with self._lock:
            while self._queue and len(self._running) < self.max_concurrent:
                handle = self._queue.popleft()
                self._running.add(handle.id)
                # "running" from now on, before the thread is scheduled: a caller never sees a
                # started sweep as queued
                handle._set(status="running", started_at=time.time(), queue_position=None)
                thread = threading.Thread(target=handle._run, args=(self._finished,),
                                          name=f"quantlab-sweep-{handle.id[:8]}", daemon=True)
                handle._thread = thread
                thread.start()
            self._number_queue()

    def _finished(self, handle: SweepHandle) -> None:
        with self._lock:
            self._running.discard(handle.id)
            self._forget_old()
        self._start_queued()

    def _forget_old(self) -> None:
        """Keep the KEEP_FINISHED newest finished handles (their rows stay in the store)."""
        finished = sorted((h for h in self._handles.values() if h.finished), key=lambda h: h.created_at)
        for old in finished[:-KEEP_FINISHED]:
            self._handles.pop(old.id, None)


def check_spec(spec: SweepSpec, store: Store) -> None:
    """The cheap checks run_sweep makes before writing anything, made now so callers hear at once."""
    runner.check_spec(spec, store)


# --- the process-wide manager ------------------------------------------------------------------

_DEFAULT = SweepManager()


def default_manager() -> SweepManager:
    return _DEFAULT


def configure(*, max_concurrent: int | None = None) -> None:
    _DEFAULT.configure(max_concurrent=max_concurrent)


def start_sweep(spec: SweepSpec, store: Store, cache: ArtifactCache, options: SweepOptions | None = None,
                *, label: str | None = None) -> SweepHandle:
    """Start (or queue) `spec` in the background of this process; see SweepManager.start."""
    return _DEFAULT.start(spec, store, cache, options, label=label)


def get_sweep(handle_id: str | None) -> SweepHandle | None:
    return _DEFAULT.get(handle_id)


def list_sweeps() -> list[SweepHandle]:
    return _DEFAULT.list()


def active_sweeps() -> list[SweepHandle]:
    return _DEFAULT.active()


def running_twin(spec: SweepSpec | None, store: Store | None = None) -> SweepHandle | None:
    """The unfinished sweep of this very spec, if any (see SweepManager.running_twin)."""
    return _DEFAULT.running_twin(spec, store)


def cancel_sweep(handle_id: str) -> bool:
    handle = _DEFAULT.get(handle_id)
    if handle is None:
        return False
    handle.cancel()
    return True
