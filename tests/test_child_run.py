"""A command run in a child process (the CLI's Ray runs): an end no Python code can catch is one line.

Each case runs `run_in_child` in a fresh interpreter: forking pytest itself would run the rest of
the session twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb

from conftest import ROOT, process_running

PRELUDE = """
import os, signal, sys, time
from quantlab.child_run import run_in_child
from quantlab.store import Store
store = Store(sys.argv[1])
def explain(child, code):
    return f"child {child} ended with {code}; {len(store.fail_sweeps_of_process(child))} sweep(s) failed"
"""


def run_script(body: str, tmp_path: Path, **popen: object) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "q.duckdb")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen)


def start_sleeping_child(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A parent whose child says its pid and sleeps."""
    script = run_script("""
        def body():
            print(os.getpid(), flush=True)
            time.sleep(60)
            return 0
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    return script, int(script.stdout.readline())


def sweep_statuses(tmp_path: Path) -> list[str]:
    with duckdb.connect(str(tmp_path / "q.duckdb"), read_only=True) as store:
        return [status for (status,) in store.sql("SELECT status FROM sweeps ORDER BY started_at").fetchall()]


def test_a_child_ended_by_native_code_is_one_error_line_and_its_running_sweep_is_failed(tmp_path):
    script = run_script("""
        def body():
            store.start_sweep("m", "d", {}, "cli")
            print("progress before the end", file=sys.stderr, flush=True)
            os._exit(1)  # as Ray's C++ client does: no exception, no atexit
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    out, err = script.communicate(timeout=60)
    lines = err.splitlines()
    assert script.returncode == 2, err
    assert lines[0] == "progress before the end"
    assert len(lines) == 2 and lines[1].startswith("error: child ") and lines[1].endswith(
        "ended with 1; 1 sweep(s) failed"), err
    assert sweep_statuses(tmp_path) == ["failed"]


def test_a_child_that_returns_gives_its_status_and_nothing_more(tmp_path):
    script = run_script("""
        def body():
            store.start_sweep("m", "d", {}, "cli")
            print("rows", flush=True)
            return 3
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    out, err = script.communicate(timeout=60)
    assert (script.returncode, out, err) == (3, "rows\n", "")
    assert sweep_statuses(tmp_path) == ["running"]  # the body's own business (the CLI finishes its sweeps)


def test_a_bug_in_the_child_keeps_its_traceback_and_status_1(tmp_path):
    script = run_script("""
        def body():
            raise RuntimeError("a bug")
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    out, err = script.communicate(timeout=60)
    assert script.returncode == 1
    assert "Traceback" in err and "RuntimeError: a bug" in err and "error: child" not in err


def test_a_signal_sent_to_the_parent_reaches_the_child(tmp_path):
    script = run_script("""
        def body():
            stopped = []
            signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
            print("ready", flush=True)
            while not stopped:
                time.sleep(0.05)
            return 5
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    assert script.stdout.readline() == "ready\n"
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=30) == 5


def test_a_child_killed_by_a_signal_is_named_in_the_error_line(tmp_path):
    script, child = start_sleeping_child(tmp_path)
    os.kill(child, signal.SIGKILL)  # as the kernel's out-of-memory killer does
    out, err = script.communicate(timeout=30)
    assert script.returncode == 2
    assert err.strip() == f"error: child {child} ended with -{int(signal.SIGKILL)}; 0 sweep(s) failed"


def test_the_child_does_not_outlive_a_killed_parent(tmp_path):
    script, child = start_sleeping_child(tmp_path)
    script.kill()
    script.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process_running(child):
        time.sleep(0.05)
    assert not process_running(child)


def test_no_process_the_child_started_outlives_its_end(tmp_path):
    """A daemon the child started (a local Ray's raylet, say) and that daemon's own child."""
    script = run_script("""
        import subprocess
        def body():
            daemon = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                       "p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); "
                                       "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
            print(daemon.pid, daemon.stdout.readline().strip(), flush=True)
            os._exit(1)
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    daemons = [int(pid) for pid in script.stdout.readline().split()]
    out, err = script.communicate(timeout=60)
    assert script.returncode == 2 and len(daemons) == 2
    assert not [pid for pid in daemons if process_running(pid)]


def test_a_forked_grandchild_holding_the_childs_pipe_does_not_hold_up_the_error_line(tmp_path):
    script = run_script("""
        def body():
            if os.fork() == 0:  # no exec: it keeps every descriptor of the child
                time.sleep(60)
                os._exit(0)
            os._exit(1)
        sys.exit(run_in_child(body, explain))
    """, tmp_path)
    out, err = script.communicate(timeout=30)
    assert script.returncode == 2 and err.startswith("error: child "), err
