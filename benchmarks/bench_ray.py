"""Ray against the local pool: the default PTQ sweep, and a plan of 4 sweeps on two nodes vs one.

Goals (issue 14): `--ray local` cold <= 1.15x the pool's cold wall time on the default PTQ sweep;
a plan of 4 sweeps on two nodes <= 0.6x the same plan on one node (nodes of the same size).

1. Whole-process wall time of `python -m quantlab sweep` (default PTQ techniques, seed-cnn on
   digits-28, default training), cold (fresh cache and store), pool (--workers 2) vs --ray local
   (Ray started by QuantLab with this machine's cores). Includes Ray's start-up and shutdown.
2. `run_plan` of 4 sweeps (seed-cnn and mlp x digits-28 and digits; float32, dynamic, int8-only)
   on a `ray.cluster_utils.Cluster` of one node with 1 CPU, then of two nodes with 1 CPU each
   (on a 2-core machine: one core per node), cold each time.

3. The sweep of part 1 against a Ray head already running on this machine (`ray start --head`
   with the settings README recommends), pool vs `--ray HOST:PORT`: what a team that keeps a
   cluster up pays per sweep (no Ray start or stop in the sweep's time).
4. The plan of part 2 on one node with both cores (2 CPUs, unpinned) against two nodes of one core
   each: the same total cores, split. What two nodes gain there is what one node serializes
   (latency timing takes a node's one timing slot), less each node's own start-up.

Run: .venv/bin/python benchmarks/bench_ray.py [--repeats N] [--part 1|2|3|4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PTQ = "float32,dynamic,float16,int8-fallback,int8-only,uint8-only,int16x8"
PLAN = """
name = "bench"
models = ["seed-cnn", "mlp"]
datasets = ["digits-28", "digits"]
techniques = ["float32", "dynamic", "int8-only"]
"""


def timed_sweep(folder: Path, extra: list[str]) -> float:
    command = [sys.executable, "-m", "quantlab", "sweep", "--model", "seed-cnn", "--dataset", "digits-28",
               "--techniques", PTQ, "--db", str(folder / "q.duckdb"), "--cache", str(folder / "cache"), *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def pool_against_ray(repeats: int, ray_address: str, title: str) -> None:
    """The default PTQ sweep, cold, on the pool and on Ray at `ray_address`, `repeats` times: a table."""
    rows = []
    for _ in range(repeats):
        times = {}
        for name, extra in (("pool", ["--workers", "2"]), ("ray", ["--ray", ray_address])):
            folder = Path(tempfile.mkdtemp(prefix=f"ql-bench-{name}-"))
            times[name] = timed_sweep(folder, extra)
            shutil.rmtree(folder)
        rows.append(times)
    print(f"default PTQ sweep ({len(PTQ.split(','))} variants, cold, {os.cpu_count()} cores), {title}")
    print(f"{'pool s':>8} {'ray s':>8} {'ray/pool':>9}")
    for times in rows:
        print(f"{times['pool']:>8.1f} {times['ray']:>8.1f} {times['ray'] / times['pool']:>9.2f}")


def part_one(repeats: int) -> None:
    pool_against_ray(repeats, "local", "Ray started by QuantLab (--ray local)")
    print("goal: ray/pool <= 1.15")


def part_three(repeats: int) -> None:
    import signal
    import socket

    from quantlab.ray_executor import TIMING_RESOURCE

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_worker_niceness": "0", "RAY_num_workers_soft_limit": str((os.cpu_count() or 2) + 4)}
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
                             "--include-dashboard=false", "--resources", f'{{"{TIMING_RESOURCE}": 1}}', "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        time.sleep(10)
        pool_against_ray(repeats, f"127.0.0.1:{port}", "against a running head (ray start --head)")
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def run_plan_on(nodes: int, cpus_per_node: int = 1) -> float:
    """Wall time of the cold plan on a `Cluster` of `nodes` nodes; nodes of 1 CPU are each pinned to
    a core of their own, a node of more CPUs is left on every core."""
    import ray
    from ray.cluster_utils import Cluster

    from quantlab.cache import ArtifactCache
    from quantlab.plans import load_plan, run_plan
    from quantlab.ray_executor import TIMING_RESOURCE, local_system_config
    from quantlab.store import Store

    folder = Path(tempfile.mkdtemp(prefix=f"ql-bench-plan{nodes}-"))
    (folder / "plan.toml").write_text(PLAN)
    # The settings README recommends for `ray start` (and `--ray local` uses), cluster-wide. Each
    # node is pinned to a core of its own (its daemons and workers inherit the pinning), as a node
    # of one CPU on a machine of its own would be: unpinned, a lone node's TensorFlow trained on
    # both cores, and the one-node figure was that of a two-core node.
    everything = os.sched_getaffinity(0)
    cores = sorted(everything)
    try:
        if cpus_per_node == 1:
            os.sched_setaffinity(0, {cores[0]})
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus_per_node, "resources": {TIMING_RESOURCE: 1},
            "_system_config": local_system_config(cpus_per_node)})
        for index in range(1, nodes):
            os.sched_setaffinity(0, {cores[index % len(cores)]})
            cluster.add_node(num_cpus=1, resources={TIMING_RESOURCE: 1})
    finally:
        os.sched_setaffinity(0, everything)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        started = time.perf_counter()
        report = run_plan(load_plan(folder / "plan.toml"), store=Store(folder / "q.duckdb"),
                          cache=ArtifactCache(folder / "cache"), ray="auto")
        seconds = time.perf_counter() - started
        assert report.ok and all(s.failed == 0 for s in report.sweeps), [s.summary() for s in report.sweeps]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(folder)
    return seconds


def part_two(repeats: int) -> None:
    rows = [(run_plan_on(1), run_plan_on(2)) for _ in range(repeats)]
    print("plan of 4 sweeps x 3 variants (cold), nodes of 1 CPU each")
    print(f"{'1 node s':>9} {'2 nodes s':>10} {'2/1':>6}")
    for one, two in rows:
        print(f"{one:>9.1f} {two:>10.1f} {two / one:>6.2f}")
    print("goal: 2 nodes / 1 node <= 0.6")


def part_four(repeats: int) -> None:
    rows = [(run_plan_on(1, cpus_per_node=2), run_plan_on(2)) for _ in range(repeats)]
    print("plan of 4 sweeps x 3 variants (cold), the same 2 cores as one node or as two nodes of 1 CPU")
    print(f"{'1 node of 2 s':>14} {'2 nodes of 1 s':>15} {'2/1':>6}")
    for one, two in rows:
        print(f"{one:>14.1f} {two:>15.1f} {two / one:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--part", choices=("1", "2", "3", "4", "both", "all"), default="all")
    args = parser.parse_args()
    if args.part in ("1", "both", "all"):
        part_one(args.repeats)
    if args.part in ("2", "both", "all"):
        part_two(args.repeats)
    if args.part in ("3", "all"):
        part_three(args.repeats)
    if args.part in ("4", "all"):
        part_four(args.repeats)


if __name__ == "__main__":
    main()
