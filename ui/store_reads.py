"""What the pages read from the results store, cached until the store file changes.

Each loader takes the Store (not hashed) and its `stamp()` (path, modification times and sizes of the
file and its write-ahead log), so a new visitor's first render reuses what an earlier render read,
and any write (a sweep's row, a migration) makes the next read go to DuckDB again. Frames come back
as copies (st.cache_data), so a page may change what it gets. The engine functions are the ones the
pages called before; only the caching is here (the engine never imports Streamlit).

Sweep statuses can change without a write (a sweep's process dies: it reads `interrupted`), so
the sweep lists also expire after STATUS_SECONDS.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from quantlab import analysis
from quantlab.store import Store
from quantlab.ui_state import sweep_statuses as _sweep_statuses

MAX_ENTRIES = 64
STATUS_SECONDS = 5


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _count(_store: Store, stamp: tuple) -> int:
    return _store.count() if _store.exists() else 0


def count(store: Store) -> int:
    """Rows in the store (0 when there is no file yet)."""
    return _count(store, store.stamp())


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _filters(_store: Store, stamp: tuple) -> analysis.Filters:
    return analysis.list_filters(_store)


def list_filters(store: Store) -> analysis.Filters:
    return _filters(store, store.stamp())


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _compare_frame(_store: Store, stamp: tuple, **kwargs: Any):
    return analysis.compare_frame(_store, **kwargs)


def compare_frame(store: Store, **kwargs: Any):
    """analysis.compare_frame with the same arguments."""
    return _compare_frame(store, store.stamp(), **kwargs)


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _workload_quality(_store: Store, stamp: tuple, model: str | None, dataset: str | None) -> str:
    return analysis.workload_quality(_store, model, dataset)


def workload_quality(store: Store, model: str | None, dataset: str | None) -> str:
    return _workload_quality(store, store.stamp(), model, dataset)


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _last_sweep_spec(_store: Store, stamp: tuple, model: str | None, dataset: str | None):
    return analysis.last_sweep_spec(_store, model, dataset)


def last_sweep_spec(store: Store, model: str | None, dataset: str | None):
    return _last_sweep_spec(store, store.stamp(), model, dataset)


@st.cache_data(max_entries=MAX_ENTRIES, ttl=STATUS_SECONDS, show_spinner=False)
def _sweeps(_store: Store, stamp: tuple, limit: int | None):
    return _store.sweeps(limit=limit)


def sweeps(store: Store, limit: int | None = None):
    """Store.sweeps (newest first, statuses as of at most STATUS_SECONDS ago)."""
    return _sweeps(store, store.stamp(), limit)


@st.cache_data(max_entries=MAX_ENTRIES, ttl=STATUS_SECONDS, show_spinner=False)
def _statuses(_store: Store, stamp: tuple) -> dict[str, str]:
    return _sweep_statuses(_store)


def sweep_statuses(store: Store) -> dict[str, str]:
    return _statuses(store, store.stamp())


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _results(_store: Store, stamp: tuple, limit: int | None):
    return _store.results(limit=limit)


def recent_results(store: Store, limit: int):
    """The `limit` newest rows (Store.results)."""
    return _results(store, store.stamp(), limit)


@st.cache_data(max_entries=MAX_ENTRIES, show_spinner=False)
def _row(_store: Store, stamp: tuple, row_id: str):
    return _store.row(row_id)


def row(store: Store, row_id: str):
    """One stored row as a dict with its JSON columns parsed (Store.row), or None."""
    return _row(store, store.stamp(), row_id)
