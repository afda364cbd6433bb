"""Sweeps on a real local Ray instance: same rows as the pool, executor and node on each, cached re-runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import ray

from conftest import ROOT, run_cli
from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TrainSettings
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store
from quantlab.techniques import parse_technique_list

TECHNIQUES = "float32,dynamic"
MEASURE = MeasureSettings(min_runs=5, min_seconds=0.05)


def spec(techniques: str = TECHNIQUES) -> SweepSpec:
    return SweepSpec("seed-cnn", "digits-28", parse_technique_list(techniques),
                     train=TrainSettings(epochs=3), measure=MEASURE)


@pytest.fixture(scope="module")
def both(ray_local, tmp_path_factory):
    """The same sweep on the pool and on Ray, each in its own store and cache (nothing shared)."""
    out = {}
    for executor in ("pool", "ray"):
        folder = tmp_path_factory.mktemp(executor)
        store, cache = Store(folder / "q.duckdb"), ArtifactCache(folder / "cache")
        events: list[dict] = []
        report = run_sweep(spec(), store=store, cache=cache, on_event=events.append,
                           options=SweepOptions(ray="auto" if executor == "ray" else None))
        out[executor] = {"report": report, "store": store, "cache": cache, "events": events}
    return out


def by_technique(rows):
    return {row["technique"]: row for row in rows}


def test_ray_rows_equal_the_pools_in_bytes_and_accuracy(both):
    pool, on_ray = by_technique(both["pool"]["report"].rows), by_technique(both["ray"]["report"].rows)
    assert set(pool) == set(on_ray) == set(TECHNIQUES.split(","))
    for technique in pool:
        assert on_ray[technique]["error"] is None, on_ray[technique]["error"]
        assert on_ray[technique]["model_bytes"] == pool[technique]["model_bytes"]
        assert on_ray[technique]["gzip_bytes"] == pool[technique]["gzip_bytes"]
        assert on_ray[technique]["accuracy"] == pool[technique]["accuracy"]
        assert on_ray[technique]["agreement"] == pool[technique]["agreement"]


def test_rows_name_their_executor_and_node(both):
    node_ids = {n["NodeID"] for n in ray.nodes()}
    for row in both["ray"]["report"].rows:
        assert row["executor"] == "ray" and row["provenance"]["executor"] == "ray"
        node = row["provenance"]["node"]
        assert node["node_id"] in node_ids and node["cpu_model"] and node["hostname"]
        assert row["node"].startswith(node["hostname"] + "/")
    for row in both["pool"]["report"].rows:
        assert row["executor"] == "pool" and row["provenance"]["node"]["cpu_model"]
    stored = both["ray"]["store"].results()
    assert set(stored["executor"]) == {"ray"} and stored["node"].notna().all()


def test_artifacts_come_back_to_the_drivers_cache(both):
    cache = both["ray"]["cache"]
    for row in both["ray"]["report"].rows:
        assert row["artifact_path"].startswith(str(cache.root))
        assert os.path.getsize(row["artifact_path"]) == row["model_bytes"]
        assert cache.read_json("results", row["result_key"]) is not None


def test_progress_comes_through_the_same_events(both):
    kinds = [e["type"] for e in both["ray"]["events"]]
    assert kinds[0] == "prepare" and "sweep-start" in kinds and kinds[-1] == "sweep-done"
    assert kinds.count("variant-done") == 2 and kinds.count("variant-queued") == 2
    finished = [e for e in both["ray"]["events"] if e["type"] == "progress" and e.get("stage") == "finished"]
    assert {e["technique"] for e in finished} == {None, "float32", "dynamic"}  # None: the prepare task
    # What the tasks themselves report while they run (the Run page's per-variant messages).
    stages = {(e["technique"], e.get("stage")) for e in both["ray"]["events"] if e["type"] == "progress"}
    for technique in ("float32", "dynamic"):
        assert {(technique, "started"), (technique, "convert"), (technique, "measure")} <= stages
    assert (None, "train baseline") in stages


def test_a_warm_rerun_through_the_cli_is_cached_and_starts_no_ray(both):
    folder = both["ray"]["cache"].root.parent
    code = ("import sys; from quantlab.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules and 'tensorflow' not in sys.modules; sys.exit(rc)")
    args = ["sweep", "--model", "seed-cnn", "--dataset", "digits-28", "--epochs", "3", "--min-runs", "5",
            "--min-seconds", "0.05", "--techniques", TECHNIQUES, "--db", str(folder / "q.duckdb"),
            "--cache", str(folder / "cache"), "--json", "--ray", "local"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(r["cached"] and r["executor"] == "ray" for r in rows)


def test_an_unreachable_head_is_one_error_line(tmp_path):
    result = run_cli("sweep", "--model", "seed-cnn", "--dataset", "digits-28", "--techniques", "float32",
                     "--db", str(tmp_path / "q.duckdb"), "--cache", str(tmp_path / "cache"),
                     "--ray", "127.0.0.1:1", timeout=180)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect to Ray"), result.stderr


def test_auto_on_a_machine_whose_last_head_died_is_one_error_line_at_once(tmp_path):
    """`--ray auto` joins the last `ray start --head` here (Ray's ray_current_cluster file); when that
    head has died since, Ray's client retried it for minutes (2 min here before the test gave up)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)  # Ray looks under $TMPDIR/ray
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "quantlab", "sweep", "--model", "seed-cnn", "--dataset", "digits-28",
         "--techniques", "float32", "--db", str(tmp_path / "q.duckdb"), "--cache", str(tmp_path / "cache"),
         "--ray", "auto"], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**env, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: cannot connect to Ray at 'auto': the last head `ray start` made on this machine ({dead}) "
        f"does not answer"), result.stderr


