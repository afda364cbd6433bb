"""Run: pick a model, a dataset and techniques; run the sweep; watch each variant finish."""

from pathlib import Path

import streamlit as st

from quantlab.errors import QuantLabError
from quantlab.sweeps import active_sweeps, get_sweep, running_twin, start_sweep
from quantlab.share import decode
from quantlab.techniques import all_techniques, get_technique
from quantlab.ui_state import (DEFAULT_DATASET, DEFAULT_MODEL, MISSING, NO_LABELS, AppSettings, blame_upload,
                               build_technique_specs, check_uploaded_dataset, check_uploaded_model,
                               estimate_sweep, NO_LABELS_UPLOAD, dataset_facts, dataset_fit_error,
                               failure_text, file_stamp, is_keras3_file, keras3_note, make_sweep_spec,
                               model_kind_of, model_output_names, param_input, results_table,
                               RECENT_SWEEPS, interrupted_notes, save_upload, stored_name,
                               stored_sweeps_table, technique_groups, technique_tags,
                               unavailable_techniques, upload_refusals)
from quantlab.workloads import BUILTIN_DATASETS, BUILTIN_MODELS
from ui import store_reads
from ui.share import sync_view, update_view, url_params, write_view
from ui.entry import run_through_app

run_through_app()  # first, before anything is drawn

POLL_SECONDS = 1.0
COMPARE_PAGE = Path(__file__).parent / "compare.py"
FORM = "run_form"            # the choices, kept while the user visits other pages
HANDLE = "run_handle"        # the id of the sweep this session started last
BUILT_IN, UPLOAD = "Built-in", "Upload a file"
STATUS_STATES = {"queued": "running", "running": "running", "done": "complete", "failed": "error",
                 "cancelled": "error"}
VARIANT_ICONS = {"waiting": ":material/schedule:", "running": ":material/autorenew:",
                 "done": ":material/check_circle:", "cached": ":material/cached:",
                 "failed": ":material/error:", "skipped": ":material/block:"}

settings = AppSettings.from_env()
store, cache = settings.store(), settings.cache()
view = sync_view("run")
form = st.session_state.setdefault(FORM, {})


def follow_link():
    """A link (e.g. from the Recommend page) that names built-ins or techniques sets those choices."""
    linked = decode(url_params())
    for kind, builtins in (("model", BUILTIN_MODELS), ("dataset", BUILTIN_DATASETS)):
        wanted = getattr(linked, kind)
        if wanted in builtins and form.get(f"linked_{kind}") != wanted:
            form.update({f"linked_{kind}": wanted, kind: wanted, f"{kind}_source": BUILT_IN})
    if linked.techniques and form.get("linked_techniques") != list(linked.techniques):
        form["linked_techniques"] = list(linked.techniques)
        form["techniques"] = {t.id: t.id in linked.techniques for t in all_techniques()}


def remember(name, value):
    form[name] = value
    return value


def save_and_check(kind):
    """When a file is uploaded (or removed): keep it under the cache and check it."""
    uploaded = st.session_state.get(f"run_{kind}_file")
    if uploaded is None:
        form.pop(f"{kind}_upload", None)
        return
    try:
        settings.check_upload_quota(st.session_state.get("run_upload_count", 0))
    except QuantLabError as exc:
        form[f"{kind}_upload"] = {"path": "", "name": uploaded.name, "stored_as": uploaded.name,
                                  "error": str(exc)}
        return
    st.session_state["run_upload_count"] = st.session_state.get("run_upload_count", 0) + 1
    path = save_upload(uploaded.getvalue(), uploaded.name, settings.cache_dir)
    check = check_uploaded_model if kind == "model" else check_uploaded_dataset
    try:
        check(path, settings.max_upload_mb)
        error = None
    except QuantLabError as exc:
        error = str(exc).splitlines()[0]
    except Exception as exc:  # an unexpected reader failure is still reported in words
        error = f"could not be read ({type(exc).__name__}); check that it is a valid {path.suffix} file"
    form[f"{kind}_upload"] = {"path": str(path), "name": path.name, "stored_as": stored_name(kind, path),
                              "error": error}


