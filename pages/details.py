"""Variant details: one stored result, from its ops and I/O types to where its numbers came from."""

from pathlib import Path

import streamlit as st

from quantlab.charts import quantizer_validation_figure
from quantlab.techniques import get_technique
from quantlab.errors import QuantLabError
from quantlab.analysis import NO_LABELS_NOTE
from quantlab.ui_state import (MISSING, AppSettings, busy_cpu_warning, declared_params,
                               downloadable_artifact, error_text, extra_details, float_kernels_summary,
                               float_ops_summary, format_bytes, has_no_labels, interval_text, is_fine_tuned,
                               latency_histogram, latency_sample_note, latency_shape, latency_summary,
                               preparation_notes, number_text, ops_table, provenance_table,
                               quantizer_report, reference_lines, row_frame, row_label, tensor_table,
                               uncertainty_lines, weight_granularity_summary)
from ui import store_reads
from ui.share import share_controls, sync_view, update_view, write_view
from ui.entry import run_through_app

run_through_app()  # first, before anything is drawn

RECENT_ROWS = 200

settings = AppSettings.from_env()
store = settings.store()
view = sync_view("details")


def choose_row():
    """The row named in the link, or one of the recent rows."""
    recent = store_reads.recent_results(store, RECENT_ROWS)
    labels = {r["row_id"]: row_label(r) for r in recent.to_dict(orient="records")} if not recent.empty else {}
    if view.row and view.row not in labels:
        linked = store_reads.row(store, view.row)
        if linked is None:
            st.warning(f"No stored result has the id {view.row}; pick one below.", icon=":material/search_off:")
        else:
            labels = {view.row: row_label(linked), **labels}
    if not labels:
        return None
    ids = list(labels)
    return st.selectbox("Result", ids, index=ids.index(view.row) if view.row in ids else 0,
                        format_func=labels.get, key="details_row",
                        help=f"The {RECENT_ROWS} newest results, newest first")


def technique_label(technique_id):
    try:
        return get_technique(technique_id).label
    except QuantLabError:
        return technique_id


def headline(row):
    st.subheader(f"{technique_label(row['technique'])} · {row['model_name']} on {row['dataset_name']}")
    params = ", ".join(f"{k}={v}" for k, v in declared_params(row).items())
    st.caption(f"Technique `{row['technique']}` ({row['family']})" + (f", parameters {params}" if params else "")
               + f"; recorded {row['recorded_at']}" + ("; reused from the cache" if row["cached"] else ""))
    if row.get("error"):
        st.error(f"This variant failed: {row['error']}", icon=":material/error:")
    for note in preparation_notes(row):
        st.caption(note)


def key_numbers(row):
    columns = st.columns(6)
    columns[0].metric("Size", format_bytes(row.get("model_bytes")) or "n/a")
    columns[1].metric("Gzip size", format_bytes(row.get("gzip_bytes")) or "n/a")
    for column, name, key, digits, style in ((columns[2], "Accuracy", "accuracy", 4, "f"),
                                             (columns[3], "Agreement", "agreement", 4, "f"),
                                             (columns[4], "SQNR (dB)", "sqnr_db", 1, "f"),
                                             (columns[5], "p50 latency (ms)", "latency_p50_ms", 3, "g")):
        column.metric(name, number_text(row, key, digits, style))
    for line in uncertainty_lines(row):
        st.caption(line)
    for line in reference_lines(store, row):
        st.markdown(f"**{line.split('?')[0]}?**{line.split('?', 1)[1]}")
    if warning := busy_cpu_warning(row):
        st.warning(warning, icon=":material/speed:")
    if has_no_labels(row):
        note = row["details"].get("label_note")
        st.caption(f"{NO_LABELS_NOTE[:1].upper()}{NO_LABELS_NOTE[1:]}" + (f" ({note})." if note else "."))


def tensors_and_ops(row):
    st.markdown("#### Inputs and outputs")
    tensors = tensor_table(row["details"])
    if tensors.empty:
        st.caption(f"Input type {row.get('input_dtype') or 'n/a'}, output type {row.get('output_dtype') or 'n/a'}"
                   " (no tensor inspection recorded: a Keras model is not a .tflite file).")
    else:
        st.caption("Integer inputs must be quantized with q = round(x / scale) + zero point; integer outputs "
                   "dequantized with x = (q - zero point) * scale.")
        st.dataframe(tensors, hide_index=True, placeholder=MISSING)
    st.markdown("#### Ops")
    ops = ops_table(row["details"])
    st.caption(float_ops_summary(row, ops))
    if weights := weight_granularity_summary(row["details"]):
        st.caption(weights)
    if float_kernels := float_kernels_summary(row):
        st.info(float_kernels, icon=":material/info:")
    if not ops.empty:
        st.dataframe(ops, hide_index=True, placeholder=MISSING)


