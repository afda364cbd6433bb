"""Baseline-relative comparison in SQL, Pareto front, sweet spot, filters.

Every row here is synthetic (made-up sizes, accuracies and latencies): it tests the arithmetic and
the choices, not any real model.
"""

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from quantlab import analysis
from quantlab.store import COLUMN_NAMES, Store

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
SWEEP = "a" * 32

# technique, family, bytes, accuracy, p50 ms
SYNTHETIC = (("baseline", "baseline", 400_000, 0.950, 2.0),
             ("float32", "float", 100_000, 0.950, 1.0),
             ("float16", "ptq", 50_000, 0.950, 1.0),
             ("dynamic", "ptq", 26_000, 0.948, 0.8),
             ("int8-only", "ptq", 25_000, 0.930, 0.5))


def make_row(technique="dynamic", family="ptq", model_bytes=26_000, accuracy=0.948, p50=0.8, *,
             seconds=0, **overrides):
    row = {"row_id": uuid.uuid4().hex, "sweep_id": SWEEP, "recorded_at": T0 + timedelta(seconds=seconds),
           "result_key": f"k-{technique}", "cached": False, "model_name": "synthetic-cnn",
           "model_hash": "mh1", "dataset_name": "synthetic-digits", "dataset_hash": "dh1",
           "technique": technique, "family": family, "params": {}, "model_bytes": model_bytes,
           "gzip_bytes": None if model_bytes is None else model_bytes // 2, "accuracy": accuracy,
           "agreement": 0.99, "sqnr_db": 30.0, "latency_p50_ms": p50,
           "latency_p90_ms": None if p50 is None else p50 * 1.2, "latency_runs": 50, "num_threads": 1,
           "latency_method": "synthetic batch-1 timing", "provenance": {"cpu_model": "Synthetic CPU"}}
    row.update(overrides)
    return row


def fill(store, rows):
    """Insert synthetic rows in one statement (insert_result opens a connection per row)."""
    store.migrate()
    frame = pd.DataFrame(rows)
    for name in ("params", "provenance", "details"):
        frame[name] = frame.get(name, pd.Series([{}] * len(frame))).map(lambda v: json.dumps(v or {}))
    frame = frame.reindex(columns=list(COLUMN_NAMES))
    with store.connect() as con:
        con.register("incoming", frame)
        con.execute("INSERT INTO results SELECT * FROM incoming")


def synthetic_rows(**overrides):
    return [make_row(t, f, b, a, p, seconds=i, **overrides) for i, (t, f, b, a, p) in enumerate(SYNTHETIC)]


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    fill(store, synthetic_rows())
    return store


def by_technique(frame):
    return frame.set_index("technique")


# --- compare_frame --------------------------------------------------------------------------------