def choose_input(kind, builtins, default, suffixes, help_text):
    """A built-in model/dataset or an uploaded file; returns (what to run, its display name, ok)."""
    sources = [BUILT_IN, UPLOAD] if settings.uploads_enabled else [BUILT_IN]
    source = st.radio(f"{kind.capitalize()} source", sources, horizontal=True, key=f"run_{kind}_source",
                      index=sources.index(form.get(f"{kind}_source", BUILT_IN)) if form.get(
                          f"{kind}_source") in sources else 0)
    remember(f"{kind}_source", source)
    if source == BUILT_IN:
        names = list(builtins)
        wanted = form.get(kind) or getattr(view, kind) or default
        name = st.selectbox(f"Built-in {kind}", names, index=names.index(wanted) if wanted in names else
                            names.index(default), key=f"run_{kind}",
                            format_func=lambda n: f"{n}: {builtins[n].description}")
        return remember(kind, name), name, True
    # Any file reaches the server, which refuses it in words below (the browser's own refusal of a
    # type or size would only show in a hover).
    st.file_uploader(f"{kind.capitalize()} file ({', '.join(suffixes)}; up to {settings.max_upload_mb} MB)",
                     key=f"run_{kind}_file", on_change=save_and_check, args=(kind,), help=help_text)
    upload = form.get(f"{kind}_upload")
    if not upload:
        st.caption(f"Upload a {kind} file to go on, or switch back to a built-in {kind}.")
        return None, None, False
    if upload.get("error"):
        error = upload["error"]
        st.error(error if upload["name"] in error else f"{upload['name']}: {error}", icon=":material/error:")
        return upload["path"], upload["stored_as"], False
    st.caption(f"Using **{upload['name']}** (checked; it is loaded safely, in a separate process, "
               f"when the sweep starts).")
    return upload["path"], upload["stored_as"], True


@st.cache_data(show_spinner=False, max_entries=32)
def outputs_for(model_path, _stamp):
    """The output names of an uploaded model (cached per file)."""
    return model_output_names(model_path)


@st.cache_data(show_spinner=False, max_entries=32)
def facts_for(dataset_path, _stamp):
    """(has labels, has a train split) of an uploaded dataset (cached per file)."""
    return dataset_facts(dataset_path)


@st.cache_data(show_spinner=False, max_entries=32)
def keras3_for(model_path, _stamp):
    """Whether the uploaded file was written by Keras 3 (its config read once per file, not per rerun)."""
    return is_keras3_file(model_path)


@st.cache_data(show_spinner=False, max_entries=32)
def fit_error_for(model_path, dataset_path, _stamp):
    """Why the uploaded dataset cannot feed the uploaded model, or None (cached per pair of files)."""
    return dataset_fit_error(model_path, dataset_path)


@st.cache_data(show_spinner=False, max_entries=32)
def refusals_for(model_path, dataset_path, _stamp):
    """Techniques that cannot run on the uploaded model and dataset, with the reason (cached per file)."""
    has_labels, has_train = facts_for(dataset_path, _stamp[-1:])
    return upload_refusals(model_path, has_labels, has_train)


def forget_ticks_of_another_model_kind(model_kind):
    """A model of another kind (a .tflite after a Keras model) starts from its own default ticks."""
    previous = form.get("techniques_kind")
    form["techniques_kind"] = model_kind
    if previous is not None and previous != model_kind:
        form["techniques"] = {}


def choose_techniques(model_kind, refused):
    """Every registered technique by family: a checkbox each, its parameters in an expander."""
    forget_ticks_of_another_model_kind(model_kind)
    chosen = {}
    for group in technique_groups(model_kind, refused):
        st.markdown(f"**{group.title}**")
        for choice in group.choices:
            technique = choice.technique
            saved = form.setdefault("techniques", {}).get(technique.id)
            tags = technique_tags(technique)
            # A technique this model cannot take is a separate, unticked widget: when the model changes
            # (a .tflite upload), what becomes available starts from its default, not a stale tick.
            selected = st.checkbox(
                f"{technique.label} · `{technique.id}`" + (f" · _{', '.join(tags)}_" if tags else ""),
                value=(choice.default_selected if saved is None else saved) and choice.available,
                disabled=not choice.available,
                key=f"run_technique_{technique.id}" + ("" if choice.available else "_unavailable"),
                help=technique.description)
            if not choice.available:
                st.caption(f"Not for this model: {choice.reason}.")
                continue
            form["techniques"][technique.id] = selected
            params = technique_params(technique) if technique.params else {}
            if selected:
                chosen[technique.id] = params
    for technique_id, reason in unavailable_techniques().items():
        st.caption(f"`{technique_id}` is not available with the installed libraries: {reason}")
    return chosen


