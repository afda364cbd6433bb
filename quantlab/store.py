"""The DuckDB results store: schema, migrations and queries.

Every variant of every sweep is one row that says how its numbers were obtained. Connections are
short-lived and retried while another process holds the file's write lock, so the dashboard, its
sweeps and the CLI can share one database file. Inside one process (the Streamlit server: page
scripts and sweep threads) connections to a file are taken one at a time: DuckDB refuses a second
in-process connection with another configuration (read-only next to writable) and can fail with
"Unique file handle conflict" when threads open and close the same file at once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import StoreError

DEFAULT_DB_PATH = Path("cache") / "quantlab.duckdb"
LOCK_TIMEOUT_SECONDS = 60.0

RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("row_id", "VARCHAR PRIMARY KEY"),
    ("sweep_id", "VARCHAR NOT NULL"),
    ("recorded_at", "TIMESTAMPTZ NOT NULL"),
    ("result_key", "VARCHAR NOT NULL"),
    ("cached", "BOOLEAN NOT NULL"),
    ("measured_at", "TIMESTAMPTZ"),
    ("model_name", "VARCHAR NOT NULL"),
    ("model_hash", "VARCHAR"),
    ("dataset_name", "VARCHAR NOT NULL"),
    ("dataset_hash", "VARCHAR"),
    ("technique", "VARCHAR NOT NULL"),
    ("family", "VARCHAR NOT NULL"),
    ("params", "VARCHAR NOT NULL"),
    ("model_bytes", "BIGINT"),
    ("gzip_bytes", "BIGINT"),
    ("accuracy", "DOUBLE"),
    ("agreement", "DOUBLE"),
    ("sqnr_db", "DOUBLE"),
    ("latency_p50_ms", "DOUBLE"),
    ("latency_p90_ms", "DOUBLE"),
    ("latency_mean_ms", "DOUBLE"),
    ("latency_std_ms", "DOUBLE"),
    ("latency_runs", "INTEGER"),
    ("num_threads", "INTEGER"),
    ("latency_method", "VARCHAR"),
    ("conversion_seconds", "DOUBLE"),
    ("input_dtype", "VARCHAR"),
    ("output_dtype", "VARCHAR"),
    ("float_ops", "INTEGER"),
    ("total_ops", "INTEGER"),
    ("artifact_path", "VARCHAR"),
    ("error", "VARCHAR"),
    ("provenance", "VARCHAR"),
    ("details", "VARCHAR"),
)
# Added by migration 3: each row's own 95% intervals (see uncertainty.row_intervals). Paired
# p-values against a reference are not columns: they are computed when rows are read.
INTERVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy_ci_low", "DOUBLE"),
    ("accuracy_ci_high", "DOUBLE"),
    ("agreement_ci_low", "DOUBLE"),
    ("agreement_ci_high", "DOUBLE"),
    ("latency_p50_ci_low_ms", "DOUBLE"),
    ("latency_p50_ci_high_ms", "DOUBLE"),
    ("latency_cpu_busy", "BOOLEAN"),
    ("test_samples", "INTEGER"),
)
# Added by migration 5: where a row was measured (pool or ray; hostname/Ray node id).
PLACEMENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("executor", "VARCHAR"),
    ("node", "VARCHAR"),
)
COLUMN_NAMES = tuple(name for name, _ in RESULT_COLUMNS + INTERVAL_COLUMNS + PLACEMENT_COLUMNS)
# Added by migration 4: the process that runs a sweep. `process_started` is the process's start time
# as the kernel counts it (/proc/<pid>/stat), so that a new process reusing the pid is not taken for
# the sweep's own; NULL where /proc does not exist.
SWEEP_PROCESS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pid", "INTEGER"),
    ("hostname", "VARCHAR"),
    ("process_started", "VARCHAR"),
)
# `interrupted`: the process running the sweep stopped before it finished (see process_alive).
SWEEP_STATUSES = ("running", "done", "cancelled", "failed", "interrupted")
JSON_COLUMNS = ("params", "provenance", "details")

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "results and sweeps tables", (
        "CREATE TABLE results (" + ", ".join(f"{n} {t}" for n, t in RESULT_COLUMNS) + ")",
        "CREATE TABLE sweeps (sweep_id VARCHAR PRIMARY KEY, started_at TIMESTAMPTZ NOT NULL, "
        "finished_at TIMESTAMPTZ, model_name VARCHAR, dataset_name VARCHAR, spec VARCHAR, "
        "status VARCHAR NOT NULL, source VARCHAR)",
    )),
    # The int8 PTQ techniques gained `weights` (default per-channel, what they always did): older
    # rows name it, so the newest-row-per-variant queries see one variant, not two.
    (2, "int8 rows name their default weights=per-channel", (
        "UPDATE results SET params = '{\"weights\": \"per-channel\"}' "
        "WHERE technique IN ('int8-fallback', 'int8-only', 'uint8-only') AND params IN ('{}', '')",
    )),
    # Rows stored before it keep NULL intervals (their per-sample predictions were not kept);
    # a sweep measures those variants again (runner: a cached result needs its predictions).
    (3, "95% intervals of accuracy, agreement and p50; busy-CPU flag; test sample count", tuple(
        f"ALTER TABLE results ADD COLUMN {name} {kind}" for name, kind in INTERVAL_COLUMNS)),
    # A sweep whose process was killed (kill -9, a crashed server) used to stay `running` forever:
    # each sweep now names its process, and the next start of the app or the CLI marks the sweeps
    # whose process is gone `interrupted` (Store.mark_interrupted_sweeps).
    (4, "sweeps record the process running them: pid, host name, process start", tuple(
        f"ALTER TABLE sweeps ADD COLUMN {name} {kind}" for name, kind in SWEEP_PROCESS_COLUMNS)),
    # Rows stored before it keep NULL executor and node (they were measured by the local pool).
    (5, "executor and node of each row; the plan a sweep belongs to", (
        *(f"ALTER TABLE results ADD COLUMN {name} {kind}" for name, kind in PLACEMENT_COLUMNS),
        "ALTER TABLE sweeps ADD COLUMN plan_id VARCHAR",
    )),
)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, starttime field 22 of proc(5).
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def this_process() -> tuple[int, str, str | None]:
    """(pid, host name, start time) of this process, as a sweep row records them."""
    return os.getpid(), socket.gethostname(), _process_start(os.getpid())


def process_alive(pid: int | None, hostname: str | None, started: str | None) -> bool | None:
    """Whether the process a sweep row names still runs: True, False, or None when it cannot be told
    from here (another host). A pid now used by another process (another start time) is gone, and
    so is a zombie."""
    if pid is None or hostname is None:
        return False  # recorded before sweeps named their process (migration 4): nothing runs it now
    if hostname != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if not Path("/proc").is_dir():
        return True
    now = _process_start(int(pid))
    return now is not None and (started is None or now == started)


def _process_lock(path: Path) -> threading.RLock:
    """The lock this process holds while it has `path` open (re-entrant: a thread may nest)."""
    key = os.path.realpath(path)
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.RLock())


def _migrate(con: Any) -> list[int]:
    """Apply, on an open connection, the migrations not yet recorded; returns the versions applied."""
    applied = []
    con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "description VARCHAR, applied_at TIMESTAMPTZ)")
    done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
    for version, description, statements in MIGRATIONS:
        if version in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, description, now_utc()])
            con.execute("COMMIT")
        except Exception:
            _roll_back(con)
            raise
        applied.append(version)
    return applied


def _roll_back(con: Any) -> None:
    """Undo an open transaction; a failed COMMIT has already ended it, and its error is the one to see."""
    import duckdb

    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def _result_values(row: dict[str, Any]) -> dict[str, Any]:
    """A row ready to insert: ids and time filled in, JSON columns as text; unknown columns refused."""
    values = dict(row)
    values.setdefault("row_id", new_id())
    values.setdefault("recorded_at", now_utc())
    for name in JSON_COLUMNS:
        if not isinstance(values.get(name), str):
            values[name] = json.dumps(values.get(name) or {}, sort_keys=True, default=str)
    unknown = set(values) - set(COLUMN_NAMES)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    return values


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "already open" in text


@dataclass(frozen=True)
class Store:
    """A DuckDB file of results. `read_only` stores never write (for viewers of a hosted demo)."""

    path: Path = DEFAULT_DB_PATH
    read_only: bool = False

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """A short-lived connection, waiting while another thread or process holds the file."""
        import duckdb

        in_process = _process_lock(Path(self.path))
        if not in_process.acquire(timeout=LOCK_TIMEOUT_SECONDS):
            raise StoreError(f"cannot open the results database {self.path}: another part of this "
                             f"program kept it open for {LOCK_TIMEOUT_SECONDS:.0f} s; try again")
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        try:
            delay = 0.02
            while True:
                try:
                    if not self.read_only:
                        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                    connection = duckdb.connect(str(self.path), read_only=self.read_only)
                    break
                except duckdb.Error as exc:
                    if not _is_lock_error(exc) or time.monotonic() > deadline:
                        raise StoreError(f"cannot open the results database {self.path}: "
                                         f"{str(exc).splitlines()[0]}; close other programs using it "
                                         f"or pass another file with --db") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
            try:
                yield connection
            finally:
                connection.close()
        finally:
            in_process.release()

    def exists(self) -> bool:
        return Path(self.path).exists()

    def stamp(self) -> tuple:
        """What changes whenever the file's content may have: its path, and the modification time
        (ns) and size of the file and of its write-ahead log (absent: zeros). Readers that cache
        what they read key it on this (the dashboard's ui/store_reads.py)."""
        parts: list[Any] = [str(Path(self.path).resolve())]
        for path in (Path(self.path), Path(f"{self.path}.wal")):
            try:
                info = path.stat()
                parts += [info.st_mtime_ns, info.st_size]
            except OSError:
                parts += [0, 0]
        return tuple(parts)

    def migrate(self) -> list[int]:
        """Apply the migrations not yet recorded; returns the versions applied."""
        if self.read_only:
            return []
        with self.connect() as con:
            return _migrate(con)

    def schema_versions(self) -> list[int]:
        if not self.exists():
            return []
        with self.connect() as con:
            return [r[0] for r in con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()]

    # --- writes -------------------------------------------------------------------------------

    def start_sweep(self, model_name: str, dataset_name: str, spec: dict, source: str,
                    plan_id: str | None = None) -> str:
        self.require_writable()
        sweep_id = new_id()
        pid, hostname, started = this_process()
        with self.connect() as con:
            _migrate(con)
            con.execute("INSERT INTO sweeps (sweep_id, started_at, finished_at, model_name, dataset_name, "
                        "spec, status, source, pid, hostname, process_started, plan_id) "
                        "VALUES (?, ?, NULL, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                        [sweep_id, now_utc(), model_name, dataset_name, json.dumps(spec), source,
                         pid, hostname, started, plan_id])
        return sweep_id

    def finish_sweep(self, sweep_id: str, status: str = "done") -> None:
        with self.connect() as con:
            con.execute("UPDATE sweeps SET finished_at = ?, status = ? WHERE sweep_id = ?",
                        [now_utc(), status, sweep_id])

    def mark_interrupted_sweeps(self) -> list[str]:
        """Mark `interrupted` the running sweeps whose process is gone; returns their ids.

        The app and the CLI call this when they start. Sweeps of another host are left alone (their
        process cannot be seen from here); a read-only store, or a file this user cannot write, is
        not changed (`sweeps()` still shows such sweeps as interrupted)."""
        return self._end_running_sweeps(
            "interrupted", lambda pid, host, started: process_alive(pid, host, started) is False)

    def fail_sweeps_of_process(self, pid: int) -> list[str]:
        """Mark `failed` the running sweeps of process `pid` on this host, which has ended and whose
        parent knows why (the CLI's Ray runs: `child_run`); returns their ids."""
        host = socket.gethostname()
        return self._end_running_sweeps("failed", lambda row_pid, row_host, started: (
            row_pid == pid and row_host == host and process_alive(row_pid, row_host, started) is False))

    def _end_running_sweeps(self, status: str, ended: Callable[[int | None, str | None, str | None], bool]
                            ) -> list[str]:
        if self.read_only or not self.exists() or not os.access(self.path, os.W_OK):
            return []
        with self.connect() as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables "
                               "WHERE table_name = 'sweeps'").fetchone()[0] or \
                    not con.execute("SELECT count(*) FROM sweeps WHERE status = 'running'").fetchone()[0]:
                return []  # nothing to look at: the file is left as it is (no migration either)
            _migrate(con)
            running = con.execute("SELECT sweep_id, pid, hostname, process_started FROM sweeps "
                                  "WHERE status = 'running'").fetchall()
            gone = [sweep_id for sweep_id, pid, host, started in running if ended(pid, host, started)]
            for sweep_id in gone:  # finish_sweep of a sweep that lives on after all sets its status
                con.execute("UPDATE sweeps SET status = ?, finished_at = ? "
                            "WHERE sweep_id = ? AND status = 'running'", [status, now_utc(), sweep_id])
        return gone

    def insert_result(self, row: dict[str, Any]) -> str:
        """Insert one complete row (all or nothing); returns its row_id."""
        return self.insert_results([row])[0]

    def insert_results(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Insert complete rows in one transaction on one connection (all or none); returns their ids."""
        self.require_writable()
        records = [_result_values(row) for row in rows]
        if not records:
            return []
        placeholders = ", ".join("?" for _ in COLUMN_NAMES)
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.executemany(f"INSERT INTO results ({', '.join(COLUMN_NAMES)}) VALUES ({placeholders})",
                                [[values.get(name) for name in COLUMN_NAMES] for values in records])
                con.execute("COMMIT")
            except Exception:
                _roll_back(con)
                raise
        return [values["row_id"] for values in records]

    def require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"the results database {self.path} is open read-only (demo mode); "
                             f"results can be viewed here but not added")

    # --- reads --------------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run a parameterized read query; returns a pandas DataFrame (empty if no store yet)."""
        import pandas as pd

        if not self.exists():
            return pd.DataFrame()
        with self.connect() as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables "
                               "WHERE table_name = 'results'").fetchone()[0]:
                return pd.DataFrame()
            return con.execute(sql, list(params)).df()

    def results(self, *, latest_only: bool = False, model_name: str | None = None,
                dataset_name: str | None = None, sweep_id: str | None = None,
                include_errors: bool = True, limit: int | None = None) -> Any:
        """Result rows, newest first; `latest_only` keeps the newest row per measured variant."""
        where, params = ["TRUE"], []
        for column, value in (("model_name", model_name), ("dataset_name", dataset_name),
                              ("sweep_id", sweep_id)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if not include_errors:
            where.append("error IS NULL")
        sql = f"SELECT * FROM results WHERE {' AND '.join(where)}"
        if latest_only:
            sql += (" QUALIFY row_number() OVER (PARTITION BY model_hash, dataset_hash, technique, "
                    "params, coalesce(error, '') ORDER BY recorded_at DESC) = 1")
        sql += " ORDER BY recorded_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.query(sql, params)

    def row(self, row_id: str) -> dict[str, Any] | None:
        frame = self.query("SELECT * FROM results WHERE row_id = ?", [row_id])
        if frame.empty:
            return None
        record = frame.iloc[0].to_dict()
        for name in JSON_COLUMNS:
            record[name] = json.loads(record[name] or "{}")
        return record

    def sweeps(self, limit: int | None = None) -> Any:
        """Stored sweeps, newest first, with the number of rows each stored. A `running` sweep whose
        process is gone reads `interrupted` also before mark_interrupted_sweeps ran (read-only stores)."""
        frame = self.query("SELECT s.*, (SELECT count(*) FROM results r WHERE r.sweep_id = s.sweep_id) "
                           "AS rows FROM sweeps s ORDER BY started_at DESC"
                           + (f" LIMIT {int(limit)}" if limit else ""))
        if frame.empty or "pid" not in frame.columns:
            return frame
        import pandas as pd

        for index, row in frame[frame["status"] == "running"].iterrows():
            pid, host, started = (None if pd.isna(row[name]) else row[name]
                                  for name in ("pid", "hostname", "process_started"))
            if process_alive(None if pid is None else int(pid), host, started) is False:
                frame.loc[index, "status"] = "interrupted"
        return frame

    def count(self) -> int:
        frame = self.query("SELECT count(*) AS n FROM results")
        return 0 if frame.empty else int(frame["n"].iloc[0])
