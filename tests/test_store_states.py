"""Every page in the store states users reach, headless (AppTest): no traceback, and the right words.

(a) a dataset without labels: accuracy NULL, agreement and SQNR set, the baseline's agreement 1.0;
(b) a model with only its baseline row (its first sweep was cancelled);
(c) a model with a failed variant (error set, numbers NULL) and a variant without a latency;
(d) two models, one labelled and one not, compared with each other.
Every row is synthetic (made-up figures), built here; no test converts or measures anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from quantlab import lab
from quantlab.analysis import NO_LABELS, NO_LABELS_NOTE
from quantlab.cache import ArtifactCache
from quantlab.calibrate import CALIBRATORS
from quantlab.store import Store
from tests.test_analysis import fill, make_row

ROOT = Path(__file__).resolve().parent.parent
PAGES = {name: str(ROOT / "pages" / f"{name}.py") for name in ("run", "compare", "recommend", "details", "lab")}
TIMEOUT = 60
LABELLED, UNLABELLED, CANCELLED, FAILING = "labelled-cnn", "x-only-cnn", "cancelled-cnn", "failing-cnn"
READY_TFLITE = "ready.tflite"
DATASET = "synthetic-digits"
NO_LABEL_DETAILS = {"labels": False, "label_note": "the dataset has x_test only"}
# technique, family, bytes, accuracy, agreement, p50 ms
VARIANTS = (("baseline", "baseline", 400_000, 0.950, 1.000, 2.0),
            ("float32", "float", 100_000, 0.950, 1.000, 1.0),
            ("float16", "ptq", 50_000, 0.950, 0.998, 1.0),
            ("dynamic", "ptq", 26_000, 0.948, 0.990, 0.8),
            ("int8-only", "ptq", 25_000, 0.930, 0.970, 0.5))


@pytest.fixture(scope="module", autouse=True)
def restore_main_module():
    """AppTest installs the page as sys.modules["__main__"]; put ours back (see tests/test_lab.py)."""
    main = sys.modules.get("__main__")
    yield
    sys.modules["__main__"] = main


def workload(model: str, *, labels: bool = True, seconds: int = 0) -> list[dict]:
    """Rows of every VARIANT of `model`; without labels, accuracy is NULL and details say so."""
    return [make_row(t, f, b, a if labels else None, p, seconds=seconds + i, model_name=model,
                     model_hash=f"{model}-hash", agreement=g, result_key=f"{model}-{t}",
                     details={} if labels else NO_LABEL_DETAILS)
            for i, (t, f, b, a, g, p) in enumerate(VARIANTS)]


def failing(model: str = FAILING) -> list[dict]:
    """A baseline, a float32, a dynamic row without a latency, and an int8-only that failed."""
    base, f32, _, dynamic, _ = workload(model)
    dynamic.update(latency_p50_ms=None, latency_p90_ms=None, latency_runs=None, latency_method=None)
    failed = make_row("int8-only", "ptq", None, None, None, seconds=9, model_name=model,
                      model_hash=f"{model}-hash", agreement=None, sqnr_db=None, latency_runs=None,
                      latency_method=None, result_key=f"{model}-int8-only", details={},
                      error="int8-only: no int8 kernel for op FOO; use int8-fallback")
    return [base, f32, dynamic, failed]


STATES = {
    "a-no-labels": lambda: workload(UNLABELLED, labels=False),
    "b-baseline-only": lambda: workload(LABELLED) + workload(CANCELLED, seconds=20)[:1],
    "c-failed-variant": lambda: failing(),
    "d-labelled-and-not": lambda: workload(LABELLED) + workload(UNLABELLED, labels=False, seconds=20),
    "e-ready-tflite": lambda: [make_row(technique, family, size, 0.93, p50, model_name=READY_TFLITE,
                                        model_hash="tflite-hash", agreement=None, sqnr_db=None,
                                        result_key=f"tflite-{technique}", seconds=index)
                               for index, (technique, family, size, p50) in enumerate(
                                   (("as-uploaded", "uploaded", 25_000, 0.5),
                                    ("lq-int4-dynamic", "litert", 14_000, 0.00767)))],
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_DB", str(tmp_path / "q.duckdb"))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    for name in ("QUANTLAB_DEMO", "QUANTLAB_READ_ONLY", "QUANTLAB_UPLOADS", "QUANTLAB_MAX_UPLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def stored(env: Path, state: str) -> Store:
    store = Store(env / "q.duckdb")
    fill(store, STATES[state]())
    return store


def open_page(page: str, **query) -> AppTest:
    app = AppTest.from_file(PAGES[page], default_timeout=TIMEOUT)
    for key, value in query.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def words(app: AppTest) -> str:
    """Every text the page shows, one per line."""
    parts = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "success", "warning", "error"):
        parts.extend(str(element.value) for element in getattr(app, kind))
    parts.extend(f"{m.label}: {m.value}" for m in app.metric)
    return "\n".join(parts)


def figures(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]


def y_titles(figure: dict) -> list[str]:
    return [axis["title"]["text"] for name, axis in figure["layout"].items()
            if name.startswith("yaxis") and "title" in axis]


def row_id_of(store: Store, model: str, technique: str) -> str:
    frame = store.query("SELECT row_id FROM results WHERE model_name = ? AND technique = ?", [model, technique])
    return frame["row_id"].iloc[0]


# --- every page, every state: no traceback ---------------------------------------------------------


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("page", PAGES)
def test_every_page_opens_in_every_store_state(env, state, page):
    store = stored(env, state)
    model = {"a-no-labels": UNLABELLED, "b-baseline-only": CANCELLED, "c-failed-variant": FAILING,
             "d-labelled-and-not": UNLABELLED, "e-ready-tflite": READY_TFLITE}[state]
    query = {"model": model, "dataset": DATASET}
    if page == "details":
        query = {"row": row_id_of(store, model, "as-uploaded" if model == READY_TFLITE else "baseline")}
    app = open_page(page, **query)
    if page == "lab":
        assert "Nothing to open yet" in words(app)


# --- (e) a ready .tflite, measured as it is ---------------------------------------------------------


def test_compare_of_a_ready_tflite_says_there_is_no_float_model_to_compare_with(env):
    stored(env, "e-ready-tflite")
    app = open_page("compare", model=READY_TFLITE, dataset=DATASET)
    text = words(app)
    assert "a ready .tflite is measured as it is" in text and "upload its Keras model" in text
    assert "add the baseline technique" not in text and "relative columns are empty" not in text


def test_recommend_offers_nothing_a_ready_tflite_cannot_run(env):
    stored(env, "e-ready-tflite")
    app = open_page("recommend", model=READY_TFLITE, dataset=DATASET)
    # the tree's techniques convert a Keras model and are never offered; int4 (it takes a .tflite) is measured
    assert not [b for b in app.button if b.key == "recommend_run"]
    text = words(app)
    assert "ready.tflite is a ready TensorFlow Lite file, measured as it is: the tree's techniques " \
           "(int8-fallback, dynamic, float16) convert a Keras model" in text
    assert "Not measured yet" not in text


def test_details_gives_a_small_p50_in_significant_digits(env):
    store = stored(env, "e-ready-tflite")
    app = open_page("details", row=row_id_of(store, READY_TFLITE, "lq-int4-dynamic"))
    assert {m.label: m.value for m in app.metric}["p50 latency (ms)"] == "0.00767"


# --- (a) no labels ---------------------------------------------------------------------------------


def test_compare_without_labels_judges_by_agreement_and_says_so(env):
    stored(env, "a-no-labels")
    app = open_page("compare", model=UNLABELLED, dataset=DATASET)
    assert NO_LABELS_NOTE in words(app)
    assert app.success[0].value == ("**Best inside your budget: Dynamic range — 15.4x smaller, -1.0 points of "
                                    "agreement, 1.2x faster than TFLite float32 (2.5x faster than the Keras "
                                    "model in TensorFlow)**")
    size, latency = figures(app)[:2]
    assert y_titles(size) == ["Agreement with the float model (%) · no labels"]
    assert size["layout"]["title"]["text"] == "Agreement vs size"
    assert any(trace["name"] == "Pareto front" for trace in size["data"])
    assert app.number_input(key="compare_drop").label == "Agreement drop you accept, points"
    table = app.dataframe[0].value
    assert set(table["accuracy"]) == {NO_LABELS}
    assert "agreement_change_points" in table and "accuracy_change_points" not in table
    assert table["agreement_change_points"].min() == pytest.approx(-3.0)


def test_compare_without_labels_tightens_the_tolerance_in_agreement_points(env):
    stored(env, "a-no-labels")
    app = open_page("compare", model=UNLABELLED, dataset=DATASET, drop="0.5")
    assert "Float16" in app.success[0].value and "-0.2 points of agreement" in app.success[0].value
    app.radio(key="compare_objective").set_value("accuracy").run()
    assert not app.exception
    assert "closest to the float model" in words(app)


def test_recommend_without_labels_checks_the_agreement_drop_and_says_so(env):
    stored(env, "a-no-labels")
    app = open_page("recommend", model=UNLABELLED, dataset=DATASET)
    app.radio(key="recommend_hardware").set_value("edgetpu").run()
    text = words(app)
    assert NO_LABELS_NOTE in text
    assert "Integer only (int8 I/O) loses 3.0 points of agreement, more than your 1-point tolerance" in text
    app.number_input(key="recommend_drop").set_value(5.0).run()
    assert "so the tolerance applies to it), against the Keras baseline: Integer only (int8 I/O) is 16.0x " \
           "smaller, -3.0 points of agreement" in app.success[0].value


def test_details_without_labels_shows_no_labels_for_accuracy(env):
    store = stored(env, "a-no-labels")
    app = open_page("details", row=row_id_of(store, UNLABELLED, "dynamic"))
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Accuracy"] == NO_LABELS and metrics["Agreement"] == "0.9900"
    assert "the dataset has x_test only" in words(app)
    assert "no labels, agreement 0.990" in app.selectbox(key="details_row").format_func(
        app.selectbox(key="details_row").value)


def test_details_of_the_unlabelled_baseline_has_full_agreement(env):
    store = stored(env, "a-no-labels")
    app = open_page("details", row=row_id_of(store, UNLABELLED, "baseline"))
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Accuracy"] == NO_LABELS and metrics["Agreement"] == "1.0000"


# --- (b) a model with only its baseline ------------------------------------------------------------


def test_compare_of_a_baseline_only_model_draws_everything_below_it(env):
    stored(env, "b-baseline-only")
    app = open_page("compare", model=CANCELLED, dataset=DATASET)
    assert "only the Keras baseline is measured here" in app.warning[0].value
    assert len(figures(app)) == 3  # size, latency, the two models
    assert {b.key for b in app.download_button} >= {"compare_share_csv", "compare_share_json",
                                                     "compare_share_html"}
    assert "How these numbers were measured" in words(app)


def test_a_baseline_only_model_can_be_picked_to_compare_with(env):
    stored(env, "b-baseline-only")
    app = open_page("compare", model=LABELLED, dataset=DATASET)
    assert app.selectbox(key="compare_other_model").value == CANCELLED
    bars = figures(app)[2]
    assert {trace["name"] for trace in bars["data"]} == {f"{LABELLED} on {DATASET}"}
    assert f"{CANCELLED} on {DATASET}: only the Keras baseline is measured" in bars["layout"]["title"]["text"]
    app.radio(key="compare_two_models_view").set_value("Accuracy vs size").run()
    assert not app.exception and len(figures(app)) == 3


# --- (c) a failed variant, a variant without latency -----------------------------------------------


def test_compare_lists_the_failed_variant_and_ignores_a_missing_latency(env):
    stored(env, "c-failed-variant")
    app = open_page("compare", model=FAILING, dataset=DATASET)
    assert "1 variant(s) failed in this selection" in [e.label for e in app.expander]
    assert app.success[0].value == "**Best inside your budget: Dynamic range — 15.4x smaller, -0.2 points**"
    assert app.dataframe[0].value["latency_p50_ms"].isna().sum() == 1
    budgeted = open_page("compare", model=FAILING, dataset=DATASET, budget="0.9")
    assert budgeted.warning[0].value == ("None fits, because no variant runs within 0.9 ms (fastest: "
                                         "TFLite float32 at 1 ms).")


def test_details_of_the_failed_variant_says_why(env):
    store = stored(env, "c-failed-variant")
    app = open_page("details", row=row_id_of(store, FAILING, "int8-only"))
    assert "This variant failed: int8-only: no int8 kernel" in words(app)
    assert {m.label: m.value for m in app.metric}["Accuracy"] == "n/a"


def test_details_lists_only_the_failed_variant_as_failed(env):
    """A results frame holds NaN for "no error": the measured rows must not read "failed"."""
    stored(env, "c-failed-variant")
    app = open_page("details")
    labels = {option.split(" · ")[0]: option for option in app.selectbox[0].options}
    assert " · failed · " in labels["int8-only"]
    assert [t for t, label in labels.items() if " · failed · " in label] == ["int8-only"]
    assert " · acc " in labels["float32"]


# --- (d) a labelled and an unlabelled model side by side -------------------------------------------


def test_a_labelled_and_an_unlabelled_model_compare_their_own_quality(env):
    stored(env, "d-labelled-and-not")
    app = open_page("compare", model=LABELLED, dataset=DATASET)
    assert NO_LABELS_NOTE not in words(app)  # the labelled model is judged by accuracy
    assert y_titles(figures(app)[0]) == ["Accuracy (%)"]
    assert app.selectbox(key="compare_other_model").value == UNLABELLED
    bars = figures(app)[2]
    assert {trace["name"] for trace in bars["data"]} == {f"{LABELLED} on {DATASET}",
                                                         f"{UNLABELLED} on {DATASET} (no labels: agreement)"}
    assert "accuracy or agreement change, points" in [a["text"] for a in bars["layout"]["annotations"]]
    assert f"{UNLABELLED} on {DATASET} has no labels" in words(app)
    app.radio(key="compare_two_models_view").set_value("Accuracy vs size").run()
    assert y_titles(figures(app)[2]) == ["Accuracy (%)", "Agreement with the float model (%) · no labels"]


# --- the Lab on a workload without labels ----------------------------------------------------------


def prepare_lab_workload(env: Path, store: Store) -> None:
    """A prepared workload of UNLABELLED with tiny extracted tensors and a cached evaluation that has
    no accuracy (what the Lab shows, not how a worker computes it)."""
    cache = ArtifactCache(env / "cache")
    files = env / "files"
    files.mkdir()
    (files / "model.h5").write_bytes(b"stand-in")
    (files / "data.npz").write_bytes(b"stand-in")
    manifest = {"model_name": UNLABELLED, "dataset_name": DATASET, "model_hash": f"{UNLABELLED}-hash",
                "dataset_hash": "dh1", "model_kind": "keras", "model_path": str(files / "model.h5"),
                "dataset_path": str(files / "data.npz"), "split_sizes": {"calibration": 4, "test": 8}}
    lab.write_json(Path(cache.root) / "prepared" / "x-only.json", manifest)
    kernel = {"key": "t0", "name": "dense/kernel", "layer": "dense", "layer_class": "Dense", "kind": "weight",
              "role": "kernel", "shape": [6, 3], "size": 18, "channel_axis": -1, "quantized": True}
    output = {**kernel, "key": "a0", "name": "dense/output", "kind": "activation", "role": "output",
              "shape": [4, 3], "size": 12, "samples": 4}
    rng = np.random.default_rng(0)
    lab.save_tensors(lab.weights_path(cache, manifest), {"t0": rng.normal(size=(6, 3))}, [kernel], manifest)
    lab.save_tensors(lab.activations_path(cache, manifest), {"a0": rng.normal(size=(4, 3))}, [output], manifest)
    weights = lab.load_tensors(lab.weights_path(cache, manifest))
    request = lab.FakeQuantRequest(lab.bits_from_table(lab.layer_table(weights, 8)), symmetric=True,
                                   per_channel=True, calibrator=CALIBRATORS[0], percentile=99.99,
                                   method="linear", activations=False, activation_bits=8)
    lab.write_json(lab.evaluation_path(cache, manifest, request),
                   {"accuracy": None, "float_accuracy": None, "agreement": 0.985})
    fill(store, [make_row("int8-fallback", "ptq", 25_000, None, 0.5, seconds=30, model_name=UNLABELLED,
                          model_hash=f"{UNLABELLED}-hash", agreement=0.98, details=NO_LABEL_DETAILS,
                          params={"weights": "per-channel"})])


def test_the_lab_model_view_shows_agreement_without_labels(env):
    store = stored(env, "a-no-labels")
    prepare_lab_workload(env, store)
    app = open_page("lab")
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Predicted agreement (fake-quantized)"] == "0.9850"
    assert metrics["Float (Keras)"] == NO_LABELS
    assert metrics["Converted: int8-fallback"] == "0.9800 agreement"
