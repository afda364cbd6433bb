"""Compare: every variant of one model on one dataset, measured against its baseline.

Filters (model, dataset, sweep), then your budgets (latency, accuracy drop), then the best variant
inside them, accuracy against size and against latency, the baseline-relative table, two models side
by side, exports, and how the numbers were measured. A click on a point or a table row opens the
variant's details.
"""

import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from quantlab import analysis, charts
from quantlab.sweeps import active_sweeps
from quantlab.ui_state import AppSettings, interrupted_note
from ui import store_reads
from ui.share import share_controls, sync_view, update_view, write_view
from ui.entry import end_page, run_through_app

run_through_app()  # first, before anything is drawn

SHARED_FIELDS = ("model", "dataset", "sweep", "latest_only", "latency_budget_ms", "accuracy_drop_pp",
                 "objective")
DEFAULT_DROP_POINTS = 1.0
WAIT_SECONDS = 2.0           # how often an empty Compare page looks for the first sweep's rows
NO_RESULTS = ("No results yet. Run a sweep first: the Run page converts and measures every technique on a "
              "model in one click, then come back here to compare them.")
OBJECTIVE_LABELS = {"size": "Smallest", "latency": "Fastest", "accuracy": "Most accurate"}
NO_LABELS_OBJECTIVE = "Closest to the float model"
TABLE_COLUMNS = {
    "label": st.column_config.TextColumn("Technique", pinned=True),
    "variant": st.column_config.TextColumn("Variant (id, params)"),
    "family": st.column_config.TextColumn("Family"),
    "model_bytes": st.column_config.NumberColumn("Size (bytes)", format="localized"),
    "x_smaller": st.column_config.NumberColumn("x smaller", format="%.2fx"),
    "gzip_bytes": st.column_config.NumberColumn("gzip (bytes)", format="localized"),
    "x_smaller_gzip": st.column_config.NumberColumn("x smaller (gzip)", format="%.2fx"),
    "accuracy": st.column_config.NumberColumn("Accuracy", format="percent"),
    "accuracy_change_points": st.column_config.NumberColumn("Δ accuracy (points)", format="%+.2f"),
    "agreement_change_points": st.column_config.NumberColumn("Δ agreement (points)", format="%+.2f"),
    "accuracy_change_ci": st.column_config.TextColumn(
        "Δ accuracy ± CI", help="Change in points against the baseline [paired 95% interval]"),
    "agreement_change_ci": st.column_config.TextColumn(
        "Δ agreement ± CI", help="Change in points against the baseline [paired 95% interval]"),
    "differs_from_baseline": st.column_config.TextColumn(
        "Differs from baseline?", help="Exact McNemar test on the same test samples: yes when p < 0.05; "
                                       "— when the per-sample predictions are not kept"),
    "latency_cpu_busy": st.column_config.CheckboxColumn(
        "CPU busy while timed", help="Other processes used more than 30% of the CPU while this row was "
                                     "timed: its latency is not comparable; measure it again"),
    "agreement": st.column_config.NumberColumn("Agreement", format="percent"),
    "sqnr_db": st.column_config.NumberColumn("SQNR (dB)", format="%.1f"),
    "latency_p50_ms": st.column_config.NumberColumn("p50 (ms)", format="%.3g"),
    "latency_p90_ms": st.column_config.NumberColumn("p90 (ms)", format="%.3g"),
    "speedup": st.column_config.NumberColumn("x faster (vs baseline)", format="%.3gx"),
    "speedup_vs_float32": st.column_config.NumberColumn("x faster (vs TFLite float32)", format="%.3gx"),
    "num_threads": st.column_config.NumberColumn("Threads"),
    "input_dtype": st.column_config.TextColumn("Input"),
    "output_dtype": st.column_config.TextColumn("Output"),
    "cached": st.column_config.CheckboxColumn("Cached"),
    "recorded_at": st.column_config.DatetimeColumn("Recorded", format="YYYY-MM-DD HH:mm"),
    "row_id": st.column_config.TextColumn("Row"),
}
NO_LABELS_COLUMNS = {**TABLE_COLUMNS, "accuracy": st.column_config.TextColumn("Accuracy")}


