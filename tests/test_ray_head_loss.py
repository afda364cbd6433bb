"""The Ray head, or the sweep's own process, dies mid-sweep: one `error:` line, the rows so far kept,
the sweep failed, no partial row, no process left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from conftest import ROOT, TINY_ARGS, process_running
from quantlab.ray_executor import TIMING_RESOURCE
from quantlab.techniques import parse_technique_list

TECHNIQUES = "float32,dynamic,float16,int8-fallback,int8-only,uint8-only,int16x8"
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def head():
    """A head started as a user would (`ray start --head --block`), in its own process group."""
    port = free_port()
    process = subprocess.Popen(
        [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
         "--resources", f'{{"{TIMING_RESOURCE}": 1}}', "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    time.sleep(3)  # the raylet registers after the GCS answers
    yield process, port
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    current = Path("/tmp/ray/ray_current_cluster")  # `--ray auto` must not find the dead head later
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def test_a_head_killed_mid_sweep_is_one_error_line_and_loses_no_finished_row(head, tmp_path):
    process, port = head
    db = tmp_path / "q.duckdb"
    cli = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "sweep", *TINY_ARGS, "--techniques", TECHNIQUES, "--db", str(db),
         "--cache", str(tmp_path / "cache"), "--ray", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    before_kill: list[str] = []
    for line in cli.stderr:  # progress, until the first variant's row is in
        before_kill.append(line)
        if line.startswith("[1/7]"):
            break
    else:
        pytest.fail("the sweep ended before its first row:\n" + "".join(before_kill))
    os.killpg(process.pid, signal.SIGKILL)
    killed = time.monotonic()
    after_kill = cli.stderr.read().splitlines()
    cli.wait(timeout=60)
    seconds = time.monotonic() - killed

    assert cli.returncode == 2, after_kill
    assert after_kill and after_kill[-1].startswith("error: lost the connection to the Ray head"), after_kill
    assert [line for line in after_kill if line.startswith("error:")] == after_kill[-1:]
    assert not any("Traceback" in line or line.startswith("[20") for line in after_kill), after_kill  # no C++ log
    assert seconds < 30, seconds  # Ray's own client would wait 60 s, then end the process silently

    with duckdb.connect(str(db), read_only=True) as store:
        assert store.sql("SELECT status FROM sweeps").fetchall() == [("failed",)]
        rows = store.sql("SELECT technique, model_bytes, accuracy, artifact_path, error FROM results").fetchall()
    assert 1 <= len(rows) < 7
    assert len({row[0] for row in rows}) == len(rows)  # one row per variant at most
    for technique, model_bytes, accuracy, artifact, error in rows:  # every row whole
        assert error is None and model_bytes > 0 and accuracy is not None and Path(artifact).exists(), technique


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_a_ray_runs_process_killed_mid_sweep_is_one_error_line_and_leaves_no_ray_behind(tmp_path):
    """The CLI runs a Ray sweep in a child process (Ray's client may end its process with no
    word); here the kernel's out-of-memory killer is played by a SIGKILL to that child."""
    db = tmp_path / "q.duckdb"
    cli = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "sweep", *TINY_ARGS, "--techniques", TECHNIQUES, "--db", str(db),
         "--cache", str(tmp_path / "cache"), "--ray", "local"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    before_kill: list[str] = []
    for line in cli.stderr:
        before_kill.append(line)
        if line.startswith("[1/7]"):
            break
    else:
        pytest.fail("the sweep ended before its first row:\n" + "".join(before_kill))
    started = descendants(cli.pid)  # the child, the Ray it started, Ray's workers
    (child,) = [int(pid) for pid in Path(f"/proc/{cli.pid}/task/{cli.pid}/children").read_text().split()]
    os.kill(child, signal.SIGKILL)
    after_kill = cli.stderr.read().splitlines()
    cli.wait(timeout=60)

    assert cli.returncode == 2, after_kill
    assert [line for line in after_kill if line.startswith("error:")] == after_kill[-1:]
    assert after_kill[-1] == (
        "error: the run's process was killed by SIGKILL (out of memory?); 1 sweep(s) marked failed; rows "
        "recorded so far are kept, run it again to finish (finished variants are cached)")
    assert len(started) > 3 and not [pid for pid in started if process_running(pid)]
    with duckdb.connect(str(db), read_only=True) as store:
        assert store.sql("SELECT status FROM sweeps").fetchall() == [("failed",)]
        rows = store.sql("SELECT technique, model_bytes, error FROM results").fetchall()
    assert 1 <= len(rows) < 7 and all(size > 0 and error is None for _, size, error in rows)


def dashboard_sweep(address: str, folder: Path, techniques: str = TECHNIQUES):
    from quantlab import sweeps
    from quantlab.cache import ArtifactCache
    from quantlab.config import MeasureSettings, SweepSpec, TrainSettings
    from quantlab.runner import SweepOptions
    from quantlab.store import Store

    spec = SweepSpec("seed-cnn", "digits-28", parse_technique_list(techniques), train=TrainSettings(epochs=3),
                     measure=MeasureSettings(min_runs=5, min_seconds=0.05))
    return sweeps.SweepManager().start(spec, Store(folder / "q.duckdb"), ArtifactCache(folder / "cache"),
                                       SweepOptions(source="app", ray=address))


