"""Worker pool: results, events, and a failing, crashing or slow task failing alone."""

import os
import time

from quantlab.errors import QuantLabError
from quantlab.pool import PoolLimits, WorkerPool


def sample_task(payload: dict, emit, lock) -> dict:
    action = payload["action"]
    emit({"stage": "start", "action": action})
    if action == "raise":
        raise RuntimeError("boom\nsecond line")
    if action == "user-error":
        raise QuantLabError("the dataset is wrong; fix it")
    if action == "crash":
        os._exit(7)
    if action == "sleep":
        time.sleep(30)
    if action == "cores":
        from quantlab.measure import evaluation_cores
        return {"cores": evaluation_cores()}
    if action == "hold-lock":
        lock.acquire()
        time.sleep(30)
    if action == "take-lock":
        taken = lock.acquire(timeout=10)
        if taken:
            lock.release()
        return {"took_lock": taken}
    if action == "allocate":
        blob = bytearray(300 * 1024 * 1024)
        blob[::4096] = b"x" * len(blob[::4096])
        time.sleep(5)
    return {"pid": os.getpid(), "value": payload.get("value")}


def run(tasks, **kwargs):
    events = []
    with WorkerPool(sample_task, warm=False, **kwargs) as pool:
        outcomes = {o.task_id: o for o in pool.run(tasks, lambda t, e: events.append((t, e)))}
    return outcomes, events


def test_results_and_events_come_back_per_task():
    outcomes, events = run([(f"t{i}", {"action": "ok", "value": i}) for i in range(4)], size=2)
    assert {k: o.result["value"] for k, o in outcomes.items()} == {"t0": 0, "t1": 1, "t2": 2, "t3": 3}
    assert sorted(t for t, _ in events) == ["t0", "t1", "t2", "t3"]


def test_workers_are_reused_across_tasks():
    outcomes, _ = run([(f"t{i}", {"action": "ok"}) for i in range(4)], size=1)
    assert len({o.result["pid"] for o in outcomes.values()}) == 1


def test_exceptions_crashes_and_timeouts_fail_only_their_task():
    tasks = [("raise", {"action": "raise"}), ("user", {"action": "user-error"}),
             ("crash", {"action": "crash"}), ("slow", {"action": "sleep"}), ("ok", {"action": "ok"})]
    outcomes, _ = run(tasks, size=2, limits=PoolLimits(task_timeout_seconds=3))
    assert outcomes["ok"].ok
    assert outcomes["raise"].error == "RuntimeError: boom" and not outcomes["raise"].user_error
    assert outcomes["user"].error == "the dataset is wrong; fix it" and outcomes["user"].user_error
    assert "exited with code 7" in outcomes["crash"].error
    assert "time limit" in outcomes["slow"].error


def test_a_worker_over_its_memory_limit_is_stopped():
    outcomes, _ = run([("big", {"action": "allocate"}), ("ok", {"action": "ok"})], size=1,
                      limits=PoolLimits(memory_limit_mb=200))
    assert "memory" in outcomes["big"].error
    assert outcomes["ok"].ok


def test_a_worker_killed_while_holding_the_shared_lock_gives_it_back():
    # Without the give-back, "after" would wait for a lock nobody will ever release.
    tasks = [("holder", {"action": "hold-lock"}), ("after", {"action": "take-lock"})]
    outcomes, _ = run(tasks, size=1, limits=PoolLimits(task_timeout_seconds=3))
    assert "time limit" in outcomes["holder"].error
    assert outcomes["after"].result == {"took_lock": True}


def test_stop_kills_the_tasks_in_progress_at_once_and_starts_no_more():
    started = time.monotonic()
    with WorkerPool(sample_task, warm=False, size=2) as pool:
        pool.start()
        processes = [worker.process for worker in pool._workers]
        tasks = [("a", {"action": "sleep"}), ("b", {"action": "hold-lock"}), ("c", {"action": "ok"})]
        outcomes = list(pool.run(tasks, stop=lambda: time.monotonic() - started > 3))
        assert outcomes == [] and sorted(pool.stopped_tasks) == ["a", "b"]
        assert len(processes) == 2 and not any(process.is_alive() for process in processes)
        after = list(pool.run([("d", {"action": "take-lock"})]))  # the lock "b" held is free again
    assert after[0].result == {"took_lock": True}
    assert time.monotonic() - started < 25  # the 30 s sleeps did not run to their end


def test_workers_side_by_side_share_the_cores_for_evaluation():
    cores = len(os.sched_getaffinity(0))
    one, _ = run([("a", {"action": "cores"})], size=1)
    assert one["a"].result["cores"] == cores
    two, _ = run([("a", {"action": "cores"}), ("b", {"action": "cores"})], size=2)
    assert {o.result["cores"] for o in two.values()} == {max(1, cores // 2)}


def test_latency_goes_ahead_without_a_lock_that_is_never_given_back():
    import threading

    from quantlab.tasks import _held

    lock = threading.Lock()
    lock.acquire()  # lost with a killed worker, say
    with _held(lock, wait=0.2) as held:
        assert not held.acquired
    assert lock.locked()  # not released by someone who never had it
    lock.release()
    with _held(lock, wait=0.2) as held:
        assert held.acquired and lock.locked()
    assert not lock.locked()
