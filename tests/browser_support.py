"""A real `streamlit run app.py` and a headless Chromium, for the browser and concurrency tests.

`StreamlitServer` starts the dashboard on a free localhost port with its own results database and
cache (QUANTLAB_DB, QUANTLAB_CACHE), waits for /_stcore/health and stops it (and the worker
processes it started) afterwards. `launch_chromium` starts Debian's Chromium through Playwright;
when it is missing the test fails with what to install, it never skips. The helpers drive
Streamlit widgets by their labels, as a user would.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("QUANTLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STARTUP_SECONDS = 90
IDLE_SECONDS = 60
VIEWPORT = {"width": 1400, "height": 1000}
NARROW_VIEWPORT = {"width": 800, "height": 1000}
# What Streamlit draws for an uncaught exception or an st.error, and words no page should show.
ERROR_SELECTORS = ('[data-testid="stException"]', '[data-testid="stAlertContentError"]')
LOCK_WORDS = re.compile(r"\block\b|conflicting|already open|could not set lock", re.IGNORECASE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class StreamlitServer:
    """`streamlit run app.py` in its own process group, with its own store and cache."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.db = self.folder / "q.duckdb"
        self.cache = self.folder / "cache"
        self.log_path = self.folder / "streamlit.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not started"
        return self.process.pid

    def start(self) -> "StreamlitServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTLAB_")}
        env.update(QUANTLAB_DB=str(self.db), QUANTLAB_CACHE=str(self.cache), PYTHONPATH=str(ROOT),
                   PYTHONUNBUFFERED="1", **self.extra_env)
        command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                   "--server.headless", "true", "--server.port", str(self.port),
                   "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
                   "--server.fileWatcherType", "none", "--server.runOnSave", "false"]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = STARTUP_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"streamlit exited with {self.process.returncode} before it was "
                                     f"healthy:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as response:
                    if response.status == 200 and response.read().strip() == b"ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise AssertionError(f"streamlit did not answer {self.url}/_stcore/health within {timeout:.0f} s:\n"
                             f"{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server and everything in its process group (sweep workers included)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind in the group
        self._log.close()


@contextlib.contextmanager
def running_server(folder: Path, env: dict[str, str] | None = None) -> Iterator[StreamlitServer]:
    server = StreamlitServer(folder, env).start()
    try:
        yield server
    finally:
        server.stop()


def require_chromium() -> str:
    """The Chromium executable, or a failure saying how to install it (CI installs it; never a skip)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: the browser tests need it. Install Debian's "
                    f"package (apt-get update && apt-get install -y chromium) or set QUANTLAB_CHROMIUM "
                    f"to a Chromium executable; `playwright install` does not work here.", pytrace=False)
    return CHROMIUM


def launch_chromium(playwright: Any) -> Any:
    executable = require_chromium()
    try:
        return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
    except Exception as exc:  # a broken install: say what failed
        pytest.fail(f"Chromium at {executable} did not start through Playwright: {exc}", pytrace=False)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright_instance() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r requirements-dev.txt", pytrace=False)
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright_instance) -> Iterator[Any]:
    chromium = launch_chromium(playwright_instance)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def new_page(browser: Any, downloads: bool = False, viewport: dict | None = None) -> Any:
    """A page in a fresh context (its own cookies and storage: a second user)."""
    context = browser.new_context(viewport=viewport or VIEWPORT, accept_downloads=downloads)
    context.set_default_timeout(30_000)
    return context.new_page()


# --- driving Streamlit as a user -------------------------------------------------------------------


def wait_idle(page: Any, timeout: float = IDLE_SECONDS, settle: float = 0.5) -> None:
    """Wait until the app is connected and no script run has been in progress for `settle` seconds.

    Streamlit marks its root element with data-test-script-state (initial, running, notRunning...).
    """
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        state = page.evaluate("""() => { const app = document.querySelector('[data-testid="stApp"]');
            return app ? [app.dataset.testScriptState, app.dataset.testConnectionState] : [null, null]; }""")
        if state == ["notRunning", "CONNECTED"]:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle:
                return
        else:
            quiet_since = None
        time.sleep(0.05)
    raise AssertionError(f"the app did not finish running within {timeout:.0f} s at {page.url}")


def open_app(page: Any, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    wait_idle(page)


def go_to_page(page: Any, title: str) -> None:
    """Click a page in the sidebar navigation."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    wait_idle(page)