def page_link(page: str, label: str, **kwargs) -> None:
    """A link to another page of the app, or plain words when that page is not in this app."""
    try:
        st.page_link(page, label=label, **kwargs)
    except StreamlitPageNotFoundError:
        st.caption(f"{label} (that page is not part of this app yet)")


def open_details(row_id: str) -> None:
    """Go to the details page of one stored row."""
    try:
        st.switch_page("pages/details.py", query_params={"row": row_id})
    except StreamlitPageNotFoundError:
        st.info(f"Row `{row_id}` picked; the details page is not part of this app yet.")


def picked_point(event) -> str | None:
    """The row_id of the first clicked point that carries one (budget lines and the front do not)."""
    for point in (event or {}).get("selection", {}).get("points", []):
        custom = point.get("customdata")
        if isinstance(custom, (list, tuple)) and custom:
            return str(custom[0])
        if isinstance(custom, str):
            return custom
    return None


settings = AppSettings.from_env()
store = settings.store()
view = sync_view("compare")

st.title("Compare variants")
st.caption("Every variant of a model measured against its Keras baseline: how much smaller, how much "
           "faster, how many accuracy points it costs.")


@st.fragment(run_every=WAIT_SECONDS)
def wait_for_first_results() -> None:
    """While the first sweep runs: say so, and draw the page once its first variant is stored."""
    if not store_reads.list_filters(store).empty:
        st.rerun(scope="app")
    running = active_sweeps()
    st.info(f"The first sweep is running ({running[0].label}: {running[0].snapshot().summary()}). Its "
            f"variants appear here as they finish." if running else NO_RESULTS, icon=":material/info:")


filters = store_reads.list_filters(store)
if filters.empty:
    if active_sweeps():
        wait_for_first_results()
    else:
        st.info(NO_RESULTS, icon=":material/info:")
    page_link("pages/run.py", label="Open the Run page", icon=":material/play_circle:")
    end_page()

# --- what to compare -----------------------------------------------------------------------------
with st.container(horizontal=True):
    newest_model = filters.pairs["model_name"].iloc[0]
    model = st.selectbox("Model", filters.models, key="compare_model",
                         index=filters.models.index(view.model if view.model in filters.models
                                                    else newest_model))
    datasets = filters.datasets_for(model)
    dataset = st.selectbox("Dataset", datasets, key="compare_dataset",
                           index=datasets.index(view.dataset) if view.dataset in datasets else 0)
    plan_id = st.selectbox("Plan", [None, *filters.plans], key="compare_plan",
                           format_func=lambda p: "Any plan or none" if p is None else p,
                           help="The sweeps of one `python -m quantlab plan` file") if filters.plans else None
    sweeps = filters.sweeps_for(model, dataset)
    statuses = store_reads.sweep_statuses(store)
    sweep_labels = {row.sweep_id: analysis.sweep_label({**row._asdict(), "status": statuses.get(row.sweep_id)})
                    for row in sweeps.itertuples()}
    sweep_options = [None, *sweep_labels]
    sweep_id = st.selectbox("Sweep", sweep_options, key="compare_sweep",
                            index=sweep_options.index(view.sweep) if view.sweep in sweep_labels else 0,
                            format_func=lambda s: "Newest result of every variant" if s is None
                            else sweep_labels[s])

# The sweep shown (or the newest of this workload) ended when its process stopped: say so.
shown_sweep = sweep_id or (sweeps["sweep_id"].iloc[0] if not sweeps.empty else None)
if shown_sweep and statuses.get(shown_sweep) == "interrupted":
    stored = store_reads.sweeps(store)
    st.warning(interrupted_note(stored[stored["sweep_id"] == shown_sweep].iloc[0].to_dict()),
               icon=":material/warning:")

