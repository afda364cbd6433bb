"""The Calibration lab: page-facing functions on tiny numpy data, then the page itself (AppTest) on a
tiny workload prepared by a real sweep (seed CNN, 1 epoch, scikit-learn's 8x8 digits)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantlab import lab
from quantlab.cache import ArtifactCache
from quantlab.calibrate import (
    CALIBRATORS,
    compare_calibrators,
    fake_quantize,
    quantize_kmeans,
    weight_bytes,
)
from quantlab.config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings
from quantlab.errors import QuantLabError
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "lab.py")


@pytest.fixture(scope="module", autouse=True)
def restore_main_module():
    """AppTest installs the page as sys.modules["__main__"] and leaves it there; put ours back so that
    worker pools spawned later in this process do not re-run the page."""
    main = sys.modules.get("__main__")
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def heavy_tailed() -> np.ndarray:
    """A (4, 6, 8) tensor: 8 channels on the last axis, each with its own scale, Student-t values."""
    rng = np.random.default_rng(1)
    return rng.standard_t(df=3, size=(4, 6, 8)) * np.linspace(0.5, 4.0, 8)


# --- one tensor -----------------------------------------------------------------------------------


def test_a_small_tensor_is_analysed_whole_and_a_large_one_on_a_sample_with_its_extremes():
    small = np.arange(24.0).reshape(2, 3, 4)
    assert lab.analysis_sample(small, -1, limit=100) is small
    rng = np.random.default_rng(0)
    big = rng.normal(size=(500, 7, 7, 6)) * np.arange(1, 7)
    sample = lab.analysis_sample(big, -1, limit=3000)
    assert sample.shape[1] == 6 and sample.size <= 3000 + 2 * 6 * 6
    np.testing.assert_array_equal(sample.max(axis=0), big.reshape(-1, 6).max(axis=0))
    np.testing.assert_array_equal(sample.min(axis=0), big.reshape(-1, 6).min(axis=0))
    np.testing.assert_array_equal(lab.analysis_sample(big, -1, limit=3000), sample)   # seeded


@pytest.mark.parametrize("symmetric,per_channel", [(True, False), (False, False), (True, True), (False, True)])
def test_the_calibrator_table_is_compare_calibrators(heavy_tailed, symmetric, per_channel):
    config, _ = lab.make_config(4, symmetric, per_channel, "kl", "linear", axis=-1)
    analysis = lab.analyze_tensor(heavy_tailed, config)
    expected = compare_calibrators(heavy_tailed, bits=4, symmetric=symmetric, per_channel=per_channel)
    assert [r.calibrator for r in analysis.rows] == [r.calibrator for r in expected] == [*CALIBRATORS, "kmeans"]
    for got, want in zip(analysis.rows, expected):
        assert (got.low, got.high, got.mse, got.clipped_share) == pytest.approx(
            (want.low, want.high, want.mse, want.clipped_share))
    table = analysis.table()
    assert list(table["calibrator"]) == [*CALIBRATORS, "kmeans"]
    assert table.loc[table["chosen"], "calibrator"].tolist() == ["kl"]


def test_per_channel_ranges_and_levels_are_those_of_the_channel_shown(heavy_tailed):
    config, _ = lab.make_config(8, True, True, "max", "linear", axis=-1)
    analysis = lab.analyze_tensor(heavy_tailed, config, channel=5)
    assert analysis.channels == 8 and analysis.channel == 5
    result = fake_quantize(heavy_tailed, config)
    assert analysis.thresholds["max"] == pytest.approx((result.low[5], result.high[5]))
    assert analysis.levels.max() == pytest.approx(result.high[5])
    assert analysis.counts.sum() == heavy_tailed[..., 5].size
    assert lab.analyze_tensor(heavy_tailed, config, channel=99).channel == 7   # clamped


def test_levels_are_all_drawn_at_8_bits_and_thinned_at_16(heavy_tailed):
    eight = lab.analyze_tensor(heavy_tailed, lab.make_config(8, True, False, "max", "linear")[0])
    assert eight.level_count == 255 and eight.level_step == 1 and len(eight.levels) == 255
    np.testing.assert_allclose(np.diff(eight.levels), np.diff(eight.levels)[0])
    sixteen = lab.analyze_tensor(heavy_tailed, lab.make_config(16, False, False, "mse", "linear")[0])
    assert sixteen.level_count == 65536 and len(sixteen.levels) <= lab.MAX_LEVEL_LINES + 1
    assert any("every 256th" in note for note in sixteen.notes)
    assert [r.calibrator for r in sixteen.rows] == list(CALIBRATORS)   # no k-means above 8 bits


def test_kmeans_draws_its_centroids_and_refuses_16_bits(heavy_tailed):
    config, notes = lab.make_config(3, False, True, "max", "kmeans")
    assert not config.per_channel and notes
    analysis = lab.analyze_tensor(heavy_tailed, config)
    np.testing.assert_allclose(analysis.levels, quantize_kmeans(heavy_tailed, 3).levels)
    assert analysis.chosen == "kmeans" and len(analysis.levels) <= 8
    with pytest.raises(QuantLabError, match="k-means"):
        lab.make_config(16, True, False, "max", "kmeans")


def test_the_histogram_figure_draws_levels_and_every_calibrators_range(heavy_tailed):
    analysis = lab.analyze_tensor(heavy_tailed, lab.make_config(4, True, False, "percentile", "linear", 99.0)[0])
    figure = lab.histogram_figure(analysis, log_scale=True, title="t")
    names = [trace.name for trace in figure.data]
    assert names[:2] == ["values", "levels"]
    assert "percentile range (chosen)" in names and "kmeans range" in names and len(names) == 2 + 5
    assert figure.layout.yaxis.type == "log"
    assert lab.histogram_figure(analysis).layout.yaxis.type == "linear"


# --- tensors files and the model view -------------------------------------------------------------


def tiny_tensors(tmp_path: Path) -> lab.LabTensors:
    infos = [
        {"key": "t0", "name": "conv/kernel", "layer": "conv", "layer_class": "Conv2D", "kind": "weight",
         "role": "kernel", "shape": [3, 3, 1, 4], "size": 36, "channel_axis": -1, "quantized": True},
        {"key": "t1", "name": "conv/bias", "layer": "conv", "layer_class": "Conv2D", "kind": "weight",
         "role": "bias", "shape": [4], "size": 4, "channel_axis": -1, "quantized": False},
        {"key": "t2", "name": "dense/kernel", "layer": "dense", "layer_class": "Dense", "kind": "weight",
         "role": "kernel", "shape": [10, 3], "size": 30, "channel_axis": -1, "quantized": True},
    ]
    rng = np.random.default_rng(0)
    arrays = {"t0": rng.normal(size=(3, 3, 1, 4)), "t1": np.zeros(4), "t2": rng.normal(size=(10, 3))}
    path = lab.save_tensors(tmp_path / "w.npz", arrays, infos, {"model_hash": "m", "dataset_hash": "d"})
    return lab.load_tensors(path)


def test_tensors_round_trip_and_the_layer_table_gives_weight_bytes(tmp_path):
    tensors = tiny_tensors(tmp_path)
    assert tensors.names == ["conv/kernel", "conv/bias", "dense/kernel"]
    assert tensors.get("dense/kernel").shape == (10, 3) and tensors.info("conv/kernel").channels == 4
    table = lab.layer_table(tensors, 8)
    assert table[["layer", "quantized params", "float params", "bits"]].values.tolist() == \
        [["conv", 36, 4, 8], ["dense", 30, 0, 8]]
    table.loc[1, "bits"] = 2
    size = lab.weight_size(table)
    assert size.quantized_bytes == weight_bytes({"conv": 36, "dense": 30}, {"conv": 8, "dense": 2}) == 36 + 8
    assert size.float_bytes == 16 and size.float32_bytes == 4 * 70
    assert lab.bits_from_table(table) == {"conv": 8, "dense": 2}
    with pytest.raises(QuantLabError, match="no tensor"):
        tensors.get("nothing")


def test_a_fake_quant_request_checks_itself_and_keys_its_cache(tmp_path):
    manifest = {"model_hash": "m", "dataset_hash": "d"}
    cache = ArtifactCache(tmp_path)
    request = lab.FakeQuantRequest({"dense": 4, "conv": 8})
    assert lab.FakeQuantRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert list(request.weight_bits) == ["conv", "dense"]
    other = lab.FakeQuantRequest({"dense": 4, "conv": 8}, activations=True)
    assert lab.evaluation_path(cache, manifest, request) != lab.evaluation_path(cache, manifest, other)
    assert lab.evaluation_path(cache, manifest, request) == lab.evaluation_path(
        cache, manifest, lab.FakeQuantRequest({"conv": 8, "dense": 4}))
    assert request.activation_config().symmetric is False
    with pytest.raises(QuantLabError, match="bit width"):
        lab.FakeQuantRequest({"dense": 5.5})
    with pytest.raises(QuantLabError, match="k-means"):
        lab.FakeQuantRequest({"dense": 16}, method="kmeans")
    assert lab.cached_evaluation(cache, manifest, request) is None


def test_sensitivity_names_frame_and_chart():
    assert lab.short_layer_name("seed_cnn/conv2d/Relu;seed_cnn/conv2d/BiasAdd") == "conv2d"
    assert lab.short_layer_name("StatefulPartitionedCall:0") == "model output"
    result = {"layers": [
        {"op_name": "CONV_2D", "tensor_name": "m/conv/Relu", "rmse_scale": 0.3, "scale": 0.01},
        {"op_name": "MAX_POOL_2D", "tensor_name": "m/pool/MaxPool", "rmse_scale": 0.0, "scale": 0.01},
        {"op_name": "FULLY_CONNECTED", "tensor_name": "StatefulPartitionedCall:0", "rmse_scale": 0.6,
         "scale": 0.1}], "ranking": ["StatefulPartitionedCall:0", "m/conv/Relu", "m/pool/MaxPool"]}
    frame = lab.sensitivity_frame(result, keep_float=1)
    assert frame["rank"].tolist() == [2, 3, 1]
    assert frame["kept float"].tolist() == [False, False, True]
    assert frame["layer"].tolist() == ["0: conv", "1: pool", "2: model output"]
    figure = lab.sensitivity_figure(frame)
    assert list(figure.data[0].marker.color) == ["#4C78A8", "#4C78A8", "#E45756"]


def test_a_layer_that_became_several_ops_names_each_op():
    """Conv1D converts to EXPAND_DIMS, CONV_2D and RESHAPE, all named after the layer."""
    ops = ("EXPAND_DIMS", "CONV_2D", "RESHAPE")
    result = {"layers": [{"op_name": op, "tensor_name": f"m/conv1d/{op.lower()}", "rmse_scale": 0.3, "scale": 0.1}
                         for op in ops] + [{"op_name": "FULLY_CONNECTED", "tensor_name": "m/dense/MatMul",
                                            "rmse_scale": 0.2, "scale": 0.1}], "ranking": []}
    assert lab.sensitivity_frame(result)["layer"].tolist() == [
        "0: conv1d · EXPAND_DIMS", "1: conv1d · CONV_2D", "2: conv1d · RESHAPE", "3: dense"]


def test_attentions_projections_are_named_by_their_sublayer():
    """MultiHeadAttention's query, key, value and output projections are all FULLY_CONNECTED ops of one
    layer; the sublayer in the tensor name tells them apart (a TensorFlow op name such as Tensordot does not)."""
    names = ["t/multi_head_attention/query/einsum/Einsum;t/multi_head_attention/Mul",
             "t/multi_head_attention/key/einsum/Einsum1", "t/multi_head_attention/softmax/Softmax",
             "t/dense/Tensordot/MatMul1", "t/dense/Tensordot"]
    ops = ["FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX", "FULLY_CONNECTED", "RESHAPE"]
    result = {"layers": [{"op_name": op, "tensor_name": name, "rmse_scale": 0.3, "scale": 0.1}
                         for op, name in zip(ops, names)], "ranking": []}
    assert lab.sensitivity_frame(result)["layer"].tolist() == [
        "0: multi_head_attention/query · FULLY_CONNECTED", "1: multi_head_attention/key · FULLY_CONNECTED",
        "2: multi_head_attention/softmax · SOFTMAX", "3: dense · FULLY_CONNECTED", "4: dense · RESHAPE"]


def test_the_selective_sweep_repeats_the_workloads_settings():
    spec = SweepSpec("seed-cnn", "digits", (TechniqueSpec("int8-fallback"),), TrainSettings(epochs=1),
                     MeasureSettings(min_runs=5))
    workload = lab.Workload({"model_name": "seed-cnn", "model_kind": "keras"}, spec.to_dict(), "m", "d")
    selective = lab.selective_spec(workload, 3)
    assert selective.techniques == (TechniqueSpec("int8-selective", {"keep_float": 3}),)
    assert (selective.model, selective.dataset, selective.train, selective.measure) == \
        (spec.model, spec.dataset, spec.train, spec.measure)
    with pytest.raises(QuantLabError, match="Run page"):
        lab.selective_spec(lab.Workload({"model_name": "x", "model_kind": "keras"}, None, "m", "d"), 1)
    assert "tf_keras" in lab.Workload({"model_name": "x.tflite", "model_kind": "tflite"}).reason


def test_a_model_of_several_inputs_is_refused_before_the_lab_offers_extraction():
    two = {"model_name": "two.keras", "model_kind": "keras",
           "io": {"inputs": [{"name": "features", "shape": [8]}, {"name": "tokens", "shape": [10]}]}}
    workload = lab.Workload(two)
    assert not workload.usable and "has 2 inputs" in workload.reason and "one-input" in workload.reason
    assert lab.Workload({**two, "io": {"inputs": [{"name": "x", "shape": [8]}]}}).usable
    assert lab.Workload({"model_name": "m.h5", "model_kind": "keras"}).usable  # one input: no io block


def test_the_model_views_bit_widths_become_a_recipe_with_the_widest_share_as_default():
    request = lab.FakeQuantRequest({"conv": 4, "dense": 8, "dense_1": 8, "head": 32})
    recipe = lab.mixed_precision_recipe(request)
    rules = json.loads(recipe.text)
    assert [(r["regex"], r["algorithm_key"]) for r in rules] == [
        (".*", "min_max_uniform_quantize"), (lab_regex("conv"), "min_max_uniform_quantize"),
        (lab_regex("head"), "no_quantize")]
    assert rules[0]["op_config"]["explicit_dequantize"] is True       # weight-only, as the prediction
    assert recipe.what == "weights conv 4-bit, dense 8-bit, dense_1 8-bit, head float"
    with_activations = lab.mixed_precision_recipe(lab.FakeQuantRequest({"conv": 8}, activations=True,
                                                                        activation_bits=16))
    assert json.loads(with_activations.text)[0]["op_config"]["activation_tensor_config"]["num_bits"] == 16
    with pytest.raises(QuantLabError, match="8 or 16 activation bits"):
        lab.mixed_precision_recipe(lab.FakeQuantRequest({"conv": 8}, activations=True, activation_bits=4))
    with pytest.raises(QuantLabError, match="linearly"):
        lab.mixed_precision_recipe(lab.FakeQuantRequest({"conv": 4}, method="kmeans"))


def lab_regex(layer):
    from quantlab.litert_quant import layer_regex

    return layer_regex(layer)


def test_keeping_the_ranked_layers_float_and_the_recipe_sweep_repeats_the_workloads_settings():
    sensitivity = {"ranking": ["seq/conv/Relu;seq/conv/BiasAdd", "StatefulPartitionedCall:0", "seq/pool/Max"]}
    recipe = lab.keep_float_recipe(sensitivity, 2)
    assert [r["algorithm_key"] for r in json.loads(recipe.text)] == ["min_max_uniform_quantize",
                                                                    "no_quantize", "no_quantize"]
    assert recipe.what == "static int8 with the 2 most sensitive layer(s) float (conv, model output)"
    spec = SweepSpec("seed-cnn", "digits", (TechniqueSpec("int8-fallback"),), TrainSettings(epochs=1),
                     MeasureSettings(min_runs=5))
    workload = lab.Workload({"model_name": "seed-cnn", "model_kind": "keras"}, spec.to_dict(), "m", "d")
    measured = lab.recipe_spec(workload, recipe)
    assert measured.techniques[0].id == "lq-recipe"
    assert measured.techniques[0].params["recipe"] == recipe.text
    assert (measured.model, measured.train, measured.measure) == (spec.model, spec.train, spec.measure)


# --- the page on a prepared workload --------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real sweep of baseline and int8-fallback (1 epoch, 8x8 digits), in its own database and cache."""
    root = tmp_path_factory.mktemp("lab")
    store, cache = Store(root / "quantlab.duckdb"), ArtifactCache(root / "cache")
    spec = SweepSpec("seed-cnn", "digits", (TechniqueSpec("baseline"), TechniqueSpec("int8-fallback")),
                     TrainSettings(epochs=1), MeasureSettings(min_runs=5, min_seconds=0.05))
    report = run_sweep(spec, store=store, cache=cache, options=SweepOptions(workers=1, source="test"))
    assert not report.failed, report.failed
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTLAB_DB", str(store.path))
        patch.setenv("QUANTLAB_CACHE", str(cache.root))
        yield {"store": store, "cache": cache, "report": report}
    lab.close_worker()


