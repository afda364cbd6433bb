"""Sweeps whose process was killed: the next start of the CLI or the app marks them `interrupted`.

The first test kills a real CLI sweep with SIGKILL; the others use real processes that have ended
(a finished `python -c pass`) or this one, and a real DuckDB file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, run_cli
from quantlab import sweeps
from quantlab.store import COLUMN_NAMES, MIGRATIONS, Store, process_alive, this_process

APP = str(ROOT / "app.py")
COMPARE = str(ROOT / "pages" / "compare.py")
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def status_of(db: Path, sweep_id: str | None = None) -> list[tuple]:
    """(sweep_id, status, finished) as stored, read without the liveness check of Store.sweeps()."""
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT sweep_id, status, finished_at IS NOT NULL FROM sweeps"
                           + (" WHERE sweep_id = ?" if sweep_id else ""),
                           [sweep_id] if sweep_id else []).fetchall()


def ended_pid() -> int:
    """The pid of a process that has run and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def sweep_of_ended_process(store: Store, model: str = "seed-cnn", dataset: str = "digits-28") -> str:
    """A sweep row as start_sweep writes it, then owned by a process that has ended."""
    sweep_id = store.start_sweep(model, dataset, {"model": model}, "test")
    with store.connect() as con:
        con.execute("UPDATE sweeps SET pid = ? WHERE sweep_id = ?", [ended_pid(), sweep_id])
    return sweep_id


def test_a_killed_cli_sweep_is_marked_interrupted_by_the_next_cli_start(tmp_path):
    db, cache = tmp_path / "q.duckdb", tmp_path / "cache"
    # Latency timed for at least 30 s per variant: the sweep is still running when it is killed.
    command = [sys.executable, "-m", "quantlab", "sweep", "--model", "seed-cnn", "--dataset", "digits",
               "--techniques", "float32,dynamic", "--epochs", "1", "--min-runs", "5",
               "--min-seconds", "30", "--db", str(db), "--cache", str(cache)]
    with open(tmp_path / "sweep.log", "w") as log:
        sweep = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        running = []
        while not running:
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the sweep never recorded itself as running"
            time.sleep(0.5)
            if db.exists():
                frame = Store(db, read_only=True).sweeps()
                running = [] if frame.empty else list(frame.loc[frame["status"] == "running", "sweep_id"])
        row = Store(db, read_only=True).sweeps().iloc[0]
        assert (row["pid"], row["hostname"]) == (sweep.pid, socket.gethostname())

        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
        assert status_of(db)[0][1] == "running"  # nothing ran to say otherwise
        # Viewers (read-only) see it interrupted before anything rewrote the row.
        assert list(Store(db, read_only=True).sweeps()["status"]) == ["interrupted"]

        listed = run_cli("results", "--db", str(db), check=True)
        assert listed.returncode == 0
        assert status_of(db) == [(running[0], "interrupted", True)]
    finally:
        try:  # the sweep's workers, if any outlived it
            os.killpg(sweep.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_only_sweeps_whose_process_is_gone_are_marked(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    gone = sweep_of_ended_process(store)
    alive = store.start_sweep("seed-cnn", "digits", {}, "test")  # this process: still running
    reused = store.start_sweep("seed-cnn", "mlp", {}, "test")   # this pid, but another start time
    elsewhere = store.start_sweep("seed-cnn", "digits", {}, "test")
    with store.connect() as con:
        con.execute("UPDATE sweeps SET process_started = '1' WHERE sweep_id = ?", [reused])
        con.execute("UPDATE sweeps SET hostname = 'another-host', pid = ? WHERE sweep_id = ?",
                    [ended_pid(), elsewhere])
    finished = store.start_sweep("seed-cnn", "digits", {}, "test")
    store.finish_sweep(finished, "done")

    assert sorted(store.mark_interrupted_sweeps()) == sorted([gone, reused])
    statuses = {sweep_id: status for sweep_id, status, _ in status_of(store.path)}
    assert statuses == {gone: "interrupted", reused: "interrupted", alive: "running",
                        elsewhere: "running", finished: "done"}
    assert store.mark_interrupted_sweeps() == []  # nothing more to do

    assert process_alive(*this_process()) is True
    assert process_alive(os.getpid(), socket.gethostname(), None) is True
    assert process_alive(ended_pid(), socket.gethostname(), None) is False
    assert process_alive(os.getpid(), "another-host", None) is None


def test_a_sweep_that_finishes_after_all_keeps_its_own_status(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    sweep_id = sweep_of_ended_process(store)
    store.mark_interrupted_sweeps()
    store.finish_sweep(sweep_id, "done")
    assert status_of(store.path, sweep_id)[0][1] == "done"


def make_old_store(db: Path, status: str) -> None:
    """A store as versions 1-3 left it, with one sweep in `status`."""
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description VARCHAR, "
                    "applied_at TIMESTAMPTZ)")
        for version, description, statements in MIGRATIONS[:3]:
            for statement in statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, description, T0])
        con.execute("INSERT INTO sweeps VALUES ('old', ?, NULL, 'seed-cnn', 'digits', '{}', ?, 'cli')",
                    [T0, status])


def test_a_store_without_running_sweeps_is_left_as_it_is(tmp_path):
    make_old_store(tmp_path / "old.duckdb", "done")
    store = Store(tmp_path / "old.duckdb")
    assert store.mark_interrupted_sweeps() == []
    assert store.schema_versions() == [1, 2, 3]  # not even migrated: `quantlab results` only reads