quality = analysis.QUALITY[store_reads.workload_quality(store, model, dataset)]
no_labels = quality.metric == "agreement"
if no_labels:
    st.caption(f"**{model}** on **{dataset}**: {analysis.NO_LABELS_NOTE}.")

with st.container(horizontal=True):
    budget = st.number_input("Latency budget, p50 ms (empty: none)", min_value=0.0, value=view.latency_budget_ms,
                             step=0.1, format="%.3f", key="compare_budget", placeholder="no budget",
                             help="Batch-1 median latency each variant must stay within")
    drop = st.number_input(f"{quality.noun.capitalize()} drop you accept, points", min_value=0.0,
                           max_value=100.0, value=view.accuracy_drop_pp if view.accuracy_drop_pp is not None
                           else DEFAULT_DROP_POINTS, step=0.1, key="compare_drop",
                           help=f"Points of {quality.noun} below the baseline (1.0 = 95.0% -> 94.0%)")
    objectives = list(OBJECTIVE_LABELS)
    objective = st.radio("Among those, pick the", objectives, key="compare_objective",
                         index=objectives.index(view.objective) if view.objective in objectives else 0,
                         format_func=lambda o: NO_LABELS_OBJECTIVE if no_labels and o == "accuracy"
                         else OBJECTIVE_LABELS[o], horizontal=True)
every_row = st.checkbox("Show every stored measurement, not only the newest of each variant",
                        value=view.latest_only is False, key="compare_every_row",
                        help="Repeated sweeps measure a variant again: see how much its numbers vary")

view = update_view(model=model, dataset=dataset, sweep=sweep_id, latency_budget_ms=budget or None,
                   accuracy_drop_pp=drop, latest_only=False if every_row else None, objective=objective)
write_view(view, SHARED_FIELDS)

everything = store_reads.compare_frame(store, model=model, dataset=dataset, sweep_id=sweep_id,
                                    latest_only=not every_row, include_errors=True, plan_id=plan_id)
frame = everything[everything["error"].isna()]
failed = everything[everything["error"].notna()]

# --- the answer ----------------------------------------------------------------------------------
spot = analysis.sweet_spot(everything, budget or None, drop, objective, quality.metric)  # picks among successes
if spot.found:
    tie = spot.tie_note()
    st.success(f"**{spot.headline()}**" + (f"\n\n{tie}" if tie else ""), icon=":material/verified:")
    st.caption(f"{spot.reason[:1].upper()}{spot.reason[1:]}; relative to the {spot.row['reference_note']}.")
    if st.button(f"Open the details of {spot.row['label']}", key="compare_open_best"):
        open_details(spot.row_id)
else:
    st.warning(spot.headline(), icon=":material/block:")

if not frame.empty and frame["reference_technique"].isna().all() and not analysis.is_ready_tflite(frame):
    st.info("No baseline or float32 row is measured for this model, so the relative columns are empty: "
            "add the baseline technique to a sweep.")

# --- the trade-off charts -------------------------------------------------------------------------
size_figure = charts.accuracy_vs_size(frame, sweet_spot_row_id=spot.row_id, max_accuracy_drop_points=drop,
                                      metric=quality.metric)
latency_figure = charts.accuracy_vs_latency(frame, sweet_spot_row_id=spot.row_id,
                                            latency_budget_ms=budget or None,
                                            max_accuracy_drop_points=drop, metric=quality.metric)
charts_row = st.container(key="stack_compare_charts")   # on a narrow window the two charts stack
left, right = charts_row.columns(2)
with left:
    size_click = st.plotly_chart(size_figure, key="compare_size_chart", on_select="rerun",
                                 selection_mode="points")
with right:
    latency_click = st.plotly_chart(latency_figure, key="compare_latency_chart", on_select="rerun",
                                    selection_mode="points")
better = "closer to the float model" if no_labels else "more accurate"
st.caption(f"Click a point to open its details. Error bars: 95% intervals ({quality.noun}: Wilson; "
           f"latency p50: bootstrap of the timed runs); points whose bars overlap are not told apart. "
           f"The line joins the Pareto front: no variant is both smaller (or faster) and {better} than a "
           f"point on it. Dashed: your budgets.")
