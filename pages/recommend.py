"""Recommend: which quantization to use, by what this model measured, explained by the decision tree.

The questions of TensorFlow Lite's post-training quantization decision tree; the headline: the
smallest measured variant your answers allow within your tolerance (or, before one is measured, the
tree's leaf with the docs' generic figures); the tree's reasoning as the explanation, the tree drawn
with your answers highlighted, this model's numbers for the tree's choice, or a button that measures
what is missing. Every answer is in the link.
"""

import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from quantlab import analysis, charts, recommend, sweeps
from quantlab.errors import QuantLabError
from quantlab.techniques import unsupported_techniques
from quantlab.ui_state import DEFAULT_DATASET, DEFAULT_MODEL, AppSettings, model_kind_of
from ui import store_reads
from ui.layout import scroll_to, sideways_scroll
from ui.share import share_controls, sync_view, update_view, write_view
from ui.entry import run_through_app

run_through_app()  # first, before anything is drawn

SHARED_FIELDS = ("model", "dataset", "accuracy_drop_pp", "hardware", "drop_ok", "representative_data",
                 "can_retrain", "integer_io", "uint8_io")
DEFAULT_DROP_POINTS = 1.0
SWEEP_KEY = "recommend_sweep_handle"
BACKING_STYLE = {"fits": st.success, "exceeds": st.warning, "not-measured": st.info,
                 "no-reference": st.info, "blocked": st.warning}


def page_link(page: str, label: str, **kwargs) -> None:
    """A link to another page of the app, or plain words when that page is not in this app."""
    try:
        st.page_link(page, label=label, **kwargs)
    except StreamlitPageNotFoundError:
        st.caption(f"{label} (that page is not part of this app yet)")


def answer_toggle(label: str, key: str, fixed: bool | None, value: bool | None,
                  help: str | None = None) -> bool:
    """A yes/no question (`value`: a link's answer, None: no), or, when other answers already decide it
    (`fixed`), that answer greyed out."""
    if fixed is None:
        return st.toggle(label, value=bool(value), key=key, help=help)
    return st.toggle(label, value=fixed, key=f"{key}_fixed_{fixed}", disabled=True, help=help)


def measured_headline(pick: recommend.MeasuredPick, model: str) -> None:
    """The headline when this model is measured: the variant to use and its numbers."""
    st.markdown(f"### Use **{pick.label}** (`{pick.technique}`)")
    st.markdown(f"Measured on {model}: **{pick.gain}**; {pick.reason}.")


def tree_headline(advice: recommend.Recommendation) -> None:
    """The headline before anything fits: the decision tree's leaf."""
    if advice.technique:
        st.markdown(f"### Try **{advice.label}** (`{advice.technique}`)")
    else:
        st.markdown(f"### {recommend.NODE_BY_ID[advice.leaf].text}")


def tree_explanation(advice: recommend.Recommendation, frame, pick: recommend.MeasuredPick | None) -> None:
    """Why, by the decision tree; the docs' generic figures only where this model has none measured."""
    measured = recommend.measured_gain(advice.technique, frame)
    if pick is None:
        figures = f" (measured here: {measured})" if measured else f"; {advice.claim}" if advice.claim else ""
        st.markdown(f"Because {advice.reason}{figures}.")
    elif advice.technique == pick.technique:
        st.markdown(f"The decision tree agrees: {advice.reason}.")
    else:
        figures = f": measured here, {measured}" if measured else ", not measured on this model yet"
        st.markdown(f"The decision tree's starting point for your answers is **{advice.label}** "
                    f"(`{advice.technique}`), because {advice.reason}{figures}."
                    if advice.technique else f"The decision tree says: {advice.reason}.")
    st.caption("Your path: " + " → ".join(f"{step.question} **{step.answer}**" for step in advice.path))
    if advice.fallbacks and pick is None:
        st.markdown("If it loses more accuracy than you accept, try next:\n" + "\n".join(
            f"{i}. **{recommend.technique_label(f.technique)}** (`{f.technique}`): "
            f"{recommend.measured_gain(f.technique, frame) or f.why}"
            for i, f in enumerate(advice.fallbacks, start=1)))


