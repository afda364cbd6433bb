"""Which quality a workload is judged by: accuracy, or, without labels, top-1 agreement with the float
model; and what every analysis, chart and recommendation function does with it.

The contract (quantlab.analysis.quality_metric): rows whose successful measurements all lack an
accuracy but have an agreement (or say `"labels": false`) are judged by agreement; anything else by
accuracy. Every row here is synthetic and made in the test.
"""

import numpy as np
import pandas as pd
import pytest

from quantlab import analysis, charts, lab, recommend, ui_state
from quantlab.analysis import NO_LABELS, quality_metric
from quantlab.store import Store
from tests.test_analysis import fill, make_row

# technique, family, bytes, agreement, p50 ms
UNLABELLED = (("baseline", "baseline", 400_000, 1.000, 2.0),
              ("float32", "float", 100_000, 1.000, 1.0),
              ("float16", "ptq", 50_000, 0.998, 1.0),
              ("dynamic", "ptq", 26_000, 0.990, 0.8),
              ("int8-only", "ptq", 25_000, 0.970, 0.5))


def unlabelled_rows(**overrides):
    return [make_row(t, f, b, None, p, seconds=i, agreement=g,
                     details={"labels": False, "label_note": "x_test only"}, **overrides)
            for i, (t, f, b, g, p) in enumerate(UNLABELLED)]


@pytest.fixture
def frame(tmp_path):
    """compare_frame of a workload without labels."""
    store = Store(tmp_path / "q.duckdb")
    fill(store, unlabelled_rows())
    return analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits")


def edgetpu():
    return recommend.recommend(recommend.Answers(hardware="edgetpu"))


# --- the contract ---------------------------------------------------------------------------------


def test_rows_without_any_accuracy_but_with_agreement_are_judged_by_agreement(frame):
    assert quality_metric(frame) == "agreement"
    assert quality_metric(frame.iloc[0].to_dict()) == "agreement"  # one row works too


def test_any_measured_accuracy_means_accuracy():
    labelled = pd.DataFrame({"accuracy": [0.95, np.nan], "agreement": [1.0, 0.99], "error": [None, None]})
    assert quality_metric(labelled) == "accuracy"


def test_nothing_measured_is_judged_by_accuracy():
    assert quality_metric(None) == "accuracy"
    assert quality_metric(pd.DataFrame()) == "accuracy"
    failed = pd.DataFrame({"accuracy": [np.nan], "agreement": [np.nan], "error": ["crashed"]})
    assert quality_metric(failed) == "accuracy"


def test_details_saying_no_labels_count_even_when_every_row_failed():
    failed = pd.DataFrame({"accuracy": [np.nan], "agreement": [np.nan], "error": ["crashed"],
                           "details": ['{"labels": false}']})
    assert quality_metric(failed) == "agreement"


