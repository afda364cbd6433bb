"""Every page runs through app.py, also when it is the first page a server process opens.

Streamlit (1.67) starts each server process in its legacy multipage mode whenever a `pages/`
folder sits next to the entry point: until some visit runs app.py (whose `st.navigation` turns that
mode off for the process), an address such as `/compare` runs pages/compare.py alone, without
app.py's navigation, sidebar, stale-sweep check and layout. A bookmarked page opened first after a
restart did exactly that.
"""

from __future__ import annotations

import streamlit as st

_app_has_run = False  # in this process (a server's first visit may skip it: see above)


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
