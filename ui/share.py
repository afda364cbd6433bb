"""The view state in the URL, and the "share" controls (a link to copy, result downloads).

Pages call `sync_view(page)` first: it reads the URL's query parameters through quantlab.share
(invalid ones are dropped), merges them into the session's view, and returns it. After drawing their
widgets they call `write_view(view, fields)` so that the address bar always reproduces what is shown.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import streamlit as st

from quantlab import share
from quantlab.share import ViewState

VIEW_KEY = "view"


def url_params() -> dict[str, list[str]]:
    return {key: st.query_params.get_all(key) for key in st.query_params}


def current_view() -> ViewState:
    """The session's view state (without reading the URL)."""
    view = st.session_state.get(VIEW_KEY)
    return view if isinstance(view, ViewState) else ViewState()


def sync_view(page: str) -> ViewState:
    """The session's view with whatever valid state the URL carries, remembered for other pages."""
    view = current_view().merged(share.decode(url_params())).with_(page=page)
    st.session_state[VIEW_KEY] = view
    return view


def update_view(**changes: Any) -> ViewState:
    view = current_view().with_(**changes)
    st.session_state[VIEW_KEY] = view
    return view


def write_view(view: ViewState, fields: Iterable[str]) -> None:
    """Put `fields` of the view in the address bar (only when they changed: no needless messages)."""
    wanted = share.encode(view, fields)
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def share_link(view: ViewState, fields: Iterable[str]) -> str:
    """The page's address with the view state as its query (relative when the address is unknown)."""
    try:
        base = st.context.url
    except Exception:  # outside a browser session (tests, bare mode)
        base = None
    return share.share_url(base or "", view, fields)


def share_controls(view: ViewState, fields: Sequence[str], *, frame: Any = None, figures: Sequence[Any] = (),
                   title: str = "QuantLab results", key: str = "share") -> None:
    """A link to copy, and the shown results as CSV, JSON and a self-contained HTML report."""
    st.caption("Link to this view (copy it with the button at the right of the box):")
    st.code(share_link(view, fields), language=None)
    if frame is None or getattr(frame, "empty", True):
        return
    columns = st.columns(3)
    with columns[0]:
        st.download_button("Download CSV", data=lambda: share.export_csv(frame),
                           file_name=share.export_file_name(view, "csv"), mime="text/csv",
                           key=f"{key}_csv", on_click="ignore", icon=":material/table:")
    with columns[1]:
        st.download_button("Download JSON", data=lambda: share.export_json(frame),
                           file_name=share.export_file_name(view, "json"), mime="application/json",
                           key=f"{key}_json", on_click="ignore", icon=":material/data_object:")
    with columns[2]:
        st.download_button("Download HTML report",
                           data=lambda: share.export_html_report(frame, figures, title).encode("utf-8"),
                           file_name=share.export_file_name(view, "html"), mime="text/html",
                           key=f"{key}_html", on_click="ignore", icon=":material/description:",
                           help="One self-contained file: the charts (with plotly.js embedded), the "
                                "table and how the numbers were measured")