def test_migration_4_names_the_process_and_older_running_sweeps_become_interrupted(tmp_path):
    db = tmp_path / "old.duckdb"
    make_old_store(db, "running")  # left running by a version that did not name its process
    store = Store(db)
    assert store.schema_versions() == [1, 2, 3]
    assert store.mark_interrupted_sweeps() == ["old"]
    assert store.schema_versions() == [v for v, _, _ in MIGRATIONS]
    with duckdb.connect(str(db), read_only=True) as con:
        columns = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                             "WHERE table_name = 'sweeps'").fetchall()}
    assert {"pid", "hostname", "process_started"} <= columns
    assert status_of(db, "old")[0][1] == "interrupted"
    new = store.start_sweep("seed-cnn", "digits", {}, "test")
    assert store.sweeps().set_index("sweep_id").loc[new, "pid"] == os.getpid()


def test_a_read_only_store_is_not_changed_but_shows_the_sweep_interrupted(tmp_path):
    sweep_id = sweep_of_ended_process(Store(tmp_path / "q.duckdb"))
    viewer = Store(tmp_path / "q.duckdb", read_only=True)
    assert viewer.mark_interrupted_sweeps() == []
    assert status_of(viewer.path, sweep_id)[0][1] == "running"
    assert list(viewer.sweeps()["status"]) == ["interrupted"]


# --- the pages --------------------------------------------------------------------------------------


def result_rows(sweep_id: str) -> list[dict]:
    return [{"row_id": uuid.uuid4().hex, "sweep_id": sweep_id, "recorded_at": T0 + timedelta(seconds=i),
             "result_key": f"k-{t}", "cached": False, "model_name": "seed-cnn", "model_hash": "mh",
             "dataset_name": "digits-28", "dataset_hash": "dh", "technique": t, "family": f,
             "params": "{}", "model_bytes": b, "gzip_bytes": b // 2, "accuracy": 0.95, "agreement": 1.0,
             "latency_p50_ms": 1.0, "latency_p90_ms": 1.2, "latency_runs": 50, "num_threads": 1,
             "latency_method": "synthetic timing, batch 1", "provenance": "{}", "details": "{}"}
            for i, (t, f, b) in enumerate((("baseline", "baseline", 400_000), ("float32", "float", 100_000)))]


@pytest.fixture
def interrupted_store(tmp_path, monkeypatch):
    """A store whose only sweep's process ended after it stored two variants."""
    monkeypatch.setenv("QUANTLAB_DB", str(tmp_path / "q.duckdb"))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    for name in ("QUANTLAB_DEMO", "QUANTLAB_READ_ONLY", "QUANTLAB_UPLOADS", "QUANTLAB_MAX_UPLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sweeps, "_DEFAULT", sweeps.SweepManager())
    store = Store(tmp_path / "q.duckdb")
    sweep_id = sweep_of_ended_process(store)
    frame = pd.DataFrame(result_rows(sweep_id)).reindex(columns=list(COLUMN_NAMES))
    with store.connect() as con:
        con.register("incoming", frame)
        con.execute("INSERT INTO results SELECT * FROM incoming")
    return store, sweep_id


def test_the_app_start_marks_it_and_the_run_page_says_so(interrupted_store):
    store, sweep_id = interrupted_store
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    assert status_of(store.path, sweep_id)[0][1] == "interrupted"
    app.switch_page("pages/run.py").run()
    assert not app.exception
    warnings = [w.value for w in app.warning]
    assert any("**seed-cnn** on **digits-28**" in w and "was interrupted" in w and "The 2 variants" in w
               for w in warnings), warnings
    table, = [d.value for d in app.dataframe if "status" in d.value.columns]
    assert list(table["status"]) == ["interrupted (its process stopped)"] and list(table["rows"]) == [2]


def test_compare_labels_the_sweep_interrupted(interrupted_store):
    store, sweep_id = interrupted_store
    app = AppTest.from_file(COMPARE, default_timeout=60).run()
    assert not app.exception
    labels = app.selectbox(key="compare_sweep").options
    assert any(label.endswith(f"· interrupted · {sweep_id[:8]}") for label in labels), labels
    assert any("was interrupted" in w.value for w in app.warning)


def test_a_sweep_that_breaks_off_inside_a_live_process_is_stored_failed(tiny_sweep, tmp_path):
    from quantlab.cache import ArtifactCache
    from quantlab.config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings
    from quantlab.runner import SweepOptions, run_sweep

    store = Store(tmp_path / "q.duckdb")
    spec = SweepSpec("seed-cnn", "digits-28", (TechniqueSpec("float32"),), TrainSettings(epochs=3),
                     MeasureSettings(min_runs=5, min_seconds=0.05))

    def break_off(event: dict) -> None:   # an error in the caller's handler, after the sweep started
        if event.get("type") == "sweep-start":
            raise RuntimeError("the dashboard's handler broke")

    with pytest.raises(RuntimeError, match="handler broke"):
        run_sweep(spec, store=store, cache=ArtifactCache(tiny_sweep["cache"]), on_event=break_off,
                  options=SweepOptions(workers=1, source="test"))
    [(_, status, finished)] = status_of(store.path)
    assert status == "failed" and finished
