"""The dashboard in a real Chromium against a real `streamlit run app.py`, as a user drives it.

One server with an empty store and cache; the module's first step runs a tiny sweep through the Run
page's widgets (seed-cnn on the 8x8 digits, four techniques, one training epoch, five latency runs).
Then: the points on the Compare charts, a changed filter, the share link opened in a fresh browser
context, the CSV download, the Recommend page's decision tree, the Lab page and a variant's details.
Screenshots of every page go to test-artifacts/browser/.
"""

from __future__ import annotations

import csv
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser_support import (NARROW_VIEWPORT, assert_no_errors, by_key, choose_option, go_to_page, new_page, open_app,
                                   running_server, screenshot, set_checkbox, set_number,
                                   start_sweep_in_browser, wait_idle,
                                   watch_sweep)
from tests.browser_support import artifacts, browser, playwright_instance  # noqa: F401, F811  (fixtures)

pytestmark = pytest.mark.browser

DATASET = "digits"
TECHNIQUES = ("baseline", "float32", "dynamic", "int8-fallback")
SWEEP_SECONDS = 240
LAB_EXTRACT_SECONDS = 120


@pytest.fixture(scope="module")
def shots(artifacts):
    folder = artifacts / "browser"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("browser")) as running:
        yield running


@pytest.fixture(scope="module")
def swept(server, browser, shots):
    """The sweep, run from the Run page; returns its final status line."""
    page = new_page(browser)
    open_app(page, server.url)
    assert "Run a sweep" in page.locator("h1").first.inner_text()
    screenshot(page, shots, "01-run-empty")
    start_sweep_in_browser(page, dataset=DATASET, techniques=TECHNIQUES, epochs=1, min_runs=5,
                           min_seconds=0.05)
    status, notes = watch_sweep(page, timeout=SWEEP_SECONDS)
    assert_no_errors(page, "Run")
    screenshot(page, shots, "02-run-done")
    # While it ran: never a done check next to "running", never "No results yet", the preparation
    # counted in seconds, and the sidebar following the page.
    running = [n for n in notes if " running: " in n["box"]]
    assert running, f"the sweep was never seen running: {notes[:3]}"
    assert not [n["box"] for n in running if n["box"].split()[0] == "check"]
    assert not [n for n in running if "No results yet" in n["main"]]
    assert any(re.search(r"[Pp]reparing the model and the dataset.*: \d+ s so far", n["main"])
               for n in running), [n["box"] for n in running]
    # The sidebar redraws itself while the sweep runs (it used to stay at "0 of N"). How far it
    # trails the page depends on timing (two workers can finish within one of its 1 s redraws), so
    # what is asserted is that it moved, not by how much it lagged.
    shown = {m.group(1) for n in running if (m := re.search(r"running: (\d+) of \d+ variants", n["sidebar"]))}
    assert len(shown) >= 2, [n["sidebar"][-200:] for n in running]
    # On to the results, by the link the Run page shows under a finished sweep.
    page.locator('[data-testid="stPageLink"] a', has_text="Compare the results").click()
    wait_idle(page)
    expect(page.locator("h1").first).to_have_text("Compare variants")
    assert_no_errors(page, "Compare, opened from the Run page")
    page.context.close()
    return status


def open_compare(browser, server):
    """A new visitor: with results stored, the app opens on Compare."""
    page = new_page(browser, downloads=True)
    open_app(page, server.url)
    expect(page.locator("h1").first).to_have_text("Compare variants")
    return page


def query(url: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items()}


def chart_points(page) -> int:
    """Markers Plotly drew in the Compare page's trade-off charts."""
    page.locator('[data-testid="stPlotlyChart"] .scatterlayer .point').first.wait_for(timeout=30_000)
    return page.locator('[data-testid="stPlotlyChart"] .scatterlayer .point').count()


def number_value(page, key: str) -> float | None:
    text = by_key(page, key).locator("input").input_value().strip()
    return float(text) if text else None


def headline(page) -> str:
    """The Compare page's answer: the sweet spot, or why none fits."""
    box = page.locator('[data-testid="stAlertContentSuccess"], [data-testid="stAlertContentWarning"]').first
    return box.inner_text().strip()


def radio_value(page, key: str) -> str:
    return by_key(page, key).locator("label:has(input:checked)").inner_text().strip()


def combobox_value(page, key: str) -> str:
    return by_key(page, key).locator('[role="combobox"]').input_value()


def test_run_page_sweeps_every_chosen_technique(swept, server):
    assert re.search(rf"seed-cnn on {DATASET}: done: {len(TECHNIQUES)} of {len(TECHNIQUES)} variants", swept), swept
    assert "failed" not in swept


