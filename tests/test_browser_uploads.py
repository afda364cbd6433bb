"""A user's own files in a real Chromium: a Keras 3 `.keras` model and a dataset without labels.

Both are built here and uploaded through the Run page's file uploaders. The page must list the
fine-tuning techniques as unavailable (no labels) before anything runs, the sweep must give every
post-training row, and Compare must judge the variants on agreement with the float model.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests import model_zoo as zoo
from tests.browser_support import (assert_no_errors, by_key, expand, go_to_page, new_page, open_app,
                                   running_server, screenshot, set_checkbox, set_number, technique_ids,
                                   wait_for_sweep, wait_for_text, wait_idle)
from tests.browser_support import artifacts, browser, playwright_instance  # noqa: F401, F811  (fixtures)

pytestmark = pytest.mark.browser

TECHNIQUES = ("baseline", "float32", "dynamic", "int8-fallback")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-files")
    x_calib, _ = zoo.images(64)
    x_test, _ = zoo.images(60, seed=3)
    return {"model": zoo.save_keras(zoo.keras3_model(functional=True), folder, "my_model"),
            "dataset": zoo.save_dataset(folder, "my_data", x_test, x_calib=x_calib)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("browser-uploads")) as running:
        yield running


def upload(page, kind: str, path) -> None:
    """Switch the kind's source to an upload and give the file to its uploader."""
    by_key(page, f"run_{kind}_source").get_by_text("Upload a file").click()
    wait_idle(page)
    by_key(page, f"run_{kind}_file").locator('input[type="file"]').set_input_files(str(path))
    wait_for_text(page, f"Using {path.name}")


@pytest.fixture(scope="module")
def swept(server, browser, files, artifacts):
    shots = artifacts / "browser"
    shots.mkdir(exist_ok=True)
    page = new_page(browser)
    open_app(page, server.url)
    upload(page, "model", files["model"])
    upload(page, "dataset", files["dataset"])
    wait_for_text(page, "This dataset has no labels")
    # The technique list redraws once the dataset's facts are known: fine-tuning becomes unavailable.
    by_key(page, "run_technique_qat-int8_unavailable").wait_for(timeout=60_000)
    wait_idle(page)
    offered = technique_ids(page)  # an unavailable technique's checkbox is keyed <id>_unavailable
    refusals = {t.removesuffix("_unavailable"): t.endswith("_unavailable") for t in offered}
    for technique, refused in refusals.items():
        if not refused:
            set_checkbox(page, f"run_technique_{technique}", technique in TECHNIQUES)
    expand(page, "Training and measurement settings")
    set_number(page, "run_min_runs", 5)
    set_number(page, "run_min_seconds", 0.05)
    page_text = page.locator('[data-testid="stMain"]').inner_text()
    screenshot(page, shots, "uploads-01-run")
    by_key(page, "run_start").locator("button").click()
    status = wait_for_sweep(page, timeout=300)
    assert_no_errors(page, "Run, after the upload sweep")
    screenshot(page, shots, "uploads-02-run-done")
    yield {"page": page, "status": status, "refused": refusals, "run_text": page_text, "shots": shots}
    page.context.close()


def test_fine_tuning_is_listed_unavailable_before_anything_runs(swept):
    for technique in ("qat-int8", "prune", "cluster"):
        assert swept["refused"][technique], f"{technique} was offered for a dataset without labels"
    assert "no labels" in swept["run_text"]
    for technique in TECHNIQUES:
        assert not swept["refused"][technique]


def test_the_keras3_upload_gets_every_chosen_row(swept):
    assert f"done: {len(TECHNIQUES)} of {len(TECHNIQUES)} variants" in swept["status"], swept["status"]
    assert "failed" not in swept["status"]


def test_compare_judges_the_unlabelled_workload_on_agreement(swept):
    page = swept["page"]
    go_to_page(page, "Compare")
    expect(page.locator("h1").first).to_have_text("Compare variants")
    wait_for_text(page, "no labels")
    assert_no_errors(page, "Compare, unlabelled Keras 3 upload")
    assert "agreement" in page.locator('[data-testid="stMain"]').inner_text().lower()
    screenshot(page, swept["shots"], "uploads-03-compare")
    for title in ("Recommend", "Details"):
        go_to_page(page, title)
        assert_no_errors(page, f"{title}, unlabelled Keras 3 upload")