def latency(row):
    st.markdown("#### Latency")
    samples = row["details"].get("latency_samples_ms") or []
    st.caption(latency_summary(row))
    if interval := interval_text(row, "latency_p50_ci_low_ms", "latency_p50_ci_high_ms", 4, " ms"):
        st.caption(f"p50 {interval} (bootstrap of the timed runs: how far the median could move "
                   f"if the same runs were repeated)")
    if shape := latency_shape(row):
        st.warning(shape, icon=":material/bar_chart:")
    if samples:
        st.plotly_chart(latency_histogram(samples, row), key="details_latency_histogram")
        st.caption(latency_sample_note(samples, row))
    else:
        st.caption("No per-run latencies were recorded for this variant.")
    st.caption(f"Method: {row.get('latency_method') or 'not recorded'}")
    if note := row["details"].get("latency_note"):
        st.warning(f"Latency {note}.")


def fine_tuning(row):
    extra = extra_details(row)
    if not extra:
        if is_fine_tuned(row):
            st.caption("This technique re-trains the model, but recorded no fine-tuning statistics.")
        return
    st.markdown("#### Fine-tuning" if is_fine_tuned(row) else "#### What the technique recorded")
    st.json(extra, expanded=1)


def litert_quantizer(row):
    report = quantizer_report(row)
    if report is None:
        return
    st.markdown(f"#### LiteRT Quantizer {report.version}")
    if report.warning:
        st.warning(report.warning, icon=":material/warning:")
    st.caption(f"The recipe {report.summary}. Tensor types in the file: {report.tensor_types}.")
    for note in report.notes:
        st.caption(note)
    columns = st.container(key="stack_details_lq").columns([1, 2])   # stacked on a narrow window
    columns[0].dataframe(report.coverage, hide_index=True, key="details_lq_coverage")
    columns[0].download_button("Download the recipe (.json)", data=report.recipe_json,
                               file_name=f"{row['model_name']}-{row['technique']}-recipe.json".replace(" ", "_"),
                               mime="application/json", key="details_lq_recipe", on_click="ignore",
                               icon=":material/download:")
    if report.validation:
        columns[1].plotly_chart(quantizer_validation_figure(report.validation), key="details_lq_validation")
        columns[1].caption("The quantizer's own check: each activation of the quantized model against the "
                           "float model's, on the first test samples (SNR in dB; MSE and cosine on hover).")


def provenance(row):
    st.markdown("#### Provenance")
    table = provenance_table(row)
    st.dataframe(table, hide_index=True, key="details_provenance",
                 height=38 + 35 * len(table))  # every line shown: no scroll inside the table


def download(row):
    path = downloadable_artifact(row, settings.cache_dir)
    if path is None:
        st.caption("No model file to download (the variant failed, or its file is no longer in the cache).")
        return
    what = "the .tflite file" if path.suffix == ".tflite" else f"the {path.suffix} model"
    st.download_button(f"Download {what} ({format_bytes(path.stat().st_size)})", data=path.read_bytes,
                       file_name=f"{row['model_name']}-{row['technique']}{path.suffix}".replace(" ", "_"),
                       mime="application/octet-stream", key="details_download", on_click="ignore",
                       icon=":material/download:")


# --- the page -------------------------------------------------------------------------------------

st.title("Variant details")
st.caption("Everything stored about one converted model: its tensors and ops, sizes, latency spread, "
           "and the versions and hashes that produced it.")

row_id = choose_row()
record = store_reads.row(store, row_id) if row_id else None
if record is None:
    st.info("No results are stored yet: run a sweep first.", icon=":material/info:")
    if (Path(__file__).parent / "run.py").exists():
        st.page_link("pages/run.py", label="Run a sweep", icon=":material/play_circle:")
else:
    view = update_view(row=row_id, model=record["model_name"], dataset=record["dataset_name"])
    headline(record)
    key_numbers(record)
    download(record)
    if not error_text(record):  # a failed variant has no file, ops or timings to show
        tensors_and_ops(record)
        latency(record)
    fine_tuning(record)
    litert_quantizer(record)
    provenance(record)
    with st.expander("Share this result", key="details_share_expander"):
        share_controls(view, ("row",), frame=row_frame(store, row_id),
                       figures=[latency_histogram(record["details"]["latency_samples_ms"], record)]
                       if record["details"].get("latency_samples_ms") else [],
                       title=f"QuantLab: {record['technique']} on {record['model_name']}", key="details_share")
write_view(view, ("row",))
