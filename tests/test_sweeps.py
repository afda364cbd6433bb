"""Background sweeps: events in order, rows as stored, a cached re-run, the queue, failures.

One real tiny sweep (seed-cnn on 8x8 digits, one training epoch, two techniques) runs once for the
module, with two more sweeps of the same spec started while it runs: the second waits in the queue
and then comes entirely from the cache; the third is cancelled before it starts.
"""

import re
from dataclasses import dataclass

import time

import pytest

from quantlab import sweeps
from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TrainSettings
from quantlab.errors import QuantLabError
from quantlab.runner import SweepOptions
from quantlab.store import Store
from quantlab.sweeps import SweepManager
from quantlab.techniques import parse_technique_list

TIMEOUT_SECONDS = 600
SPEC = SweepSpec(model="seed-cnn", dataset="digits", techniques=parse_technique_list("float32,dynamic"),
                 train=TrainSettings(epochs=1), measure=MeasureSettings(min_runs=5, min_seconds=0.05))
OPTIONS = SweepOptions(workers=1, source="test")


@dataclass
class Ran:
    store: Store
    first: sweeps.SweepHandle
    second: sweeps.SweepHandle
    third: sweeps.SweepHandle
    status_at_start: dict
    second_at_start: sweeps.SweepSnapshot
    manager: SweepManager
    while_preparing: sweeps.SweepSnapshot | None


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    store, cache = Store(root / "q.duckdb"), ArtifactCache(root / "cache")
    manager = SweepManager(max_concurrent=1)
    first = manager.start(SPEC, store, cache, OPTIONS)
    second = manager.start(SPEC, store, cache, OPTIONS)
    third = manager.start(SPEC, store, cache, OPTIONS)
    status_at_start = {"first": first.snapshot().status, "second": second.snapshot().status,
                       "third": third.snapshot().status}
    second_at_start = second.snapshot()
    third.cancel()
    while_preparing = None
    while not first.finished and while_preparing is None:   # caught while it trains the baseline
        snapshot = first.snapshot()
        if snapshot.preparing and snapshot.preparing_seconds >= 1.0:
            while_preparing = snapshot
        time.sleep(0.05)
    assert first.wait(TIMEOUT_SECONDS), "the first sweep did not finish in time"
    assert second.wait(TIMEOUT_SECONDS), "the queued sweep did not finish in time"
    return Ran(store, first, second, third, status_at_start, second_at_start, manager, while_preparing)


def test_a_sweep_runs_in_the_background_and_finishes_done(ran):
    assert ran.status_at_start["first"] == "running"  # start() returned while it ran
    snapshot = ran.first.snapshot()
    assert snapshot.status == "done", snapshot.error
    assert (snapshot.done, snapshot.total, snapshot.failed) == (2, 2, 0)
    assert [v.state for v in snapshot.variants] == ["done", "done"]
    assert snapshot.started_at <= snapshot.finished_at
    assert snapshot.summary().startswith("done: 2 of 2 variants")


def test_while_preparing_the_progress_says_the_step_and_its_seconds_not_0_of_n(ran):
    snapshot = ran.while_preparing
    assert snapshot is not None, "the first sweep was never seen preparing for a second"
    assert snapshot.done == 0 and snapshot.status == "running"
    assert snapshot.progress_text().startswith("Preparing the model and the dataset")
    assert re.search(r": [1-9]\d* s so far \(then 2 variants\)$", snapshot.progress_text())
    assert snapshot.summary().startswith("running: preparing the model and the dataset")
    assert "0 of 2" not in snapshot.summary()


def test_after_preparing_the_progress_counts_variants(ran):
    snapshot = ran.first.snapshot()
    assert not snapshot.preparing and snapshot.prepared_at is not None
    assert 1.0 <= snapshot.preparing_seconds < snapshot.elapsed_seconds
    assert snapshot.progress_text() == "2 of 2 variants finished"
    cached = ran.second.snapshot()   # its workload came from the cache: no preparation at all
    assert cached.prepare_started_at is None and cached.preparing_seconds == 0.0


def test_events_arrive_in_order(ran):
    kinds = [event["type"] for event in ran.first.events()]
    assert kinds[0] == "prepare"
    assert kinds[-1] == "sweep-done"
    start = kinds.index("sweep-start")
    finished = [i for i, kind in enumerate(kinds) if kind in ("variant-done", "variant-failed")]
    assert len(finished) == 2 and all(i > start for i in finished)
    assert [ran.first.events()[i]["done"] for i in finished] == [1, 2]
    assert ran.first.events(since=len(kinds) - 1) == [ran.first.events()[-1]]


def test_finished_rows_match_the_store(ran):
    handle_rows = {row["row_id"]: row for row in ran.first.snapshot().rows}
    stored = ran.store.results(sweep_id=ran.first.sweep_id)
    assert set(stored["row_id"]) == set(handle_rows)
    for record in stored.to_dict(orient="records"):
        row = handle_rows[record["row_id"]]
        assert record["technique"] == row["technique"]
        assert record["accuracy"] == pytest.approx(row["accuracy"])
        assert record["model_bytes"] == row["model_bytes"]
        assert not record["cached"]


def test_a_sweep_started_while_another_runs_waits_in_the_queue(ran):
    assert ran.status_at_start["second"] == "queued"
    assert ran.second_at_start.queue_position == 1
    assert ran.second_at_start.summary().startswith("queued")
    assert ran.second.snapshot().started_at >= ran.first.snapshot().finished_at


