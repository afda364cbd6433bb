"""Every page runs through app.py, also when it is the first page a server process opens.

Streamlit (1.67) starts each server process in its legacy multipage mode whenever a `pages/`
folder sits next to the entry point: until some visit runs app.py (whose `st.navigation` turns that
mode off for the process), an address such as `/compare` runs pages/compare.py alone, without
app.py's navigation, sidebar, stale-sweep check and layout. A bookmarked page opened first after a
restart did exactly that.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, NoReturn

import streamlit as st

_app_has_run = False  # in this process (a server's first visit may skip it: see above)
_in_app = threading.local()  # app.py is running the page in this (script) thread


class PageEnded(Exception):
    """A page ended early (`end_page`); app.py catches it and goes on with the sidebar."""


@contextmanager
def page_run() -> Iterator[None]:
    """app.py runs the page inside this, so that a page's `end_page` ends only the page."""
    _in_app.active = True
    try:
        yield
    except PageEnded:
        pass
    finally:
        _in_app.active = False


def end_page() -> NoReturn:
    """End the page's run here. `st.stop()` would also drop all that app.py draws after the page
    (the sidebar's model, dataset and store lines); a page run alone (a test) still stops."""
    if getattr(_in_app, "active", False):
        raise PageEnded
    st.stop()


def mark_app_run() -> None:
    """Called by app.py on every run."""
    global _app_has_run
    _app_has_run = True


def run_through_app() -> None:
    """Called first by every page: on a server's very first visit, when that visit ran the page
    alone, turn the legacy mode off and run again, through app.py."""
    if _app_has_run:
        return
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False  # what st.navigation itself sets
        st.rerun()