def by_key(page: Any, key: str) -> Any:
    """The element of the widget created with `key=key` (Streamlit marks it with class st-key-<key>)."""
    return page.locator(f".st-key-{key}").first


def set_number(page: Any, key: str, value: float) -> None:
    box = by_key(page, key).locator("input")
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def choose_option(page: Any, key: str, option_start: str) -> None:
    """Pick the option of a selectbox whose text starts with `option_start` (no-op if it is shown)."""
    box = by_key(page, key).locator('[role="combobox"]')
    if box.input_value().startswith(option_start):
        return
    options = page.locator('[role="option"]')
    for opener in (box, by_key(page, key).locator('button[aria-label="Open"]')):
        opener.click()
        try:
            options.first.wait_for(timeout=5_000)
            break
        except Exception:  # the list did not open: try the arrow button
            continue
    options.filter(has_text=re.compile(rf"^\s*{re.escape(option_start)}")).first.click()
    wait_idle(page)
    assert box.input_value().startswith(option_start), f"{key} shows {box.input_value()!r}"


def set_checkbox(page: Any, key: str, checked: bool) -> None:
    """Tick or untick a checkbox (or toggle), waiting for the rerun it causes."""
    box = by_key(page, key)
    tick = box.locator('input[type="checkbox"]')
    if tick.is_checked() != checked:
        box.locator("label").first.click()
        wait_idle(page)
    assert tick.is_checked() == checked, f"checkbox {key!r} did not become {checked}"


def click_button(page: Any, key: str) -> None:
    by_key(page, key).locator("button").first.click()
    wait_idle(page)


def expand(page: Any, summary: str) -> None:
    """Open an st.expander by its summary text (no-op when open)."""
    block = page.locator('[data-testid="stExpander"]').filter(has_text=summary).first
    details = block.locator("details")
    if details.count() and details.get_attribute("open") is None:
        block.locator("summary").first.click()
        page.wait_for_timeout(300)


def error_texts(page: Any) -> list[str]:
    """The texts of every error box, exception or "Page not found" dialog on the page."""
    texts = []
    for selector in ERROR_SELECTORS:
        texts.extend(page.locator(selector).all_inner_texts())
    texts.extend(text for text in page.locator('[role="dialog"]').all_inner_texts() if "not found" in text)
    return texts


def assert_no_errors(page: Any, where: str) -> None:
    errors = error_texts(page)
    assert not errors, f"{where}: the page shows errors: {errors}"


def screenshot(page: Any, folder: Path, name: str, max_height: int = 6000, narrow: bool = True) -> Path:
    """The whole page at 1400 px (`name`.png) and, unless `narrow` is false, the same address opened
    in a fresh 800 px wide tab (`name`-800px.png: a narrow window's first visit, its sidebar folded).
    Streamlit scrolls an inner container, so the viewport is made as tall as it."""
    path = folder / f"{name}.png"
    _whole_page(page, path, VIEWPORT["width"], max_height)
    if narrow:
        context = page.context.browser.new_context(viewport=NARROW_VIEWPORT)
        try:
            other = context.new_page()
            other.goto(page.url, wait_until="domcontentloaded")
            wait_idle(other)
            _whole_page(other, folder / f"{name}-{NARROW_VIEWPORT['width']}px.png", NARROW_VIEWPORT["width"],
                        max_height)
        finally:
            context.close()
    return path


def _whole_page(page: Any, path: Path, width: int, max_height: int) -> None:
    height = page.evaluate("""() => Math.max(document.body.scrollHeight, ...Array.from(
        document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"]'),
        e => e.scrollHeight))""")
    page.set_viewport_size({"width": width, "height": min(max(height, VIEWPORT["height"]), max_height)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})


def wait_for_text(page: Any, pattern: str | re.Pattern, timeout: float = IDLE_SECONDS) -> None:
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    page.get_by_text(regex).first.wait_for(timeout=timeout * 1000)


# --- the Run page ----------------------------------------------------------------------------------

TECHNIQUE_PREFIX = "st-key-run_technique_"


