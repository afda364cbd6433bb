"""Worker processes that run conversions and measurements outside the calling process.

TensorFlow's converter leaks memory per call and a hostile or broken model may crash the process
that loads it, so the work runs in spawned workers. A worker imports TensorFlow once and serves many
tasks (re-importing it per variant would cost seconds each), and is replaced after
`max_tasks_per_worker` tasks to bound the leak. A worker that crashes, runs out of time or exceeds
its memory limit is killed and replaced; its task fails with the reason and the others go on. A
caller's `stop` kills the workers at once, busy or idle (cancelling a sweep). Workers share one lock (latency
timings never overlap); a worker reports when it holds it, so the pool can give back the lock of a
worker it kills.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import traceback
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

from .errors import QuantLabError
from .measure import EVALUATION_CORES_ENV, available_cores

TaskFunction = Callable[[dict, Callable[[dict], None], Any], dict]


@dataclass(frozen=True)
class PoolLimits:
    """Per-task limits enforced by the parent, which kills a worker that passes one."""

    task_timeout_seconds: float | None = None
    memory_limit_mb: float | None = None
    max_tasks_per_worker: int = 25


@dataclass(frozen=True)
class TaskOutcome:
    task_id: str
    result: dict | None = None
    error: str | None = None
    user_error: bool = False  # the input was bad (as opposed to a crash or a bug)

    @property
    def ok(self) -> bool:
        return self.error is None


def _redirect_output(log_path: str) -> None:
    """Send the worker's stdout/stderr (TensorFlow's C++ logging, tracebacks) to a log file."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


class _ReportedLock:
    """The pool's shared lock as a worker uses it: the parent hears when it is taken and given back."""

    def __init__(self, lock: Any, connection: Any) -> None:
        self._lock, self._connection = lock, connection

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        taken = self._lock.acquire(block, timeout) if timeout is not None else self._lock.acquire(block)
        if taken:
            self._connection.send(("lock", None, True))
        return taken

    def release(self) -> None:
        self._connection.send(("lock", None, False))
        self._lock.release()


def _worker_main(connection: Any, task_function: TaskFunction, shared_lock: Any, warm: bool,
                 log_path: str | None = None, cores: int | None = None) -> None:
    """The loop a worker runs: receive a task, stream its events, send its result or error."""
    shared_lock = _ReportedLock(shared_lock, connection) if shared_lock is not None else None
    if cores:
        os.environ[EVALUATION_CORES_ENV] = str(cores)  # measure.evaluation_cores reads it
    if log_path:
        _redirect_output(log_path)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    if warm:
        try:
            from .tfcompat import import_for_tasks
            import_for_tasks()
        except Exception:  # the task itself will report a broken install
            pass
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, payload = message

        def emit(event: dict, task_id: str = task_id) -> None:
            connection.send(("event", task_id, event))

        try:
            result = task_function(payload, emit, shared_lock)
            connection.send(("done", task_id, result))
        except QuantLabError as exc:
            connection.send(("user-error", task_id, str(exc)))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            connection.send(("failed", task_id, f"{type(exc).__name__}: {first_line}"))


_MAIN_SWAP_LOCK = threading.RLock()


@contextmanager
def neutral_main() -> Iterator[None]:
    """Hide a script-like __main__ from multiprocessing's spawn while a worker starts.

    Streamlit (and its AppTest) installs the running page as sys.modules["__main__"] with the
    script's __file__; a spawned child would execute that whole script again before its task.
    A stand-in __main__ without __file__ makes the child import nothing of it.
    """
    with _MAIN_SWAP_LOCK:
        main = sys.modules.get("__main__")
        script_like = main is not None and getattr(main, "__spec__", None) is None and \
            getattr(main, "__file__", None) is not None
        if not script_like:
            yield
            return
        stand_in = types.ModuleType("__main__")
        sys.modules["__main__"] = stand_in
        try:
            yield
        finally:
            if sys.modules.get("__main__") is stand_in:
                sys.modules["__main__"] = main


@dataclass
class _Worker:
    process: Any
    connection: Any
    task_id: str | None = None
    started: float = 0.0
    tasks_done: int = 0
    holds_lock: bool = False
    last_step: str | None = None  # the running task's last progress message, for crash reports


def crash_message(code: int | None, last_step: str | None, log_path: str | None) -> str:
    """What is known about a worker that died: how, during which step, and where its log is."""
    how = {-9: "was killed (SIGKILL: out of memory, or killed from outside)",
           -11: "crashed (segmentation fault in native code: TensorFlow, LiteRT or oneDNN)",
           -6: "aborted (SIGABRT in native code)"}.get(code if code is not None else 0,
                                                       f"exited with code {code}")
    during = f" during '{last_step}'" if last_step else ""
    log = f"; its output is in {log_path}" if log_path else ""
    return f"the worker process {how}{during}{log}; no QuantLab check failed, so this variant has no result"