settings = AppSettings.from_env()
store = settings.store()
view = sync_view("recommend")

st.title("Which quantization should I try?")
st.caption(f"An interactive version of the post-training quantization decision tree in the "
           f"[TensorFlow Lite docs]({recommend.DOCS_URL}), checked against what was measured on your model.")

questions, answer = st.columns([2, 3], gap="large")

# --- the questions -------------------------------------------------------------------------------
with questions:
    st.subheader("Your deployment")
    hardware_options = list(recommend.HARDWARE)
    hardware = st.radio("Target hardware", hardware_options, key="recommend_hardware",
                        index=hardware_options.index(view.hardware) if view.hardware in hardware_options else 0,
                        format_func=recommend.HARDWARE.get)
    integer_target = hardware in recommend.INTEGER_HARDWARE
    integer_io = answer_toggle("Integer-only input/output required", "recommend_integer_io",
                               fixed=None if hardware == "cpu" else integer_target, value=view.integer_io,
                               help="Edge TPUs and microcontrollers always need integer I/O, a GPU delegate "
                                    "runs float; on a CPU it is a choice (e.g. a pipeline that feeds raw "
                                    "uint8 camera frames)")
    accuracy_drop_ok = st.toggle("Some accuracy drop is acceptable", value=view.drop_ok is not False,
                                 key="recommend_drop_ok")
    max_drop = st.number_input("How much, in accuracy points", min_value=0.0, max_value=100.0, step=0.1,
                               value=view.accuracy_drop_pp if view.accuracy_drop_pp is not None
                               else DEFAULT_DROP_POINTS, key="recommend_drop",
                               disabled=not accuracy_drop_ok,
                               help="Used to check this model's measured rows (1.0 = 95.0% -> 94.0%)")
    representative_data = st.toggle("Representative data available (about 100-500 samples)",
                                    value=view.representative_data is not False, key="recommend_data")
    can_retrain = st.toggle("Retraining (fine-tuning) is possible", value=bool(view.can_retrain),
                            key="recommend_retrain")
    uint8_free = integer_target or integer_io
    uint8_io = answer_toggle("The toolchain expects uint8 input/output (older accelerators)",
                             "recommend_uint8", fixed=None if uint8_free else False, value=view.uint8_io)

answers = recommend.Answers(hardware=hardware, accuracy_drop_ok=accuracy_drop_ok, max_drop_points=max_drop,
                            representative_data=representative_data, can_retrain=can_retrain,
                            integer_io=integer_io and hardware == "cpu", uint8_io=uint8_io)
advice = recommend.recommend(answers)

st.markdown("**The decision tree**, your answers in red:")
nodes, edges = recommend.tree_frames(advice)
tree = charts.decision_tree_figure(nodes, edges)   # room for every leaf: a narrow window scrolls it
sideways_scroll("recommend_tree_box", tree.layout.width).plotly_chart(
    tree, key="recommend_tree", width="content", config={"displayModeBar": False})
scroll_to("recommend_tree_box", charts.tree_focus(nodes))   # the answer in view, also at 800 px

# --- what this model's measurements say -------------------------------------------------------------
st.subheader("On your model")
filters = store_reads.list_filters(store)
models = filters.models or [view.model or DEFAULT_MODEL]
with st.container(horizontal=True):
    model = st.selectbox("Model", models, key="recommend_model",
                         index=models.index(view.model) if view.model in models else 0)
    datasets = filters.datasets_for(model) or [view.dataset or DEFAULT_DATASET]
    dataset = st.selectbox("Dataset", datasets, key="recommend_dataset",
                           index=datasets.index(view.dataset) if view.dataset in datasets else 0)
# The answers go into the link; one the other answers decide is left out (it follows them).
view = update_view(model=model, dataset=dataset, accuracy_drop_pp=max_drop, hardware=hardware,
                   drop_ok=accuracy_drop_ok, representative_data=representative_data, can_retrain=can_retrain,
                   integer_io=integer_io if hardware == "cpu" else None,
                   uint8_io=uint8_io if uint8_free else None)