def technique_ids(page: Any) -> list[str]:
    """Every technique the Run page offers (a checkbox each, keyed run_technique_<id>)."""
    return page.evaluate(f"""() => Array.from(document.querySelectorAll('[class*="{TECHNIQUE_PREFIX}"]'),
        e => Array.from(e.classList).find(c => c.startsWith('{TECHNIQUE_PREFIX}')).slice({len(TECHNIQUE_PREFIX)}))""")


def start_sweep_in_browser(page: Any, *, dataset: str, techniques: tuple[str, ...], epochs: int = 1,
                           min_runs: int = 5, min_seconds: float = 0.05, press_run: bool = True) -> None:
    """On the Run page: the built-in seed-cnn on `dataset`, only `techniques`, tiny settings; press Run
    (unless `press_run` is false: then the button is only checked to be enabled)."""
    choose_option(page, "run_dataset", f"{dataset}:")
    offered = technique_ids(page)
    assert set(techniques) <= set(offered), f"the Run page offers {offered}, not all of {techniques}"
    for technique in offered:
        if by_key(page, f"run_technique_{technique}").locator("input").is_enabled():
            set_checkbox(page, f"run_technique_{technique}", technique in techniques)
    expand(page, "Training and measurement settings")
    set_number(page, "run_epochs", epochs)
    set_number(page, "run_min_runs", min_runs)
    set_number(page, "run_min_seconds", min_seconds)
    start = by_key(page, "run_start").locator("button")
    assert start.is_enabled(), "the Run sweep button is disabled"
    if not press_run:
        return
    before = sweep_labels(page)
    start.click()
    deadline = time.monotonic() + 30
    while True:  # this sweep's status line (not the one of a sweep this session ran before)
        labels = sweep_labels(page)
        if labels and (labels != before or not FINISHED_LINE.search(labels[0])):
            break
        assert time.monotonic() < deadline, "pressing Run sweep showed no new sweep status"
        time.sleep(0.2)


def sweep_labels(page: Any) -> list[str]:
    """The status lines of the sweeps the Run page shows, e.g. "seed-cnn on digits: done: 4 of 4 ..."."""
    labels = []
    for text in page.locator('[data-testid="stExpander"] summary').all_inner_texts():
        words = text.split()
        if words and words[0] in STATUS_ICON_WORDS:   # a done or failed box's icon (running: a spinner)
            words = words[1:]
        labels.append(" ".join(words))
    return [text for text in labels if SWEEP_LINE.search(text)]


STATUS_ICON_WORDS = ("check", "error")


SWEEP_LINE = re.compile(r" on \S+: (queued|running|done|failed|cancelled)\b")
FINISHED_LINE = re.compile(r" on \S+: (done|failed|cancelled)\b")


def watch_sweep(page: Any, timeout: float = 240) -> tuple[str, list[dict[str, str]]]:
    """Wait for this session's sweep like wait_for_sweep, noting twice a second what the page's first
    status box (its icon's name included) and the sidebar said; returns the final line and the notes."""
    notes = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        boxes = page.locator('[data-testid="stExpander"] summary').all_inner_texts()
        sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
        box = next((" ".join(b.split()) for b in boxes if SWEEP_LINE.search(b)), "")
        notes.append({"box": box, "sidebar": " ".join(sidebar.split()),
                      "main": " ".join(page.locator('[data-testid="stMain"]').inner_text().split())})
        if FINISHED_LINE.search(box):
            wait_idle(page)
            return sweep_labels(page)[0], notes
        time.sleep(0.5)
    raise AssertionError(f"the sweep did not finish within {timeout:.0f} s; the page shows: "
                         f"{page.locator('[data-testid=stMain]').inner_text()[:2000]}")


def wait_for_sweep(page: Any, timeout: float = 240) -> str:
    """Wait until this session's sweep (the first shown) is finished; returns its status line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        labels = sweep_labels(page)
        if labels and FINISHED_LINE.search(labels[0]):
            wait_idle(page)
            return sweep_labels(page)[0]
        time.sleep(0.5)
    raise AssertionError(f"the sweep did not finish within {timeout:.0f} s; the page shows: "
                         f"{page.locator('[data-testid=stMain]').inner_text()[:2000]}")