def test_compare_chart_filter_share_link_and_csv(swept, server, browser, shots):
    page = open_compare(browser, server)
    assert chart_points(page) >= len(TECHNIQUES), "the trade-off charts drew too few points"
    assert combobox_value(page, "compare_model") == "seed-cnn"
    assert combobox_value(page, "compare_dataset") == DATASET
    assert_no_errors(page, "Compare")
    screenshot(page, shots, "03-compare")

    # Change the filters: a latency budget, a larger tolerated accuracy drop, the fastest variant.
    set_number(page, "compare_budget", 1.5)
    set_number(page, "compare_drop", 5.0)
    by_key(page, "compare_objective").locator("label", has_text="Fastest").click()
    wait_idle(page)
    answer = headline(page)
    link = page.evaluate("location.href")
    assert query(link) == {"model": "seed-cnn", "dataset": DATASET, "budget": "1.5", "drop": "5",
                           "objective": "latency"}, link
    shown = page.locator('[data-testid="stCode"]').first.inner_text().strip()
    assert query(shown) == {"page": "compare", **query(link)}, shown
    assert number_value(page, "compare_budget") == pytest.approx(1.5)
    screenshot(page, shots, "04-compare-filtered")

    # The CSV holds the variants shown: every technique that was run, once each.
    with page.expect_download() as download_info:
        by_key(page, "compare_share_csv").locator("button").click()
    download = download_info.value
    assert download.suggested_filename == f"quantlab-seed-cnn-{DATASET}.csv"
    with open(download.path(), encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["technique"] for row in rows) == sorted(TECHNIQUES)
    assert {row["model_name"] for row in rows} == {"seed-cnn"}
    assert {row["dataset_name"] for row in rows} == {DATASET}
    assert all(0 < float(row["accuracy"]) <= 1 for row in rows)
    page.context.close()

    # The address-bar link and the link the page shows, each opened by someone else (a fresh
    # context: no cookies, no session), show the same view.
    for name, url in (("05-compare-from-address-bar", link), ("06-compare-from-shown-link", shown)):
        other = new_page(browser)
        open_app(other, url)
        where = f"Compare opened from {url}"
        assert_no_errors(other, where)
        assert other.locator("h1").first.inner_text().strip() == "Compare variants", where
        assert combobox_value(other, "compare_model") == "seed-cnn", where
        assert combobox_value(other, "compare_dataset") == DATASET, where
        assert number_value(other, "compare_budget") == pytest.approx(1.5), where
        assert number_value(other, "compare_drop") == pytest.approx(5.0), where
        assert radio_value(other, "compare_objective") == "Fastest", where
        assert headline(other) == answer, where  # the same winner
        assert chart_points(other) >= len(TECHNIQUES), where
        assert query(other.evaluate("location.href")) == query(link), where
        screenshot(other, shots, name)
        other.context.close()


def test_an_800_px_window_folds_the_sidebar_stacks_the_charts_and_wraps_labels(swept, server, browser, shots):
    page = new_page(browser, viewport=NARROW_VIEWPORT)
    open_app(page, server.url)                              # Compare, as results are stored
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar).to_have_attribute("data-collapsed", "true", timeout=10_000)
    main = page.locator('[data-testid="stMain"]').bounding_box()
    assert main["width"] >= 760, main                       # the page has the window's whole width
    charts = page.locator(".st-key-stack_compare_charts [data-testid='stPlotlyChart']")
    first, second = charts.nth(0).bounding_box(), charts.nth(1).bounding_box()
    assert second["y"] >= first["y"] + first["height"] - 1, (first, second)   # one under the other
    assert first["width"] >= 600, first
    open_app(page, f"{server.url}/recommend")
    label = by_key(page, "recommend_data").locator('[data-testid="stWidgetLabel"] p')
    assert label.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), "the toggle's label is cut"
    assert "100-500 samples" in label.inner_text()
    tree = by_key(page, "recommend_tree_box")
    # Every leaf keeps its room (about 100 px): the tree scrolls sideways instead of being squeezed.
    assert tree.evaluate("e => e.scrollWidth > e.clientWidth && e.scrollWidth >= 900"), \
        tree.evaluate("e => [e.scrollWidth, e.clientWidth]")
    # ...and it opens scrolled to the answer (the CPU leaf, right of the middle): the filled box is
    # in view. Before, it started at the left edge with the answer off-screen.
    chosen = tree.locator("g.annotation rect.bg[style*='fill: rgb(214, 40, 40)']")
    expect(chosen).to_have_count(1)
    page.wait_for_function("() => document.querySelector('.st-key-recommend_tree_box').scrollLeft > 0")
    view, leaf = tree.bounding_box(), chosen.bounding_box()
    assert view["x"] <= leaf["x"] and leaf["x"] + leaf["width"] <= view["x"] + view["width"], (view, leaf)
    page.context.close()


