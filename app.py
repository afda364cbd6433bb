"""QuantLab: compare TensorFlow Lite quantization trade-offs of Keras models.

The entry point: page configuration, navigation, and the sidebar every page shares.
Run with `streamlit run app.py`.
"""

from pathlib import Path

import streamlit as st

from quantlab import share, sweeps
from quantlab.store import Store
from quantlab.ui_state import DEFAULT_DATASET, DEFAULT_MODEL, AppSettings
from ui import store_reads
from ui.layout import narrow_window_layout
from ui.entry import mark_app_run, page_run
from ui.share import current_view, url_params

HERE = Path(__file__).parent
SIDEBAR_POLL_SECONDS = 1.0

# URL name -> (file, title, icon). A page whose file does not exist yet is left out.
PAGES = {
    "run": ("pages/run.py", "Run", ":material/play_circle:"),
    "compare": ("pages/compare.py", "Compare", ":material/scatter_plot:"),
    "recommend": ("pages/recommend.py", "Recommend", ":material/recommend:"),
    "details": ("pages/details.py", "Variant details", ":material/info:"),
    "lab": ("pages/lab.py", "Quantization lab", ":material/science:"),
}

mark_app_run()
st.set_page_config(page_title="QuantLab", page_icon=":material/tune:", layout="wide")

settings = AppSettings.from_env()
sweeps.configure(max_concurrent=settings.max_concurrent)
store = settings.store()


@st.cache_resource(show_spinner=False)
def mark_interrupted_sweeps(db_path: str, read_only: bool) -> list[str]:
    """Once per server and results file: sweeps whose process was killed become `interrupted`."""
    return Store(Path(db_path), read_only=read_only).mark_interrupted_sweeps()


mark_interrupted_sweeps(str(settings.db_path), settings.read_only)
has_results = store_reads.count(store) > 0

params = url_params()


def open_home() -> None:
    """The bare address: Compare when results are stored, else Run; a link's ?page= names another."""
    wanted = share.decode(params).page
    if wanted not in pages:
        wanted = "compare" if has_results and "compare" in pages else "run"
    st.switch_page(pages[wanted], query_params={k: v for k, v in params.items() if k != "page"})


# Only the bare address (a hidden home page) redirects; every page has its own address, so a
# bookmarked /run stays on Run.
pages = {name: st.Page(file, title=title, icon=icon, url_path=name)
         for name, (file, title, icon) in PAGES.items() if (HERE / file).exists()}
home = st.Page(open_home, title="QuantLab", default=True, visibility="hidden")
current = st.navigation([home, *pages.values()])

# A shared link to a page may name another in its query (/compare?page=details&row=...): open that
# page once per session.
wanted = share.decode(params).page
if current is not home and wanted in pages and pages[wanted] is not current \
        and not st.session_state.get("opened_linked_page"):
    st.session_state["opened_linked_page"] = True
    st.switch_page(pages[wanted], query_params={k: v for k, v in params.items() if k != "page"})
st.session_state["opened_linked_page"] = True


@st.fragment(run_every=SIDEBAR_POLL_SECONDS if sweeps.active_sweeps() else None)
def store_and_sweeps() -> None:
    """The store's row count and each running sweep's progress, redrawn every second while a sweep
    runs (the page's own progress redraws itself; this keeps the sidebar in step with it)."""
    st.caption(f"Results: `{settings.db_path}` ({store_reads.count(store)} rows)  \n"
               f"Artifacts: `{settings.cache_dir}`")
    for handle in sweeps.active_sweeps():
        st.caption(f"Sweep {handle.label}: {handle.snapshot().summary()}")


sidebar = st.sidebar.container()
if current is not home:  # (the bare address only redirects: its run's elements are never seen)
    with st.sidebar:
        narrow_window_layout()   # narrow windows: the sidebar folds once, paired charts stack, labels wrap
try:
    with page_run():  # a page that ends early (end_page) still gets the sidebar below
        current.run()
finally:
    # Drawn after the page so that it shows the page's current choices.
    with sidebar:
        view = current_view()
        st.markdown(f"**Model:** {view.model or DEFAULT_MODEL}  \n"
                    f"**Dataset:** {view.dataset or DEFAULT_DATASET}")
        store_and_sweeps()
        for line in settings.mode_lines():
            st.caption(line)