def technique_params(technique):
    """The technique's declared parameters, each with its default, in an expander."""
    values = form.setdefault("params", {}).setdefault(technique.id, {})
    with st.expander(f"Parameters of {technique.label}", key=f"run_params_{technique.id}"):
        for param in technique.params:
            spec = param_input(param)
            key = f"run_param_{technique.id}_{param.name}"
            current = values.get(param.name, spec.default)
            if spec.widget == "selectbox":
                options = list(spec.options)
                value = st.selectbox(spec.label, options, index=options.index(current) if current in options
                                     else 0, help=spec.help, key=key)
            elif spec.widget == "checkbox":
                value = st.checkbox(spec.label, value=bool(current), help=spec.help, key=key)
            elif spec.widget == "text":
                value = st.text_area(spec.label, value=str(current), help=spec.help, key=key,
                                     placeholder="paste a recipe JSON, or the path of a .json file on the server")
            elif spec.widget == "int":
                value = st.number_input(spec.label, value=int(current), min_value=spec.minimum,
                                        max_value=spec.maximum, step=1, help=spec.help, key=key)
            else:
                value = st.number_input(spec.label, value=float(current), min_value=spec.minimum,
                                        max_value=spec.maximum, step=spec.step, format="%g",
                                        help=spec.help, key=key)
            values[param.name] = value
    return dict(values)


def measurement_settings():
    with st.expander("Training and measurement settings", key="run_settings_expander"):
        st.caption("Built-in models are trained first (once per setting; the result is cached). Latency is "
                   "measured at batch 1 after warm-up, for at least the given runs and seconds.")
        columns = st.columns(4)
        epochs = columns[0].number_input("Training epochs", 1, 200, form.get("epochs", 8), key="run_epochs")
        threads = columns[1].number_input("Interpreter threads", 1, 64, form.get("threads", 1),
                                          key="run_threads")
        min_runs = columns[2].number_input("Latency runs (at least)", 5, 100_000, form.get("min_runs", 50),
                                           key="run_min_runs")
        min_seconds = columns[3].number_input("Latency seconds (at least)", 0.05, 600.0,
                                              float(form.get("min_seconds", 1.0)), step=0.25,
                                              key="run_min_seconds")
    form.update(epochs=epochs, threads=threads, min_runs=min_runs, min_seconds=min_seconds)
    return dict(epochs=epochs, num_threads=threads, min_runs=min_runs, min_seconds=min_seconds)


def draw_sweep(snapshot):
    """One sweep: its status, a line per variant, and a table of the variants finished so far."""
    # Not `with st.status(...)`: leaving that block marks the box complete, a done check next to
    # "running".
    box = st.status(f"{snapshot.label}: {snapshot.summary()}", state=STATUS_STATES[snapshot.status],
                    expanded=not snapshot.finished or bool(snapshot.failed) or snapshot.status == "failed")
    if snapshot.status == "queued":
        box.info(snapshot.summary(), icon=":material/hourglass_top:")
    elif snapshot.preparing:  # nothing to count yet: the step and its seconds, not an empty bar
        box.info(snapshot.progress_text(), icon=":material/hourglass_top:")
    elif snapshot.total:
        box.progress(snapshot.fraction, text=snapshot.progress_text())
    if snapshot.message and not snapshot.preparing:
        box.caption(snapshot.message)
    for variant in snapshot.variants:
        box.markdown(f"{VARIANT_ICONS.get(variant.state, '')} **{variant.label}**: "
                     f"{variant.message or variant.state}")
    for note in snapshot.model_notes:  # outside the box, which collapses when the sweep ends
        st.caption(f"Model: {note}")
    if snapshot.status == "failed":
        st.error(f"The sweep failed: {snapshot.error}", icon=":material/error:")
    if snapshot.rows:
        table = results_table(snapshot.rows, details_link="details?row=")
        st.dataframe(table, hide_index=True, placeholder=MISSING, column_config={
            "accuracy": st.column_config.TextColumn() if (table["accuracy"] == NO_LABELS).any()
            else st.column_config.NumberColumn(format="%.4f"),
            "agreement": st.column_config.NumberColumn(format="%.4f"),
            "p50 latency (ms)": st.column_config.NumberColumn(format="%.3g"),  # 0.000557 ms, 31.1 ms
            "row": st.column_config.LinkColumn("details", display_text="open", help="Variant details")})
    for row in snapshot.rows:
        if row.get("error"):
            st.error(failure_text(row), icon=":material/error:")