def test_recommend_walks_the_decision_tree(swept, server, browser, shots):
    page = new_page(browser)
    open_app(page, server.url)
    go_to_page(page, "Recommend")
    expect(page.locator("h1").first).to_have_text("Which quantization should I try?")
    heading = page.locator("h3", has_text=re.compile(r"^(Try|Use) ")).first
    path = page.get_by_text(re.compile(r"^Your path: "))

    # An Edge TPU whose toolchain wants uint8 input and output: nothing measured fits, so the tree's
    # leaf leads.
    by_key(page, "recommend_hardware").locator("label", has_text="Edge TPU").click()
    wait_idle(page)
    set_checkbox(page, "recommend_uint8", True)
    expect(heading).to_contain_text("Try")
    expect(heading).to_contain_text("uint8-only")
    expect(path).to_contain_text("Which hardware runs the model? Edge TPU")
    expect(path).to_contain_text("Toolchain expects uint8 I/O (older accelerators)? yes")

    # A CPU, some accuracy drop acceptable, calibration data at hand: the headline is the measured
    # variant to use, the tree's int8-fallback its explanation, with this model's numbers and no
    # generic docs' figure next to them.
    by_key(page, "recommend_hardware").locator("label", has_text="CPU").click()
    wait_idle(page)
    expect(heading).to_contain_text("Use")
    expect(page.get_by_text(re.compile(r"^Measured on seed-cnn: "))).to_be_visible()
    expect(page.get_by_text("int8-fallback").first).to_be_visible()
    expect(path).to_contain_text("Representative data (~100-500 samples)? yes")
    assert "3x+ faster" not in page.locator("section.main, [data-testid='stMain']").first.inner_text()
    expect(by_key(page, "recommend_open_row").locator("button")).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
    assert_no_errors(page, "Recommend")
    screenshot(page, shots, "07-recommend")

    # A microcontroller, no data, retraining possible: the link reopens with the same advice.
    by_key(page, "recommend_hardware").locator("label", has_text="Microcontroller").click()
    wait_idle(page)
    set_checkbox(page, "recommend_data", False)
    set_checkbox(page, "recommend_retrain", True)
    advice = heading.inner_text().strip()
    assert "qat-int8" in advice, advice
    link = page.evaluate("location.href")
    assert {key: query(link)[key] for key in ("hw", "data", "retrain")} == {"hw": "mcu", "data": "0",
                                                                           "retrain": "1"}, link
    page.context.close()
    other = new_page(browser)
    open_app(other, link)
    where = f"Recommend opened from {link}"
    expect(other.locator("h3", has_text=re.compile(r"^(Try|Use) ")).first).to_have_text(advice)
    assert radio_value(other, "recommend_hardware") == "Microcontroller", where
    assert_no_errors(other, where)
    screenshot(other, shots, "07-recommend-from-link")
    other.context.close()


def test_lab_page_opens_on_the_swept_workload(swept, server, browser, shots):
    page = new_page(browser)
    open_app(page, server.url)
    go_to_page(page, "Quantization lab")
    expect(page.locator("h1").first).to_have_text("Calibration lab")
    expect(by_key(page, "lab_workload").locator('[role="combobox"]')).to_have_value(
        re.compile(rf"^seed-cnn on {DATASET} · model "))
    assert_no_errors(page, "Lab")
    screenshot(page, shots, "08-lab")

    # Extract the workload's tensors (once, in a worker process): the tensor view then draws a
    # histogram and every calibrator's error.
    extract = by_key(page, "lab_extract").locator("button")
    if extract.count():
        extract.click()
        wait_idle(page, timeout=LAB_EXTRACT_SECONDS)
    expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible(timeout=30_000)
    expect(page.locator('[data-testid="stDataFrame"]').first).to_be_visible()
    assert_no_errors(page, "Lab, after extraction")
    screenshot(page, shots, "08-lab-extracted")

    # 4 bits, per-channel, the mse calibrator, channel 2: a colleague opening the link sees the same
    # tensor, channel and quantizer (the histogram's title names the tensor and channel).
    choose_option(page, "lab_bits", "4")
    set_checkbox(page, "lab_per_channel", True)
    choose_option(page, "lab_calibrator", "mse")
    set_number(page, "lab_channel", 2)
    title = page.locator('[data-testid="stPlotlyChart"] .gtitle').first.text_content()
    link = page.evaluate("location.href")
    assert {key: query(link).get(key) for key in ("bits", "per_channel", "calibrator", "channel")} == {
        "bits": "4", "per_channel": "1", "calibrator": "mse", "channel": "2"}, link
    page.context.close()
    other = new_page(browser)
    open_app(other, link)
    where = f"Lab opened from {link}"
    expect(other.locator("h1").first).to_have_text("Calibration lab")
    assert combobox_value(other, "lab_bits") == "4", where
    assert combobox_value(other, "lab_calibrator") == "mse", where
    assert number_value(other, "lab_channel") == 2, where
    expect(other.locator('[data-testid="stPlotlyChart"] .gtitle').first).to_have_text(title)
    assert_no_errors(other, where)
    screenshot(other, shots, "08-lab-from-link")
    other.context.close()


