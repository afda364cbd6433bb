"""Node loss and cancel on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TrainSettings
from quantlab.ray_executor import TIMING_RESOURCE
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store
from quantlab.techniques import parse_technique_list

TECHNIQUES = "float32,dynamic,float16,int8-fallback"
FULL = ("model_bytes", "gzip_bytes", "accuracy", "agreement", "latency_p50_ms", "artifact_path", "node")


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {TIMING_RESOURCE: 1}})
    worker = cluster.add_node(num_cpus=1, resources={TIMING_RESOURCE: 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def sweep_spec() -> SweepSpec:
    return SweepSpec("seed-cnn", "digits-28", parse_technique_list(TECHNIQUES), train=TrainSettings(epochs=3),
                     measure=MeasureSettings(min_runs=5, min_seconds=0.05))


def test_a_node_killed_mid_sweep_loses_no_variant(two_nodes, tmp_path):
    cluster, worker = two_nodes
    worker_id = worker.node_id
    store, cache = Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache")
    events: list[dict] = []
    killed = threading.Event()

    def on_event(event: dict) -> None:
        events.append(event)
        # When the first variant is done the other three are in flight on both nodes (one CPU
        # each): take the second node away without warning.
        if event["type"] == "variant-done" and not killed.is_set():
            cluster.remove_node(worker, allow_graceful=False)
            killed.set()

    report = run_sweep(sweep_spec(), store=store, cache=cache, on_event=on_event,
                       options=SweepOptions(ray="auto"))
    assert killed.is_set(), "the sweep finished before the node was killed: nothing was tested"
    rows = store.results()
    assert sorted(rows["technique"]) == sorted(TECHNIQUES.split(","))  # exactly one row each
    for row in report.rows:  # retried once on the head: full rows, every measurement present
        assert row["error"] is None, row["error"]
        assert all(row.get(k) is not None for k in FULL), row["technique"]
    deadline = time.monotonic() + 60  # the head marks a killed node dead after its heartbeats stop
    while worker_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    after_kill = [r for r in report.rows[1:]]  # finished after the node was gone: measured on the head
    assert all(r["provenance"]["node"]["node_id"] != worker_id for r in after_kill)
    assert len(rows) == len(report.rows) == 4


def test_cancel_cancels_the_ray_tasks_and_stores_no_partial_row(two_nodes, tmp_path):
    store, cache = Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache")
    cancel = threading.Event()

    def on_event(event: dict) -> None:
        if event["type"] == "sweep-start":
            threading.Timer(1.0, cancel.set).start()

    started = time.monotonic()
    report = run_sweep(sweep_spec(), store=store, cache=cache, on_event=on_event,
                       options=SweepOptions(ray="auto"), cancel=cancel)
    assert time.monotonic() - started < 120
    assert len(report.rows) < 4
    frame = store.results()
    assert len(frame) == len(report.rows) and frame["error"].isna().all()
    assert store.sweeps()["status"].iloc[0] == "cancelled"
    # The cancelled tasks are gone from the cluster: nothing left running or waiting.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
