"""A sweep on a cluster whose worker is another "machine": its own IP and no file shared with the driver.

One kernel can fake a second machine this far: a network namespace of its own (an address on a
veth pair, reached over it) and its own /tmp and /dev/shm (Ray's session, its object store, and
no sight of the driver's cache). The head, on the driver's side, has no CPUs: it only coordinates,
so every task runs over there and every file travels both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from conftest import ROOT, TINY_ARGS
from tests import model_zoo as zoo
from quantlab.ray_executor import TIMING_RESOURCE

RAY = Path(sys.executable).with_name("ray")
TECHNIQUES = "float32,dynamic,int8-only"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def wait_for_line(process: subprocess.Popen, text: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return
        if time.monotonic() > deadline:
            break
    pytest.fail(f"no {text!r} from {process.args[:3]}:\n" + "".join(seen[-20:]))


def own_tmp_keeping(installed: list[tuple[Path, Path]]) -> str:
    """Shell that gives the node a /tmp of its own, keeping what every node has installed (the
    checkout and its environment) where it was, when that lives in /tmp (a CI clone)."""
    steps = [f"mkdir -p {aside} && mount --bind {folder} {aside}" for folder, aside in installed]
    steps.append("mount -t tmpfs tmpfs /tmp")
    steps += [f"mkdir -p {folder} && mount --bind {aside} {folder}" for folder, aside in installed]
    return " && ".join(steps)


@pytest.fixture(scope="module")
def two_machines():
    """(head address, the worker machine's IP); everything is removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("making a second machine needs root, `ip` and `unshare` (network and mount namespaces)")
    tag = os.getpid() % 200 + 20
    keep = Path(tempfile.mkdtemp(prefix="quantlab-keep-", dir="/var/tmp"))
    installed = [(folder, keep / str(index)) for index, folder in enumerate(
        {ROOT.resolve(), Path(sys.prefix).resolve()}) if folder.is_relative_to("/tmp")]
    namespace, here, there = f"quantlab{tag}", f"qla{tag}", f"qlb{tag}"
    head_ip, node_ip = f"10.78.{tag}.1", f"10.78.{tag}.2"
    ip("link", "add", here, "type", "veth", "peer", "name", there)
    processes: list[subprocess.Popen] = []
    try:
        ip("netns", "add", namespace)
        ip("link", "set", there, "netns", namespace)
        ip("addr", "add", f"{head_ip}/24", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", namespace, "ip", "addr", "add", f"{node_ip}/24", "dev", there)
        ip("netns", "exec", namespace, "ip", "link", "set", there, "up")
        ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        port = 46000 + tag
        env = {**os.environ}
        if (Path.home() / ".ray" / "auth_token").exists():
            env["RAY_AUTH_MODE"] = "token"  # a joining `ray start` sends the token only when told to
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--port", str(port), "--node-ip-address", head_ip, "--num-cpus", "0",
             "--include-dashboard=false", "--block"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        processes.append(head)
        wait_for_line(head, "Ray runtime started")
        resources = json.dumps({TIMING_RESOURCE: 1})
        node = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"{own_tmp_keeping(installed)} && mount -t tmpfs tmpfs /dev/shm && exec {RAY} start --address "
             f"{head_ip}:{port} --node-ip-address {node_ip} --num-cpus 2 --resources '{resources}' --block"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        processes.append(node)
        wait_for_line(node, "Ray runtime started")
        yield f"{head_ip}:{port}", node_ip
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)  # gone with the namespace, mostly
        shutil.rmtree(keep, ignore_errors=True)
        current = Path("/tmp/ray/ray_current_cluster")  # `--ray auto` must not find this head later
        if current.exists() and current.read_text().strip().startswith(head_ip):
            current.unlink()


def sweep(folder: Path, *extra: str, workload: list[str] = TINY_ARGS, techniques: str = TECHNIQUES) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "quantlab", "sweep", *workload, "--techniques", techniques, "--json",
         "--db", str(folder / "q.duckdb"), "--cache", str(folder / "cache"), *extra],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_sweep_on_another_machine_gives_the_pools_rows_and_its_files_come_home(two_machines, tmp_path):
    address, node_ip = two_machines
    on_ray = {row["technique"]: row for row in sweep(tmp_path / "ray", "--ray", address)}
    on_pool = {row["technique"]: row for row in sweep(tmp_path / "pool", "--workers", "2")}

    assert sorted(on_ray) == sorted(on_pool) == sorted(TECHNIQUES.split(","))
    for technique, row in on_ray.items():
        assert row["error"] is None, row
        assert (row["model_bytes"], row["accuracy"]) == (on_pool[technique]["model_bytes"],
                                                          on_pool[technique]["accuracy"]), technique
        assert row["executor"] == "ray"
    with duckdb.connect(str(tmp_path / "ray" / "q.duckdb"), read_only=True) as store:
        found = store.sql("SELECT provenance, artifact_path FROM results").fetchall()
    assert len(found) == 3
    for provenance, artifact in found:
        assert json.loads(provenance)["node"]["ip"] == node_ip  # measured over there
        assert Path(artifact).is_relative_to(tmp_path / "ray" / "cache") and Path(artifact).stat().st_size > 0


def test_a_users_keras3_model_and_unlabelled_data_travel_to_the_other_machine(two_machines, tmp_path):
    """The user's files live on the driver's /tmp, which the other machine cannot see."""
    address, node_ip = two_machines
    mine = tmp_path / "mine"
    mine.mkdir()
    model = zoo.save_keras(zoo.keras3_model(functional=True), mine, "k3")
    data = zoo.save_dataset(mine, "nolabels", zoo.images(40, seed=3)[0], x_calib=zoo.images(40, seed=4)[0])
    workload = ["--model", str(model), "--dataset", str(data), "--min-runs", "5", "--min-seconds", "0.02"]
    techniques = "baseline,dynamic,int8-only"
    on_ray = {row["technique"]: row for row in sweep(tmp_path / "ray", "--ray", address, workload=workload,
                                                     techniques=techniques)}
    on_pool = {row["technique"]: row for row in sweep(tmp_path / "pool", workload=workload, techniques=techniques)}

    assert sorted(on_ray) == sorted(on_pool) == sorted(techniques.split(","))
    for technique, row in on_ray.items():
        assert row["error"] is None and row["accuracy"] is None, row  # no labels: fidelity only
        assert (row["model_bytes"], row["agreement"], row["sqnr_db"]) == (
            on_pool[technique]["model_bytes"], on_pool[technique]["agreement"], on_pool[technique]["sqnr_db"])
    with duckdb.connect(str(tmp_path / "ray" / "q.duckdb"), read_only=True) as store:
        nodes = [json.loads(p)["node"]["ip"] for (p,) in store.sql("SELECT provenance FROM results").fetchall()]
    assert nodes == [node_ip] * 3
