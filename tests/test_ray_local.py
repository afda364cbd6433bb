"""`--ray local`: the Ray that QuantLab starts itself runs a sweep in as many workers as it has CPUs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray

from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TrainSettings, content_hash
from quantlab.measure import available_cores
from quantlab.ray_executor import LOCAL_NODE_CACHE, keep_started_ray
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store
from quantlab.techniques import parse_technique_list

TECHNIQUES = "float32,dynamic,float16,int8-only,int16x8"


def test_a_local_ray_sweep_imports_tensorflow_once_per_cpu_and_shuts_ray_down(tmp_path):
    assert not ray.is_initialized()
    events: list[dict] = []
    spec = SweepSpec("seed-cnn", "digits-28", parse_technique_list(TECHNIQUES),
                     train=TrainSettings(epochs=3), measure=MeasureSettings(min_runs=5, min_seconds=0.05))
    report = run_sweep(spec, store=Store(tmp_path / "q.duckdb"), cache=ArtifactCache(tmp_path / "cache"),
                       on_event=events.append, options=SweepOptions(ray="local"))
    assert [row["error"] for row in report.rows] == [None] * 5
    assert {row["executor"] for row in report.rows} == {"ray"}
    # Every task (the preparation and 5 variants) ran in a worker that imported TensorFlow once and
    # took the next task: before, timing slots and idle-worker killing made Ray start new, cold
    # workers for later variants (4 to 6 of them for 7 variants on 2 CPUs).
    started = [e for e in events if e["type"] == "progress" and e.get("stage") == "started"]
    workers = {e["worker"] for e in started}
    assert 1 <= len(workers) <= available_cores(), workers
    # At Ray's default nice 15 they lost the CPU to anything else running, where the pool's do not.
    assert {e["niceness"] for e in started} == {0}
    # A Ray started here runs here: the tasks wrote the driver's cache in place, no node copy.
    assert all(Path(row["artifact_path"]).is_relative_to(tmp_path / "cache") and Path(row["artifact_path"]).exists()
               for row in report.rows)
    driver_key = content_hash({"host": socket.gethostname(), "cache": str((tmp_path / "cache").resolve())}, 12)
    assert not (LOCAL_NODE_CACHE / driver_key).exists()
    assert not ray.is_initialized()  # QuantLab stops the Ray it started, all its daemons with it
    assert ray_child_processes() == []
    from ray._private import services

    assert services.get_node.__module__ == "ray._private.services"  # the quick start's wait is undone


def ray_child_processes() -> list[str]:
    """Command lines of this process's children that are Ray's (its daemons and workers), not
    another test's (a multiprocessing resource tracker, say)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and \
                    ("site-packages/ray/" in command or command.startswith("ray::")):
                found.append(command[:80])
        except (OSError, IndexError, ValueError):
            pass
    return found


def test_the_dashboards_run_button_runs_on_ray_when_quantlab_ray_address_is_set(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from quantlab import sweeps
    from test_app_pages import APP

    monkeypatch.setenv("QUANTLAB_DB", str(tmp_path / "q.duckdb"))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTLAB_RAY_ADDRESS", "local")
    monkeypatch.setattr(sweeps, "_DEFAULT", sweeps.SweepManager())
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params.update(model="seed-cnn", dataset="digits-28", techniques="float32,dynamic")
    at.run()
    assert "Runs on a Ray that this server starts" in " ".join(str(c.value) for c in at.caption)
    at.button(key="run_start").click().run()
    [handle] = sweeps.list_sweeps()
    assert handle.wait(300), handle.snapshot()
    at.run()
    assert not at.exception
    assert "done: 2 of 2 variants" in " ".join(s.label for s in at.status)
    rows = Store(tmp_path / "q.duckdb").results()
    assert sorted(rows["technique"]) == ["dynamic", "float32"]
    assert set(rows["executor"]) == {"ray"} and rows["error"].isna().all()
    try:
        # The server keeps the Ray it started: the next sweep does not pay Ray's start and stop.
        assert ray.is_initialized()
        node = ray.get_runtime_context().get_node_id()
        at.checkbox(key="run_technique_float16").check().run()
        at.button(key="run_start").click().run()
        second = sweeps.list_sweeps()[0]
        assert second is not handle and second.wait(300), second.snapshot()
        rows = Store(tmp_path / "q.duckdb").results()
        assert "float16" in set(rows["technique"]) and rows["error"].isna().all()
        assert set(rows["node"].str.split("/").str[1]) == {node[:8]}  # the same Ray, not a new one
    finally:
        keep_started_ray(False)
    assert not ray.is_initialized()


def test_a_users_model_and_data_outside_the_cache_run_on_a_local_ray_read_in_place(tmp_path):
    """A model nobody here designed (integer token input, an Embedding) and its dataset, both the
    user's files outside QuantLab's cache: a Ray QuantLab starts reads them where they are."""
    from quantlab.config import TechniqueSpec
    from quantlab.techniques import resolve_spec
    from tests import model_zoo as zoo

    x, y = zoo.tokens(200)
    model = zoo.embedding_model()
    zoo.train_briefly(model, x, y)
    mine = tmp_path / "mine"
    mine.mkdir()
    data = zoo.save_dataset(mine, "tok", *zoo.tokens(80, seed=3), x_train=x, y_train=y)
    spec = SweepSpec(str(zoo.save_h5(model, mine, "tokens")), str(data),
                     tuple(resolve_spec(TechniqueSpec(t)) for t in ("float32", "dynamic", "int8-only")),
                     TrainSettings(epochs=1), MeasureSettings(min_runs=5, min_seconds=0.02))
    cache = tmp_path / "cache"
    report = run_sweep(spec, store=Store(tmp_path / "q.duckdb"), cache=ArtifactCache(cache),
                       options=SweepOptions(ray="local"))
    assert sorted((row["technique"], row["error"]) for row in report.rows) == \
        [("dynamic", None), ("float32", None), ("int8-only", None)]   # in the order they finished
    assert {row["executor"] for row in report.rows} == {"ray"}
    assert all(row["model_bytes"] > 0 and row["accuracy"] is not None for row in report.rows)
    driver_key = content_hash({"host": socket.gethostname(), "cache": str(cache.resolve())}, 12)
    assert not (LOCAL_NODE_CACHE / driver_key).exists()      # nothing copied to a node cache
    assert not ray.is_initialized()
