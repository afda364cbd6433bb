"""Sharing: view state to and from URL parameters (invalid values dropped, never a crash), exports."""

import json
import random
import string
from datetime import datetime, timezone
from io import StringIO

import pandas as pd
import plotly.graph_objects as go
import pytest

from quantlab import share
from quantlab.share import ViewState
from quantlab.store import COLUMN_NAMES

FULL = ViewState(page="compare", model="seed-cnn", dataset="digits-28", techniques=("dynamic", "int8-only"),
                 families=("ptq",), include_errors=False, latest_only=True, x_metric="latency_p50_ms",
                 y_metric="accuracy", latency_budget_ms=2.5, accuracy_drop_pp=1.0,
                 row="0123456789abcdef0123456789abcdef", sweep="fedcba9876543210")
COMPARE = ViewState(page="compare", model="seed-cnn", dataset="digits-28", latency_budget_ms=0.5,
                    accuracy_drop_pp=0.0, objective="latency")
RECOMMEND = ViewState(page="recommend", model="seed-cnn", dataset="digits-28", accuracy_drop_pp=2.5,
                      hardware="mcu", drop_ok=True, representative_data=False, can_retrain=True,
                      integer_io=False, uint8_io=True)
LAB = ViewState(page="lab", workload="0123abcd", lab_tab="model", source="activations",
                layer="conv2d/kernel", bits=4, levels="kmeans", symmetric=False, per_channel=True,
                calibrator="percentile", percentile=99.9, channel=3, log_scale=True,
                layer_bits=("dense:2", "conv2d:32"), activations=True, activation_bits=16, keep_float=1)


def test_a_full_state_round_trips_through_the_url():
    params = share.encode(FULL)
    assert params["techniques"] == "dynamic,int8-only"
    assert params["budget"] == "2.5" and params["errors"] == "0" and params["latest"] == "1"
    assert share.decode(params) == FULL


@pytest.mark.parametrize("state", [COMPARE, RECOMMEND, LAB], ids=["compare", "recommend", "lab"])
def test_every_control_that_changes_a_conclusion_round_trips(state):
    params = share.encode(state)
    assert share.decode(params) == state
    assert share.decode_with_report(params)[1] == []


def test_a_link_says_which_objective_answers_and_quantizer_it_shows():
    assert share.encode(COMPARE)["objective"] == "latency"
    assert share.encode(RECOMMEND) == {"page": "recommend", "model": "seed-cnn", "dataset": "digits-28",
                                       "drop": "2.5", "hw": "mcu", "drop_ok": "1", "data": "0",
                                       "retrain": "1", "int_io": "0", "uint8": "1"}
    lab = share.encode(LAB)
    assert (lab["bits"], lab["layer"], lab["layer_bits"], lab["pct"]) == ("4", "conv2d/kernel",
                                                                         "dense:2,conv2d:32", "99.9")


def test_the_links_choices_are_the_pages_choices():
    from quantlab import analysis, calibrate, recommend

    assert share.OBJECTIVES == tuple(analysis.OBJECTIVES)
    assert {"cpu", "gpu", "edgetpu", "mcu"} == set(recommend.HARDWARE)
    assert share.decode({"calibrator": "kl", "bits": "16"}) == ViewState(calibrator="kl", bits=16)
    assert set(calibrate.CALIBRATORS) >= {"max", "percentile", "kl", "mse"}


def test_an_empty_state_has_no_parameters():
    assert share.encode(ViewState()) == {}
    assert share.decode({}) == ViewState()


def test_encode_can_limit_the_fields():
    assert share.encode(FULL, ("row",)) == {"row": FULL.row}


@pytest.mark.parametrize("params, dropped", [
    ({"model": "../../etc/passwd"}, "model"),
    ({"model": "/abs/path.keras"}, "model"),
    ({"dataset": "x" * 500}, "dataset"),
    ({"page": "admin"}, "page"),
    ({"techniques": "bogus,also-bogus"}, "techniques"),
    ({"families": "nonsense"}, "families"),
    ({"budget": "nan"}, "budget"),
    ({"budget": "inf"}, "budget"),
    ({"budget": "-3"}, "budget"),
    ({"budget": "0"}, "budget"),
    ({"budget": "fast"}, "budget"),
    ({"drop": "101"}, "drop"),
    ({"errors": "maybe"}, "errors"),
    ({"x": "row_id"}, "x"),
    ({"row": "not-hex!"}, "row"),
    ({"row": "'; DROP TABLE results; --"}, "row"),
    ({"unknown": "1"}, "unknown"),
    ({"objective": "cheapest"}, "objective"),
    ({"hw": "tpu-v9"}, "hw"),
    ({"data": "perhaps"}, "data"),
    ({"bits": "9"}, "bits"),
    ({"bits": "4.5"}, "bits"),
    ({"act_bits": "32"}, "act_bits"),
    ({"channel": "-1"}, "channel"),
    ({"pct": "20"}, "pct"),
    ({"calibrator": "magic"}, "calibrator"),
    ({"tab": "admin"}, "tab"),
    ({"layer": "../../etc/passwd"}, "layer"),
    ({"layer": "dense<script>"}, "layer"),
    ({"layer_bits": "dense:9,conv2d"}, "layer_bits"),
    ({"workload": "xyz"}, "workload"),
])
def test_invalid_values_are_dropped_and_reported(params, dropped):
    state, report = share.decode_with_report(params)
    assert state == ViewState()
    assert report == [dropped]


