"""Does the dashboard's server process grow while it runs conversions? Goal: at most 50 MB over 30.

    .venv/bin/python benchmarks/bench_app_memory.py [--sweeps 5] [--cold] [--env NAME=VALUE] [--json]

Starts a real `streamlit run app.py` (its own throw-away store and cache) and drives it with a headless
Chromium (/usr/bin/chromium) exactly as a user would: on the Run page, seed-cnn on the 8x8 digits,
six TFLite techniques (float32, dynamic, float16, int8-fallback, int8-only, uint8-only), one training
epoch; then Run sweep, --sweeps times. Each sweep uses another "Latency runs" value, so no result comes
from the cache: every variant is converted and measured again (in the sweep's worker processes), 6 per
sweep, 30 with the default 5 sweeps.

By default the server is warm, as a hosted one is: before it starts, the CLI stores one result
(float32, with other latency settings than the sweeps, so nothing is reused), so the first page the
server draws already opens the DuckDB store; opening DuckDB the first time costs about 40 MB once,
which --cold leaves in the figures (an empty store, opened by the first sweep).

The resident set size (VmRSS) of the streamlit process alone (not its workers) is read before any
page is opened, after the Run page was drawn once, and after every sweep. The goal is judged from the
page drawn once (Streamlit and the app imported, a session open, the store read) to the end; the
growth after the first sweep is printed too, as the per-conversion slope that a leak would show.
--env passes settings to the server (e.g. --env MALLOC_ARENA_MAX=2 to see what glibc's per-thread
malloc arenas account for).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser_support import (go_to_page, launch_chromium, new_page, open_app,  # noqa: E402
                                   rss_mb, running_server, start_sweep_in_browser, wait_for_sweep)

TECHNIQUES = ("float32", "dynamic", "float16", "int8-fallback", "int8-only", "uint8-only")
GOAL_MB = 50.0
SETTLE_SECONDS = 3.0  # after a sweep: its worker pool is closed, the page has polled once more


def children_rss_mb(pid: int) -> float:
    """RSS of the server's live child processes (the sweep workers), for information."""
    total = 0.0
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for text in child.read_text().split():
            try:
                total += rss_mb(int(text))
            except (FileNotFoundError, RuntimeError):
                pass
    return total


def warm_store(folder: Path) -> None:
    """One stored result (and the trained baseline in the cache), written by the CLI."""
    subprocess.run([sys.executable, "-m", "quantlab", "sweep", "--model", "seed-cnn", "--dataset", "digits",
                    "--techniques", "float32", "--epochs", "1", "--min-runs", "4", "--min-seconds", "0.05",
                    "--db", str(folder / "q.duckdb"), "--cache", str(folder / "cache")],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=5, help=f"sweeps of {len(TECHNIQUES)} conversions each")
    parser.add_argument("--cold", action="store_true", help="start on an empty store (see above)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.env)

    from playwright.sync_api import sync_playwright

    figures: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantlab-memory-") as name:
        folder = Path(name)
        if not args.cold:
            warm_store(folder)
        with running_server(folder, server_env) as server, sync_playwright() as playwright:
            def record(label: str, conversions: int) -> None:
                time.sleep(SETTLE_SECONDS)
                figure = {"after": label, "conversions": conversions,
                          "server_rss_mb": round(rss_mb(server.pid), 1),
                          "workers_rss_mb": round(children_rss_mb(server.pid), 1),
                          "seconds": round(time.perf_counter() - started, 1)}
                figures.append(figure)
                print(f"{label:<40} {conversions:>3} conversions  server RSS {figure['server_rss_mb']:>6.1f} MB  "
                      f"(live children {figure['workers_rss_mb']:>5.1f} MB)  t={figure['seconds']:>5.1f} s",
                      flush=True)

            record("server started", 0)
            browser = launch_chromium(playwright)
            page = new_page(browser)
            open_app(page, server.url)  # Compare on a warm server, Run on a cold one
            go_to_page(page, "Run")
            record("first page and Run drawn", 0)
            conversions = 0
            for sweep in range(args.sweeps):
                start_sweep_in_browser(page, dataset="digits", techniques=TECHNIQUES, epochs=1,
                                       min_runs=5 + sweep, min_seconds=0.05)
                status = wait_for_sweep(page, timeout=600)
                expected = f"done: {len(TECHNIQUES)} of {len(TECHNIQUES)} variants"
                if expected not in status or "cached" in status:
                    raise SystemExit(f"sweep {sweep + 1} did not convert every variant: {status}")
                conversions += len(TECHNIQUES)
                record(f"sweep {sweep + 1} ({status.split(': ', 1)[1]})", conversions)
            browser.close()

    drawn, first, last = figures[1], figures[2], figures[-1]
    growth = last["server_rss_mb"] - drawn["server_rss_mb"]
    later = last["server_rss_mb"] - first["server_rss_mb"]
    slope = later / max(1, last["conversions"] - first["conversions"])
    print()
    print(f"{'cold (empty store)' if args.cold else 'warm (one stored result)'} server"
          + (f", env {' '.join(args.env)}" if args.env else ""))
    print(f"server RSS growth over {last['conversions']} conversions: {growth:+.1f} MB "
          f"({drawn['server_rss_mb']:.1f} -> {last['server_rss_mb']:.1f} MB; goal <= {GOAL_MB:.0f} MB): "
          f"{'PASS' if growth <= GOAL_MB else 'FAIL'}")
    print(f"after the first sweep: {later:+.1f} MB over {last['conversions'] - first['conversions']} "
          f"conversions ({slope * 1000:+.0f} KB per conversion)")
    if args.json:
        print(json.dumps({"cold": args.cold, "env": server_env, "figures": figures, "goal_mb": GOAL_MB,
                          "growth_mb": round(growth, 1), "growth_after_first_sweep_mb": round(later, 1)}))
    if growth > GOAL_MB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
