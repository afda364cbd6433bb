"""Issue "hosted demo": two browser sessions sweeping at once and the CLI writing the same store at
the same time: no lock error shown to anyone, no row lost or duplicated.

One `streamlit run` server (two sweeps may run at once: QUANTLAB_MAX_SWEEPS=2) and one results
database. Two browser contexts (two users) each set up a tiny sweep with their own techniques; the CLI
starts a third on the same database and cache, and as soon as it has opened its sweep in the store
both users press Run (the CLI's variants are made slow enough to still be writing then). While
everything runs, both pages are watched for error boxes and lock messages. Then every sweep must be
done with exactly one row per technique, the three must have overlapped in time, and the CLI must
have exited 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quantlab.store import Store
from tests.browser_support import (FINISHED_LINE, LOCK_WORDS, ROOT, assert_no_errors, error_texts, new_page,
                                   open_app, running_server, start_sweep_in_browser, sweep_labels, wait_idle)
from tests.browser_support import browser, playwright_instance  # noqa: F401, F811  (fixtures)

pytestmark = pytest.mark.browser

DATASET = "digits"
SESSION_TECHNIQUES = {"first": ("baseline", "float32", "dynamic"),
                      "second": ("float16", "int8-fallback", "int8-only")}
CLI_TECHNIQUES = ("float32", "dynamic", "float16", "int8-fallback", "uint8-only")
# Each CLI variant times at least this long, so its five variants keep writing for well over 10 s
# after its sweep opens: the two app sweeps, started at that moment, overlap it even on a loaded machine.
CLI_MIN_SECONDS = 2.0
CLI_SWEEP_OPENED = re.compile(r"^sweep \w+: \d+ variants")
TIMEOUT_SECONDS = 300


class CliSweep:
    """`python -m quantlab sweep` in a subprocess, its stderr collected line by line as it arrives."""

    def __init__(self, db: Path, cache: Path) -> None:
        command = [sys.executable, "-m", "quantlab", "sweep", "--model", "seed-cnn", "--dataset", DATASET,
                   "--techniques", ",".join(CLI_TECHNIQUES), "--epochs", "1", "--min-runs", "5",
                   "--min-seconds", str(CLI_MIN_SECONDS), "--db", str(db), "--cache", str(cache)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: re.Pattern, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(pattern.search(line) for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the CLI never printed {pattern.pattern!r} "
                                     f"(exit {self.process.poll()}):\n{self.stderr[-3000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def page_problems(page) -> list[str]:
    """Error boxes, and any mention of a lock, on the page right now."""
    problems = list(error_texts(page))
    text = page.locator('[data-testid="stApp"]').inner_text()
    problems.extend(f"lock text: {line}" for line in text.splitlines() if LOCK_WORDS.search(line))
    return problems


def test_two_sessions_and_the_cli_sweep_one_store_at_once(browser, tmp_path):
    with running_server(tmp_path / "server", env={"QUANTLAB_MAX_SWEEPS": "2"}) as server:
        pages = {name: new_page(browser) for name in SESSION_TECHNIQUES}
        for name, page in pages.items():
            open_app(page, server.url)
            start_sweep_in_browser(page, dataset=DATASET, techniques=SESSION_TECHNIQUES[name], epochs=1,
                                   min_runs=5, min_seconds=0.05, press_run=False)

        # Everyone at once: the CLI opens its sweep on the same database and cache, then both users
        # press Run while it is writing.
        cli = CliSweep(server.db, server.cache)
        try:
            cli.wait_for_line(CLI_SWEEP_OPENED, timeout=TIMEOUT_SECONDS)
            for page in pages.values():
                page.locator(".st-key-run_start button").click()

            problems: dict[str, set[str]] = {name: set() for name in pages}
            statuses: dict[str, str] = {}
            deadline = time.monotonic() + TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                for name, page in pages.items():
                    problems[name].update(page_problems(page))
                    labels = sweep_labels(page)
                    if labels:
                        statuses[name] = labels[0]
                if cli.process.poll() is not None and len(statuses) == len(pages) and all(
                        FINISHED_LINE.search(status) for status in statuses.values()):
                    break
                time.sleep(0.5)
            else:
                cli_state = "running" if cli.process.poll() is None else f"exit {cli.process.returncode}"
                raise AssertionError(f"not everything finished in {TIMEOUT_SECONDS} s: pages {statuses}, "
                                     f"CLI {cli_state}")
            returncode = cli.finish(timeout=30)
        finally:
            cli.kill()
        stderr = cli.stderr

        for name, page in pages.items():
            wait_idle(page)
            problems[name].update(page_problems(page))
            assert_no_errors(page, f"the {name} session")
        assert not any(problems.values()), f"pages showed errors or lock messages: {problems}"
        for name, status in statuses.items():
            count = len(SESSION_TECHNIQUES[name])
            assert f": done: {count} of {count} variants" in status, f"the {name} session's sweep: {status}"
        assert returncode == 0, f"the CLI failed ({returncode}):\n{stderr[-3000:]}"
        assert not LOCK_WORDS.search(stderr), f"the CLI mentioned a lock:\n{stderr[-3000:]}"
        server_log = server.log()
        assert "Traceback" not in server_log and not LOCK_WORDS.search(server_log), server_log[-3000:]

        # The store: three finished sweeps, each with exactly one row per technique it ran, none failed.
        store = Store(server.db, read_only=True)
        sweeps = store.query("SELECT sweep_id, source, status, spec, started_at, finished_at FROM sweeps")
        rows = store.query("SELECT sweep_id, technique, error, count(*) AS n FROM results "
                           "GROUP BY ALL ORDER BY sweep_id, technique")
    assert sorted(sweeps["source"]) == ["app", "app", "cli"], sweeps
    assert set(sweeps["status"]) == {"done"}, sweeps
    expected = {("cli", tuple(sorted(CLI_TECHNIQUES)))} | {
        ("app", tuple(sorted(techniques))) for techniques in SESSION_TECHNIQUES.values()}
    found = set()
    for sweep in sweeps.itertuples():
        mine = rows[rows["sweep_id"] == sweep.sweep_id]
        assert list(mine["n"]) == [1] * len(mine), f"duplicated rows in sweep {sweep.sweep_id}:\n{mine}"
        assert mine["error"].isna().all(), f"failed variants in sweep {sweep.sweep_id}:\n{mine}"
        found.add((sweep.source, tuple(sorted(mine["technique"]))))
    assert found == expected, f"rows lost or misplaced: {found} != {expected}"
    assert int(rows["n"].sum()) == sum(len(t) for t in SESSION_TECHNIQUES.values()) + len(CLI_TECHNIQUES)

    # They really ran at the same time: every two sweeps were writing during a common interval.
    spans = list(zip(sweeps["source"], sweeps["started_at"], sweeps["finished_at"]))
    for index, (source, start, end) in enumerate(spans):
        for other, other_start, other_end in spans[index + 1:]:
            assert start < other_end and other_start < end, \
                f"the {source} and {other} sweeps ran one after the other, not at once:\n{sweeps}"