def test_relative_columns_are_computed_against_the_baseline(store):
    frame = by_technique(analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits"))
    assert len(frame) == 5
    assert frame.loc["int8-only", "x_smaller"] == pytest.approx(16.0)
    assert frame.loc["int8-only", "x_smaller_gzip"] == pytest.approx(16.0)
    assert frame.loc["int8-only", "speedup"] == pytest.approx(4.0)
    assert frame.loc["int8-only", "speedup_vs_float32"] == pytest.approx(2.0)
    assert frame.loc["int8-only", "accuracy_change_points"] == pytest.approx(-2.0)
    assert frame.loc["dynamic", "agreement"] == pytest.approx(0.99)
    assert set(frame["reference_technique"]) == {"baseline"}
    assert set(frame["reference_note"]) == {"Keras baseline"}
    assert frame.loc["baseline", "x_smaller"] == pytest.approx(1.0)
    assert frame.loc["dynamic", "label"] == "Dynamic range"


def test_float32_stands_in_when_no_baseline_was_measured(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    fill(store, [r for r in synthetic_rows() if r["technique"] != "baseline"])
    frame = by_technique(analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits"))
    assert set(frame["reference_technique"]) == {"float32"}
    assert frame["reference_note"].iloc[0].startswith("TFLite float32")
    assert frame.loc["int8-only", "x_smaller"] == pytest.approx(4.0)
    assert frame.loc["int8-only", "speedup"] == pytest.approx(2.0)


def test_no_reference_leaves_relative_columns_empty_and_says_so(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    fill(store, [make_row("int8-only")])
    frame = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits")
    assert frame["x_smaller"].isna().all() and frame["accuracy_change_points"].isna().all()
    assert "no reference" in frame["reference_note"].iloc[0]


def test_latest_only_keeps_the_newest_row_of_each_variant(store):
    store.insert_result(make_row("dynamic", accuracy=0.90, seconds=100))
    latest = by_technique(analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits"))
    assert latest.loc["dynamic", "accuracy"] == pytest.approx(0.90)
    every = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits", latest_only=False)
    assert (every["technique"] == "dynamic").sum() == 2


def test_params_make_separate_variants_with_readable_names(store):
    store.insert_result(make_row("prune", "prune", params={"target_sparsity": 0.8}, seconds=10))
    store.insert_result(make_row("prune", "prune", params={"target_sparsity": 0.5}, seconds=11))
    frame = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits")
    assert sorted(frame.loc[frame.technique == "prune", "variant"]) == [
        "prune (target_sparsity: 0.5)", "prune (target_sparsity: 0.8)"]
    assert frame.loc[frame.technique == "prune", "label"].iloc[0] == "Magnitude pruning"


def test_a_technique_no_longer_registered_is_labelled_by_its_id(store):
    store.insert_result(make_row("retired-technique", "ptq", seconds=10))
    frame = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits")
    assert frame.loc[frame.technique == "retired-technique", "label"].iloc[0] == "retired-technique"


def test_latest_shows_only_the_newest_model_version(store):
    store.insert_result(make_row("baseline", "baseline", 400_000, 0.96, 2.0, model_hash="mh2", seconds=50))
    store.insert_result(make_row("dynamic", model_hash="mh2", accuracy=0.955, seconds=51))
    frame = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits")
    assert sorted(frame["technique"]) == ["baseline", "dynamic"]
    assert set(frame["model_hash"]) == {"mh2"}
    assert frame.set_index("technique").loc["dynamic", "accuracy_change_points"] == pytest.approx(-0.5)


def test_a_sweep_without_a_baseline_uses_the_baseline_of_another_sweep(store):
    other = "b" * 32
    store.insert_result(make_row("int16x8", accuracy=0.949, p50=20.0, sweep_id=other, seconds=60))
    frame = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits", sweep_id=other)
    assert list(frame["technique"]) == ["int16x8"]
    assert frame["reference_technique"].iloc[0] == "baseline"
    assert frame["speedup"].iloc[0] == pytest.approx(0.1)


def test_failed_rows_are_left_out_unless_asked_for(store):
    store.insert_result(make_row("uint8-only", model_bytes=None, accuracy=None, p50=None,
                                 error="conversion failed", seconds=70))
    assert "uint8-only" not in set(analysis.compare_frame(store, model="synthetic-cnn",
                                                          dataset="synthetic-digits")["technique"])
    frame = analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits",
                                   include_errors=True)
    assert frame.loc[frame.technique == "uint8-only", "error"].item() == "conversion failed"


def test_filters_select_models_and_are_parameters(store):
    fill(store, synthetic_rows(model_name="synthetic-mobilenet", model_hash="other"))
    assert set(analysis.compare_frame(store, model=None, dataset=None)["model_name"]) == {
        "synthetic-cnn", "synthetic-mobilenet"}
    assert analysis.compare_frame(store, model="x' OR '1'='1", dataset=None).empty


def test_empty_and_missing_stores_give_an_empty_frame_with_the_columns(tmp_path):
    missing = analysis.compare_frame(Store(tmp_path / "none.duckdb", read_only=True), model="m", dataset="d")
    assert missing.empty and "x_smaller" in missing.columns and "row_id" in missing.columns
    empty = Store(tmp_path / "empty.duckdb")
    empty.migrate()
    assert analysis.compare_frame(empty, model="m", dataset="d").empty


def test_ten_thousand_rows_are_compared_in_one_fast_query(store):
    rows = [make_row(t, f, b, a - i * 1e-6, p, seconds=1000 + i, sweep_id=f"{i // 5:032x}",
                     model_name=f"synthetic-{i // 5 % 20}", model_hash=f"h{i // 5 % 20}")
            for i, (t, f, b, a, p) in enumerate(SYNTHETIC * 2000)]
    fill(store, rows)
    started = time.perf_counter()
    frame = analysis.compare_frame(store, model="synthetic-3", dataset="synthetic-digits")
    elapsed = time.perf_counter() - started
    assert len(frame) == 5 and frame["reference_technique"].eq("baseline").all()
    assert elapsed < 2.0
    filters = analysis.list_filters(store)
    assert len(filters.models) == 21


# --- Pareto front ---------------------------------------------------------------------------------


def test_pareto_front_keeps_only_undominated_rows():
    frame = pd.DataFrame({"name": list("abcde"), "size": [1, 2, 3, 2, 5], "acc": [0.5, 0.7, 0.9, 0.6, 0.9]})
    front = analysis.pareto_front(frame, "size", "acc")
    assert list(front["name"]) == ["a", "b", "c"]


def test_pareto_front_flags_ties_and_missing_values():
    frame = pd.DataFrame({"size": [1, 1, 2, np.nan], "acc": [0.5, 0.6, 0.6, 1.0]})
    assert list(analysis.pareto_mask(frame, "size", "acc")) == [False, True, False, False]


def test_pareto_front_directions_can_flip():
    frame = pd.DataFrame({"speed": [1.0, 2.0, 3.0], "loss": [0.1, 0.2, 0.5]})
    front = analysis.pareto_front(frame, "speed", "loss", minimize_x=False, maximize_y=False)
    assert list(front["speed"]) == [3.0, 2.0, 1.0]


def test_pareto_front_is_vectorised_over_many_rows():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.random(100_000), "y": rng.random(100_000)})
    started = time.perf_counter()
    front = analysis.pareto_front(frame, "x", "y")
    assert time.perf_counter() - started < 1.0
    assert front["y"].is_monotonic_increasing and front["x"].is_monotonic_increasing


# --- sweet spot -----------------------------------------------------------------------------------


@pytest.fixture
def frame(store):
    return analysis.compare_frame(store, model="synthetic-cnn", dataset="synthetic-digits")


def test_sweet_spot_is_the_smallest_inside_both_budgets(frame):
    spot = analysis.sweet_spot(frame, latency_budget_ms=1.0, max_accuracy_drop_points=1.0)
    assert spot.found and spot.row["technique"] == "dynamic" and spot.candidates == 3
    assert spot.headline() == ("Best inside your budget: Dynamic range — 15.4x smaller, -0.2 points, "
                               "1.2x faster than TFLite float32 (2.5x faster than the Keras model in "
                               "TensorFlow)")


def test_sweet_spot_objectives(frame):
    assert analysis.sweet_spot(frame, None, 5.0, "latency").row["technique"] == "int8-only"
    assert analysis.sweet_spot(frame, None, 5.0, "accuracy").row["technique"] == "float16"
    assert analysis.sweet_spot(frame, None, None, "size").row["technique"] == "int8-only"
    with pytest.raises(ValueError, match="objective"):
        analysis.sweet_spot(frame, None, None, "cost")


def test_the_keras_baseline_is_never_the_sweet_spot(frame):
    spot = analysis.sweet_spot(frame, None, 0.0, "accuracy")
    assert spot.row["technique"] != "baseline"


def test_none_fits_when_nothing_is_fast_enough(frame):
    spot = analysis.sweet_spot(frame, 0.1, 1.0)
    assert not spot.found
    assert spot.headline() == ("None fits, because no variant runs within 0.1 ms (fastest: "
                               "Integer only (int8 I/O) at 0.5 ms).")


def test_none_fits_when_everything_loses_too_much(frame):
    worse = frame.assign(accuracy_change_points=frame["accuracy_change_points"] - 5)
    spot = analysis.sweet_spot(worse, None, 1.0)
    assert "every variant loses more than 1 point (" in spot.reason
    assert "smallest loss" in spot.reason


def test_none_fits_when_the_fast_ones_are_inaccurate_and_the_accurate_ones_slow(frame):
    spot = analysis.sweet_spot(frame, 0.6, 0.5)
    assert "1 variant(s) within 0.6 ms each lose more than 0.5 points" in spot.reason
    assert "too slow (fastest: Dynamic range at 0.8 ms)" in spot.reason


def test_none_fits_without_rows_or_reference(frame, tmp_path):
    assert "run a sweep" in analysis.sweet_spot(frame.iloc[0:0], 1.0, 1.0).reason
    assert "only the Keras baseline" in analysis.sweet_spot(frame[frame.technique == "baseline"], 1, 1).reason
    no_ref = frame.assign(accuracy_change_points=np.nan)
    assert "no baseline or float32 row" in analysis.sweet_spot(no_ref, None, 1.0).reason


def test_none_fits_when_every_tflite_variant_failed_says_so(frame):
    """It said "only the Keras baseline is measured here; run some TFLite techniques" after three
    had been run and failed (a model with an op TFLite has no kernel for)."""
    failed = frame.assign(error=np.where(frame.technique == "baseline", None, "no kernel"))
    reason = analysis.sweet_spot(failed, 1, 1).reason
    assert reason.startswith(f"every TFLite variant here failed ({(frame.technique != 'baseline').sum()})")


# --- words, filters, specs ------------------------------------------------------------------------


def test_describe_gain_leads_with_the_like_for_like_speedup_when_the_reference_is_keras():
    row = {"technique": "dynamic", "x_smaller": 8.0, "accuracy_change_points": -0.2, "speedup": 400.0,
           "speedup_vs_float32": 1.5, "reference_technique": "baseline"}
    assert analysis.describe_gain(row) == ("8.0x smaller, -0.2 points, 1.5x faster than TFLite float32 "
                                           "(400.0x faster than the Keras model in TensorFlow)")
    slower = {**row, "speedup_vs_float32": 0.5}
    assert "2.0x slower than TFLite float32 (400.0x faster than the Keras" in analysis.describe_gain(slower)
    assert analysis.describe_gain({**row, "reference_technique": "float32"}).endswith("400.0x faster")


def test_describe_gain_says_larger_and_slower_and_unknown():
    assert analysis.describe_gain({"x_smaller": 0.5, "accuracy_change_points": 0.04, "speedup": 0.25}) == \
        "2.0x larger, ±0.0 points, 4.0x slower"
    assert analysis.describe_gain({"x_smaller": 4.0, "accuracy_change_points": None}) == \
        "4.0x smaller, accuracy change unknown"


def test_measurement_note_comes_from_the_rows(frame):
    note = analysis.measurement_note(frame)
    assert "synthetic batch-1 timing" in note and "threads: 1" in note
    assert "50 timed runs" in note and "Synthetic CPU" in note
    assert analysis.measurement_note(frame.iloc[0:0]) == ""


def test_list_filters_gives_distinct_values_pairs_and_sweeps(store):
    fill(store, synthetic_rows(model_name="synthetic-mobilenet", model_hash="other",
                               dataset_name="synthetic-cifar", sweep_id="c" * 32))
    filters = analysis.list_filters(store)
    assert filters.models == ["synthetic-cnn", "synthetic-mobilenet"]
    assert filters.datasets == ["synthetic-cifar", "synthetic-digits"]
    assert filters.datasets_for("synthetic-mobilenet") == ["synthetic-cifar"]
    sweeps = filters.sweeps_for("synthetic-cnn", "synthetic-digits")
    assert list(sweeps["sweep_id"]) == [SWEEP] and sweeps["variants"].item() == 5
    assert "5 variants" in analysis.sweep_label(sweeps.iloc[0].to_dict())


def test_list_filters_of_a_missing_store_is_empty(tmp_path):
    assert analysis.list_filters(Store(tmp_path / "none.duckdb", read_only=True)).empty


def test_last_sweep_spec_reads_the_newest_sweep(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    store.start_sweep("synthetic-cnn", "synthetic-digits", {"model": "/x/old.keras"}, "test")
    store.start_sweep("synthetic-cnn", "synthetic-digits", {"model": "/x/new.keras"}, "test")
    assert analysis.last_sweep_spec(store, "synthetic-cnn", "synthetic-digits") == {"model": "/x/new.keras"}
    assert analysis.last_sweep_spec(store, "other", "synthetic-digits") is None


def test_table_frame_orders_families_and_keeps_row_ids(frame):
    table = analysis.table_frame(frame)
    assert list(table["family"])[:2] == ["baseline", "float"]
    assert table["row_id"].notna().all() and "accuracy_change_points" in table.columns


def test_the_table_leads_with_the_change_latency_and_speed_ups_and_dashes_missing_text(frame):
    table = analysis.table_frame(frame.assign(input_dtype=None))
    assert list(table.columns[:9]) == ["label", "accuracy_change_points", "accuracy_change_ci",
                                       "differs_from_baseline", "latency_p50_ms", "latency_cpu_busy",
                                       "speedup_vs_float32", "speedup", "x_smaller"]
    assert set(table["input_dtype"]) == {"—"}
    assert list(analysis.table_frame(frame, "agreement").columns[1:3]) == ["agreement_change_points",
                                                                          "agreement_change_ci"]


def test_most_accurate_breaks_a_tie_by_the_smaller_file_then_the_faster():
    rows = pd.DataFrame([
        {"row_id": r, "technique": t, "label": t, "error": None, "model_bytes": b, "latency_p50_ms": p,
         "accuracy": 0.95, "accuracy_change_points": 0.0}
        for r, t, b, p in (("a", "float32", 97_000, 0.008), ("b", "float16", 45_000, 0.009),
                           ("c", "dynamic", 24_000, 0.010))])
    assert analysis.sweet_spot(rows, None, 1.0, "accuracy", "accuracy").row["technique"] == "dynamic"
    assert analysis.sweet_spot(rows, None, 1.0, "latency", "accuracy").row["technique"] == "float32"
