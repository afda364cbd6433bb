"""Shared fixtures: one tiny real workload, prepared once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_TECHNIQUES = "baseline,float32,dynamic,float16,int8-fallback,int8-only,uint8-only,int16x8"
TINY_ARGS = ["--model", "seed-cnn", "--dataset", "digits-28", "--epochs", "3", "--min-runs", "5",
             "--min-seconds", "0.05"]


def run_cli(*args: str, check: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m quantlab ARGS` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "quantlab", *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"quantlab {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray of two CPUs started in the test process (not by QuantLab): its tasks get
    their files shipped to a node cache, as on a cluster, though they run on this machine."""
    import ray

    from quantlab.ray_executor import TIMING_RESOURCE

    ray.init(address="local", num_cpus=2, resources={TIMING_RESOURCE: 1}, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> dict:
    """A real cold sweep of every post-training technique on seed-cnn / digits-28, via the CLI."""
    folder = tmp_path_factory.mktemp("tiny")
    db, cache = folder / "q.duckdb", folder / "cache"
    result = run_cli("sweep", *TINY_ARGS, "--techniques", TINY_TECHNIQUES, "--db", str(db),
                     "--cache", str(cache), "--json", check=True)
    return {"db": db, "cache": cache, "stdout": result.stdout, "stderr": result.stderr}


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for its reaper as one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