def test_valid_values_survive_next_to_invalid_ones():
    state = share.decode({"model": "mlp", "techniques": ["dynamic", "bogus,float16"], "budget": "x",
                          "row": "ABCDEF01"})
    assert state == ViewState(model="mlp", techniques=("dynamic", "float16"), row="abcdef01")


def test_repeated_parameters_take_the_last_single_value():
    assert share.decode({"model": ["mlp", "seed-cnn"]}).model == "seed-cnn"


def test_decode_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = string.printable + "éü中\x00\u202e"
    values = [None, 3, 2.5, True, b"bytes", [], [None, 7], {"a": 1}, object()]
    for _ in range(500):
        params = {}
        for _ in range(rng.randint(0, 6)):
            key = rng.choice(list(share.PARAM_FIELDS) + ["", "zz", "page\x00"])
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            params[key] = rng.choice(values + [text, [text, text], text.replace(" ", ",")])
        state = share.decode(params)
        assert isinstance(state, ViewState)
        share.encode(state)  # whatever was kept can be written back
    assert share.decode(None) == ViewState()
    assert share.decode(42) == ViewState()  # not a mapping at all


def test_newer_state_overrides_only_what_it_sets():
    session = ViewState(model="mlp", dataset="digits", row="abcdef01")
    assert session.merged(ViewState(model="seed-cnn")) == ViewState(model="seed-cnn", dataset="digits",
                                                                     row="abcdef01")


def test_share_url_replaces_any_existing_query():
    url = share.share_url("http://localhost:8501/compare?old=1#top", ViewState(model="mlp"))
    assert url == "http://localhost:8501/compare?model=mlp"
    assert share.share_url(None, ViewState()) == ""
    assert share.share_url("http://h/details", FULL, ("row",)) == f"http://h/details?row={FULL.row}"


# --- exports ----------------------------------------------------------------------------------------


@pytest.fixture
def frame():
    rows = []
    for i, technique in enumerate(("float32", "int8-only")):
        row = {name: None for name in COLUMN_NAMES}
        row.update(row_id=f"{i:032x}", sweep_id="s1", technique=technique, family="ptq",
                   model_name="seed-cnn", dataset_name="digits-28", params=json.dumps({"bits": 8}),
                   model_bytes=10_000 // (i + 1), accuracy=0.95 - i / 100, agreement=float("nan"),
                   latency_p50_ms=0.1 * (i + 1), latency_runs=50 + i, num_threads=1,
                   latency_method="invoke() at batch 1", provenance=json.dumps({"cpu_model": "x"}),
                   details=json.dumps({"latency_samples_ms": [0.1, 0.2]}), cached=bool(i),
                   recorded_at=pd.Timestamp("2026-01-02 03:04:05", tz="UTC"),
                   error=None if i == 0 else "<b>boom</b>")
        rows.append(row)
    return pd.DataFrame(rows)


def test_csv_reads_back_with_the_main_columns_first(frame):
    data = share.export_csv(frame)
    back = pd.read_csv(StringIO(data.decode("utf-8")))
    assert len(back) == 2
    assert list(back.columns[:3]) == ["model_name", "dataset_name", "technique"]
    assert set(back.columns) == set(frame.columns)
    assert share.export_csv(pd.DataFrame()) == b""


def test_json_decodes_nested_columns_and_is_strict_json(frame):
    records = json.loads(share.export_json(frame).decode("utf-8"))
    assert records[0]["params"] == {"bits": 8}
    assert records[0]["details"]["latency_samples_ms"] == [0.1, 0.2]
    assert records[0]["agreement"] is None  # NaN is not JSON
    assert records[0]["recorded_at"].startswith("2026-01-02T03:04:05")
    assert "NaN" not in share.export_json(frame).decode("utf-8")


def test_html_report_is_self_contained_with_plotly_embedded_once(frame):
    figures = [go.Figure(go.Bar(x=[1], y=[2])), go.Figure(go.Scatter(x=[1], y=[2]))]
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    html = share.export_html_report(frame, figures, "Seed <CNN> report", generated_at=when)
    assert html.count("plotly.js v") == 1  # the library, inlined once for both figures
    assert html.count("Plotly.newPlot") == 2
    assert "<script src=" not in html  # nothing fetched from a CDN
    assert "Seed &lt;CNN&gt; report" in html and "<CNN>" not in html
    assert "2026-01-02 03:04:05 UTC" in html
    assert "<table" in html and "int8-only" in html
    assert "&lt;b&gt;boom&lt;/b&gt;" in html  # cell text is escaped
    assert "invoke() at batch 1" in html and "runs per variant: 50-51" in html


def test_html_report_without_figures_or_rows_still_renders():
    html = share.export_html_report(pd.DataFrame(), [], "Empty")
    assert "plotly.js" not in html and "No results." in html


def test_measurement_methods_name_threads_and_runs(frame):
    assert share.measurement_methods(frame) == ["invoke() at batch 1; threads: 1; runs per variant: 50-51"]


def test_export_file_names_say_what_they_hold():
    assert share.export_file_name(FULL, "csv") == "quantlab-seed-cnn-digits-28.csv"
    assert share.export_file_name(ViewState(), ".json") == "quantlab.json"