def test_workload_quality_reads_the_store(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    fill(store, unlabelled_rows() + [make_row(model_name="labelled-cnn", model_hash="other")])
    assert analysis.workload_quality(store, "synthetic-cnn", "synthetic-digits") == "agreement"
    assert analysis.workload_quality(store, "labelled-cnn", "synthetic-digits") == "accuracy"
    assert analysis.workload_quality(store, None, None) == "accuracy"


# --- analysis --------------------------------------------------------------------------------------


def test_agreement_change_is_computed_against_the_reference(frame):
    change = frame.set_index("technique")["agreement_change_points"]
    assert change["baseline"] == 0 and change["int8-only"] == pytest.approx(-3.0)
    assert frame["accuracy_change_points"].isna().all()


def test_the_sweet_spot_without_labels_keeps_the_agreement_drop_within_the_tolerance(frame):
    spot = analysis.sweet_spot(frame, None, 1.0)
    assert spot.metric == "agreement" and spot.row["technique"] == "dynamic"
    assert spot.reason == "the smallest of 3 variant(s) losing at most 1 point of agreement"
    assert "-1.0 points of agreement" in spot.headline()
    assert analysis.sweet_spot(frame, None, 0.5).row["technique"] == "float16"
    assert analysis.sweet_spot(frame, None, 5.0, "accuracy").reason.startswith("the closest to the float model")


def test_without_labels_and_without_a_reference_the_agreement_drop_is_unknown(frame):
    spot = analysis.sweet_spot(frame.assign(agreement_change_points=np.nan), None, 1.0)
    assert "to measure the agreement drop against" in spot.reason


def test_rows_without_latency_never_fit_a_latency_budget_and_never_raise(frame):
    no_latency = frame.assign(latency_p50_ms=np.where(frame["agreement"] > 0.98, np.nan,
                                                      frame["latency_p50_ms"]))
    spot = analysis.sweet_spot(no_latency, 1.0, 0.5)
    assert not spot.found
    assert spot.reason.endswith("within the agreement tolerance have no latency measurement")
    assert "No latency" in analysis.measurement_note(frame.assign(latency_method=None))
    assert analysis.sweet_spot(no_latency, None, 1.0).row["technique"] == "dynamic"


def test_describe_gain_names_the_agreement_drop():
    row = {"x_smaller": 4.0, "accuracy": None, "agreement": 0.99, "agreement_change_points": -1.0}
    assert analysis.describe_gain(row) == "4.0x smaller, -1.0 points of agreement"
    assert analysis.describe_gain({**row, "agreement_change_points": None}) == \
        "4.0x smaller, agreement change unknown"


def test_the_table_says_no_labels_and_shows_the_agreement_change(frame):
    table = analysis.table_frame(frame)
    assert set(table["accuracy"]) == {NO_LABELS}
    assert "agreement_change_points" in table and "accuracy_change_points" not in table
    assert list(analysis.table_frame(frame.iloc[0:0], "agreement").columns) == \
        list(analysis.table_columns("agreement"))


# --- charts ----------------------------------------------------------------------------------------


def test_the_tradeoff_chart_plots_agreement_and_says_so_on_the_axis(frame):
    fig = charts.accuracy_vs_size(frame, max_accuracy_drop_points=1.0)
    assert fig.layout.yaxis.title.text == "Agreement with the float model (%) · no labels"
    assert fig.layout.title.text == "Agreement vs size"
    ptq = next(t for t in fig.data if t.name == "ptq")
    assert list(ptq.y) == pytest.approx([99.8, 99.0, 97.0])
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert list(front.x) == [25_000, 26_000, 50_000, 100_000]
    floor = next(t for t in fig.data if t.name == "agreement floor (-1 point)")
    assert list(floor.y) == [99.0, 99.0]


def test_hover_says_no_labels_and_quotes_the_agreement_change(frame):
    text = charts.hover_text(frame).iloc[-1]
    assert "accuracy no labels · agreement 97.00% (-3.00 points)" in text and "nan" not in text.lower()


def test_hover_of_no_rows_is_empty_not_a_type_error():
    assert charts.hover_text(pd.DataFrame(columns=["technique", "accuracy"])).empty


def test_two_models_when_one_has_only_its_baseline(frame):
    baseline_only = frame[frame["technique"] == "baseline"]
    fig = charts.model_comparison_figure(frame, baseline_only, "a", "b")
    assert {t.name for t in fig.data} == {"a (no labels: agreement)"}
    assert "b: only the Keras baseline is measured" in fig.layout.title.text
    assert not charts.model_comparison_figure(baseline_only, baseline_only, "a", "b").data


def test_two_models_one_labelled_compare_each_ones_own_quality_change(frame):
    labelled = frame.assign(accuracy=frame["agreement"] - 0.05,
                            accuracy_change_points=frame["agreement_change_points"] * 2)
    fig = charts.model_comparison_figure(labelled, frame, "a", "b")
    assert fig.layout.annotations[2].text == "accuracy or agreement change, points"
    change_a, change_b = [t for t in fig.data if t.xaxis == "x3"]
    assert change_a.name == "a" and change_b.name == "b (no labels: agreement)"
    assert min(change_a.x) == pytest.approx(-6.0) and min(change_b.x) == pytest.approx(-3.0)
    scatter = charts.side_by_side_tradeoff(labelled, frame, "a", "b")
    assert scatter.layout.yaxis.title.text == "Accuracy (%)"
    assert scatter.layout.yaxis2.title.text.startswith("Agreement with the float model")


# --- recommend -------------------------------------------------------------------------------------


def test_recommend_checks_the_agreement_drop_and_says_that_it_did(frame):
    backing = recommend.back_with_measurements(edgetpu(), frame)
    assert backing.status == "exceeds" and backing.metric == "agreement"
    assert "no labels: quality is top-1 agreement with the float model" in backing.text
    assert "Integer only (int8 I/O) loses 3.0 points of agreement" in backing.text
    relaxed = recommend.recommend(recommend.Answers(hardware="edgetpu", max_drop_points=5.0))
    fits = recommend.back_with_measurements(relaxed, frame)
    assert fits.status == "fits" and "-3.0 points of agreement" in fits.text


def test_recommend_without_a_reference_asks_for_the_baseline_to_measure_agreement(frame):
    backing = recommend.back_with_measurements(edgetpu(), frame.assign(agreement_change_points=np.nan))
    assert backing.status == "no-reference" and "its agreement drop against" in backing.text


# --- the page engines ------------------------------------------------------------------------------


def test_ui_state_shows_no_labels_for_the_accuracy_of_such_rows():
    row = {"technique": "dynamic", "model_name": "m", "dataset_name": "d", "accuracy": None,
           "agreement": 0.99, "row_id": "abc", "details": {"labels": False}}
    assert ui_state.number_text(row, "accuracy", 4) == NO_LABELS
    assert ui_state.number_text(row, "agreement", 4) == "0.9900"
    assert ui_state.number_text({"accuracy": None}, "accuracy", 4) == "n/a"
    assert "no labels, agreement 0.990" in ui_state.row_label(row)
    assert list(ui_state.results_table([row])["accuracy"]) == [NO_LABELS]
    assert "labels" not in ui_state.extra_details(row)


def test_the_lab_tiles_show_agreement_without_labels():
    result = {"accuracy": None, "float_accuracy": None, "agreement": 0.985}
    rows = [{"technique": "int8-fallback", "params": {}, "accuracy": None, "agreement": 0.98, "row_id": "r1"}]
    tiles = {t.label: t.value for t in lab.model_view_tiles(result, rows)}
    assert tiles == {"Predicted agreement (fake-quantized)": "0.9850", "Float (Keras)": NO_LABELS,
                     "Converted: int8-fallback": "0.9800 agreement"}
    labelled = lab.model_view_tiles({"accuracy": 0.9, "float_accuracy": 0.95, "agreement": 0.97}, [])
    assert labelled[0].value == "0.9000" and labelled[0].delta == "-5.00 points vs float"
    assert lab.quality_text(rows[0]) == "no labels, agreement 0.9800"