write_view(view, SHARED_FIELDS)

frame = store_reads.compare_frame(store, model=model, dataset=dataset)
pick = recommend.measured_pick(advice, frame)
backing = recommend.back_with_measurements(advice, frame)
previous = analysis.last_sweep_spec(store, model, dataset)
model_file = (previous or {}).get("model") or model
if model_kind_of(model_file) == "tflite":
    backing = recommend.back_a_ready_tflite(backing, model, advice.chain)

# --- the recommendation: what was measured first, the decision tree as its explanation ------------
with answer:
    st.subheader("Recommendation")
    if pick:
        measured_headline(pick, model)
    else:
        tree_headline(advice)
    tree_explanation(advice, frame, pick)

if backing.metric == "agreement":
    st.caption(f"**{model}** on **{dataset}**: {analysis.NO_LABELS_NOTE}; your tolerance is checked "
               f"against the drop in agreement.")
BACKING_STYLE.get(backing.status, st.info)(
    backing.text if not pick or pick.technique == backing.technique
    else f"The decision tree's path, checked: {backing.text}")
shown_row = pick.row_id if pick else backing.row_id
if shown_row and st.button("Open the measured row", key="recommend_open_row"):
    try:
        st.switch_page("pages/details.py", query_params={"row": shown_row})
    except StreamlitPageNotFoundError:
        st.info(f"Row `{shown_row}`; the details page is not part of this app yet.")

offer = recommend.int4_offer(advice, frame)
if offer is not None and not (pick and pick.technique == recommend.INT4_TECHNIQUE):
    st.caption(offer.text)
to_run = tuple(dict.fromkeys(backing.to_run + (offer.to_run if offer else ())))
if to_run:
    runnable, unknown = recommend.runnable_techniques(to_run)
    if unknown:
        reasons = unsupported_techniques()
        st.caption("Not available in this QuantLab install: " + "; ".join(
            f"{t} ({reasons[t]})" if t in reasons else f"{t} (not registered yet)" for t in unknown) + ".")
    runnable, other_kind = recommend.split_by_model_kind(runnable, model_kind_of(model_file))
    if other_kind:
        st.caption(f"{', '.join(other_kind)} cannot run on **{model}**, a ready TensorFlow Lite file "
                   f"measured as it is: upload its Keras model to measure the techniques the tree names.")
    if runnable and settings.can_run:
        if st.button(f"Measure {', '.join(runnable)} on {model}", key="recommend_run", type="primary",
                     icon=":material/play_arrow:"):
            try:
                spec = recommend.follow_up_spec(previous, model, dataset, runnable)
                sweeps.check_spec(spec, store)
                handle = sweeps.start_sweep(spec, store, settings.cache(), settings.sweep_options(),
                                            label=f"{', '.join(runnable)} on {model}")
                st.session_state[SWEEP_KEY] = handle.id
            except QuantLabError as exc:
                st.error(str(exc))
    elif runnable:
        st.caption("This dashboard is read-only: run these techniques where results can be written.")
    linked = {"model": model, "dataset": dataset, **({"techniques": ",".join(runnable)} if runnable else {})}
    page_link("pages/run.py", label="Or choose settings on the Run page", icon=":material/play_circle:",
              query_params=linked)

handle = sweeps.get_sweep(st.session_state.get(SWEEP_KEY))
if handle is not None:
    finished_before = handle.finished

    @st.fragment(run_every=None if finished_before else 2)
    def sweep_status() -> None:
        snapshot = handle.snapshot()
        st.caption(f"Sweep {snapshot.label}: {snapshot.summary()}")
        if snapshot.finished and not finished_before:
            st.rerun()  # the whole page, to show the new measurements
    sweep_status()

st.subheader("Share")
share_controls(view.with_(page="recommend"), ("page", *SHARED_FIELDS), key="recommend_share")