busy = analysis.busy_labels(frame)
if busy:
    st.warning(f"Timed while other processes kept the CPU busy (ringed in red on the latency chart): "
               f"{', '.join(busy)}. Their latency is not comparable with rows timed on a quiet machine: "
               f"measure latency again when the machine is idle.", icon=":material/speed:")
    page_link("pages/run.py", label="Measure latency again on the Run page", icon=":material/play_circle:",
              query_params={"model": model, "dataset": dataset, "remeasure": "1"})
clicked = picked_point(size_click) or picked_point(latency_click)
if clicked:
    open_details(clicked)

# --- the table -----------------------------------------------------------------------------------
st.subheader("Against the baseline")
table = analysis.table_frame(frame, quality.metric)
picked = st.dataframe(table, key="compare_table", on_select="rerun", selection_mode="single-row",
                      hide_index=True, placeholder=analysis.MISSING,
                      column_config=NO_LABELS_COLUMNS if no_labels else TABLE_COLUMNS, width="stretch")
st.caption("Sort by any column header; select a row to open its details.")
if picked and picked.selection.rows:
    open_details(table["row_id"].iloc[picked.selection.rows[0]])

if not failed.empty:
    with st.expander(f"{len(failed)} variant(s) failed in this selection"):
        st.dataframe(failed[["technique", "variant", "error", "recorded_at", "row_id"]], hide_index=True,
                     key="compare_failed", placeholder=analysis.MISSING)

# --- two models side by side ----------------------------------------------------------------------
st.subheader("Two models side by side")
others = [m for m in filters.models if m != model]
if not others:
    st.caption("Only one model is measured so far: run a sweep on another model to compare them here.")
else:
    with st.container(horizontal=True):
        other_model = st.selectbox("Compare with model", others, key="compare_other_model")
        other_datasets = filters.datasets_for(other_model)
        other_dataset = st.selectbox("on dataset", other_datasets, key="compare_other_dataset",
                                     index=other_datasets.index(dataset) if dataset in other_datasets else 0)
    other_frame = store_reads.compare_frame(store, model=other_model, dataset=other_dataset)
    name_a, name_b = f"{model} on {dataset}", f"{other_model} on {other_dataset}"
    shown = st.radio("Show", ["Relative to each baseline", "Accuracy vs size"], horizontal=True,
                     key="compare_two_models_view", label_visibility="collapsed")
    other_quality = analysis.quality_metric(other_frame)
    if other_quality != quality.metric:
        unlabelled = name_b if other_quality == "agreement" else name_a
        st.caption(f"{unlabelled} has no labels: its quality is top-1 agreement with its float model, "
                   f"the other's is accuracy; compare their changes, not their levels.")
    if shown == "Relative to each baseline":
        st.plotly_chart(charts.model_comparison_figure(frame, other_frame, name_a, name_b),
                        key="compare_two_models_bars")
    else:
        st.plotly_chart(charts.side_by_side_tradeoff(frame, other_frame, name_a, name_b),
                        key="compare_two_models_scatter")

# --- share and how it was measured ---------------------------------------------------------------
st.subheader("Share and export")
share_controls(view.with_(page="compare"), ("page", *SHARED_FIELDS), frame=frame,
               figures=[size_figure, latency_figure], title=f"QuantLab: {model} on {dataset}",
               key="compare_share")

with st.container(border=True):
    st.markdown("**How these numbers were measured**")
    st.caption(analysis.measurement_note(frame) or "Nothing measured in this selection.")
    st.caption("Latency is single-sample (batch 1) inference on this machine's CPU with the LiteRT "
               "interpreter; accuracy is top-1 on the dataset's test split; agreement is the share of "
               "test samples whose top-1 class matches the float reference."
               + (" This dataset has no labels, so no accuracy is measured." if no_labels else ""))