def test_the_labs_mixed_precision_is_measured_as_a_litert_recipe_with_one_click(swept, server, browser,
                                                                               shots):
    page = new_page(browser)
    open_app(page, server.url.rstrip("/") + "/lab?tab=model")
    expect(page.locator("h1").first).to_have_text("Calibration lab")
    extract = by_key(page, "lab_extract").locator("button")
    if extract.count():
        extract.click()
        wait_idle(page, timeout=LAB_EXTRACT_SECONDS)
    page.get_by_role("tab", name="Model accuracy").click()
    wait_idle(page)
    button = by_key(page, "lab_run_recipe_model").get_by_role("button", name=re.compile("Measure these bit"))
    expect(button).to_be_enabled(timeout=30_000)
    button.click()
    measured = page.get_by_text(re.compile(r"Measured as a LiteRT recipe \(weights .*\): .*bytes"))
    expect(measured).to_be_visible(timeout=SWEEP_SECONDS * 1000)
    assert_no_errors(page, "Lab, after measuring the recipe")
    screenshot(page, shots, "08-lab-recipe-measured")
    page.context.close()
    # the measured variant is on Compare with the others
    compare = open_compare(browser, server)
    expect(compare.get_by_text("lq-recipe").first).to_be_attached(timeout=30_000)
    compare.context.close()
    # Its Details at 800 px: the quantizer's coverage table and its check stack, none cut.
    from quantlab.store import Store

    rows = Store(server.db, read_only=True).results()
    row_id = rows[rows["technique"] == "lq-recipe"]["row_id"].iloc[0]
    narrow = new_page(browser, viewport=NARROW_VIEWPORT)
    open_app(narrow, f"{server.url.rstrip('/')}/details?row={row_id}")
    table = by_key(narrow, "stack_details_lq").locator('[data-testid="stDataFrame"]').first
    expect(table).to_be_visible(timeout=30_000)
    assert table.bounding_box()["width"] >= 600, table.bounding_box()   # the window's width, not a third
    assert_no_errors(narrow, "Details of the recipe at 800 px")
    screenshot(narrow, shots, "08b-details-recipe")   # and its 800 px twin
    narrow.context.close()


def test_details_page_of_the_recommended_variant(swept, server, browser, shots):
    page = open_compare(browser, server)
    best = by_key(page, "compare_open_best").locator("button")
    technique_label = best.inner_text().removeprefix("Open the details of ").strip()
    best.click()
    wait_idle(page)
    expect(page.locator("h1").first).to_have_text("Variant details")
    expect(page).to_have_url(re.compile(r"/details\?row=[0-9a-f]{32}$"))
    expect(page.locator("h3").first).to_have_text(f"{technique_label} · seed-cnn on {DATASET}")
    expect(page.get_by_text("Provenance", exact=True)).to_be_visible()
    expect(page.locator('[data-testid="stMetric"]')).to_have_count(6)
    expect(by_key(page, "details_download").locator("button")).to_contain_text("Download the .tflite file")
    expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()  # the latency histogram
    assert_no_errors(page, "Variant details")
    screenshot(page, shots, "09-details")
    page.context.close()


def test_server_log_has_no_traceback(swept, server):
    time.sleep(0.5)
    log = server.log()
    assert "Traceback" not in log, log[-4000:]


def test_a_bookmarked_run_page_stays_on_run(swept, server, browser):
    page = new_page(browser)
    open_app(page, server.url.rstrip("/") + "/run")
    expect(page.locator("h1").first).to_contain_text("Run a sweep")  # not redirected to Compare
    assert_no_errors(page, "Run, bookmarked")
    page.context.close()
