"""Every page's script time with a results store: a visitor's first render, page by page.

    .venv/bin/python benchmarks/bench_pages.py [--runs 5] [--db FILE --cache DIR]

Runs each page of the app headless with AppTest (pages/run.py, compare, recommend, details, lab,
and app.py, the entry point with its sidebar, on its default page) against a store, each page in a
fresh Python process, and prints per page: its first run (a server's first render: the imports of
streamlit, pandas, plotly, duckdb and the engine included), then the median of --runs fresh sessions
(a new AppTest each: no session state; what a new visitor's first render costs once the server is
warm). Goal: every fresh-session median under 1 s on a quiet machine. The figures include
AppTest's own cost per run, printed first as the time of a page that draws one line.

Without --db it builds a throw-away store of 10,000 synthetic rows (made-up figures, as
bench_compare_page.py: 10 models x 200 sweeps x 5 techniques); with --db/--cache it times a real
store, e.g. one written by `python -m quantlab sweep` (the Lab needs its cache to open a workload).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


GOAL_SECONDS = 1.0
PAGES = ("app", "run", "compare", "recommend", "details", "lab")
EMPTY_PAGE = "import streamlit as st\nst.write('one line')\n"


def page_file(name: str) -> str:
    if name == "empty":
        path = Path(tempfile.gettempdir()) / "quantlab_bench_empty_page.py"
        path.write_text(EMPTY_PAGE)
        return str(path)
    return str(ROOT / "app.py") if name == "app" else str(ROOT / "pages" / f"{name}.py")


def time_page_once(name: str) -> float:
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(page_file(name), default_timeout=120)
    started = time.perf_counter()
    app.run()
    elapsed = time.perf_counter() - started
    if app.exception:
        raise SystemExit(f"{name}: the page failed: {app.exception[0].message}")
    return elapsed


def time_page(name: str, runs: int) -> dict:
    """In this process: the page's first run, then `runs` fresh sessions."""
    first = time_page_once(name)
    return {"first": first, "fresh": [time_page_once(name) for _ in range(runs)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", type=Path, help="a results store to time (default: 10,000 synthetic rows)")
    parser.add_argument("--cache", type=Path, help="the artifact cache that goes with --db")
    parser.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated, of {', '.join(PAGES)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # the child process: time one page, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_page(args.one, args.runs)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        if args.db:
            db, cache = args.db, args.cache or Path(folder) / "cache"
        else:
            from benchmarks.bench_compare_page import synthetic_store
            db, cache = Path(folder) / "large.duckdb", Path(folder) / "cache"
            synthetic_store(db, models=10, sweeps_per_model=200)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTLAB_")}
        env.update(QUANTLAB_DB=str(db), QUANTLAB_CACHE=str(cache), PYTHONPATH=str(ROOT))
        from quantlab.store import Store
        print(f"store {db}: {Store(db, read_only=True).count():,} rows; cache {cache}")
        worst = 0.0
        for name in ["empty", *args.pages.split(",")]:
            child = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(args.runs)],
                                   env=env, capture_output=True, text=True, cwd=ROOT)
            if child.returncode != 0:
                raise SystemExit(f"{name}: {child.stdout[-2000:]}{child.stderr[-2000:]}")
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            fresh, median = figures["fresh"], statistics.median(figures["fresh"])
            worst = max(worst, median) if name != "empty" else worst
            print(f"{name:>10}: first run {figures['first'] * 1000:6.0f} ms; a new session: median "
                  f"{median * 1000:5.0f} ms (min {min(fresh) * 1000:.0f}, max {max(fresh) * 1000:.0f}, "
                  f"{len(fresh)} runs)")
    verdict = "within" if worst <= GOAL_SECONDS else "OVER"
    print(f"slowest page median {worst * 1000:.0f} ms ({verdict} the {GOAL_SECONDS:g} s goal)")
    return 0 if worst <= GOAL_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