def run_page(timeout: float = 300):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(PAGE, default_timeout=timeout)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def timed_run(app) -> float:
    started = time.perf_counter()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return time.perf_counter() - started


def table_with(app, column: str):
    """The first table on the page that has `column`."""
    return next(frame.value for frame in app.dataframe if column in frame.value.columns)


def test_workloads_are_the_prepared_ones_with_their_sweep(prepared):
    workloads = lab.list_workloads(prepared["store"], prepared["cache"])
    assert len(workloads) == 1
    workload = workloads[0]
    assert workload.usable and workload.spec["model"] == "seed-cnn"
    assert workload.model_hash == prepared["report"].rows[0]["model_hash"]
    assert "seed-cnn on digits" in workload.label


def test_the_page_without_a_prepared_workload_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_DB", str(tmp_path / "empty.duckdb"))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    app = run_page()
    assert "Run a sweep" in app.info[0].value


def test_the_page_extracts_once_then_redraws_from_numpy(prepared):
    # Tests of other modules may have imported TensorFlow into this process before; then the check
    # below cannot tell, and says so in the test output.
    tensorflow_already_imported = "tensorflow" in sys.modules
    app = run_page()
    assert app.button(key="lab_extract").label == "Extract weights and activations"
    app.button(key="lab_extract").click()
    timed_run(app)
    workload = lab.list_workloads(prepared["store"], prepared["cache"])[0]
    assert lab.tensors_ready(prepared["cache"], workload.manifest)
    assert app.selectbox(key="lab_tensor_weights").value == "conv2d/kernel"
    assert len(app.get("plotly_chart")) == 1
    table = table_with(app, "SQNR (dB)")
    assert list(table["calibrator"]) == [*CALIBRATORS, "kmeans"]

    changes = [("bits 4", lambda: app.selectbox(key="lab_bits").set_value(4)),
               ("asymmetric", lambda: app.toggle(key="lab_symmetric").set_value(False)),
               ("per-channel", lambda: app.toggle(key="lab_per_channel").set_value(True)),
               ("channel 3", lambda: app.number_input(key="lab_channel").set_value(3)),
               ("calibrator mse", lambda: app.selectbox(key="lab_calibrator").set_value("mse")),
               ("16 bits", lambda: app.selectbox(key="lab_bits").set_value(16)),
               ("k-means at 16 bits", lambda: app.radio(key="lab_method").set_value("kmeans")),
               ("8 bits", lambda: app.selectbox(key="lab_bits").set_value(8)),
               ("log scale", lambda: app.toggle(key="lab_log_scale").set_value(True)),
               ("activations", lambda: app.radio(key="lab_source").set_value("activations")),
               ("conv2d output", lambda: app.selectbox(key="lab_tensor_activations").set_value("conv2d")),
               ("linear", lambda: app.radio(key="lab_method").set_value("linear"))]
    times = {}
    for name, change in changes:
        change()
        times[name] = timed_run(app)
        if name == "k-means at 16 bits":
            assert "k-means quantization goes up to 8 bits" in app.warning[0].value
    assert len(app.get("plotly_chart")) == 1
    table = table_with(app, "SQNR (dB)")
    assert table.loc[table["chosen"], "calibrator"].tolist() == ["mse"]
    assert app.number_input(key="lab_channel").label.startswith("Channel shown (of 12 channels")   # conv2d
    image = next(name for name in app.selectbox(key="lab_tensor_activations").options if name.startswith("image"))
    app.selectbox(key="lab_tensor_activations").set_value(image)
    timed_run(app)   # the (samples, 8, 8) input has no channel axis: its last axis is the image's columns
    assert app.number_input(key="lab_channel").label.startswith("Image column shown (of 8 image columns")
    print("redraw seconds:", {k: round(v, 3) for k, v in times.items()})
    if tensorflow_already_imported:
        print("TensorFlow was imported before this test: not checking that the page avoids it")
    else:
        assert "tensorflow" not in sys.modules, "the page process imported TensorFlow"


