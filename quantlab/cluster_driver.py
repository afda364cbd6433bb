"""The dashboard's sweeps on a Ray cluster, run by one long-lived child process per address.

Ray's client ends its whole process, with no exception, when the Ray node under it dies; that
process must not be the dashboard's server. A spawned child joins the cluster once and runs every
sweep sent to it (each in a thread of its own, sharing the connection and the cluster's warm
workers); events come back through a queue. When the child ends unasked, every sweep it was running
fails with one line, and the next sweep starts a new child.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable

from .cache import ArtifactCache
from .config import SweepSpec
from .errors import QuantLabError, first_line
from .ray_executor import RERUN_HINT
from .runner import SweepOptions, run_sweep
from .store import Store

SWEEP_END = "driver-sweep-end"  # the last event of a sweep the child ran
_GONE = None                    # put on every listener when the child has ended


class ClusterDriver:
    """A child process connected to the Ray cluster at `address`, running the sweeps sent to it."""

    def __init__(self, address: str) -> None:
        from .pool import neutral_main

        self.address = address
        context = multiprocessing.get_context("spawn")
        self._requests, self._events = context.Queue(), context.Queue()
        self._process = context.Process(target=_serve, args=(self._requests, self._events),
                                        name="quantlab-cluster-driver", daemon=True)
        with neutral_main():
            self._process.start()
        self._lock = threading.Lock()
        self._listeners: dict[str, queue.Queue] = {}
        self._gone = False
        threading.Thread(target=self._read, name="quantlab-cluster-events", daemon=True).start()

    @property
    def alive(self) -> bool:
        with self._lock:
            return not self._gone and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def run(self, spec: SweepSpec, store: Store, cache: ArtifactCache, options: SweepOptions,
            cancel: threading.Event, on_event: Callable[[dict], None]) -> int:
        """Run one sweep in the child; returns how many rows it made (as `run_sweep`'s report)."""
        key = uuid.uuid4().hex
        listener: queue.Queue = queue.Queue()
        with self._lock:
            if self._gone:
                raise self._lost(store)
            self._listeners[key] = listener
        self._requests.put(("sweep", key, spec, store, cache, options))
        asked_to_cancel = False
        try:
            while True:
                if cancel.is_set() and not asked_to_cancel:
                    self._requests.put(("cancel", key))
                    asked_to_cancel = True
                try:
                    event = listener.get(timeout=0.2)
                except queue.Empty:
                    continue
                if event is _GONE:
                    raise self._lost(store)
                if event.get("type") != SWEEP_END:
                    on_event(event)
                    continue
                if event.get("error"):
                    raise (QuantLabError if event.get("user_error") else RuntimeError)(event["error"])
                return int(event["rows"])
        finally:
            with self._lock:
                self._listeners.pop(key, None)

    def _lost(self, store: Store) -> QuantLabError:
        marked = len(store.fail_sweeps_of_process(self.pid)) if self.pid else 0
        return QuantLabError(
            f"lost the connection to the Ray head at {self.address!r}: the Ray node under this server's "
            f"sweeps stopped and Ray's client ended their process (exit status {self._process.exitcode}, "
            f"{marked} sweep(s) marked failed); {RERUN_HINT}")

    def _read(self) -> None:
        """Hand each event to its sweep; when the child has ended, tell every sweep still waiting."""
        while True:
            try:
                key, event = self._events.get(timeout=0.2)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                try:
                    key, event = self._events.get(timeout=1.0)  # what it sent just before it ended
                except Exception:  # nothing more, or half an event cut off by the child's end
                    break
            except Exception:  # half an event: the child ended while it wrote
                if self._process.is_alive():
                    continue
                break
            with self._lock:
                listener = self._listeners.get(key)
            if listener is not None:
                listener.put(event)
        self._process.join(timeout=30)
        with self._lock:
            self._gone = True
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener.put(_GONE)


_DRIVERS: dict[str, ClusterDriver] = {}
_DRIVERS_LOCK = threading.Lock()


def driver_for(address: str) -> ClusterDriver:
    """This process's driver for `address`: the running one, or a new one if there is none or it ended."""
    with _DRIVERS_LOCK:
        driver = _DRIVERS.get(address)
        if driver is None or not driver.alive:
            driver = _DRIVERS[address] = ClusterDriver(address)
        return driver


def _serve(requests: Any, events: Any) -> None:
    """The child: run each sweep asked for in a thread, cancel on request, end with the server (a
    daemon process: multiprocessing ends it when the server exits; the watch, when it is killed)."""
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), daemon=True).start()
    cancels: dict[str, threading.Event] = {}
    while True:
        kind, key, *details = requests.get()
        if kind == "cancel" and key in cancels:
            cancels[key].set()
        elif kind == "sweep":
            cancels[key] = threading.Event()
            threading.Thread(target=_run_one, args=(key, *details, cancels[key], events), daemon=True).start()


def _end_with_parent(parent: int) -> None:
    """The kernel's parent-death signal would follow the server's thread that started this child,
    not the server: watch the parent instead."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _run_one(key: str, spec: SweepSpec, store: Store, cache: ArtifactCache, options: SweepOptions,
             cancel: threading.Event, events: Any) -> None:
    def send(event: dict) -> None:
        events.put((key, event))

    try:
        report = run_sweep(spec, store=store, cache=cache, on_event=send, options=options, cancel=cancel)
        send({"type": SWEEP_END, "rows": len(report.rows)})
    except QuantLabError as exc:
        send({"type": SWEEP_END, "error": first_line(exc) or type(exc).__name__, "user_error": True})
    except Exception as exc:  # a bug: the traceback goes to the server's log (the child's stderr)
        import traceback

        traceback.print_exc()
        send({"type": SWEEP_END, "error": f"{type(exc).__name__}: {first_line(exc)} (an internal error; "
                                          f"the traceback is in the server log)"})
