"""A bookmarked page opened first after the server starts runs through app.py like any other visit.

Streamlit runs the first script run of a server process in its legacy "pages/ folder" mode, which
runs pages/<name>.py directly, without app.py (no sidebar, no stale-sweep check, no layout), until
somebody opens the bare address.
"""

from __future__ import annotations

from browser_support import (artifacts, assert_no_errors, browser, new_page, open_app,  # noqa: F401
                             playwright_instance, running_server, screenshot)

PAGE_TITLES = {"compare": "Compare variants", "recommend": "Which quantization should I try?",
               "details": "Variant details", "lab": "Calibration lab", "run": "Run a sweep"}


def sidebar_text(page) -> str:
    return page.locator('[data-testid="stSidebar"]').inner_text()


def test_every_page_opened_first_after_a_server_start_runs_through_app_py(browser, artifacts, tmp_path):
    for name, title in PAGE_TITLES.items():
        with running_server(tmp_path / name) as server:  # a fresh server: this is its first visit
            page = new_page(browser)
            open_app(page, f"{server.url}/{name}")
            assert_no_errors(page, f"/{name} opened first")
            assert page.get_by_role("heading", name=title).count() >= 1, name
            text = sidebar_text(page)
            # app.py's navigation names the pages; the legacy mode lists the file names, "app" first.
            assert "Quantization lab" in text and "Variant details" in text, (name, text)
            assert "\napp\n" not in f"\n{text}\n", (name, text)
            # app.py's own sidebar lines, also under a page that ends early (Compare with an empty
            # store, the Lab without a workload): st.stop() there dropped them.
            assert "Model: seed-cnn" in text and "Results:" in text, (name, text)
            assert page.url.rstrip("/").endswith(f"/{name}") or f"/{name}?" in page.url, page.url
            page.context.close()