PLAN = """
name = "zoo"
models = ["seed-cnn", "mlp"]
datasets = ["digits-28"]
techniques = ["float32", "dynamic"]
threads = [1, 2]
epochs = 3
min_runs = 5
min_seconds = 0.05
"""


def test_a_plan_runs_its_sweeps_on_ray_and_a_rerun_is_all_cached(ray_local, tmp_path):
    from quantlab.analysis import compare_frame, list_filters
    from quantlab.plans import load_plan, run_plan

    path = tmp_path / "zoo.toml"
    path.write_text(PLAN)
    plan = load_plan(path)
    store, cache = Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache")
    lines: list[tuple[int, int]] = []
    first = run_plan(plan, store=store, cache=cache, ray="auto", on_sweep=lambda k, n, r: lines.append((k, n)))
    assert first.ok and len(first.sweeps) == 4 and lines == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert {(s.spec.model, s.spec.measure.num_threads) for s in first.sweeps} == \
        {("seed-cnn", 1), ("seed-cnn", 2), ("mlp", 1), ("mlp", 2)}
    assert all(s.variants == 2 and s.failed == 0 for s in first.sweeps)
    # One event log serves every sweep of the connection: an actor per sweep cost a worker each.
    from ray._private.state import actors

    assert [a["ActorClassName"] for a in actors().values()].count("_EventLog") == 1
    again = run_plan(plan, store=store, cache=cache, ray="auto")
    assert all(s.cached == s.variants == 2 for s in again.sweeps)
    sweeps = store.sweeps()
    assert len(sweeps) == 8 and set(sweeps["plan_id"]) == {plan.plan_id}
    assert set(store.results()["executor"]) == {"ray"}
    assert plan.plan_id in list_filters(store).plans
    rows = compare_frame(store, model="mlp", dataset="digits-28", plan_id=plan.plan_id, latest_only=False)
    assert len(rows) == 8 and set(rows["technique"]) == {"float32", "dynamic"}


def test_a_plans_relative_paths_are_found_next_to_the_plan_file(tmp_path, monkeypatch):
    from quantlab.plans import load_plan

    (tmp_path / "plans").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.keras").write_bytes(b"not read here")
    (tmp_path / "plans" / "p.toml").write_text('models = ["seed-cnn", "../models/mine.keras", "gone.keras"]\n'
                                               'datasets = ["digits"]\n')
    monkeypatch.chdir(ROOT)  # not the plan's folder
    plan = load_plan(tmp_path / "plans" / "p.toml")
    assert plan.models == ("seed-cnn", str(tmp_path / "plans" / "../models/mine.keras"), "gone.keras")
    assert plan.datasets == ("digits",)