def test_the_model_tab_predicts_accuracy_next_to_the_converted_int8(prepared):
    workload = lab.list_workloads(prepared["store"], prepared["cache"])[0]
    lab.extract_tensors(workload.manifest, prepared["cache"])
    app = run_page()
    assert app.button(key="lab_evaluate").label == "Evaluate these settings"
    app.button(key="lab_evaluate").click()
    timed_run(app)
    metrics = {m.label: m.value for m in app.metric}
    assert {"Predicted (fake-quantized)", "Float (Keras)", "Converted: int8-fallback"} <= set(metrics)
    assert metrics["Weights at these bit widths"].endswith("bytes")
    predicted, converted = float(metrics["Predicted (fake-quantized)"]), float(metrics["Converted: int8-fallback"])
    assert 0 <= predicted <= 1 and abs(predicted - converted) < 0.1
    int8_row = next(r for r in prepared["report"].rows if r["technique"] == "int8-fallback")
    assert converted == pytest.approx(int8_row["accuracy"], abs=1e-4)
    # the same settings again come from the cache: no button, the numbers at once
    app = run_page()
    assert not [b for b in app.button if b.key == "lab_evaluate"]
    assert float({m.label: m.value for m in app.metric}["Predicted (fake-quantized)"]) == predicted


def test_the_sensitivity_tab_measures_layers_and_runs_int8_selective_as_a_sweep(prepared):
    workload = lab.list_workloads(prepared["store"], prepared["cache"])[0]
    lab.extract_tensors(workload.manifest, prepared["cache"])
    app = run_page()
    app.button(key="lab_sensitivity").click()
    timed_run(app)
    assert lab.cached_sensitivity(prepared["cache"], workload.manifest) is not None
    assert len(app.get("plotly_chart")) == 2
    assert app.number_input(key="lab_keep_float").value == 2
    app.number_input(key="lab_keep_float").set_value(1)
    timed_run(app)
    frame = table_with(app, "rmse/scale")
    assert int(frame["kept float"].sum()) == 1
    app.button(key="lab_run_selective").click()
    timed_run(app)
    sweep = app.session_state["lab_selective"]
    assert sweep.keep_float == 1
    assert sweep.handle.wait(600)
    timed_run(app)
    rows = lab.converted_int8_rows(prepared["store"], workload.manifest)
    selective = rows[rows["technique"] == "int8-selective"]
    assert len(selective) == 1 and json.loads(selective["params"].iloc[0]) == {"keep_float": 1}
    assert selective["float_ops"].iloc[0] >= 1
    assert "Converted: int8-selective(keep_float=1)" in {m.label for m in app.metric}


