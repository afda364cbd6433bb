"""Run a sweep's tasks on a Ray cluster, behind the interface the runner uses for WorkerPool.

`RayExecutor.run(tasks, on_event, stop)` yields one `TaskOutcome` per task as `ray.wait` sees it
finish, exactly like `WorkerPool.run`; `stopped_tasks` and `close()` mean the same. Ray is imported
only here, and only when a sweep asks for it (`--ray ADDRESS`, or `QUANTLAB_RAY_ADDRESS`).

What runs where:
- The driver (the CLI or the dashboard process) computes every cache key, reads cached results,
  writes DuckDB and its own content-addressed cache. It never imports TensorFlow.
- Each task (prepare, or one variant) is a Ray task with `num_cpus=1` that calls `tasks.run_task`
  in a node-local cache folder. The files it needs (dataset, baseline, float reference, a shared
  fine-tuned model) are sent with it through the object store; the files it writes (the .tflite,
  per-sample predictions, a fine-tuned model) come back with its result and the driver writes them
  into its cache, so nodes need no shared file system and a warm re-run is cached as with the pool.
- Latency timing holds one unit of the node's `quantlab_timing` resource (started with
  `--resources '{"quantlab_timing": 1}'`; `--ray local` sets it), so two timings never overlap on
  one node while timings on different nodes run side by side. A node without that resource times
  under a machine-wide file lock instead, and the row says so.
- Variants that share a fine-tuned model (same technique and fit parameters) run one after the
  other: the first trains it, the next ones get it from the driver's cache.
- A task whose node or worker dies is retried once by Ray (`max_retries=1`), then gets an error row.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .cache import write_atomically
from .config import ENGINE_VERSION, content_hash
from .errors import QuantLabError
from .pool import PoolLimits, TaskOutcome, _rss_mb, limit_passed

TIMING_RESOURCE = "quantlab_timing"
LOCAL_NODE_CACHE = Path(tempfile.gettempdir()) / "quantlab-ray"
TIMING_WAIT_SECONDS = 300.0
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
TASK_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
# Timing slots run in workers of their own runtime environment: Ray reuses a worker only for tasks
# of the same environment, so a slot's worker (no TensorFlow) never takes a variant, and a worker
# that imported TensorFlow is never spent on a slot and then replaced by a cold one.
SLOT_ENV = {"env_vars": {"QUANTLAB_RAY_ROLE": "timing-slot"}}


class RayConnectionError(QuantLabError):
    """The Ray head cannot be reached (at start, or lost during a sweep)."""


# --- connecting -------------------------------------------------------------------------------


_GUARD = threading.RLock()
_USERS = 0             # executors (and plans) using the connection now
_STARTED_HERE = False  # this process started Ray (--ray local): the last user shuts it down
_KEEP_STARTED = False  # ...unless this is a long-lived process (the dashboard) that keeps it
_KEEPER_DONE: threading.Event | None = None  # set to end the thread that started a kept Ray
_LOST_WHY = "the connection was closed"  # why the last connection was left (a sweep lost the head)
_GENERATION = 0  # goes up when this process connects or leaves a lost head: executors of an older one stop


def connect(address: str) -> int:
    """Connect this process to Ray at `address` (once; later calls share it); returns the
    connection's generation, to pass to `disconnect`.

    `local` starts a Ray instance with this machine's cores and one timing unit; `auto` joins the
    cluster named by RAY_ADDRESS or started here with `ray start`; `host:port` joins that head.
    A process already connected (a test fixture, a dashboard) keeps its connection.
    """
    global _USERS, _STARTED_HERE, _GENERATION
    with _GUARD:
        import ray

        if not ray.is_initialized():
            _STARTED_HERE = _init_in_lasting_thread(address) if _KEEP_STARTED else _init(address)
            _GENERATION += 1
        _USERS += 1
        return _GENERATION


def abandon_connection(why: str) -> None:
    """Leave a Ray whose head is gone. Without this, Ray's client kept retrying the head for 60 s
    and then ended the whole process (the CLI, or the dashboard's server) with no word from us.
    Other sweeps on the same connection (a plan's) then fail with `why`, at their next step."""
    global _USERS, _STARTED_HERE, _LOST_WHY, _GENERATION
    _LOST_WHY, _GENERATION = why, _GENERATION + 1  # before the wait for the guard and the shutdown
    with _GUARD:
        import ray

        with _core_logs_aside():
            ray.shutdown()  # about 5 s with the head gone
        _USERS = 0
        _STARTED_HERE = False


def keep_started_ray(keep: bool = True) -> None:
    """In a long-lived process (the dashboard), keep a Ray this process starts (`local`) running
    between sweeps: each sweep would otherwise pay Ray's start and stop (2 to 3 s here) and its
    workers' TensorFlow imports. `keep_started_ray(False)` stops it if no sweep uses it."""
    global _KEEP_STARTED
    with _GUARD:
        _KEEP_STARTED = keep
        if not keep and _USERS == 0 and _STARTED_HERE:
            _shutdown_started()


def _shutdown_started() -> None:
    global _STARTED_HERE, _KEEPER_DONE
    import ray

    _stop_helper_daemons()
    ray.shutdown()
    _STARTED_HERE = False
    if _KEEPER_DONE is not None:
        _KEEPER_DONE.set()
        _KEEPER_DONE = None


# Daemons of a Ray started here that hold no state a sweep needs. `ray.shutdown` stops each with
# SIGTERM and then waits up to 1 s; the autoscaler monitor always takes the whole second.
_HELPER_DAEMONS = ("monitor", "log_monitor", "dashboard")


def _stop_helper_daemons() -> None:
    """Kill the helper daemons of the Ray this process started, so that `ray.shutdown` stops only
    the raylet (which stops its workers) and the GCS: 0.3 s instead of 1.3 s. Ray's own internals;
    if they change, `ray.shutdown` does it all, only slower."""
    try:
        import ray

        processes = ray._private.worker._global_node.all_processes
        for name in _HELPER_DAEMONS:
            for info in processes.get(name, []):
                if info.process.poll() is None:
                    info.process.kill()
                    info.process.wait(timeout=1)
    except Exception:  # noqa: BLE001 - a private API: fall back to Ray's slower shutdown
        pass


def _init_in_lasting_thread(address: str) -> bool:
    """`_init` in a thread that lasts until Ray is shut down. Ray's daemons get a parent-death
    signal tied to the thread that started them: started from a sweep's thread, they died when that
    sweep ended, and the next sweep lost the object store ("connection to the plasma store failed")."""
    global _KEEPER_DONE
    done, ready, outcome = threading.Event(), threading.Event(), {}

    def keep() -> None:
        try:
            outcome["started"] = _init(address)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc
        ready.set()
        done.wait()

    threading.Thread(target=keep, name="quantlab-ray-keeper", daemon=True).start()
    ready.wait()
    if "error" in outcome:
        done.set()
        raise outcome["error"]
    _KEEPER_DONE = done
    return outcome["started"]


def disconnect(generation: int | None = None) -> None:
    """One user less; an executor of a connection left since (`generation` older) counts no more."""
    global _USERS
    with _GUARD:
        if generation is not None and generation != _GENERATION:
            return
        _USERS = max(0, _USERS - 1)
        if _USERS == 0 and _STARTED_HERE and not _KEEP_STARTED:
            _shutdown_started()


@contextmanager
def shared_connection() -> Iterator[None]:
    """Keep a Ray that QuantLab starts running across several sweeps (a plan), without connecting
    until a sweep needs it: a plan that is all cached never starts Ray."""
    global _USERS
    with _GUARD:
        _USERS += 1
    try:
        yield
    finally:
        disconnect()


def _init(address: str) -> bool:
    import ray

    _no_automatic_init()

    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    # On a cluster, the quantlab package travels with the job (nodes need only the requirements).
    cluster_env = {"runtime_env": {"py_modules": [_PACKAGE_DIR], "env_vars": TASK_ENV}}
    try:
        if address == "local":
            from .measure import available_cores

            # A local Ray's workers inherit this process's environment, so the job needs no runtime
            # environment, and then Ray's prestarted workers (started with Ray) take the first tasks;
            # with one, they idled and every task waited for a worker started on demand.
            for name, value in TASK_ENV.items():
                os.environ.setdefault(name, value)
            package_parent = str(Path(_PACKAGE_DIR).parent)
            if package_parent not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
                os.environ["PYTHONPATH"] = os.pathsep.join(
                    p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
            with _quick_raylet_wait():
                ray.init(address="local", num_cpus=available_cores(), resources={TIMING_RESOURCE: 1},
                         _system_config=local_system_config(available_cores()), **common)
            return True
        target = address if address != "auto" else (os.environ.get("RAY_ADDRESS") or "auto")
        if target != "auto":
            _check_reachable(target)  # ray.init would retry an unreachable head for minutes
        elif last_head := _find_last_started_head():
            _check_last_started_head(last_head)
        # `ray start` turns on token authentication when ~/.ray/auth_token exists, but a client
        # joining it does not by itself (Ray 2.60): send the token when there is one.
        _use_token_if_any()
        with _core_logs_aside():
            ray.init(address=target, **common, **cluster_env)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RayConnectionError(
            f"cannot connect to Ray at {address!r} ({first}); start a head with `ray start --head "
            f"--port 6379 --resources '{{\"{TIMING_RESOURCE}\": 1}}'`, or pass --ray local") from None
    return False


def _no_automatic_init() -> None:
    """Turn off Ray's automatic `ray.init` at the first Ray call without a connection. After one
    sweep left a lost head, another sweep's next call would otherwise connect again, to the same
    dead head, retrying for minutes. Ray's own internals; if they change, Ray behaves as before."""
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # read when Ray is imported: for the processes started here
    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False  # Ray is imported already in this one
    except (ImportError, AttributeError):
        pass


def _find_last_started_head() -> str | None:
    """The head `--ray auto` would join when RAY_ADDRESS is unset: the last `ray start --head` on
    this machine (None if there is none, or Ray keeps it elsewhere)."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - Ray's own internals; ray.init finds it its own way
        return None


@contextmanager
def _quick_raylet_wait() -> Iterator[None]:
    """While Ray starts here, look for its raylet every 20 ms. `ray.init` asks the GCS for it in a
    C++ loop that sleeps a whole second between asks, and the raylet registers 0.4 or 1.3 s after
    its start: that loop made Ray's start 2 or 3 s, this makes it 1.5 or 2.4 s. Ray's own internals;
    if they change, `ray.init` waits its own way."""
    try:
        from ray._private import services
        from ray._raylet import GcsClient, NodeID
    except ImportError:
        yield
        return
    original = services.get_node

    def get_node(gcs_address: str, node_id: str) -> Any:
        try:
            client, wanted = GcsClient(address=gcs_address), NodeID.from_hex(node_id)
            deadline = time.monotonic() + 30
            while wanted not in client.get_all_node_info(timeout=5) and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - Ray's own wait below still holds
            pass
        return original(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


def local_system_config(cores: int) -> dict[str, int]:
    """Ray settings for the instance `--ray local` starts, so that it runs a sweep like the pool.

    - Ray starts workers at nice 15 to keep its own daemons responsive; on a shared machine its
      workers would then lose the CPU to everything else, where the pool's do not.
    - Ray keeps at most one idle worker per CPU and kills the others after a second idle; timing
      slots, the event log and prestarted workers count too, so it killed workers that had
      imported TensorFlow and the next variant paid the import (about 2.5 s) again.
    A cluster started with `ray start` takes the same as environment variables (README).
    """
    return {"worker_niceness": 0, "num_workers_soft_limit": cores + 4}


def _use_token_if_any() -> None:
    """`ray start` turns token authentication on when ~/.ray/auth_token exists, but in Ray 2.60 a
    client joining that head sends the token only with RAY_AUTH_MODE=token: do what Ray's own
    helper does for new local clusters (set the mode, refresh Ray's config) when a token exists."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # another Ray: its own defaults apply
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


NATIVE_LOG = Path(tempfile.gettempdir()) / "quantlab-ray.log"


@contextmanager
def native_stderr_aside() -> Iterator[None]:
    """For a CLI run on Ray: Python's stderr (progress, the one `error:` line) stays on the terminal,
    while what Ray's C++ client writes straight to file descriptor 2 (retry warnings, "failed to
    push error" when a node or the head dies) goes to NATIVE_LOG."""
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(NATIVE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(terminal, "w", buffering=1, errors="backslashreplace")
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr.close()
        sys.stderr = python_stderr


@contextmanager
def _core_logs_aside() -> Iterator[None]:
    """Ray's C++ client writes retry warnings straight to stderr while it connects; keep them out
    of the CLI's one-line errors (they go to a file in the temp folder)."""
    log = os.open(os.path.join(tempfile.gettempdir(), "quantlab-ray-connect.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    os.dup2(log, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log)


HEAD_CONNECT_SECONDS = 5.0
HEAD_CHECK_SECONDS = 1.0  # how often a running sweep checks that the head still answers
HEAD_MISSES = 2           # checks in a row without an answer: the head is lost


def _port_answers(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


LISTENING = "00010000"  # /proc/net/unix flags of a socket that accepts connections
NODE_STOPPED = "the Ray node on this machine stopped"


def _local_node_answers() -> bool:
    """Whether the Ray node under this driver (its raylet's object store) still listens. Once it is
    gone, Ray's client ends the whole process at its next object-store call, so the driver looks
    first: in /proc/net/unix, which lists a Unix socket while its server holds it open (a test
    connection instead would log a warning in the raylet's log each time)."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    path = getattr(node, "plasma_store_socket_name", None)
    if not path:
        return True  # Ray's internals changed: the head check still sees a lost head
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:  # not Linux: connect to it
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1.0)
            return probe.connect_ex(path) == 0
    return any(line.endswith(" " + path) and line.split()[3] == LISTENING for line in table.splitlines())


def _check_last_started_head(address: str) -> None:
    """`auto` without RAY_ADDRESS joins the head `ray start` made here last, which may have died."""
    try:
        _check_reachable(address)
    except RayConnectionError:
        raise RayConnectionError(
            f"cannot connect to Ray at 'auto': the last head `ray start` made on this machine ({address}) "
            f"does not answer; start it again (or `ray stop` to forget it), set RAY_ADDRESS, or pass "
            f"--ray local") from None


def _check_reachable(target: str) -> None:
    """Refuse at once an address whose head's port does not answer."""
    text = target.removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectionError(f"{target!r} is not a Ray address; pass local, auto or host:port "
                                 f"(e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=HEAD_CONNECT_SECONDS).close()
    except OSError as exc:
        raise RayConnectionError(f"cannot connect to Ray at {target!r} ({exc.strerror or exc}); start a "
                                 f"head with `ray start --head --port 6379 --resources "
                                 f"'{{\"{TIMING_RESOURCE}\": 1}}'`, or pass --ray local") from None


def cluster_summary() -> dict[str, Any]:
    """Nodes alive and their CPUs (what a plan or the benchmark prints)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"nodes": len(nodes), "cpus": int(sum(n["Resources"].get("CPU", 0) for n in nodes)),
            "timing_nodes": sum(1 for n in nodes if n["Resources"].get(TIMING_RESOURCE))}


# --- what a task runs on its node -------------------------------------------------------------


def node_info() -> dict[str, Any]:
    """Where this process runs: hostname, Ray node id, CPU model and count."""
    from .tasks import cpu_model

    info: dict[str, Any] = {"hostname": socket.gethostname(), "cpu_model": cpu_model(),
                            "cpu_count": os.cpu_count()}
    try:
        ray = sys.modules.get("ray")  # never imported here: only a process already in Ray has it
        if ray is not None and ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
            info["ip"] = ray.util.get_node_ip_address()
    except Exception:  # outside Ray: the hostname is the node
        pass
    return info


def node_label(info: dict[str, Any]) -> str:
    """The `node` column: hostname, then the Ray node id's first characters where there is one."""
    node_id = info.get("node_id")
    return f"{info.get('hostname', '?')}/{node_id[:8]}" if node_id else str(info.get("hostname", "?"))


class NodeTimingLock:
    """The lock `tasks._held` takes around a latency timing, made of the node's timing resource.

    `acquire` schedules a zero-CPU task that needs one unit of `quantlab_timing` on this very node
    and waits until it runs: Ray's scheduler then guarantees no other timing on this node holds the
    unit. The slot task blocks on a FIFO until `release` closes it (or this process dies), so it
    costs no CPU while the timing runs.
    """

    def __init__(self) -> None:
        self.note: str | None = None
        self._fd: int | None = None
        self._ref: Any = None
        self._dir: str | None = None
        self._flock: int | None = None

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        _remote_functions()
        node_id = ray.get_runtime_context().get_node_id()
        if not _node_has_timing_resource(node_id):
            return self._acquire_file_lock(timeout)
        self._dir = tempfile.mkdtemp(prefix="quantlab-timing-")
        fifo = os.path.join(self._dir, "slot")
        os.mkfifo(fifo)
        self._ref = _timing_slot.options(
            num_cpus=0, resources={TIMING_RESOURCE: 1}, max_retries=0, runtime_env=SLOT_ENV,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(fifo)
        opened: list[int] = []
        opener = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)), daemon=True)
        opener.start()  # returns once the slot task, holding the unit, opened the FIFO to read
        opener.join(timeout if timeout is not None else None)
        if opened:
            self._fd = opened[0]
            return True
        ray.cancel(self._ref, force=True)
        unblock = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the waiting open() return
        opener.join(1)
        os.close(unblock)
        for fd in opened:
            os.close(fd)
        self._cleanup()
        return False

    def release(self) -> None:
        if self._flock is not None:
            fcntl.flock(self._flock, fcntl.LOCK_UN)
            os.close(self._flock)
            self._flock = None
            return
        if self._fd is not None:
            # The slot task reads EOF and returns, which frees the unit. No ray.get on it here: a
            # worker blocked in ray.get lends its CPU back to Ray, which then starts another (cold,
            # TensorFlow-less) worker for the next variant instead of reusing this one.
            os.close(self._fd)
            self._fd = None
        self._cleanup()

    def _acquire_file_lock(self, timeout: float | None) -> bool:
        self.note = (f"this node has no {TIMING_RESOURCE} resource: timed under a machine-wide file "
                     f"lock instead (start the node with --resources '{{\"{TIMING_RESOURCE}\": 1}}')")
        self._flock = os.open(LOCAL_NODE_CACHE.parent / "quantlab-timing.lock", os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            try:
                fcntl.flock(self._flock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._flock)
                    self._flock = None
                    return False
                time.sleep(0.05)

    def _cleanup(self) -> None:
        if self._dir:
            try:
                os.unlink(os.path.join(self._dir, "slot"))
                os.rmdir(self._dir)
            except OSError:
                pass
            self._dir = None
        self._ref = None


_TIMING_NODES: dict[str, bool] = {}


def _node_has_timing_resource(node_id: str) -> bool:
    if node_id not in _TIMING_NODES:
        import ray

        _TIMING_NODES[node_id] = any(n["NodeID"] == node_id and n["Resources"].get(TIMING_RESOURCE)
                                     for n in ray.nodes())
    return _TIMING_NODES[node_id]


def _slot(fifo: str) -> bool:
    """Hold one timing unit until the timing task closes its end of `fifo` (or dies)."""
    fd = os.open(fifo, os.O_RDONLY)
    try:
        while os.read(fd, 1):
            pass
    finally:
        os.close(fd)
    return True


def _node_root(driver_key: str) -> Path:
    return LOCAL_NODE_CACHE / driver_key


def _files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime) of every finished file (temporaries start with a dot)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def rebase(value: Any, mapping: dict[str, str]) -> Any:
    """`value` with every string that starts with a key of `mapping` re-rooted to its value."""
    if isinstance(value, str):
        for old, new in mapping.items():
            if value == old or value.startswith(old.rstrip("/") + "/"):
                return new + value[len(old):]
        return value
    if isinstance(value, dict):
        return {k: rebase(v, mapping) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rebase(v, mapping) for v in value]
    return value


def _named_files(value: Any, root: Path) -> set[str]:
    """Relative paths under `root` of the files named in a (not yet rebased) result."""
    named: set[str] = set()
    prefix = str(root) + "/"

    def visit(item: Any) -> None:
        if isinstance(item, dict):
            for v in item.values():
                visit(v)
        elif isinstance(item, list):
            for v in item:
                visit(v)
        elif isinstance(item, str) and item.startswith(prefix):
            named.add(item[len(prefix):])
            if item.endswith(".npy"):  # a float reference's every-output sibling
                named.add(item[len(prefix):-4] + ".all.npz")

    visit(value)
    return named


class _EventLog:
    """A zero-CPU actor that holds the tasks' progress events until their driver takes them. One
    serves every executor of a connection (a plan's sweeps), each reading its own channel: an
    actor per sweep took a worker process each, and a plan's first seconds."""

    def __init__(self) -> None:
        self.items: dict[str, list[tuple[str, dict]]] = {}

    def put(self, item: tuple[str, str, dict]) -> None:
        channel, task_id, event = item
        self.items.setdefault(channel, []).append((task_id, event))

    def take(self, channel: str) -> list[tuple[str, dict]]:
        return self.items.pop(channel, [])


_SHARED_LOG: tuple[tuple[str, str], Any] | None = None  # (the connection it belongs to, the actor)


def _shared_event_log() -> Any:
    """The connection's event log, made on first use (and again after a new `ray.init`)."""
    global _SHARED_LOG
    import ray

    with _GUARD:
        # Job ids restart at 1 on every new Ray instance; the driver's node id does not repeat.
        context = ray.get_runtime_context()
        connection = (context.get_node_id(), context.get_job_id())
        if _SHARED_LOG is None or _SHARED_LOG[0] != connection:
            _SHARED_LOG = (connection, _event_log_actor.remote())
        return _SHARED_LOG[1]


def _forget_event_log(actor: Any) -> None:
    """The event log stopped answering (its node died): the next executor makes a new one."""
    global _SHARED_LOG
    with _GUARD:
        if _SHARED_LOG is not None and _SHARED_LOG[1] is actor:
            _SHARED_LOG = None


def _emitter(task_id: str, events: Any) -> Callable[[dict], None]:
    """A task's `emit`: each event goes to its driver's channel of the event log without waiting
    (never fails the task). `events` is (event log, channel) or None."""
    def emit(event: dict) -> None:
        if events is None:
            return
        log, channel = events
        try:
            log.put.remote((channel, task_id, event))
        except Exception:  # the log's node is gone: progress is lost, the result is not
            pass
    return emit


LIMIT_CHECK_SECONDS = 0.25


class _LimitWatch:
    """Checks the task's time and memory limits (a hosted demo's) on the node, as the pool checks its
    workers: once one passes, it says so in a `limit` event and the driver cancels the task, which
    kills this worker. A task that finishes before the cancel lands still fails with the reason."""

    def __init__(self, limits: PoolLimits, emit: Callable[[dict], None]) -> None:
        self.passed: str | None = None
        self._done = threading.Event()
        self._limits, self._emit, self._started = limits, emit, time.monotonic()
        if limits.task_timeout_seconds or limits.memory_limit_mb:
            threading.Thread(target=self._watch, name="quantlab-limits", daemon=True).start()

    def _watch(self) -> None:
        while not self._done.wait(LIMIT_CHECK_SECONDS):
            reason = limit_passed(self._limits, time.monotonic() - self._started, lambda: _rss_mb(os.getpid()))
            if reason:
                self.passed = reason
                self._emit({"stage": "limit", "error": reason, "message": reason})
                return

    def stop(self) -> str | None:
        """Stop watching; the limit that passed, if one did."""
        self._done.set()
        return self.passed


def execute_on_node(payload: dict, inputs: dict[str, bytes], driver_root: str, driver_key: str,
                    externals: dict[str, str], task_id: str = "", events: Any = None,
                    limits: PoolLimits = PoolLimits(), same_disk: bool = False) -> dict:
    """The body of every Ray task: materialise the inputs, run the task, send back what it wrote.

    `same_disk`: the task runs where the driver's cache is (a Ray QuantLab started on this
    machine), so it reads and writes that cache in place, as the pool's workers do.
    """
    from .measure import EVALUATION_CORES_ENV
    from .tasks import run_task

    os.environ[EVALUATION_CORES_ENV] = "1"  # the task holds one CPU
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = Path(driver_root) if same_disk else _node_root(driver_key)
    for relative, data in inputs.items():
        target = root / relative
        if not target.exists() or target.stat().st_size != len(data):
            write_atomically(target, data)
    mapping = {driver_root: str(root), **{path: str(root / rel) for path, rel in externals.items()}}
    local_payload = rebase(payload, mapping)
    local_payload["cache_dir"] = str(root)
    before = _files_under(root) if root.exists() and not same_disk else {}
    lock = NodeTimingLock()
    started = time.perf_counter()
    outcome: dict[str, Any] = {"node": node_info()}
    local_result: Any = None
    emit = _emitter(task_id, events)
    watching = _LimitWatch(limits, emit)
    try:
        emit({"stage": "started", "worker": os.getpid(), "niceness": os.nice(0),
              "message": f"running on {node_label(outcome['node'])}"})
        result = run_task(local_payload, emit, lock)
        outcome.update(status="done", result=rebase(result, {str(root): driver_root}))
        local_result = result
        if lock.note and isinstance(result, dict):
            outcome["result"].setdefault("details", {})["latency_note"] = lock.note
    except QuantLabError as exc:
        outcome.update(status="user-error", error=str(exc))
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        outcome.update(status="failed", error=f"{type(exc).__name__}: {first_line}")
    finally:
        passed = watching.stop()
    if passed:  # finished before the driver's cancel came: the limit still holds, nothing goes back
        return {"node": outcome["node"], "status": "failed", "error": passed, "files": {},
                "seconds": time.perf_counter() - started}
    if same_disk:  # written in place: nothing to send back
        return {**outcome, "files": {}, "seconds": time.perf_counter() - started}
    after = _files_under(root)
    wanted = {rel for rel, stamp in after.items() if before.get(rel) != stamp}
    # Files the result names were maybe written by an earlier task on this node: they go back too.
    wanted |= {rel for rel in after if any(rel == r or rel.startswith(r + "/")
                                           for r in _named_files(local_result, root))}
    outcome["files"] = {rel: (root / rel).read_bytes() for rel in sorted(wanted)}
    outcome["seconds"] = time.perf_counter() - started
    return outcome


def warm_worker() -> int:
    """Import what every task needs (TensorFlow above all, about 2.5 s) in a worker ahead of its tasks."""
    from . import tasks  # noqa: F401
    from .tfcompat import import_for_tasks

    import_for_tasks()
    return os.getpid()


# Defined once Ray is imported (a module-level @ray.remote would import Ray with this module).
_timing_slot: Any = None
_remote_execute: Any = None
_event_log_actor: Any = None
_warm_remote: Any = None


def _remote_functions() -> Any:
    global _timing_slot, _remote_execute, _event_log_actor, _warm_remote
    if _remote_execute is None:
        import ray

        _timing_slot = ray.remote(_slot)
        _warm_remote = ray.remote(num_cpus=1, max_retries=0)(warm_worker)
        _event_log_actor = ray.remote(num_cpus=0, max_restarts=0)(_EventLog)
        _remote_execute = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(execute_on_node)
    return _remote_execute


# --- the driver side --------------------------------------------------------------------------


def shared_step_key(payload: dict) -> str | None:
    """The fine-tuned model a variant task shares with others (None: it shares nothing)."""
    from .fine_tuning import _CONVERSION_PARAMS
    from .techniques import get_technique

    technique = payload.get("technique")
    manifest = payload.get("manifest")
    if payload.get("kind") != "variant" or not technique or not manifest:
        return None
    if not getattr(get_technique(technique["id"]), "fine_tunes", False):
        return None
    fit_params = {k: v for k, v in (technique.get("params") or {}).items() if k not in _CONVERSION_PARAMS}
    return content_hash({"engine": ENGINE_VERSION, "model": manifest["model_hash"],
                         "dataset": manifest["dataset_hash"], "technique": technique["id"],
                         "params": fit_params})


class RayExecutor:
    """Runs tasks as Ray tasks; the same `run`/`stopped_tasks`/`close` as WorkerPool."""

    name = "ray"

    def __init__(self, address: str, cache_root: Path, on_note: Callable[[str], None] | None = None,
                 expected_tasks: int = 0, limits: PoolLimits = PoolLimits()) -> None:
        self.address = address
        self.limits = limits  # per-task time and memory limits, checked on the node
        self.cache_root = Path(cache_root).resolve()
        self.expected_tasks = expected_tasks  # how many tasks this executor will run in all
        self.stopped_tasks: list[str] = []
        self._started = False
        self._generation = 0  # of the connection this executor uses
        self._warmed = False
        self._head: str | None = None  # the head's GCS address, checked while tasks run
        self._waiting: dict[str, list[tuple[str, dict]]] = {}
        self._events: Any = None
        self._channel = uuid.uuid4().hex  # this executor's events in the shared event log
        self._note = on_note or (lambda message: None)
        self.driver_key = content_hash({"host": socket.gethostname(), "cache": str(self.cache_root)}, 12)

    def start(self) -> None:
        if not self._started:
            self._generation = connect(self.address)
            self._started = True
            import ray
            from ray.exceptions import RayError

            try:
                self._head = ray.get_runtime_context().gcs_address
                _remote_functions()
                self._events = _shared_event_log()
            except (ConnectionError, OSError, RayError) as exc:  # another sweep left a lost head
                raise _lost(self._where(), exc if self._generation == _GENERATION else _LOST_WHY) from None

    # What a task needs from the driver's cache (or the user's files), as relative paths.
    def _inputs(self, payload: dict) -> tuple[dict[str, bytes], dict[str, str]]:
        paths: set[Path] = set()
        externals: dict[str, str] = {}

        def visit(value: Any) -> None:
            if isinstance(value, dict):
                for item in value.values():
                    visit(item)
            elif isinstance(value, list):
                for item in value:
                    visit(item)
            elif isinstance(value, str) and value.startswith("/") and len(value) < 4096:
                path = Path(value)
                if path.exists():
                    paths.add(path)

        visit(payload)
        manifest = payload.get("manifest") or {}
        if manifest.get("reference_path"):
            paths.add(Path(manifest["reference_path"]).with_suffix(".all.npz"))
        shared = shared_step_key(payload)
        if shared:
            for suffix in (".keras", ".h5", ".json"):  # the model as fine_tuned_suffix keeps it
                paths.add(self.cache_root / "models" / f"ft-{shared}{suffix}")
        inputs: dict[str, bytes] = {}
        for path in paths:
            if not path.exists() or path == self.cache_root:
                continue
            try:
                relative = str(path.resolve().relative_to(self.cache_root))
            except ValueError:  # a user's file outside the cache
                relative = f"external/{content_hash(str(path), 12)}/{path.name}"
                externals[str(path)] = relative
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for file in files:
                inside = relative if file == path else f"{relative}/{file.relative_to(path)}"
                inputs[inside] = file.read_bytes()
        return inputs, externals

    def _submit(self, task_id: str, payload: dict) -> Any:
        import ray

        same_disk = _STARTED_HERE  # the Ray this process started runs on this machine: no files to ship
        inputs, externals = ({}, {}) if same_disk else self._inputs(payload)
        remote = _remote_functions()
        shipped = ray.put(inputs) if inputs else inputs  # nothing to ship: no object-store call
        return remote.remote(payload, shipped, str(self.cache_root), self.driver_key, externals,
                             task_id, (self._events, self._channel), self.limits, same_disk)

    def _submit_waiting(self, payload: dict, running: dict[Any, tuple[str, dict]]) -> None:
        """Submit the variants that waited for this one's fine-tuned model (it is cached now, or
        the next one trains it)."""
        shared = shared_step_key(payload)
        for next_id, next_payload in self._waiting.pop(shared, []) if shared else []:
            running[self._submit(next_id, next_payload)] = (next_id, next_payload)

    def _warm_spare_workers(self, submitted: int) -> None:
        """While the first tasks run (the workload's preparation), import TensorFlow in the workers
        the later ones will take, as the pool's workers do when they start (once per executor)."""
        if self._warmed:
            return
        self._warmed = True
        import ray

        spare = min(self.expected_tasks, int(ray.cluster_resources().get("CPU", 0))) - submitted
        for _ in range(max(0, spare)):
            _warm_remote.remote()

    def _forward_events(self, emit: Callable[[str, dict], None], finished: set[str]) -> dict[str, str]:
        """Hand the tasks' progress events to `on_event`, as the pool does from its pipes; return
        the tasks that passed a limit, with the reason."""
        import ray

        try:
            items = ray.get(self._events.take.remote(self._channel), timeout=10)
        except Exception:  # the event log's node died: progress pauses, results still come
            _forget_event_log(self._events)
            return {}
        passed: dict[str, str] = {}
        for task_id, event in items:
            if task_id in finished:  # late events of a finished task would mislabel another
                continue
            if event.get("stage") == "limit":
                passed[task_id] = event["error"]
            emit(task_id, event)
        return passed

    def _land(self, outcome: dict) -> None:
        """Write the files a task produced into the driver's cache (atomically, like the workers)."""
        for relative, data in outcome.get("files", {}).items():
            target = self.cache_root / relative
            if relative.startswith("external/") or (target.exists() and target.stat().st_size == len(data)):
                continue  # content-addressed: a file of that name and size is that file
            write_atomically(target, data)

    def run(self, tasks: Iterable[tuple[str, dict]],
            on_event: Callable[[str, dict], None] | None = None,
            stop: Callable[[], bool] | None = None) -> Iterator[TaskOutcome]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        self.start()
        self.stopped_tasks = []
        emit = on_event or (lambda task_id, event: None)
        waiting = self._waiting = {}  # shared step key -> tasks behind its first
        ready: list[tuple[str, dict]] = []
        for task_id, payload in tasks:
            shared = shared_step_key(payload)
            if shared and shared in waiting:
                waiting[shared].append((task_id, payload))
                continue
            if shared:
                waiting[shared] = []
            ready.append((task_id, payload))
        running: dict[Any, tuple[str, dict]] = {}
        finished: set[str] = set()
        next_check, misses = time.monotonic() + HEAD_CHECK_SECONDS, 0
        try:
            for task_id, payload in ready:
                running[self._submit(task_id, payload)] = (task_id, payload)
                emit(task_id, {"stage": "queued", "message": "queued on Ray"})
            self._warm_spare_workers(len(ready))
            while running:
                if self._generation != _GENERATION:  # another sweep of this connection lost the head
                    running.clear()
                    raise _lost(self._where(), _LOST_WHY)
                if stop is not None and stop():
                    for ref, (task_id, _) in running.items():
                        ray.cancel(ref, force=True)
                        self.stopped_tasks.append(task_id)
                    return
                if self._head and time.monotonic() >= next_check:
                    next_check = time.monotonic() + HEAD_CHECK_SECONDS
                    if not _local_node_answers():
                        self._lose(running, NODE_STOPPED)
                    misses = 0 if _port_answers(self._head) else misses + 1
                    if misses >= HEAD_MISSES:
                        self._lose(running, "it stopped answering")
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
                if done and not _local_node_answers():  # ray.get would end this process
                    self._lose(running, NODE_STOPPED)
                passed = self._forward_events(emit, finished)
                for ref in [r for r, (task_id, _) in running.items() if task_id in passed and r not in done]:
                    ray.cancel(ref, force=True)  # kills the worker; a cancelled task is not retried
                    task_id, payload = running.pop(ref)
                    finished.add(task_id)
                    self._submit_waiting(payload, running)
                    yield TaskOutcome(task_id, error=passed[task_id])
                for ref in done:
                    task_id, payload = running.pop(ref)
                    finished.add(task_id)
                    try:
                        outcome = ray.get(ref)
                    except RayTaskError as exc:  # a bug in the task wrapper itself
                        yield TaskOutcome(task_id, error=f"the Ray task failed: {_first_line(exc)}")
                        continue
                    except RayError as exc:  # the worker or its node died, twice (retried once)
                        if not _head_reachable():
                            raise _lost(self._where(), exc) from None
                        yield TaskOutcome(task_id, error=(
                            f"the Ray worker or node running this variant died and its one retry "
                            f"failed too ({type(exc).__name__}: {_first_line(exc)}); no QuantLab "
                            f"check failed, so this variant has no result"))
                        continue
                    self._land(outcome)
                    node = outcome.get("node") or {}
                    emit(task_id, {"stage": "finished", "node": node_label(node),
                                   "message": f"finished on {node_label(node)} in "
                                              f"{outcome.get('seconds', 0):.1f} s"})
                    self._submit_waiting(payload, running)
                    if outcome["status"] == "done":
                        result = outcome["result"]
                        result["provenance"] = {**(result.get("provenance") or {}),
                                                "executor": "ray", "node": node}
                        yield TaskOutcome(task_id, result=result)
                    else:
                        yield TaskOutcome(task_id, error=outcome["error"],
                                          user_error=outcome["status"] == "user-error")
        except (ConnectionError, OSError, RayError) as exc:  # the connection itself, or its head
            raise _lost(self._where(), exc if self._generation == _GENERATION else _LOST_WHY) from None
        finally:
            if self.stopped_tasks or running:
                for ref in running:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:
                        pass

    def _lose(self, running: dict, why: str) -> None:
        running.clear()  # nothing left to cancel on a cluster that is gone
        self._abandon(why)
        raise _lost(self._where(), why)

    def _where(self) -> str:
        """The head as the user named it, and its address when that was `auto` or `local`."""
        named = repr(self.address)
        return f"{named} ({self._head})" if self._head and self.address in ("auto", "local") else named

    def _abandon(self, why: str) -> None:
        self._events = None
        self._started = False
        abandon_connection(why)

    def close(self) -> None:
        if self._events is not None:  # the connection's event log stays for its next executor
            try:
                self._events.take.remote(self._channel)  # drop what came late, without waiting
            except Exception:
                pass
            self._events = None
        if self._started:
            self._started = False
            disconnect(self._generation)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _head_reachable() -> bool:
    import ray

    try:
        ray.nodes()
        return True
    except Exception:
        return False


RERUN_HINT = "rows recorded so far are kept, run the sweep again to finish it (finished variants are cached)"


def _lost(where: str, why: BaseException | str) -> RayConnectionError:
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {_first_line(why)}"
    return RayConnectionError(f"lost the connection to the Ray head at {where} ({reason}); {RERUN_HINT}")