def show_sweep(handle):
    """The sweep, polled every second while it runs (also after leaving and reopening this page)."""
    if handle.finished:
        draw_sweep(handle.snapshot())
        finished_actions(handle.snapshot())
        return

    @st.fragment(run_every=POLL_SECONDS)
    def live():
        snapshot = handle.snapshot()
        draw_sweep(snapshot)
        if snapshot.finished:
            st.rerun()  # once: the whole page then draws the final state
        if st.button("Cancel sweep", key=f"run_cancel_{handle.id}", icon=":material/stop_circle:",
                     help="Stop now: variants in progress are stopped and not stored; finished ones stay stored",
                     disabled=handle.cancel_requested):
            handle.cancel()

    live()


def finished_actions(snapshot):
    """After a sweep with results: on to the Compare page (when it is installed)."""
    if not any(not row.get("error") for row in snapshot.rows):
        return
    if COMPARE_PAGE.exists():
        st.page_link("pages/compare.py", label="Compare the results", icon=":material/scatter_plot:",
                     query_params={"model": snapshot.rows[0]["model_name"],
                                   "dataset": snapshot.rows[0]["dataset_name"]})
    else:
        st.caption("The results are stored; the Compare page will chart them.")


def note_upload_failure(handle):
    """A sweep that failed because of an uploaded file: show its error next to that upload (once)."""
    seen = form.setdefault("blamed_handles", [])
    snapshot = handle.snapshot()
    if snapshot.status != "failed" or handle.id in seen or "internal error" in (snapshot.error or ""):
        return
    seen.append(handle.id)
    paths = {"model": handle.spec.model, "dataset": handle.spec.dataset}
    uploads = {kind: form.get(f"{kind}_upload") for kind in paths}
    matching = {kind: bool(up and up["path"] == paths[kind]) for kind, up in uploads.items()}
    blamed = blame_upload(snapshot.error, matching["model"], matching["dataset"])
    if blamed:
        uploads[blamed]["error"] = snapshot.error


# --- the page -------------------------------------------------------------------------------------

st.title("Run a sweep")
st.caption("Convert one model with every technique you pick, measure each variant (size, accuracy, "
           "agreement with the float model, latency) and store the results.")
for line in settings.mode_lines():
    st.info(line, icon=":material/info:")

mine = get_sweep(st.session_state.get(HANDLE))
if mine is not None:
    note_upload_failure(mine)

recent_sweeps = store_reads.sweeps(store, RECENT_SWEEPS)
for line in interrupted_notes(recent_sweeps):
    st.warning(line, icon=":material/warning:")

if store_reads.count(store) == 0 and not active_sweeps():
    # the radios below are drawn after this banner: their new value is in session state already
    if UPLOAD in (st.session_state.get(f"run_{kind}_source", form.get(f"{kind}_source"))
                  for kind in ("model", "dataset")):   # the user's own files
        st.info("No results yet. Upload your model and dataset below, tick the techniques, then press "
                "**Run sweep**.", icon=":material/rocket_launch:")
    else:
        st.info(f"No results yet. The default sweep is ready: **{DEFAULT_MODEL}** on **{DEFAULT_DATASET}** "
                f"with every post-training technique. Press **Run sweep** under the model and dataset.",
                icon=":material/rocket_launch:")

follow_link()
st.subheader("1. Model and dataset")
left, right = st.columns(2)
with left:
    model, model_name, model_ok = choose_input(
        "model", BUILTIN_MODELS, DEFAULT_MODEL, (".keras", ".h5", ".hdf5", ".zip", ".tflite"),
        "A tf_keras/Keras .keras or .h5 file, a SavedModel folder as .zip, or a ready .tflite file. "
        "Nothing in the file is executed: unknown layers and custom code are refused.")
    if form.get("model_source") == UPLOAD and model_ok and keras3_for(model, file_stamp(model)):
        st.caption(keras3_note())
with right:
    dataset, dataset_name, dataset_ok = choose_input(
        "dataset", BUILTIN_DATASETS, DEFAULT_DATASET, (".npz",),
        "A .npz with x_test and y_test (class ids or one-hot rows), optionally x_train/y_train (for "
        "fine-tuning) and x_calib (calibration samples). Without y_test, variants are compared on "
        "agreement with the float model.")
    if form.get("dataset_source") == UPLOAD and dataset_ok:
        if facts_for(dataset, file_stamp(dataset))[0] is False:
            st.info(NO_LABELS_UPLOAD, icon=":material/label_off:")
        if form.get("model_source") == UPLOAD and model_ok:
            misfit = fit_error_for(model, dataset, file_stamp(model, dataset))
            if misfit:  # said now, not after Run and the sweep's preparation
                st.error(misfit, icon=":material/error:")
                dataset_ok = False