def test_lab_workers_do_not_re_run_a_script_installed_as_main(tmp_path, monkeypatch):
    """Streamlit (and AppTest) install the running script as __main__; spawned workers must not run it."""
    import types

    from quantlab import sensitivity
    from quantlab.pool import WorkerPool

    marker = tmp_path / "script-ran"
    script = tmp_path / "page.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    fake_main = types.ModuleType("__main__")
    fake_main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    with WorkerPool(sensitivity.run_task, size=1, warm=False) as pool:
        with lab.neutral_main():
            pool.start()
        assert sys.modules["__main__"] is fake_main
        outcome = next(pool.run([("bad", {"kind": "lab-nothing"})]))
    assert "unknown lab task kind" in outcome.error
    assert not marker.exists()


def test_a_lab_link_reopens_the_same_layer_quantizer_and_numbers(prepared):
    from streamlit.testing.v1 import AppTest

    workload = lab.list_workloads(prepared["store"], prepared["cache"])[0]
    lab.extract_tensors(workload.manifest, prepared["cache"])
    app = run_page()
    app.selectbox(key="lab_bits").set_value(4).run()
    app.toggle(key="lab_per_channel").set_value(True).run()
    app.selectbox(key="lab_calibrator").set_value("mse").run()
    app.number_input(key="lab_channel").set_value(3).run()
    link = {key: app.query_params[key] for key in app.query_params}
    assert {k: link[k] for k in ("bits", "per_channel", "calibrator", "channel", "layer")} == {
        "bits": "4", "per_channel": "1", "calibrator": "mse", "channel": "3", "layer": "conv2d/kernel"}
    assert link["workload"] == workload.model_hash[:8]

    other = AppTest.from_file(PAGE, default_timeout=300)
    for key, value in link.items():
        other.query_params[key] = value
    other.run()
    assert not other.exception, [e.value for e in other.exception]
    assert (other.selectbox(key="lab_bits").value, other.toggle(key="lab_per_channel").value,
            other.selectbox(key="lab_calibrator").value, other.number_input(key="lab_channel").value) == (
        4, True, "mse", 3)
    mine, theirs = table_with(app, "SQNR (dB)"), table_with(other, "SQNR (dB)")
    assert theirs.drop(columns=["time (ms)"]).equals(mine.drop(columns=["time (ms)"]))
    assert weights_tile(other) == weights_tile(app)