def test_a_second_sweep_over_the_same_spec_is_all_cached(ran):
    snapshot = ran.second.snapshot()
    assert snapshot.status == "done", snapshot.error
    assert snapshot.cached == snapshot.total == 2
    assert all(row["cached"] for row in snapshot.rows)
    assert "prepare" not in [event["type"] for event in ran.second.events()]
    assert [v.state for v in snapshot.variants] == ["cached", "cached"]


def test_a_queued_sweep_cancelled_before_it_starts_never_runs(ran):
    assert ran.status_at_start["third"] == "queued"
    snapshot = ran.third.snapshot()
    assert snapshot.status == "cancelled"
    assert snapshot.started_at is None and snapshot.rows == () and ran.third.events() == []
    assert {v.state for v in snapshot.variants} == {"skipped"}


def test_cancel_stops_the_variant_in_progress_at_once_and_stores_nothing_of_it(ran, tmp_path):
    """A variant timing latency for 120 s is stopped within seconds; its row never appears."""
    import time

    slow = SweepSpec(model="seed-cnn", dataset="digits", techniques=parse_technique_list("float16"),
                     train=SPEC.train, measure=MeasureSettings(min_runs=5, min_seconds=120))
    cache = ArtifactCache(ran.first.cache.root)  # the baseline is prepared: the variant starts at once
    handle = SweepManager().start(slow, ran.store, cache, OPTIONS)
    deadline = time.monotonic() + 120
    while "measuring" not in handle.snapshot().variants[0].message:
        assert time.monotonic() < deadline and not handle.finished, handle.snapshot()
        time.sleep(0.1)
    cancelled_at = time.monotonic()
    handle.cancel()
    assert handle.wait(30), "cancel did not stop the variant in progress"
    assert time.monotonic() - cancelled_at < 30
    snapshot = handle.snapshot()
    assert snapshot.status == "cancelled" and snapshot.rows == ()
    assert (snapshot.variants[0].state, snapshot.variants[0].message) == \
        ("skipped", "stopped mid-way: the sweep was cancelled")
    assert ran.store.results(sweep_id=snapshot.sweep_id).empty
    status = ran.store.query("SELECT status FROM sweeps WHERE sweep_id = ?", [snapshot.sweep_id])
    assert list(status["status"]) == ["cancelled"]


def test_handles_are_found_again_newest_first(ran):
    assert ran.manager.get(ran.first.id) is ran.first
    assert [h.id for h in ran.manager.list()] == [ran.third.id, ran.second.id, ran.first.id]
    assert ran.manager.active() == []


def test_bad_input_ends_as_failed_with_one_line(tmp_path):
    manager = SweepManager()
    spec = SweepSpec(model="seed-cnn", dataset="nope", techniques=SPEC.techniques)
    handle = manager.start(spec, Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache"), OPTIONS)
    assert handle.wait(5)
    snapshot = handle.snapshot()
    assert snapshot.status == "failed"
    assert "nope" in snapshot.error and "\n" not in snapshot.error
    assert snapshot.summary() == f"failed: {snapshot.error}"
    assert not (tmp_path / "q.duckdb").exists()  # nothing was written


def test_a_read_only_store_refuses_to_run(tmp_path):
    handle = SweepManager().start(SPEC, Store(tmp_path / "q.duckdb", read_only=True),
                                  ArtifactCache(tmp_path / "cache"), OPTIONS)
    assert handle.snapshot().status == "failed"
    assert "read-only" in handle.snapshot().error


def test_an_error_inside_the_sweep_thread_ends_as_failed(tmp_path, monkeypatch):
    def refuse(spec, **kwargs):
        kwargs["on_event"]({"type": "prepare", "message": "preparing"})
        raise QuantLabError("the baseline cannot be trained; try fewer epochs\nsecond line")

    monkeypatch.setattr(sweeps, "run_sweep", refuse)
    handle = SweepManager().start(SPEC, Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache"), OPTIONS)
    assert handle.wait(10)
    assert handle.snapshot().status == "failed"
    assert handle.snapshot().error == "the baseline cannot be trained; try fewer epochs"
    assert [event["type"] for event in handle.events()] == ["prepare"]


def test_a_crash_inside_the_sweep_thread_is_reported_not_raised(tmp_path, monkeypatch):
    def crash(spec, **kwargs):
        raise KeyError("manifest")

    monkeypatch.setattr(sweeps, "run_sweep", crash)
    manager = SweepManager()
    handle = manager.start(SPEC, Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache"), OPTIONS)
    assert handle.wait(10)
    assert handle.snapshot().status == "failed"
    assert handle.snapshot().error.startswith("KeyError") and "internal error" in handle.snapshot().error
    assert manager.active() == []  # the slot is free again


def test_the_process_wide_manager_keeps_handles_across_callers(tmp_path):
    spec = SweepSpec(model="nope", dataset="digits", techniques=SPEC.techniques)
    handle = sweeps.start_sweep(spec, Store(tmp_path / "q.duckdb"), ArtifactCache(tmp_path / "cache"), OPTIONS)
    assert sweeps.get_sweep(handle.id) is handle
    assert handle in sweeps.list_sweeps()
    assert sweeps.get_sweep("unknown") is None and sweeps.get_sweep(None) is None
