"""Calibration lab: one tensor under every calibrator, the whole model under fake quantization, and the
layers int8 hurts most, for a model and dataset a sweep has prepared.

Everything here is numpy from quantlab.lab; TensorFlow work (extracting tensors, evaluating, TFLite's
quantization debugger) runs in a worker process and is cached under cache/lab/.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from quantlab import lab
from quantlab.calibrate import CALIBRATORS, KMEANS_MAX_BITS, SUPPORTED_BITS, WEIGHT_BITS, QuantConfig
from quantlab.errors import QuantLabError
from ui.share import current_view, share_controls, sync_view, update_view, write_view
from ui.entry import end_page, run_through_app

run_through_app()  # first, before anything is drawn

CONTEXT = lab.app_context()
STORE, CACHE = CONTEXT.store, CONTEXT.cache
METHOD_LABELS = {"linear": "Linear (evenly spaced levels)", "kmeans": "k-means (2^bits centroids)"}
SOURCE_LABELS = {"weights": "Weights of a layer", "activations": "Activations on the calibration split"}
TAB_LABELS = {"tensor": "Tensor", "model": "Model accuracy", "sensitivity": "Per-layer sensitivity"}
SHARED_FIELDS = ("model", "dataset", "workload", "lab_tab", "source", "layer", "bits", "levels", "symmetric",
                 "per_channel", "calibrator", "percentile", "channel", "log_scale", "layer_bits",
                 "activations", "activation_bits", "keep_float")
CALIBRATOR_HELP = ("max: the full range · percentile: a percentile of |x| · kl: TensorRT's entropy "
                   "threshold · mse: the range with the smallest squared error")


# --- cached loaders (pure quantlab functions; the keys include the file's mtime) -------------------


def file_stamp(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(ttl=5, show_spinner=False)
def load_workloads(db_path: str, cache_dir: str) -> list[lab.Workload]:
    return lab.list_workloads(STORE, CACHE)


@st.cache_resource(max_entries=8, show_spinner=False)
def load_tensors(path: str, stamp: float) -> lab.LabTensors:
    return lab.load_tensors(Path(path))


@st.cache_resource(max_entries=64, show_spinner=False)
def tensor_sample(path: str, stamp: float, name: str, axis: int):
    return lab.analysis_sample(load_tensors(path, stamp).get(name), axis)


@st.cache_data(max_entries=2048, show_spinner=False)
def calibrator_run(path: str, stamp: float, name: str, axis: int, config: dict) -> lab.CalibratorRun:
    return lab.run_calibrator(tensor_sample(path, stamp, name, axis), QuantConfig.from_dict(config))


@st.cache_data(max_entries=256, show_spinner=False)
def tensor_analysis(path: str, stamp: float, name: str, config: dict, channel: int) -> lab.TensorAnalysis:
    config_ = QuantConfig.from_dict(config)
    return lab.analyze_tensor(load_tensors(path, stamp).get(name), config_, channel,
                              sample=tensor_sample(path, stamp, name, config_.axis),
                              run=lambda sample, c: calibrator_run(path, stamp, name, config_.axis, c.to_dict()))


@st.cache_data(ttl=5, show_spinner=False)
def int8_rows(db_path: str, model_hash: str, dataset_hash: str):
    return lab.converted_int8_rows(STORE, {"model_hash": model_hash, "dataset_hash": dataset_hash})


def index_of(options, value, default: int = 0) -> int:
    """The position of `value` (a link's choice) in `options`, or `default` when it is not one of them."""
    options = list(options)
    return options.index(value) if value in options else default


def linked_workload(workloads: list[lab.Workload], view) -> int:
    """The workload a link names (by model hash prefix, else by model and dataset), or the first."""
    for i, workload in enumerate(workloads):
        if view.workload and workload.model_hash.startswith(view.workload):
            return i
    for i, workload in enumerate(workloads):
        if (workload.manifest.get("model_name"), workload.manifest.get("dataset_name")) == (view.model, view.dataset):
            return i
    return 0


def layer_overrides(table, default_bits: int) -> tuple[str, ...]:
    """`layer:bits` for each layer of the bit-width table not at `default_bits` (what a link carries)."""
    return tuple(f"{layer}:{bits}" for layer, bits in lab.bits_from_table(table).items() if bits != default_bits)


def with_overrides(table, overrides: tuple[str, ...]):
    """The bit-width table with a link's `layer:bits` overrides applied to the layers it has."""
    wanted = {layer: int(bits) for layer, _, bits in (item.rpartition(":") for item in overrides)}
    table = table.copy()
    table["bits"] = [wanted.get(layer, bits) for layer, bits in zip(table["layer"], table["bits"])]
    return table


def worker_button(label: str, key: str, working: str, work) -> None:
    """A button that runs `work` (a worker-process job) under a spinner, then redraws the page."""
    if st.button(label, key=key, type="primary"):
        try:
            with st.spinner(working):
                work()
            st.rerun()
        except QuantLabError as exc:
            st.error(str(exc))


# --- page -------------------------------------------------------------------------------------------

lab.warm_up()
view = sync_view("lab")
st.title("Calibration lab")
st.caption("How a calibrator, a bit width or per-channel scales change one tensor's quantization error, "
           "what fake quantization does to the model's accuracy, and which layers int8 hurts most.")

workloads = load_workloads(str(STORE.path), str(CACHE.root))
if not workloads:
    st.info("Nothing to open yet: the Lab works on a model and dataset that a sweep has prepared. "
            "Run a sweep (for example seed-cnn on digits-28) and come back.")
    end_page()

workload = st.selectbox("Workload: a model and dataset a sweep prepared", workloads,
                        index=linked_workload(workloads, view), format_func=lambda w: w.label, key="lab_workload")
manifest = workload.manifest
view = update_view(model=manifest.get("model_name"), dataset=manifest.get("dataset_name"),
                   workload=workload.model_hash[:8] or None)
write_view(view, SHARED_FIELDS)
if not workload.usable:
    st.warning(workload.reason)
    end_page()

if not lab.tensors_ready(CACHE, manifest):
    samples = (manifest.get("split_sizes") or {}).get("calibration", "the")
    st.info(f"The weights and activations of {manifest['model_name']} are not extracted yet. Extraction "
            f"loads the model once in a worker process and runs the {samples} calibration samples "
            f"through it; the Lab then works from the saved arrays.")
    worker_button("Extract weights and activations", "lab_extract",
                  "Extracting in a worker process (the first run starts TensorFlow)...",
                  lambda: lab.extract_tensors(manifest, CACHE))
    end_page()

weights_file = lab.weights_path(CACHE, manifest)
activations_file = lab.activations_path(CACHE, manifest)
weights = load_tensors(str(weights_file), file_stamp(weights_file))

# The quantizer, shared by the tensor view and the model view.
with st.container(border=True):
    st.markdown("**Quantizer**")
    col_bits, col_method, col_shape, col_calibrator = st.columns([0.8, 1.5, 1.2, 1.3])
    bits = col_bits.selectbox("Bits", SUPPORTED_BITS, index=index_of(SUPPORTED_BITS, view.bits, SUPPORTED_BITS.index(8)),
                              key="lab_bits")
    method = col_method.radio("Levels", list(METHOD_LABELS), index=index_of(METHOD_LABELS, view.levels),
                              format_func=METHOD_LABELS.get, key="lab_method")
    kmeans = method == "kmeans"
    symmetric = col_shape.toggle("Symmetric", value=view.symmetric is not False, key="lab_symmetric", disabled=kmeans,
                                 help="Symmetric: zero point 0, range [-t, t] (TFLite weights). "
                                      "Asymmetric: a zero point, range [low, high] (TFLite activations).")
    per_channel = col_shape.toggle("Per-channel", value=view.per_channel is not False, key="lab_per_channel",
                                   disabled=kmeans,
                                   help="One scale per output channel, as TFLite's converter does for conv and "
                                        "dense weights by default; off: one scale per tensor.")
    calibrator = col_calibrator.selectbox("Calibrator", CALIBRATORS, index=index_of(CALIBRATORS, view.calibrator),
                                          key="lab_calibrator", disabled=kmeans, help=CALIBRATOR_HELP)
    percentile = 99.99
    if calibrator == "percentile" and not kmeans:
        percentile = col_calibrator.number_input("Percentile", min_value=50.0, max_value=100.0,
                                                 value=view.percentile or 99.99, step=0.01, format="%.2f",
                                                 key="lab_percentile")
view = update_view(bits=bits, levels=method, symmetric=symmetric, per_channel=per_channel, calibrator=calibrator,
                   percentile=percentile if calibrator == "percentile" and not kmeans else None)

tab_label = st.session_state.get("lab_tab") or TAB_LABELS.get(view.lab_tab or "tensor", TAB_LABELS["tensor"])
tensor_tab, model_tab, sensitivity_tab = st.tabs(list(TAB_LABELS.values()), default=tab_label, key="lab_tab",
                                                 on_change="rerun")
view = update_view(lab_tab=next((tab for tab, label in TAB_LABELS.items()
                                 if label == st.session_state.get("lab_tab", tab_label)), None))


def tensor_view() -> None:
    source = st.radio("Tensor", list(SOURCE_LABELS), index=index_of(SOURCE_LABELS, view.source),
                      format_func=SOURCE_LABELS.get, horizontal=True, key="lab_source")
    path = weights_file if source == "weights" else activations_file
    stamp = file_stamp(path)
    tensors = load_tensors(str(path), stamp)
    name = st.selectbox("Layer", tensors.names, index=index_of(tensors.names, view.layer),
                        format_func=lambda n: tensors.info(n).label, key=f"lab_tensor_{source}")
    info = tensors.info(name)
    if source == "activations":
        st.caption(f"Output of {info.layer} on {info.samples} calibration samples"
                   + (f" (of {manifest['split_sizes']['calibration']}, to keep the file small)"
                      if info.samples and info.samples < (manifest.get("split_sizes") or {}).get("calibration", 0)
                      else "") + ".")
    elif not info.quantized:
        st.caption("TFLite keeps this vector in higher precision (int32 biases, folded batch norm); "
                   "it is shown here for comparison.")
    elif info.role == lab.FOLDED_ROLE:
        st.caption(f"The kernel of {info.layer} times its batch norm's gamma / √(variance + ε), per output "
                   f"channel: the kernel TFLite's converter actually quantizes. Uneven channel scales "
                   f"here are why per-tensor quantization can hurt where per-channel does not.")
    elif folded := lab.folded_twin(tensors, name):
        st.caption(f"TFLite folds the batch norm after {info.layer} into this kernel before quantizing; "
                   f"pick “{folded}” to see what it really quantizes.")
    try:
        config, notes = lab.make_config(bits, symmetric, per_channel, calibrator, method, percentile,
                                        axis=info.channel_axis)
    except QuantLabError as exc:
        st.warning(str(exc))
        return
    channel = 0
    noun, nouns = lab.axis_words(info)   # an input image without a channel axis has image columns there
    col_channel, col_log = st.columns([2, 1])
    if config.per_channel and info.channels > 1:
        channel = int(col_channel.number_input(f"{noun.capitalize()} shown (of {info.channels} {nouns}, "
                                               f"axis {info.channel_axis})",
                                               min_value=0, max_value=info.channels - 1,
                                               value=min(view.channel or 0, info.channels - 1), step=1,
                                               key="lab_channel"))
    log_scale = col_log.toggle("Log-scale counts", value=bool(view.log_scale), key="lab_log_scale")
    update_view(source=source, layer=name, channel=channel if config.per_channel and info.channels > 1 else None,
                log_scale=log_scale or None)
    analysis = tensor_analysis(str(path), stamp, name, config.to_dict(), channel)
    title = f"{name}" + (f", {noun} {analysis.channel}" if config.per_channel else "")
    st.plotly_chart(lab.histogram_figure(analysis, log_scale, title), key="lab_histogram")
    for note in notes + list(analysis.notes):
        st.caption(note)
    st.markdown("**Every calibrator at these settings** (error over the whole tensor; SQNR: signal to "
                "quantization noise)")
    if config.per_channel and info.channels > 1:
        st.caption(f"Per {noun}, each linear calibrator has one range per {noun}: low and high here span all "
                   f"{info.channels} (the lowest low, the highest high); the histogram's lines are "
                   f"{noun} {analysis.channel}'s. k-means is per tensor: one set of levels for every {noun}.")
    st.dataframe(analysis.table(), hide_index=True, key="lab_calibrator_table",
                 column_config={"low": st.column_config.NumberColumn(format="%.4g"),
                                "high": st.column_config.NumberColumn(format="%.4g"),
                                "MSE": st.column_config.NumberColumn(format="%.3e"),
                                "SQNR (dB)": st.column_config.NumberColumn(format="%.2f"),
                                "clipped %": st.column_config.NumberColumn(format="%.3f"),
                                "time (ms)": st.column_config.NumberColumn(format="%.1f")})


def model_view() -> None:
    split = (manifest.get("split_sizes") or {}).get("test", "the")
    what = ("Accuracy of the Keras model" if manifest.get("has_labels") is not False else
            "Top-1 agreement of the Keras model with its float self (the dataset has no labels)")
    st.markdown(f"{what} on the {split} test samples with every kernel fake-quantized "
                f"by the quantizer above, at each layer's bit width (32 = float). Biases stay float, as "
                f"in TFLite; a kernel followed by batch norm is folded with it first, as TFLite does.")
    default_bits = bits if bits in WEIGHT_BITS and not (kmeans and bits > KMEANS_MAX_BITS) else 8
    table = with_overrides(lab.layer_table(weights, default_bits), view.layer_bits)
    edited = st.data_editor(
        table, hide_index=True, key=f"lab_layer_bits_{default_bits}",
        disabled=["layer", "type", "quantized params", "float params"],
        column_config={"bits": st.column_config.SelectboxColumn(
            "bits", options=list(WEIGHT_BITS), required=True,
            help="This layer's kernel bit width; 32 keeps it float")})
    update_view(layer_bits=layer_overrides(edited, default_bits))
    size = lab.weight_size(edited)
    col_size, col_float, col_ratio = st.columns(3)
    col_size.metric("Weights at these bit widths", f"{size.total_bytes:,} bytes",
                    help="calibrate.weight_bytes of the kernels, plus float32 biases and vectors")
    col_float.metric("All float32", f"{size.float32_bytes:,} bytes")
    col_ratio.metric("Smaller by", f"{size.ratio:.2f}×")
    col_act, col_act_bits = st.columns([2, 1])
    activations = col_act.toggle("Fake-quantize activations too", value=bool(view.activations),
                                 key="lab_activations",
                                 help="The input and every layer's output, per tensor and asymmetric (as "
                                      "TFLite's int8 activations), with ranges the calibrator finds on "
                                      "the calibration split.")
    activation_bits = 8
    if activations:
        activation_bits = col_act_bits.selectbox("Activation bits", SUPPORTED_BITS,
                                                 index=index_of(SUPPORTED_BITS, view.activation_bits,
                                                                SUPPORTED_BITS.index(8)),
                                                 key="lab_activation_bits")
    update_view(activations=activations or None, activation_bits=activation_bits if activations else None)
    try:
        request = lab.FakeQuantRequest(lab.bits_from_table(edited), symmetric=symmetric,
                                       per_channel=per_channel, calibrator=calibrator, percentile=percentile,
                                       method=method, activations=activations,
                                       activation_bits=activation_bits)
    except QuantLabError as exc:
        st.warning(str(exc))
        return
    result = lab.cached_evaluation(CACHE, manifest, request)
    if result is None:
        st.caption("Not evaluated at these settings yet (about a second on a small model, in a worker).")
        worker_button("Evaluate these settings", "lab_evaluate",
                      "Evaluating the fake-quantized model in a worker process...",
                      lambda: lab.evaluate(manifest, CACHE, request))
    rows = int8_rows(str(STORE.path), manifest["model_hash"], manifest["dataset_hash"])
    tiles = lab.model_view_tiles(result, rows.to_dict("records") if len(rows) else [])
    for column, tile in zip(st.columns(max(len(tiles), 1)), tiles):
        column.metric(tile.label, tile.value, delta=tile.delta, help=tile.help)
    if result is not None and result.get("folded_layers"):
        st.caption(f"Folded with their batch norm before quantizing: {', '.join(result['folded_layers'])}.")
    if result is not None and not len(rows):
        st.caption("No converted int8 variant of this model is stored yet: run int8-fallback on the Run "
                   "page to compare the prediction with the real thing.")
    recipe_controls("model", lambda: lab.mixed_precision_recipe(request),
                    "Measure these bit widths as a LiteRT recipe",
                    "Turns the table into a LiteRT Quantizer recipe and measures it as an lq-recipe "
                    "variant of this workload: the real .tflite next to the prediction, also on Compare.")


def recipe_controls(where: str, make_recipe, label: str, help_text: str) -> None:
    """A button that measures the Lab's current choices as an lq-recipe variant, and its result."""
    try:
        recipe = make_recipe()
    except QuantLabError as exc:
        st.caption(f"As a LiteRT recipe: {exc}.")
        return
    for note in recipe.notes:
        st.caption(f"Recipe: {note}.")
    measured = lab.recipe_rows(STORE, manifest, recipe)
    for row in measured:
        st.success(f"Measured as a LiteRT recipe ({recipe.what}): {lab.quality_text(row)}, "
                   f"{row['model_bytes']:,} bytes. It is on the Compare page with the other variants.",
                   icon=":material/check_circle:")
    reason = ("" if CONTEXT.can_run else "This dashboard is read-only.") or \
             ("" if workload.spec else "No stored sweep of this workload to repeat its settings from.")
    if not measured and st.button(label, key=f"lab_run_recipe_{where}", disabled=bool(reason),
                                  help=reason or help_text, icon=":material/science:"):
        try:
            st.session_state["lab_recipe"] = lab.start_recipe_sweep(workload, recipe, STORE, CACHE,
                                                                    CONTEXT.sweep_options)
            st.session_state["lab_recipe_shown"] = False
        except QuantLabError as exc:
            st.error(str(exc))
    sweep = st.session_state.get("lab_recipe")
    if sweep is not None and sweep.recipe == recipe and not measured:
        st.fragment(recipe_status, run_every=None if sweep.finished else 2.0)()


def recipe_status() -> None:
    sweep = st.session_state.get("lab_recipe")
    st.markdown(f"**LiteRT recipe ({sweep.recipe.what})**: {sweep.summary()}")
    for row in sweep.rows():
        if row.get("error"):
            st.error(f"{row.get('technique')}: {row['error']}")
    if sweep.finished and not st.session_state.get("lab_recipe_shown"):
        st.session_state["lab_recipe_shown"] = True   # redraw the whole page once with the new row
        st.rerun(scope="app")


def sensitivity_view() -> None:
    st.caption("Always int8, as TFLite's converter quantizes: the quantizer settings above do not apply here.")
    st.markdown("Per layer, the error TFLite's int8 conversion (float fallback) adds to the layer's output: "
                "RMSE against the float model divided by the output's quantization scale, measured by "
                "TFLite's QuantizationDebugger on the calibration split. Pure rounding gives about 0.29 "
                "(1/√12); more means clipping or accumulated error.")
    result = lab.cached_sensitivity(CACHE, manifest)
    if result is None:
        worker_button("Measure per-layer sensitivity", "lab_sensitivity",
                      "Running TFLite's quantization debugger in a worker process...",
                      lambda: lab.compute_sensitivity(manifest, CACHE))
        return
    ranked = len(result.get("ranking", []))
    keep_float = int(st.number_input("Keep the N most sensitive layers in float", min_value=0,
                                     max_value=max(ranked, 1),
                                     value=min(2 if view.keep_float is None else view.keep_float, ranked),
                                     step=1, key="lab_keep_float"))
    update_view(keep_float=keep_float)
    frame = lab.sensitivity_frame(result, keep_float)
    st.plotly_chart(lab.sensitivity_figure(frame), key="lab_sensitivity_chart")
    st.caption(f"Red: the {keep_float} most sensitive layer(s), which int8-selective(keep_float={keep_float}) "
               f"keeps in float. Measured on {result.get('calibration_samples')} calibration samples.")
    st.dataframe(frame.sort_values("rank", na_position="last"), hide_index=True, key="lab_sensitivity_table",
                 placeholder=lab.MISSING,
                 column_config={"rmse/scale": st.column_config.NumberColumn(format="%.3f"),
                                "scale": st.column_config.NumberColumn(format="%.3g")})
    reason = ("" if CONTEXT.can_run else "This dashboard is read-only.") or \
             ("" if workload.spec else "No stored sweep of this workload to repeat its settings from.")
    if st.button(f"Measure int8 with the {keep_float} most sensitive layer(s) in float", key="lab_run_selective",
                 disabled=bool(reason), help=reason or "Runs int8-selective as a sweep with this workload's "
                                                       "settings; the result appears on the Compare page."):
        try:
            st.session_state["lab_selective"] = lab.start_selective_sweep(
                workload, keep_float, STORE, CACHE, CONTEXT.sweep_options)
            st.session_state["lab_selective_shown"] = False
        except QuantLabError as exc:
            st.error(str(exc))
    sweep = st.session_state.get("lab_selective")
    if sweep is not None:
        st.fragment(selective_status, run_every=None if sweep.finished else 2.0)()
    recipe_controls("sensitivity", lambda: lab.keep_float_recipe(result, keep_float),
                    f"Measure with the LiteRT Quantizer: static int8, {keep_float} layer(s) float",
                    "The same layers kept float in a LiteRT Quantizer recipe (static w8a8 elsewhere), "
                    "measured as an lq-recipe variant of this workload.")


def selective_status() -> None:
    sweep = st.session_state.get("lab_selective")
    st.markdown(f"**int8-selective (keep_float={sweep.keep_float})**: {sweep.summary()}")
    for row in sweep.rows():
        if row.get("error"):
            st.error(f"{row.get('technique')}: {row['error']}")
        else:
            st.success(f"{row.get('technique')} (keep_float={sweep.keep_float}): {lab.quality_text(row)}, "
                       f"{row.get('float_ops')} of {row.get('total_ops')} ops float. It is on the Compare "
                       f"page with the other variants.")
    if sweep.finished and not st.session_state.get("lab_selective_shown"):
        st.session_state["lab_selective_shown"] = True   # redraw the whole page once with the new row
        int8_rows.clear()
        st.rerun(scope="app")


with tensor_tab:
    tensor_view()
with model_tab:
    model_view()
with sensitivity_tab:
    sensitivity_view()

view = current_view()
write_view(view, SHARED_FIELDS)
with st.expander("Share this view"):
    share_controls(view.with_(page="lab"), ("page", *SHARED_FIELDS), key="lab_share")
