"""How the Compare page's script time grows with the store: 10 rows against 10,000 rows.

    .venv/bin/python benchmarks/bench_compare_page.py [--runs 5]

Builds two throw-away stores of synthetic rows (made-up figures: this times queries and drawing, not
models), runs pages/compare.py headless with AppTest (one warm-up run each, then --runs timed runs
each, interleaved so that load from other processes slows both alike), and prints the median script
times, their ratio (goal: at most 2x), and the time of the page's two queries alone. The 10,000 rows
are 10 models x 200 sweeps x 5 techniques, so the page's model has 1,000 rows in 200 sweeps to
filter, de-duplicate and relate to its baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantlab import analysis  # noqa: E402
from quantlab.store import COLUMN_NAMES, Store  # noqa: E402

GOAL_RATIO = 2.0
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
TECHNIQUES = (("baseline", "baseline", 400_000, 0.950, 2.0), ("float32", "float", 100_000, 0.950, 1.0),
              ("float16", "ptq", 50_000, 0.950, 1.0), ("dynamic", "ptq", 26_000, 0.948, 0.8),
              ("int8-only", "ptq", 25_000, 0.930, 0.5))


def synthetic_store(path: Path, models: int, sweeps_per_model: int) -> Store:
    rows = []
    for m in range(models):
        for s in range(sweeps_per_model):
            sweep_id = uuid.uuid4().hex
            for i, (technique, family, size, accuracy, p50) in enumerate(TECHNIQUES):
                noise = ((m * 7 + s * 13 + i) % 11 - 5) / 1000
                rows.append({"row_id": uuid.uuid4().hex, "sweep_id": sweep_id,
                             "recorded_at": T0 + timedelta(minutes=s, seconds=m * 5 + i), "result_key": "k",
                             "cached": s > 0, "model_name": f"synthetic-model-{m}", "model_hash": f"mh{m}",
                             "dataset_name": "synthetic-digits", "dataset_hash": "dh", "technique": technique,
                             "family": family, "params": "{}", "model_bytes": size, "gzip_bytes": size // 2,
                             "accuracy": accuracy + noise, "agreement": 0.99, "sqnr_db": 30.0,
                             "latency_p50_ms": p50 * (1 + noise), "latency_p90_ms": p50 * 1.2,
                             "latency_runs": 50, "num_threads": 1, "latency_method": "synthetic",
                             "provenance": json.dumps({"cpu_model": "synthetic"}), "details": "{}"})
    store = Store(path)
    store.migrate()
    frame = pd.DataFrame(rows).reindex(columns=list(COLUMN_NAMES))
    with store.connect() as con:
        con.register("incoming", frame)
        con.execute("INSERT INTO results SELECT * FROM incoming")
    return store


def time_page_once(store: Store) -> float:
    from streamlit.testing.v1 import AppTest

    os.environ["QUANTLAB_DB"] = str(store.path)
    app = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=120)
    started = time.perf_counter()
    app.run()
    elapsed = time.perf_counter() - started
    if app.exception:
        raise SystemExit(f"the page failed: {app.exception}")
    if not (app.success or app.warning):
        raise SystemExit("the page drew no sweet-spot answer")
    return elapsed


def time_queries(store: Store, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        filters = analysis.list_filters(store)
        model = filters.pairs["model_name"].iloc[0]
        analysis.compare_frame(store, model=model, dataset="synthetic-digits", include_errors=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        small = synthetic_store(Path(folder) / "small.duckdb", models=2, sweeps_per_model=1)
        large = synthetic_store(Path(folder) / "large.duckdb", models=10, sweeps_per_model=200)
        stores = {"10 rows": small, "10,000 rows": large}
        for store in stores.values():  # warm-up: imports, first connection
            time_page_once(store)
        times: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(args.runs):  # interleaved, so a busy machine slows both alike
            for name, store in stores.items():
                times[name].append(time_page_once(store))
        figures = {}
        for name, store in stores.items():
            page = times[name]
            figures[name] = statistics.median(page)
            print(f"{name:>12}: {store.count():>6} stored rows; "
                  f"page script median {figures[name] * 1000:7.0f} ms "
                  f"(min {min(page) * 1000:.0f}, max {max(page) * 1000:.0f}, {len(page)} runs); "
                  f"its queries alone {time_queries(store, args.runs) * 1000:6.1f} ms")
    ratio = figures["10,000 rows"] / figures["10 rows"]
    verdict = "within" if ratio <= GOAL_RATIO else "OVER"
    print(f"ratio 10,000 / 10 rows: {ratio:.2f}x ({verdict} the {GOAL_RATIO:g}x goal)")
    return 0 if ratio <= GOAL_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
