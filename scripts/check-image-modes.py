"""Inside the built image (scripts/build-image runs it): the pages on the pre-warmed store, and the
hosted-demo settings README describes, through Streamlit's AppTest against the image's own app.py.

Prints one line per check; exits 1 with the failed check as its last line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python scripts/check-image-modes.py` from the app's folder
APP = str(ROOT / "app.py")
MODE_VARIABLES = ("QUANTLAB_DEMO", "QUANTLAB_READ_ONLY", "QUANTLAB_UPLOADS", "QUANTLAB_MAX_UPLOAD_MB",
                  "QUANTLAB_MAX_UPLOADS", "QUANTLAB_MAX_SWEEPS")


def open_app(page: str | None = None, **env: str) -> AppTest:
    for name in MODE_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(env)
    app = AppTest.from_file(APP, default_timeout=60).run()
    if page:
        app.switch_page(page).run()
    if app.exception:
        raise AssertionError(f"{page or 'app.py'} raised: {app.exception[0].message}")
    return app


def texts(elements) -> list[str]:
    return [str(element.value) for element in elements]


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
    print(f"ok: {message}")


def main() -> None:
    from quantlab.errors import StoreError
    from quantlab.ui_state import AppSettings

    settings = AppSettings.from_env()
    stored = settings.store().count()
    variants = len(settings.store().results(latest_only=True))

    app = open_app()
    check(texts(app.title) == ["Compare variants"] and variants > 0
          and len(app.dataframe[0].value) == variants,
          f"the bare address opens Compare with a table of the {variants} stored variants")

    app = open_app("pages/run.py", QUANTLAB_DEMO="1")
    demo = AppSettings.from_env()
    info = " ".join(texts(app.info))
    check("Demo: uploads up to 20 MB" in info and "10 min and 4 GB" in info,
          "QUANTLAB_DEMO=1: the Run page states the 20 MB upload and 10 min / 4 GB per-variant limits")
    limits = demo.sweep_options().limits
    check(demo.max_upload_mb == 20 and demo.max_uploads == 10 and limits.task_timeout_seconds == 600
          and limits.memory_limit_mb == 4000,
          "QUANTLAB_DEMO=1: sweeps get 600 s and 4000 MB per variant, sessions 10 uploads of 20 MB")
    check(not app.button(key="run_start").disabled, "QUANTLAB_DEMO=1: a sweep can still be started")

    app = open_app("pages/run.py", QUANTLAB_READ_ONLY="1")
    check(app.button(key="run_start").disabled, "QUANTLAB_READ_ONLY=1: the Run button is disabled")
    check(any("Read-only" in text for text in texts(app.info)),
          "QUANTLAB_READ_ONLY=1: the Run page says stored results can be viewed, sweeps cannot be run")
    app = open_app(None, QUANTLAB_READ_ONLY="1")
    check(texts(app.title) == ["Compare variants"] and len(app.dataframe[0].value) == variants,
          "QUANTLAB_READ_ONLY=1: Compare still shows the stored rows")
    viewer = AppSettings.from_env().store()
    try:
        viewer.start_sweep("seed-cnn", "digits-28", {}, "check")
    except StoreError:
        refused = True
    else:
        refused = False
    check(refused and viewer.count() == stored, "QUANTLAB_READ_ONLY=1: the store refuses to record a sweep")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as exc:
        print(f"failed: {exc}")
        sys.exit(1)