def limit_passed(limits: PoolLimits, elapsed: float, rss_mb: Callable[[], float]) -> str | None:
    """Why a task `elapsed` seconds old, of `rss_mb()` resident memory, must stop (None: it may go on)."""
    if limits.task_timeout_seconds and elapsed > limits.task_timeout_seconds:
        return (f"stopped after {limits.task_timeout_seconds:.0f} s (the time limit per variant); "
                f"raise the limit or use a smaller model")
    if limits.memory_limit_mb:
        rss = rss_mb()
        if rss > limits.memory_limit_mb:
            return (f"stopped at {rss:.0f} MB of memory (the limit is {limits.memory_limit_mb:.0f} MB); "
                    f"raise the limit or use a smaller model")
    return None


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class WorkerPool:
    """A fixed number of spawned worker processes running `task_function`."""

    task_function: TaskFunction
    size: int = 1
    limits: PoolLimits = field(default_factory=PoolLimits)
    warm: bool = True
    log_path: str | None = None  # where workers write TensorFlow's logs and tracebacks
    _workers: list[_Worker] = field(default_factory=list, init=False)
    stopped_tasks: list[str] = field(default_factory=list, init=False)  # killed by the last run's stop

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._lock = self._context.Lock()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker_main, daemon=True,
                                        args=(child, self.task_function, self._lock, self.warm,
                                              self.log_path, self.cores_per_worker))
        with neutral_main():
            process.start()
        child.close()
        worker = _Worker(process, parent)
        self._workers.append(worker)
        return worker

    @property
    def cores_per_worker(self) -> int:
        """Each worker's share of the machine's cores (at least 1)."""
        return max(1, available_cores() // max(1, self.size))

    def _retire(self, worker: _Worker, kill: bool = False) -> None:
        self._workers.remove(worker)
        if kill:
            worker.process.kill()
        else:
            try:
                worker.connection.send(None)
            except OSError:
                pass
        worker.process.join(timeout=5 if not kill else 1)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=1)
        self._release_lock_of(worker)
        worker.connection.close()

    def _release_lock_of(self, worker: _Worker) -> None:
        """Give back the shared lock if the (dead) worker held it: its last lock message says."""
        try:
            while worker.connection.poll():
                kind, _, body = worker.connection.recv()
                if kind == "lock":
                    worker.holds_lock = bool(body)
        except (EOFError, OSError):
            pass
        if worker.holds_lock:
            worker.holds_lock = False
            try:
                self._lock.release()
            except ValueError:  # not held after all
                pass

    def start(self) -> None:
        """Start the workers now (they import TensorFlow while the caller does other work)."""
        while len(self._workers) < self.size:
            self._spawn()

    def run(self, tasks: Iterable[tuple[str, dict]],
            on_event: Callable[[str, dict], None] | None = None,
            stop: Callable[[], bool] | None = None) -> Iterator[TaskOutcome]:
        """Run tasks on the workers; yields each outcome as soon as it is known.

        When `stop()` turns true, every worker is killed and the run ends: the tasks in progress
        and those not started yield nothing (`stopped_tasks` lists those that were in progress).
        """
        pending = list(tasks)
        pending.reverse()
        running = 0
        self.stopped_tasks = []
        self.start()
        while pending or running:
            if stop is not None and stop():  # kill every worker: an idle one may still be importing
                for worker in list(self._workers):
                    if worker.task_id is not None:
                        self.stopped_tasks.append(worker.task_id)
                    self._retire(worker, kill=True)
                return
            for worker in list(self._workers):
                if worker.task_id is None and pending:
                    task_id, payload = pending.pop()
                    worker.task_id, worker.started = task_id, time.monotonic()
                    worker.connection.send((task_id, payload))
                    running += 1
            busy = [w for w in self._workers if w.task_id is not None]
            handles = {}
            for worker in busy:
                handles[worker.connection] = worker
                handles[worker.process.sentinel] = worker
            for handle in wait(list(handles), timeout=0.25):
                worker = handles[handle]
                if worker not in self._workers or worker.task_id is None:
                    continue
                outcome = self._receive(worker, handle, on_event)
                if outcome is not None:
                    running -= 1
                    yield outcome
            for worker in [w for w in self._workers if w.task_id is not None]:
                reason = self._limit_passed(worker)
                if reason:
                    task_id = worker.task_id
                    self._retire(worker, kill=True)
                    running -= 1
                    yield TaskOutcome(task_id, error=reason)
            while pending and len(self._workers) < self.size:
                self._spawn()

    def _receive(self, worker: _Worker, handle: Any,
                 on_event: Callable[[str, dict], None] | None) -> TaskOutcome | None:
        task_id = worker.task_id
        assert task_id is not None
        try:
            while worker.connection.poll():
                kind, message_task, body = worker.connection.recv()
                if kind == "lock":
                    worker.holds_lock = bool(body)
                    continue
                if kind == "event":
                    worker.last_step = body.get("message") or body.get("stage") or worker.last_step
                    if on_event:
                        on_event(message_task, body)
                    continue
                worker.task_id = None
                worker.last_step = None
                worker.tasks_done += 1
                if worker.tasks_done >= self.limits.max_tasks_per_worker:
                    self._retire(worker)
                if kind == "done":
                    return TaskOutcome(task_id, result=body)
                return TaskOutcome(task_id, error=body, user_error=kind == "user-error")
        except (EOFError, OSError):
            pass
        if worker.process.is_alive() and handle is not worker.process.sentinel:
            return None
        worker.process.join(timeout=1)
        code = worker.process.exitcode
        self._retire(worker, kill=True)
        return TaskOutcome(task_id, error=crash_message(code, worker.last_step, self.log_path))

    def _limit_passed(self, worker: _Worker) -> str | None:
        return limit_passed(self.limits, time.monotonic() - worker.started,
                            lambda: _rss_mb(worker.process.pid))

    def close(self) -> None:
        for worker in list(self._workers):
            self._retire(worker, kill=worker.task_id is not None)


def default_worker_count() -> int:
    return max(1, min(2, os.cpu_count() or 1))