def wait_for_a_row(handle) -> None:
    deadline = time.monotonic() + 240
    while not handle.snapshot().rows and not handle.finished and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handle.snapshot().rows and not handle.finished, handle.snapshot()


def stored(folder: Path) -> tuple[list[tuple], list[tuple]]:
    with duckdb.connect(str(folder / "q.duckdb"), read_only=True) as db:
        return (db.sql("SELECT status, pid FROM sweeps ORDER BY started_at").fetchall(),
                db.sql("SELECT technique, model_bytes, error FROM results").fetchall())


def assert_failed_in_one_line_with_whole_rows(handle, folder: Path) -> None:
    snapshot = handle.snapshot()
    assert snapshot.status == "failed", snapshot
    assert snapshot.error.startswith("lost the connection to the Ray head at ") and "\n" not in snapshot.error
    sweeps_rows, rows = stored(folder)
    assert [status for status, _ in sweeps_rows] == ["failed"]
    assert 1 <= len(rows) < 7 and len({row[0] for row in rows}) == len(rows)
    assert all(size > 0 and error is None for _, size, error in rows)


def test_the_dashboards_cluster_sweeps_share_one_driver_and_a_head_lost_fails_in_one_line(head, tmp_path):
    """The dashboard runs cluster sweeps in one long-lived child process: when Ray's client ends it,
    the server (this test's process) is still there to say so."""
    process, port = head
    address = f"127.0.0.1:{port}"
    first = dashboard_sweep(address, tmp_path / "first", "float32")
    assert first.wait(240) and first.snapshot().status == "done", first.snapshot()
    second = dashboard_sweep(address, tmp_path / "second")
    wait_for_a_row(second)
    os.killpg(process.pid, signal.SIGKILL)
    assert second.wait(60), second.snapshot()

    assert_failed_in_one_line_with_whole_rows(second, tmp_path / "second")
    [(_, first_pid)] = stored(tmp_path / "first")[0]
    [(_, second_pid)] = stored(tmp_path / "second")[0]
    assert first_pid == second_pid != os.getpid()  # the same driver process, not the server
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # the server never joined


def test_a_cluster_driver_killed_mid_sweep_fails_that_sweep_and_the_next_gets_a_new_one(head, tmp_path):
    from quantlab.cluster_driver import driver_for

    _, port = head
    address = f"127.0.0.1:{port}"
    doomed = dashboard_sweep(address, tmp_path / "doomed")
    wait_for_a_row(doomed)
    killed = driver_for(address).pid
    os.kill(killed, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    assert doomed.wait(60), doomed.snapshot()
    assert_failed_in_one_line_with_whole_rows(doomed, tmp_path / "doomed")

    after = dashboard_sweep(address, tmp_path / "after", "float32")
    assert after.wait(240) and after.snapshot().status == "done", after.snapshot()
    [(status, pid)] = stored(tmp_path / "after")[0]
    assert status == "done" and pid not in (killed, os.getpid())


def test_a_head_killed_mid_plan_ends_every_sweep_in_one_line_and_the_plan_ends(head, tmp_path):
    """A plan's sweeps share one connection: when one sweep leaves the lost head, the others fail
    with the same line. Before, one of them called Ray again, which reconnected to the dead head by
    itself and retried it for minutes: the plan hung in 4 runs of 5."""
    process, port = head
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "lost"\nmodels = ["seed-cnn", "mlp"]\ndatasets = ["digits-28", "digits"]\n'
                    'techniques = ["float32", "dynamic", "int8-only"]\nmin_runs = 5\nmin_seconds = 0.05\n')
    db, results = tmp_path / "q.duckdb", tmp_path / "cache" / "results"
    cli = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "plan", str(plan), "--db", str(db), "--cache", str(tmp_path / "cache"),
         "--ray", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 240
    while not (results.exists() and any(results.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.1)  # until the first variant is finished
    os.killpg(process.pid, signal.SIGKILL)
    try:
        output, _ = cli.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        cli.kill()
        pytest.fail("the plan did not end within 90 s of the head's loss")

    lines = output.splitlines()
    assert cli.returncode in (1, 2) and not any("Traceback" in line for line in lines), output
    ended = [line for line in lines if line.startswith(("[1/4] ", "[2/4] ", "[3/4] ", "[4/4] "))]
    cut_short = [line for line in ended if ": failed: " in line]
    run_ended = [line for line in lines if line.startswith("error: lost the connection to the Ray head")]
    # Each sweep says how it ended (one not started yet cannot reach the head), or Ray's client ended
    # the whole run and its one line says so.
    assert (len(ended) == 4 and cut_short) or run_ended, output
    assert all("lost the connection" in line or "cannot connect" in line for line in cut_short), output
    with duckdb.connect(str(db), read_only=True) as store:
        statuses = [status for (status,) in store.sql("SELECT status FROM sweeps").fetchall()]
        rows = store.sql("SELECT sweep_id, technique, model_bytes, error FROM results").fetchall()
    assert "failed" in statuses and "running" not in statuses, (statuses, output)
    assert len({(sweep, technique) for sweep, technique, _, _ in rows}) == len(rows)  # one row per variant
    assert all(size > 0 and error is None for _, _, size, error in rows)  # none partial
