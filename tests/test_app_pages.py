"""The Run and Variant details pages, headless through Streamlit's AppTest (app.py as the entry point).

The engine behind them is tested elsewhere (tests/test_sweeps.py runs real sweeps); here the store
holds hand-made rows, and where a sweep must run, a stand-in `run_sweep` plays its events.
"""

import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from quantlab import sweeps
from quantlab.errors import QuantLabError
from quantlab.runner import SweepReport
from quantlab.store import Store
from quantlab.techniques import all_techniques
from quantlab.ui_state import AppSettings, blame_upload, downloadable_artifact, save_upload

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 30


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty store and cache for the app, and no sweeps left over from other tests."""
    monkeypatch.setenv("QUANTLAB_DB", str(tmp_path / "q.duckdb"))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    for name in ("QUANTLAB_DEMO", "QUANTLAB_READ_ONLY", "QUANTLAB_UPLOADS", "QUANTLAB_MAX_UPLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sweeps, "_DEFAULT", sweeps.SweepManager())
    return tmp_path


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at.run()


def run_float32_sweep() -> AppTest:
    """The app with only float32 ticked on the Run page, after a click on Run sweep."""
    at = run_app()
    for checkbox in at.checkbox:
        if checkbox.key and checkbox.key.startswith("run_technique_") and not checkbox.disabled:
            checkbox.set_value(checkbox.key == "run_technique_float32")
    at.run()
    return at.button(key="run_start").click().run()


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def labels(elements) -> list[str]:
    return [e.label for e in elements]


def add_row(tmp_path, technique="int8-only", artifact_inside_cache=True, **overrides) -> str:
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    folder = tmp_path / "cache" / "artifacts" if artifact_inside_cache else tmp_path / "elsewhere"
    folder.mkdir(parents=True, exist_ok=True)
    artifact = folder / f"{technique}.tflite"
    artifact.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(100))
    row = {
        "sweep_id": "s1", "result_key": f"k-{technique}", "cached": False, "model_name": "seed-cnn",
        "model_hash": "mh123", "dataset_name": "digits-28", "dataset_hash": "dh456",
        "technique": technique, "family": "ptq", "params": {}, "model_bytes": 9_876, "gzip_bytes": 8_000,
        "accuracy": 0.9512, "agreement": 0.99, "sqnr_db": 31.5, "latency_p50_ms": 0.123,
        "latency_p90_ms": 0.2, "latency_mean_ms": 0.13, "latency_std_ms": 0.01, "latency_runs": 60,
        "num_threads": 1, "latency_method": "one invoke() at batch 1, timed with perf_counter",
        "input_dtype": "int8", "output_dtype": "int8", "float_ops": 1, "total_ops": 3,
        "artifact_path": str(artifact),
        "provenance": {"versions": {"tensorflow": "2.21.0"}, "cpu_model": "Test CPU", "num_threads": 1,
                       "engine_version": "1"},
        "details": {"inspection": {
            "inputs": [{"name": "input", "dtype": "int8", "shape": [1, 28, 28], "scale": 0.0039,
                        "zero_point": -128}],
            "outputs": [{"name": "logits", "dtype": "int8", "shape": [1, 10], "scale": 0.1, "zero_point": 5}],
            "ops": [{"index": 0, "op_name": "CONV_2D", "input_dtypes": ["int8"], "output_dtypes": ["int8"],
                     "computes_in_float": False, "weight_scales": 1},
                    {"index": 1, "op_name": "SOFTMAX_FLOAT_OP", "input_dtypes": ["float32"],
                     "output_dtypes": ["float32"], "computes_in_float": True},
                    {"index": 2, "op_name": "QUANTIZE", "input_dtypes": ["float32"],
                     "output_dtypes": ["int8"], "computes_in_float": False}],
            "weight_granularity": "per-tensor"},
            "latency_samples_ms": [0.12, 0.13, 0.12, 0.2, 0.11] * 10},
    }
    row.update(overrides)
    return store.insert_result(row)


# --- Run --------------------------------------------------------------------------------------------


def test_an_empty_store_opens_on_run_with_the_default_ready(env):
    at = run_app()
    assert not at.exception
    assert [t.value for t in at.title] == ["Run a sweep"]
    assert "seed-cnn" in texts(at.info) and "digits-28" in texts(at.info)
    assert at.selectbox(key="run_model").value == "seed-cnn"
    assert at.selectbox(key="run_dataset").value == "digits-28"
    run = at.button(key="run_start")
    assert run.label == "Run sweep" and not run.disabled
    assert at.checkbox(key="run_technique_dynamic").value is True
    assert at.query_params["model"] == "seed-cnn"


def test_the_technique_list_shows_every_registered_technique(env):
    at = run_app()
    shown = " ".join(labels(at.checkbox))
    for technique in all_techniques():
        assert f"`{technique.id}`" in shown, technique.id
    # one that cannot start from a Keras model is shown, disabled, with the reason
    tflite_only = [t for t in all_techniques() if "keras" not in t.sources]
    for technique in tflite_only:
        box = at.checkbox(key=f"run_technique_{technique.id}_unavailable")
        assert box.disabled and not box.value
    if tflite_only:
        assert "Not for this model" in texts(at.caption)


def test_a_link_naming_a_model_and_techniques_preselects_them(env):
    at = run_app(model="mlp", dataset="digits", techniques="float16,dynamic")
    assert at.selectbox(key="run_model").value == "mlp"
    assert at.selectbox(key="run_dataset").value == "digits"
    assert at.checkbox(key="run_technique_float16").value and at.checkbox(key="run_technique_dynamic").value
    assert not at.checkbox(key="run_technique_float32").value
    at.checkbox(key="run_technique_float32").check().run()  # the user's changes then win
    assert at.checkbox(key="run_technique_float32").value
    assert at.query_params["techniques"] == "float32,dynamic,float16"


def test_every_declared_parameter_gets_a_widget(env):
    at = run_app()
    keys = {w.key for w in [*at.selectbox, *at.number_input, *at.checkbox, *at.text_area] if w.key}
    for technique in all_techniques():
        if "keras" in technique.sources:
            for param in technique.params:
                assert f"run_param_{technique.id}_{param.name}" in keys


def test_a_bad_model_upload_is_explained_in_words(env):
    at = run_app()
    at.radio(key="run_model_source").set_value("Upload a file").run()
    at.file_uploader(key="run_model_file").set_value(("model.tflite", b"this is not a model", "application/octet-stream"))
    at.run()
    assert not at.exception
    assert "model.tflite" in texts(at.error) and "not a TensorFlow Lite file" in texts(at.error)
    assert at.button(key="run_start").disabled


@pytest.mark.parametrize("name, words", [
    ("model.pt", "model.pt is not a model file QuantLab reads; upload .keras, .h5, .hdf5, .zip, .tflite"),
    ("weights.hdf5", "weights.hdf5 is not an HDF5 file"),
])
def test_any_refused_model_upload_says_why_next_to_the_uploader_once(env, name, words):
    at = run_app()
    at.radio(key="run_model_source").set_value("Upload a file").run()
    assert list(at.file_uploader(key="run_model_file").proto.type) == []  # the browser refuses nothing
    at.file_uploader(key="run_model_file").set_value((name, b"not a model", "application/octet-stream"))
    at.run()
    assert not at.exception
    assert texts(at.error).startswith(words)
    assert texts(at.error).count(name) == 1  # "bad.h5: bad.h5 is not..." no more
    assert at.button(key="run_start").disabled


def test_a_truncated_h5_is_refused_at_upload_not_after_run(env, tmp_path):
    from tests import model_zoo as zoo

    whole = zoo.save_h5(zoo.conv1d_model(), tmp_path, "conv1d").read_bytes()
    at = run_app()
    at.radio(key="run_model_source").set_value("Upload a file").run()
    at.file_uploader(key="run_model_file").set_value(("half.h5", whole[: len(whole) // 2],
                                                       "application/octet-stream"))
    at.run()
    assert not at.exception
    assert texts(at.error).startswith("half.h5 is a damaged or truncated HDF5 file")
    assert at.button(key="run_start").disabled
    assert "Run waits for a model the checks above accept." in texts(at.caption)


def test_a_dataset_that_does_not_fit_the_uploaded_model_is_refused_before_run(env, tmp_path):
    from tests import model_zoo as zoo

    model = zoo.save_h5(zoo.conv1d_model(), tmp_path, "conv1d")  # expects (12, 4)
    at = run_app()
    at.radio(key="run_model_source").set_value("Upload a file").run()
    at.file_uploader(key="run_model_file").set_value((model.name, model.read_bytes(), "application/octet-stream"))
    at.radio(key="run_dataset_source").set_value("Upload a file").run()
    for images, refused in ((np.zeros((4, 16, 16), np.float32), True), (np.zeros((4, 12, 4), np.float32), False)):
        buffer = io.BytesIO()
        np.savez(buffer, x_test=images, y_test=np.arange(4) % 3)
        at.file_uploader(key="run_dataset_file").set_value(("data.npz", buffer.getvalue(), "application/zip"))
        at.run()
        assert not at.exception
        said = "x_test has samples of shape (16, 16) but the model expects (12, 4)" in texts(at.error)
        assert said is refused and at.button(key="run_start").disabled is refused
        # the Run bar waits for the dataset instead of estimating a sweep that cannot start
        waits = "Run waits for a dataset the checks above accept." in texts(at.caption)
        assert waits is refused and ("Estimated from" in texts(at.caption)
                                     or "No earlier rows" in texts(at.caption)) is not refused


def test_a_dataset_of_the_wrong_kind_is_refused_in_words(env):
    at = run_app()
    at.radio(key="run_dataset_source").set_value("Upload a file").run()
    at.file_uploader(key="run_dataset_file").set_value(("data.csv", b"1,2,3", "text/csv"))
    at.run()
    assert "data.csv is not a .npz file" in texts(at.error)


def test_a_bad_dataset_upload_is_explained_in_words(env):
    at = run_app()
    at.radio(key="run_dataset_source").set_value("Upload a file").run()
    buffer = io.BytesIO()
    np.savez(buffer, y_test=np.zeros(4, np.int64))  # labels without samples
    at.file_uploader(key="run_dataset_file").set_value(("data.npz", buffer.getvalue(), "application/zip"))
    at.run()
    assert not at.exception
    assert "x_test" in texts(at.error)
    assert "Traceback" not in texts(at.error)
    assert at.button(key="run_start").disabled


def test_a_good_dataset_upload_is_ready_to_run(env):
    at = run_app()
    at.radio(key="run_dataset_source").set_value("Upload a file").run()
    buffer = io.BytesIO()
    np.savez(buffer, x_test=np.zeros((4, 8, 8), np.float32), y_test=np.arange(4))
    at.file_uploader(key="run_dataset_file").set_value(("my data.npz", buffer.getvalue(), "application/zip"))
    at.run()
    assert not at.exception and not at.error
    assert "Using **my data.npz**" in texts(at.caption)
    assert not at.button(key="run_start").disabled
    assert at.query_params["dataset"] == "my data"  # the name the store will record
    assert list((env / "cache" / "uploads").glob("*/my data.npz"))


@pytest.mark.parametrize("keras3", [True, False])
def test_the_keras3_note_shows_for_a_keras3_file_only(env, tmp_path, keras3):
    from tests import model_zoo as zoo

    path = (zoo.save_keras(zoo.keras3_model(False), tmp_path, "k3") if keras3
            else zoo.save_h5(zoo.conv1d_model(), tmp_path, "tf_keras"))
    at = run_app()
    at.radio(key="run_model_source").set_value("Upload a file").run()
    at.file_uploader(key="run_model_file").set_value((path.name, path.read_bytes(), "application/octet-stream"))
    at.run()
    assert not at.exception and f"Using **{path.name}**" in texts(at.caption)
    assert ("rebuilt in tf_keras" in texts(at.caption)) is keras3


def test_read_only_mode_says_so_and_runs_nothing(env, monkeypatch):
    monkeypatch.setenv("QUANTLAB_READ_ONLY", "1")
    at = run_app()
    assert at.button(key="run_start").disabled
    assert "Read-only" in texts(at.info)


def test_a_running_sweep_shows_each_variant_and_survives_a_page_switch(env, monkeypatch):
    release = threading.Event()

    def play(spec, *, store, cache, on_event, options, cancel):
        rows = [{"row_id": "a" * 32, "technique": "float32", "params": {}, "cached": True, "error": None,
                 "model_bytes": 1000, "accuracy": 0.9, "model_name": "seed-cnn", "dataset_name": "digits-28"},
                {"row_id": "b" * 32, "technique": "dynamic", "params": {}, "cached": False,
                 "error": "conversion crashed; try another mode", "model_name": "seed-cnn",
                 "dataset_name": "digits-28"}]
        on_event({"type": "sweep-start", "sweep_id": "s1", "total": len(spec.techniques)})
        on_event({"type": "variant-done", "technique": "float32", "cached": True, "row": rows[0], "done": 1,
                  "total": len(spec.techniques)})
        on_event({"type": "variant-failed", "technique": "dynamic", "cached": False, "row": rows[1], "done": 2,
                  "total": len(spec.techniques)})
        release.wait(20)
        on_event({"type": "sweep-done", "sweep_id": "s1", "rows": 2})
        return SweepReport("s1", rows)

    monkeypatch.setattr(sweeps, "run_sweep", play)
    at = run_app()
    for checkbox in at.checkbox:
        if checkbox.key and checkbox.key.startswith("run_technique_") and not checkbox.disabled:
            checkbox.set_value(checkbox.key in ("run_technique_float32", "run_technique_dynamic"))
    at.run()
    at.button(key="run_start").click().run()
    handle = sweeps.list_sweeps()[0]
    for _ in range(50):
        if handle.snapshot().done == 2:
            break
        threading.Event().wait(0.1)
    at.run()
    assert not at.exception
    assert "running: 2 of 2 variants (1 cached, 1 failed)" in " ".join(s.label for s in at.status)
    table = at.dataframe[0].value
    assert list(table["result"]) == ["cached", "failed: conversion crashed; try another mode"]
    assert "dynamic failed: conversion crashed; try another mode" in texts(at.error)
    assert at.button(key=f"run_cancel_{handle.id}")

    at.switch_page("pages/details.py").run()
    at.switch_page("pages/run.py").run()
    assert "2 of 2 variants" in " ".join(s.label for s in at.status)  # shown again on return

    release.set()
    assert handle.wait(10)
    at.run()
    assert "done: 2 of 2 variants" in " ".join(s.label for s in at.status)


def test_progress_says_running_everywhere_while_it_runs_and_counts_seconds_while_preparing(env, monkeypatch):
    prepared, release = threading.Event(), threading.Event()

    def play(spec, *, store, cache, on_event, options, cancel):
        row = {"row_id": "c" * 32, "technique": "float32", "params": {}, "cached": False, "error": None,
               "model_bytes": 1000, "accuracy": 0.9, "model_name": "seed-cnn", "dataset_name": "digits-28"}
        on_event({"type": "prepare", "message": sweeps.PREPARING})
        on_event({"type": "progress", "technique": None, "stage": "train", "epoch": 1, "epochs": 8})
        prepared.wait(20)
        on_event({"type": "sweep-start", "sweep_id": "s2", "total": 1})
        on_event({"type": "variant-done", "technique": "float32", "cached": False, "row": row, "done": 1,
                  "total": 1})
        release.wait(20)
        return SweepReport("s2", [row])

    monkeypatch.setattr(sweeps, "run_sweep", play)
    at = run_float32_sweep()
    handle = sweeps.list_sweeps()[0]
    threading.Event().wait(1.2)
    at.run()
    status = at.status[0]
    assert status.state == "running", status.label          # not the done check
    assert "preparing the model and the dataset (train epoch 1/8)" in status.label
    assert not at.get("progress")                              # no empty bar while preparing
    assert re.search(r"[1-9]\d* s so far \(then 1 variant\)", texts(at.info))
    assert "No results yet" not in texts(at.info)
    assert "preparing the model and the dataset" in texts(run_app().sidebar.caption)   # another visitor's sidebar

    at.switch_page("pages/compare.py").run()                # nothing stored yet: it says a sweep runs
    assert "The first sweep is running" in texts(at.info)

    prepared.set()
    for _ in range(50):
        if handle.snapshot().done == 1:
            break
        threading.Event().wait(0.1)
    at.switch_page("pages/run.py").run()
    status = at.status[0]
    assert status.state == "running" and "running: 1 of 1 variants" in status.label
    assert at.get("progress")[0].proto.text == "1 of 1 variants finished"
    assert "running: 1 of 1 variants" in texts(run_app().sidebar.caption)   # the sidebar in step

    release.set()
    assert handle.wait(10)
    at.run()
    assert at.status[0].state == "complete" and "done: 1 of 1" in at.status[0].label


# --- Variant details -------------------------------------------------------------------------------


def test_a_stored_row_renders_in_details(env):
    row_id = add_row(env)
    at = run_app(page="details")
    assert not at.exception
    assert [t.value for t in at.title] == ["Variant details"]
    assert "Integer only (int8 I/O)" in texts(at.subheader)
    tensors = at.dataframe[0].value
    assert list(tensors["scale"]) == ["0.0039", "0.1"] and list(tensors["zero point"]) == ["-128", "5"]
    ops = at.dataframe[1].value
    assert list(ops.loc[ops["computes in float"], "op"]) == ["SOFTMAX_FLOAT_OP"]
    assert "1 of 3 ops compute in float: SOFTMAX_FLOAT_OP." in texts(at.caption)
    assert list(ops["weight scales"].fillna(0)) == [1, 0, 0]
    assert "quantized per tensor (one scale per kernel)" in texts(at.caption)
    assert "Method: one invoke() at batch 1, timed with perf_counter" in texts(at.caption)
    provenance = at.dataframe[2].value
    assert "Test CPU" in set(provenance["value"]) and "version: tensorflow" in set(provenance["field"])
    assert at.get("plotly_chart")
    assert at.download_button(key="details_download").label.startswith("Download the .tflite file")
    assert at.query_params["row"] == row_id


def test_a_latency_timed_without_the_shared_lock_is_flagged(env):
    add_row(env, details={"latency_note": "timed without the workers' shared lock (not free after 300 s): "
                                          "another measurement may have overlapped",
                          "latency_samples_ms": [0.1] * 50})
    at = run_app(page="details")
    assert not at.exception
    assert [w.value for w in at.warning] == ["Latency timed without the workers' shared lock (not free after "
                                             "300 s): another measurement may have overlapped."]


def test_the_row_query_parameter_selects_the_row(env):
    first = add_row(env, technique="dynamic")
    add_row(env, technique="float16")  # newer: the default without a parameter
    assert run_app(page="details").selectbox(key="details_row").value != first
    at = run_app(page="details", row=first)
    assert at.selectbox(key="details_row").value == first
    assert "Dynamic range" in texts(at.subheader)


def test_an_unknown_row_is_said_not_to_exist(env):
    add_row(env)
    at = run_app(page="details", row="0" * 32)
    assert not at.exception
    assert "No stored result has the id" in texts(at.warning)


def test_no_download_for_a_file_outside_the_cache(env):
    add_row(env, artifact_inside_cache=False)
    at = run_app(page="details")
    assert "details_download" not in [button.key for button in at.download_button]
    assert "No model file to download" in texts(at.caption)


def test_a_failed_row_says_why(env):
    add_row(env, error="int8-only: no int8 kernel for op FOO; use int8-fallback", details={},
            artifact_path=None)
    at = run_app(page="details")
    assert not at.exception
    assert "This variant failed: int8-only: no int8 kernel" in texts(at.error)


def test_uploads_can_be_turned_off(env, monkeypatch):
    monkeypatch.setenv("QUANTLAB_UPLOADS", "0")
    at = run_app()
    assert at.radio(key="run_model_source").options == ["Built-in"]
    assert "Uploads are turned off" in texts(at.info)


# --- the helpers behind the pages ----------------------------------------------------------------


def test_settings_come_from_the_environment():
    settings = AppSettings.from_env({"QUANTLAB_CACHE": "/data/c", "QUANTLAB_DEMO": "1",
                                     "QUANTLAB_READ_ONLY": "yes", "QUANTLAB_UPLOADS": "0",
                                     "QUANTLAB_MAX_SWEEPS": "two"})
    assert settings.db_path == Path("/data/c/quantlab.duckdb") and settings.cache_dir == Path("/data/c")
    assert settings.demo and settings.read_only and not settings.uploads_enabled and not settings.can_run
    assert settings.max_upload_mb == 20 and settings.max_concurrent == 1
    assert "QUANTLAB_MAX_SWEEPS='two'" in settings.notes[0]
    assert settings.sweep_options().limits.task_timeout_seconds
    assert AppSettings.from_env({}) == AppSettings()


def test_an_upload_is_kept_under_the_cache_whatever_its_name(tmp_path):
    path = save_upload(b"data", "../../etc/passwd.npz", tmp_path / "cache")
    assert path.read_bytes() == b"data"
    assert path.parent.parent == tmp_path / "cache" / "uploads" and path.name == "passwd.npz"
    assert save_upload(b"data", "x.npz", tmp_path / "cache").parent == path.parent  # by content


def test_only_files_inside_the_cache_can_be_downloaded(tmp_path):
    cache = tmp_path / "cache"
    inside = cache / "artifacts" / "a.tflite"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    outside = tmp_path / "secret.tflite"
    outside.write_bytes(b"x")
    link = cache / "artifacts" / "link.tflite"
    link.symlink_to(outside)
    assert downloadable_artifact({"artifact_path": str(inside)}, cache) == inside.resolve()
    assert downloadable_artifact({"artifact_path": str(outside)}, cache) is None
    assert downloadable_artifact({"artifact_path": str(link)}, cache) is None
    assert downloadable_artifact({"artifact_path": str(cache / "artifacts" / ".." / ".." / "secret.tflite")},
                                 cache) is None
    assert downloadable_artifact({"artifact_path": str(cache / "missing.tflite")}, cache) is None
    assert downloadable_artifact({"artifact_path": None}, cache) is None


def test_a_sweep_error_is_put_next_to_the_upload_it_concerns():
    assert blame_upload("x.npz is missing y_test", True, True) == "dataset"
    assert blame_upload("model.keras uses a Lambda layer", True, True) == "model"
    assert blame_upload("anything", False, True) == "dataset"
    assert blame_upload("anything", False, False) is None


def test_latency_histogram_keeps_a_rare_slow_run_from_squeezing_the_rest():
    from quantlab.ui_state import latency_histogram

    samples = [0.05 + 0.001 * (i % 10) for i in range(199)] + [4.0]
    figure = latency_histogram(samples, {"latency_p50_ms": 0.055, "latency_p90_ms": 0.059})
    assert max(figure.data[0].x) < 0.1
    assert "1 of the 200 drawn runs above" in figure.layout.title.text
    p50, p90 = figure.layout.annotations
    assert (p50.text, p90.text) == ("p50 0.055 ms", "p90 0.059 ms")
    assert (p50.xanchor, p90.xanchor) == ("right", "left")  # either side of its line: never on top of each other


def test_the_latency_caption_says_how_the_drawn_runs_were_sampled():
    from quantlab.ui_state import latency_sample_note

    assert latency_sample_note([0.1] * 1000, {"latency_runs": 49_045}) == (
        "1,000 of the 49,045 timed runs are drawn, evenly spaced in time order (the p50 and p90 are of "
        "every run).")
    assert latency_sample_note([0.1] * 60, {"latency_runs": 60}) == "All 60 timed runs are drawn."


def test_details_show_only_the_parameters_a_technique_has():
    from quantlab.ui_state import declared_params

    assert declared_params({"technique": "float16", "params": {"weights": "per-channel"}}) == {}
    assert declared_params({"technique": "int8-only", "params": {"weights": "per-tensor"}}) == {
        "weights": "per-tensor"}


def test_what_a_float16_row_recorded_never_shows_a_weights_granularity():
    from quantlab.ui_state import extra_details

    # As rows stored before float16 stopped recording it: the parameter float16 does not have is left out,
    # and the busy-CPU share is shown by its own warning, not as something the technique recorded.
    old_float16 = {"technique": "float16", "details": {"conversion": "float16", "weights": "per-channel",
                                                         "latency_others_cpu_share": 0.5}}
    assert extra_details(old_float16) == {}
    int8 = {"technique": "int8-only", "details": {"conversion": "int8-only", "weights": "per-tensor"}}
    assert extra_details(int8) == {"weights": "per-tensor"}


def kernel_row(technique, *kernels, conversion=None):
    ops = [{"index": i, "op_name": "FULLY_CONNECTED", "kernel_dtype": dtype, "kernel_values": values}
           for i, (dtype, values) in enumerate(kernels)]
    return {"technique": technique, "details": {"inspection": {"ops": ops}, "conversion": conversion or technique}}


def test_kernels_a_quantizing_technique_left_in_float_are_counted_with_the_known_reason():
    from quantlab.ui_state import float_kernels_summary

    tiny = float_kernels_summary(kernel_row("dynamic", ("float32", 256), ("float32", 512)))
    assert tiny == ("2 of 2 conv and dense kernels stayed float32 (768 weight values, 100% of those "
                    "kernels' values): the converter's dynamic-range mode quantizes only kernels of at "
                    "least 1,024 values, and these are smaller.")
    mixed = float_kernels_summary(kernel_row("dynamic", ("int8", 2048), ("float32", 192)))
    assert mixed.startswith("1 of 2 conv and dense kernels stayed float32 (192 weight values, 9% of")
    assert mixed.endswith("and this one is smaller.")
    # a pruned or clustered model converted with dynamic range is judged by its conversion
    pruned = float_kernels_summary(kernel_row("prune", ("float32", 256), conversion="dynamic"))
    assert pruned is not None and "1,024" in pruned
    # a large float kernel is not explained by the size rule; other techniques get the count alone
    assert "1,024" not in float_kernels_summary(kernel_row("dynamic", ("float32", 4096)))
    assert float_kernels_summary(kernel_row("int8-fallback", ("int8", 2048), ("float32", 4096))) == (
        "1 of 2 conv and dense kernels stayed float32 (4,096 weight values, 67% of those kernels' values).")
    assert float_kernels_summary(kernel_row("int8-selective", ("int8", 2048), ("float32", 4096),
                                            conversion="int8-fallback with 1 layer kept float")).endswith(
        "keeps its most sensitive layers float by design.")
    # nothing to say: every kernel integer, a conversion that keeps float, or a row without kernels
    assert float_kernels_summary(kernel_row("int8-only", ("int8", 2048))) is None
    assert float_kernels_summary(kernel_row("float32", ("float32", 2048))) is None
    assert float_kernels_summary(kernel_row("cluster", ("float32", 2048), conversion="float32")) is None
    assert float_kernels_summary({"technique": "dynamic", "details": {}}) is None


def test_details_say_when_dynamic_left_every_kernel_float(env):
    ops = kernel_row("dynamic", ("float32", 256))["details"]["inspection"]["ops"]
    for op in ops:
        op.update(input_dtypes=["float32"], output_dtypes=["float32"], computes_in_float=True)
    add_row(env, technique="dynamic", details={"inspection": {"ops": ops}, "conversion": "dynamic",
                                               "latency_samples_ms": [0.1] * 50})
    at = run_app(page="details")
    assert not at.exception
    assert "1 of 1 conv and dense kernels stayed float32 (256 weight values" in texts(at.info)
    ops_shown = next(frame.value for frame in at.dataframe if "op" in frame.value)
    assert list(ops_shown["kernel"]) == ["float32, 256 values"]


def test_demo_mode_limits_uploads_per_session_and_says_so():
    settings = AppSettings.from_env({"QUANTLAB_DEMO": "1"})
    assert settings.max_uploads > 0
    settings.check_upload_quota(settings.max_uploads - 1)
    with pytest.raises(QuantLabError, match="limit of this hosted demo"):
        settings.check_upload_quota(settings.max_uploads)
    assert any("uploads per browser session" in line for line in settings.mode_lines())
    assert AppSettings.from_env({"QUANTLAB_DEMO": "1", "QUANTLAB_MAX_UPLOADS": "0"}).max_uploads == 0
    assert AppSettings.from_env({}).max_uploads == 0


def test_run_is_disabled_while_the_very_same_sweep_runs(env, monkeypatch):
    release = threading.Event()

    def play(spec, *, store, cache, on_event, options, cancel):
        on_event({"type": "sweep-start", "sweep_id": "s2", "total": len(spec.techniques)})
        release.wait(20)
        return SweepReport("s2", [])

    monkeypatch.setattr(sweeps, "run_sweep", play)
    at = run_float32_sweep()
    assert len(sweeps.list_sweeps()) == 1
    assert at.button(key="run_start").disabled
    assert "This very sweep is already running" in texts(at.caption)
    handle = sweeps.list_sweeps()[0]
    assert sweeps.running_twin(handle.spec) is handle  # what the page checks again on a click
    at.checkbox(key="run_technique_dynamic").check().run()
    assert not at.button(key="run_start").disabled     # another sweep may start
    release.set()
    assert sweeps.list_sweeps()[0].wait(10)


def test_a_tflite_upload_ticks_as_uploaded_only_and_says_nothing_of_keras_3(env):
    at = run_app()
    assert at.checkbox(key="run_technique_dynamic").value  # ticked for the built-in Keras model
    at.radio(key="run_model_source").set_value("Upload a file").run()
    at.file_uploader(key="run_model_file").set_value(("ready.tflite", b"\x1c\x00\x00\x00TFL3" + bytes(100),
                                                      "application/octet-stream"))
    at.run()
    assert not at.exception and not at.error
    assert at.checkbox(key="run_technique_as-uploaded").value is True
    dynamic = at.checkbox(key="run_technique_dynamic_unavailable")
    assert dynamic.disabled and dynamic.value is False  # greyed and unticked
    assert "Keras 3" not in texts(at.caption)
    assert not at.button(key="run_start").disabled


def test_the_sidebar_never_names_a_refused_dataset(env):
    at = run_app()
    at.radio(key="run_dataset_source").set_value("Upload a file").run()
    at.file_uploader(key="run_dataset_file").set_value(("broken.npz", b"not a zip", "application/zip"))
    at.run()
    assert "broken" in texts(at.error)
    assert at.session_state["view"].dataset == "digits-28"  # what the sidebar names: the last accepted one
    assert "dataset" not in at.query_params or at.query_params["dataset"] != "broken"


def test_details_shows_intervals_the_busy_cpu_the_two_speeds_and_the_baseline_test(env):
    from quantlab import predictions

    folder = env / "cache" / "predictions"
    labels = np.arange(450) % 10
    variant = labels.copy()
    variant[:30] = (labels[:30] + 1) % 10
    files = {name: str(predictions.save(folder / f"{name}.npy", predictions.compact(classes, 10)))
             for name, classes in (("labels", labels), ("baseline", labels), ("variant", variant))}
    kept = lambda top1: {"top1": files[top1], "float_top1": files["baseline"], "labels": files["labels"]}
    two_speeds = [0.10] * 150 + [0.15] * 100
    add_row(env, "baseline", accuracy=1.0, agreement=1.0, details={"predictions": kept("baseline")})
    row_id = add_row(env, accuracy=420 / 450, agreement=420 / 450, accuracy_ci_low=0.906,
                     accuracy_ci_high=0.953, test_samples=450, latency_p50_ci_low_ms=0.1,
                     latency_p50_ci_high_ms=0.15,
                     details={"predictions": kept("variant"), "latency_samples_ms": two_speeds,
                              "latency_others_cpu_share": 0.8})
    at = run_app(page="details", row=row_id)
    assert not at.exception
    captions = texts(at.caption)
    assert "Accuracy 0.9333, 95% CI 0.9060–0.9530 (Wilson, 450 test samples" in captions
    assert "p50 95% CI 0.1000–0.1500 ms" in captions
    assert "**Differs from the Keras baseline in accuracy?** Yes: -6.67 points" in texts(at.markdown)
    assert "30 samples lost, 0 gained of 450" in texts(at.markdown)
    warnings = texts(at.warning)
    assert "Other processes used 80% of the CPU" in warnings and "tick \"Measure again\" on the Run page" in warnings
    assert "bimodal: 60% of runs near 0.1 ms and 40% near 0.15 ms" in warnings


def test_details_say_what_quantlab_did_to_the_model_and_the_provenance_table_does_not_repeat_it(env):
    note = "mixed precision (mixed_float16 in 3 layers): converted and fine-tuned as float32"
    add_row(env, technique="qat-int8",
            provenance={"cpu_model": "Test CPU", "num_threads": 1, "engine_version": "3", "model_notes": [note]},
            details={"fine_tune": {"inlined": ["nested model 'backbone' (Functional, 5 layers) inlined"]},
                     "conversion_notes": ["converted through a concrete function with batch 1"],
                     "latency_samples_ms": [0.1] * 50})
    at = run_app(page="details")
    assert not at.exception
    captions = texts(at.caption)
    assert f"Model: {note}" in captions
    assert "Fine-tuning: nested model 'backbone' (Functional, 5 layers) inlined" in captions
    assert "Conversion: converted through a concrete function with batch 1" in captions
    table = next(frame.value for frame in at.dataframe if "field" in frame.value)
    assert "model notes" not in set(table["field"])


def test_a_failed_variant_details_say_it_failed_and_nothing_it_never_measured(env):
    """It said "No intervals recorded (stored before QuantLab kept them)" and "no tensor inspection:
    a Keras model is not a .tflite file" for an int16x8 that had just failed."""
    add_row(env, technique="int16x8", error="int16x8: the TFLite converter failed on op SQUARE",
            details={"error_kind": "refused"}, model_bytes=None, accuracy=None, agreement=None)
    at = run_app(page="details")
    assert not at.exception
    assert "This variant failed: int16x8: the TFLite converter failed on op SQUARE" in texts(at.error)
    shown = texts(at.caption) + texts(at.markdown)
    for said in ("No intervals recorded", "no tensor inspection recorded", "Inputs and outputs",
                 "What the technique recorded"):
        assert said not in shown


def test_a_failed_variant_is_named_once_in_its_line():
    from quantlab.ui_state import failure_text

    assert failure_text({"technique": "int16x8", "error": "int16x8: no SQUARE kernel"}) == \
        "int16x8 failed: no SQUARE kernel"
    assert failure_text({"technique": "prune", "error": "the worker crashed"}) == "prune failed: the worker crashed"


def test_the_first_run_banner_follows_the_source_the_user_picked(env):
    at = run_app()
    assert "The default sweep is ready" in texts(at.info)
    at.radio(key="run_model_source").set_value("Upload a file").run()
    assert not at.exception
    assert "The default sweep is ready" not in texts(at.info)   # it stayed after an upload
    assert "Upload your model and dataset below" in texts(at.info)