def weights_tile(app) -> str:
    return next(m.value for m in app.metric if m.label == "Weights at these bit widths")


def test_a_lab_link_with_layer_bits_activations_and_a_tab(prepared):
    workload = lab.list_workloads(prepared["store"], prepared["cache"])[0]
    lab.extract_tensors(workload.manifest, prepared["cache"])
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(PAGE, default_timeout=300)
    for key, value in {"tab": "model", "layer_bits": "dense:2", "act": "1", "act_bits": "16",
                       "source": "activations", "layer": "conv2d", "keep_float": "1"}.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.radio(key="lab_source").value == "activations"
    assert app.selectbox(key="lab_tensor_activations").value == "conv2d"
    assert app.toggle(key="lab_activations").value is True
    assert app.selectbox(key="lab_activation_bits").value == 16
    assert app.query_params["layer_bits"] == "dense:2" and app.query_params["tab"] == "model"
    default = run_page()
    assert weights_tile(app) != weights_tile(default)   # the dense layer at 2 bits, not 8
    assert default.toggle(key="lab_per_channel").value is True   # as the converter quantizes weights
    assert any("Always int8" in caption.value for caption in default.caption)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_table_ranges_span_every_channel_so_kmeans_lies_inside_max(heavy_tailed, symmetric):
    """Channel 0 is the narrowest (scale 0.5, channel 7: 4.0): the table's ranges are the tensor's."""
    config, _ = lab.make_config(4, symmetric, True, "max", "linear", axis=-1)
    rows = {row.calibrator: row for row in lab.analyze_tensor(heavy_tailed, config).rows}
    assert rows["max"].per_channel and not rows["kmeans"].per_channel
    if symmetric:
        assert rows["max"].high == pytest.approx(np.abs(heavy_tailed).max())
    else:
        assert (rows["max"].low, rows["max"].high) == pytest.approx((heavy_tailed.min(), heavy_tailed.max()))
    assert rows["max"].low <= rows["kmeans"].low <= rows["kmeans"].high <= rows["max"].high
    assert rows["max"].high > 2 * np.abs(heavy_tailed[..., 0]).max()   # not channel 0's range


def test_a_tensors_channel_axis_is_named_by_its_layout():
    def info(kind, layer_class, shape):
        return lab.TensorInfo(key="t0", name="x", layer="x", layer_class=layer_class, kind=kind, role="output",
                              shape=shape, size=int(np.prod(shape)), channel_axis=-1, quantized=True)
    assert lab.axis_words(info("activation", "InputLayer", (64, 8, 8)))[0] == "image column"  # no channel axis
    assert lab.axis_words(info("activation", "Reshape", (64, 8, 8, 1)))[0] == "channel"
    assert lab.axis_words(info("activation", "Conv2D", (64, 6, 6, 12)))[1] == "channels"
    assert lab.axis_words(info("activation", "Dense", (64, 10)))[0] == "unit"
    assert lab.axis_words(info("activation", "Flatten", (64, 432)))[0] == "feature"
    assert lab.axis_words(info("weight", "Conv2D", (3, 3, 1, 12)))[0] == "output channel"