# Only an accepted choice becomes the current model or dataset (the sidebar never names a refused one).
view = update_view(**{kind: name for kind, name, ok in (("model", model_name, model_ok),
                                                        ("dataset", dataset_name, dataset_ok)) if ok})

# The primary action sits here, seen without scrolling; it is drawn once the choices below are known.
run_bar = st.container(border=True)

st.subheader("2. Techniques")
model_kind = model_kind_of(model_name or "")
uploaded_model = model if form.get("model_source") == UPLOAD and model_ok else None
uploaded_dataset = dataset if form.get("dataset_source") == UPLOAD and dataset_ok else None
refused = refusals_for(uploaded_model, uploaded_dataset,
                       file_stamp(uploaded_model, uploaded_dataset)) if uploaded_model else {}
label_output = None
outputs = outputs_for(uploaded_model, file_stamp(uploaded_model)) if uploaded_model else []
if len(outputs) > 1:
    label_output = st.selectbox("The output the labels belong to (accuracy is measured on it; "
                                "every output is compared with the float model)", outputs,
                                key="run_label_output")
chosen = choose_techniques(model_kind, refused)
techniques, technique_errors = build_technique_specs(chosen)
for technique_id, error in technique_errors.items():
    st.error(f"{get_technique(technique_id).label}: {error}", icon=":material/error:")
view = update_view(techniques=tuple(chosen))

st.subheader("3. Settings")
measure = measurement_settings()
remeasure = st.checkbox("Measure again, ignoring cached results (for latencies timed while the machine "
                        "was busy)", value=st.query_params.get("remeasure") == "1", key="run_remeasure")
ready = model_ok and dataset_ok and bool(techniques) and not technique_errors and settings.can_run
spec = make_sweep_spec(model, dataset, techniques, **measure, label_output=label_output) if ready else None
twin = running_twin(spec, store)
with run_bar:
    left, right = st.columns([1, 3], vertical_alignment="center")
    pressed = left.button("Run sweep", type="primary", key="run_start", disabled=not ready or twin is not None,
                          icon=":material/play_arrow:", width="stretch",
                          help="The same sweep is already running" if twin is not None else
                          None if settings.can_run else "This dashboard is read-only")
    with right:
        if not (model_ok and dataset_ok):
            missing = " and ".join(what for what, ok in (("a model", model_ok), ("a dataset", dataset_ok)) if not ok)
            st.caption(f"Run waits for {missing} the checks above accept.")
        elif not techniques:
            st.caption("Pick at least one technique below.")
        elif twin is not None:
            st.caption(f"This very sweep is already {'running' if twin.status == 'running' else 'waiting'} "
                       f"({twin.label}): its progress is below.")
        else:
            st.caption(f"**{model_name or 'No model'}** on **{dataset_name or 'no dataset'}**, "
                       f"{len(techniques)} technique(s). {estimate_sweep(store, [t.id for t in techniques]).text()} "
                       f"{settings.executor_text()}")
if pressed and twin is None:
    handle = start_sweep(spec, store, cache, settings.sweep_options(remeasure=remeasure),
                         label=f"{model_name} on {dataset_name}")
    st.session_state[HANDLE] = handle.id
    if handle.finished:  # refused at once (bad input): say so next to the upload it concerns
        note_upload_failure(handle)
    st.rerun()  # redraw with Run disabled while this very sweep runs

mine = get_sweep(st.session_state.get(HANDLE))
others = [h for h in active_sweeps() if mine is None or h.id != mine.id]
if mine is not None:
    show_sweep(mine)
if others:  # started in another tab, before a reload, or from another page
    st.caption("Also running or waiting on this server:")
for handle in others:
    show_sweep(handle)

if not recent_sweeps.empty:
    with st.expander(f"Stored sweeps (the newest {len(recent_sweeps)})", icon=":material/history:"):
        st.dataframe(stored_sweeps_table(recent_sweeps), hide_index=True, key="run_stored_sweeps",
                     placeholder=MISSING)

write_view(view, ("model", "dataset", "techniques"))