@pytest.mark.parametrize("line, said", [
    ("threads = [0]", "`threads` must be a list of thread counts of at least 1, e.g. [1, 2, 4]"),
    ("epochs = 0", "epochs must be a whole number of at least 1, not 0"),
    ('min_seconds = "one"', "min_seconds must be a number, not 'one'"),
])
def test_a_plan_file_with_a_mistake_is_refused_by_key(tmp_path, line, said):
    path = tmp_path / "bad.toml"
    path.write_text(f'models = ["seed-cnn"]\ndatasets = ["digits-28"]\n{line}\n')
    result = run_cli("plan", str(path), "--db", str(tmp_path / "q.duckdb"), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {path}: {said}"]


def test_a_demos_memory_limit_stops_a_ray_task_on_its_node(both):
    """QUANTLAB_DEMO's limits hold on Ray too: the task's node checks its memory, the driver cancels it."""
    from quantlab.pool import PoolLimits

    ray_run = both["ray"]
    report = run_sweep(spec("int8-only"), store=ray_run["store"], cache=ray_run["cache"],
                       options=SweepOptions(ray="auto", limits=PoolLimits(memory_limit_mb=50)))
    [row] = report.rows
    assert row["error"].startswith("stopped at ") and "(the limit is 50 MB)" in row["error"], row["error"]
    assert row.get("model_bytes") is None and row["details"]["error_kind"] == "failed"
    assert ray_run["cache"].read_json("results", row["result_key"]) is None  # nothing cached: it runs again


def test_a_demos_time_limit_stops_a_ray_task(both):
    from quantlab.pool import PoolLimits

    ray_run = both["ray"]
    report = run_sweep(spec("qat-int8"), store=ray_run["store"], cache=ray_run["cache"],
                       options=SweepOptions(ray="auto", limits=PoolLimits(task_timeout_seconds=1)))
    [row] = report.rows
    assert row["error"].startswith("stopped after 1 s (the time limit per variant)"), row["error"]
    # The worker was killed, and Ray has its CPUs back for the next sweep.
    assert run_sweep(spec("float16"), store=ray_run["store"], cache=ray_run["cache"],
                     options=SweepOptions(ray="auto")).rows[0]["error"] is None


def test_a_limit_that_passed_holds_when_the_task_finishes_before_the_cancel():
    """The node's watch remembers the limit: a task done before the driver's cancel still fails."""
    import time

    from quantlab.pool import PoolLimits
    from quantlab.ray_executor import LIMIT_CHECK_SECONDS, _LimitWatch

    events: list[dict] = []
    watch = _LimitWatch(PoolLimits(memory_limit_mb=1), events.append)   # any Python process is bigger
    time.sleep(LIMIT_CHECK_SECONDS * 4)
    reason = watch.stop()
    assert reason and reason.startswith("stopped at ") and "(the limit is 1 MB)" in reason
    assert events == [{"stage": "limit", "error": reason, "message": reason}]
    assert _LimitWatch(PoolLimits(), events.append).stop() is None   # no limits: nothing watched


def test_the_driver_sees_whether_the_ray_node_under_it_still_listens(ray_local, tmp_path):
    """Before each object-store call the driver looks for its node's socket (Ray's client would
    end the process on a dead one); a socket nobody holds open is not taken for a live node."""
    import socket

    from quantlab.ray_executor import _local_node_answers

    assert _local_node_answers()  # found in /proc/net/unix as Ray names it today
    stale = tmp_path / "plasma_store"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(stale))  # the file exists but nothing listens: what a killed raylet leaves
    node = ray._private.worker.global_worker.node
    real = node._plasma_store_socket_name
    node._plasma_store_socket_name = str(stale)
    try:
        assert not _local_node_answers()
    finally:
        node._plasma_store_socket_name = real
    assert _local_node_answers()
