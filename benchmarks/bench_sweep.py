"""Whole-process wall time of the default sweep: QuantLab cold vs a straight-line script, and warm vs cold.

Goals (issue 2): cold QuantLab <= 1.25x the straight-line script (the price of isolation, caching
and the store) and below 1.0x with both cores; a warm re-run <= 5% of the cold one.
Run: .venv/bin/python benchmarks/bench_sweep.py [--repeats N]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = "float32,dynamic,float16,int8-fallback,int8-only,uint8-only,int16x8"


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def quantlab(folder: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "quantlab", "sweep", "--model", "seed-cnn", "--dataset", "digits-28",
            "--techniques", TECHNIQUES, "--workers", str(workers), "--db", str(folder / "q.duckdb"),
            "--cache", str(folder / "cache")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):
        straight = timed([sys.executable, str(ROOT / "benchmarks" / "straight_line.py")])
        for workers in (1, 2):
            folder = Path(tempfile.mkdtemp(prefix="ql-bench-"))
            cold = timed(quantlab(folder, workers))
            warm = timed(quantlab(folder, workers))
            rows.append((workers, straight, cold, warm))
            shutil.rmtree(folder)
    print(f"{'workers':>7} {'straight s':>10} {'cold s':>8} {'cold/straight':>13} {'warm s':>7} {'warm/cold':>9}")
    for workers, straight, cold, warm in rows:
        print(f"{workers:>7} {straight:>10.1f} {cold:>8.1f} {cold / straight:>13.2f} {warm:>7.2f} "
              f"{warm / cold:>9.1%}")
    print("goals: cold/straight <= 1.25 with 1 worker, < 1.0 with 2; warm/cold <= 5%")


if __name__ == "__main__":
    main()
