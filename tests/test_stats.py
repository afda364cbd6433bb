"""Intervals and paired tests: hand-checked numbers, then how rows and rankings use them."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab import stats


# --- Wilson ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, trials, low, high", [
    (0, 10, 0.0, 0.2775),        # z^2/(n + z^2) = 3.8415 / 13.8415
    (5, 10, 0.2366, 0.7634),
    (450, 450, 0.9915, 1.0),     # n / (n + z^2) = 450 / 453.8415
    (400, 450, 0.8565, 0.9147),
])
def test_wilson_bounds_for_known_counts(successes, trials, low, high):
    interval = stats.wilson_interval(successes, trials)
    assert interval.low == pytest.approx(low, abs=5e-5)
    assert interval.high == pytest.approx(high, abs=5e-5)


def test_wilson_refuses_an_empty_split():
    with pytest.raises(ValueError, match="non-empty test split"):
        stats.wilson_interval(0, 0)


def test_one_sample_of_450_is_inside_the_interval():
    measured, one_more = stats.proportion_interval(430 / 450, 450), 431 / 450
    assert measured.contains(one_more)
    assert measured.width > 0.03  # about ±1.9 points at 95% accuracy on 450 samples


# --- McNemar --------------------------------------------------------------------------------------

def test_mcnemar_exact_p_for_known_discordant_pairs():
    assert stats.mcnemar_p(0, 5) == pytest.approx(0.0625)           # 2 / 2^5
    assert stats.mcnemar_p(1, 9) == pytest.approx(22 / 1024)        # 2 * (1 + 10) / 2^10
    assert stats.mcnemar_p(9, 1) == stats.mcnemar_p(1, 9)
    assert stats.mcnemar_p(5, 5) == 1.0


def test_identical_predictions_give_p_one():
    correct = np.array([True] * 430 + [False] * 20)
    assert stats.paired_mcnemar_p(correct, correct.copy()) == 1.0
    assert stats.paired_difference_interval(correct, correct).to_list() == [0.0, 0.0]


def test_losing_five_points_on_450_samples_is_significant():
    rng = np.random.default_rng(0)
    baseline = np.array([True] * 430 + [False] * 20)
    rng.shuffle(baseline)
    variant = baseline.copy()
    right = np.flatnonzero(baseline)
    wrong = np.flatnonzero(~baseline)
    variant[right[:28]] = False     # 28 samples lost
    variant[wrong[:5]] = True       # 5 gained: net -23 samples = -5.1 points
    assert (variant.mean() - baseline.mean()) * 100 < -5
    assert stats.paired_mcnemar_p(baseline, variant) < 0.01
    assert stats.paired_difference_interval(baseline, variant).high < 0


def test_one_sample_difference_is_noise():
    baseline = np.array([True] * 430 + [False] * 20)
    variant = baseline.copy()
    variant[0] = False              # -0.22 points
    p = stats.paired_mcnemar_p(baseline, variant)
    assert p == 1.0
    assert stats.within_noise(None, None, p_value=p)


def test_pairing_different_splits_is_refused():
    with pytest.raises(ValueError, match="same test split"):
        stats.discordant_pairs([True, False], [True])


# --- bootstrap of the median ----------------------------------------------------------------------

def test_bootstrap_interval_contains_the_median_and_is_deterministic():
    timings = np.random.default_rng(1).lognormal(mean=-3, sigma=0.2, size=200)
    interval = stats.bootstrap_median_interval(timings)
    assert interval.contains(float(np.median(timings)))
    assert stats.bootstrap_median_interval(timings) == interval


def test_bootstrap_interval_narrows_with_more_runs():
    rng = np.random.default_rng(2)
    few = stats.bootstrap_median_interval(rng.lognormal(-3, 0.3, size=50))
    many = stats.bootstrap_median_interval(rng.lognormal(-3, 0.3, size=1000))
    assert many.width < few.width / 2


def test_overlap_and_noise():
    assert stats.intervals_overlap([0.0062, 0.0071], [0.0066, 0.0075])
    assert not stats.intervals_overlap([0.0062, 0.0065], [0.0066, 0.0075])
    assert not stats.intervals_overlap(None, [0.0, 1.0])
    assert stats.within_noise([1, 2], [3, 4], p_value=0.3)
    assert not stats.within_noise([1, 2], [1.5, 4], p_value=0.001)


# --- latency modes --------------------------------------------------------------------------------

def test_a_machine_switching_speeds_gives_a_bimodal_distribution():
    rng = np.random.default_rng(3)
    two_speeds = np.concatenate([rng.normal(0.010, 0.0004, 300), rng.normal(0.015, 0.0005, 200)])
    modes = stats.latency_modes(two_speeds)
    assert modes.bimodal
    assert modes.fast_ms == pytest.approx(0.010, abs=5e-4)
    assert modes.slow_ms == pytest.approx(0.015, abs=5e-4)
    assert "bimodal" in modes.describe()


def test_one_speed_with_a_slow_tail_is_not_bimodal():
    rng = np.random.default_rng(4)
    assert not stats.latency_modes(rng.lognormal(-4.6, 0.15, 500)).bimodal
    assert not stats.latency_modes([0.01] * 100).bimodal


# --- ranking with ties ----------------------------------------------------------------------------

def ranked_rows(**changes):
    """float32 and dynamic as the issue found them: 0.00655 vs 0.007 ms, intervals overlapping."""
    import pandas as pd

    rows = pd.DataFrame([
        {"technique": "float32", "label": "TFLite float32", "model_bytes": 84_804, "accuracy": 0.9556,
         "accuracy_ci_low": 0.932, "accuracy_ci_high": 0.971, "latency_p50_ms": 0.00655,
         "latency_p50_ci_low_ms": 0.0063, "latency_p50_ci_high_ms": 0.0071},
        {"technique": "dynamic", "label": "Dynamic range", "model_bytes": 24_152, "accuracy": 0.9556,
         "accuracy_ci_low": 0.932, "accuracy_ci_high": 0.971, "latency_p50_ms": 0.0070,
         "latency_p50_ci_low_ms": 0.0068, "latency_p50_ci_high_ms": 0.0074},
    ])
    for column, values in changes.items():
        rows[column] = values
    return rows


def test_tie_on_latency_goes_to_the_smaller_variant_and_says_so():
    from quantlab.analysis import rank_with_ties

    ranking = rank_with_ties(ranked_rows(), "latency")
    assert ranking.row["technique"] == "dynamic"
    assert "tie on p50 latency (95% intervals overlap)" in ranking.explanation
    assert "smaller" in ranking.explanation


def test_a_latency_difference_outside_the_intervals_decides():
    from quantlab.analysis import rank_with_ties

    apart = ranked_rows(latency_p50_ci_high_ms=[0.0066, 0.0074], latency_p50_ci_low_ms=[0.0063, 0.0069])
    ranking = rank_with_ties(apart, "latency")
    assert ranking.row["technique"] == "float32" and ranking.explanation == ""


def test_rows_without_intervals_rank_on_their_values():
    from quantlab.analysis import rank_with_ties

    bare = ranked_rows().drop(columns=["latency_p50_ci_low_ms", "latency_p50_ci_high_ms"])
    assert rank_with_ties(bare, "latency").row["technique"] == "float32"


def test_most_accurate_treats_one_sample_as_a_tie_and_takes_the_smaller():
    from quantlab.analysis import rank_with_ties

    rows = ranked_rows(accuracy=[0.9578, 0.9556])
    assert rank_with_ties(rows, "accuracy").row["technique"] == "dynamic"


def test_the_sweet_spot_uses_the_tie_aware_ranking():
    from quantlab.analysis import sweet_spot

    rows = ranked_rows(error=[None, None], family=["float", "ptq"],
                       accuracy_change_points=[0.0, 0.0])
    spot = sweet_spot(rows, None, 1.0, "latency", "accuracy")
    assert spot.row["technique"] == "dynamic"
    assert "tie on p50 latency" in spot.reason
    assert spot.tie_note() == ("Picked from a tie: TFLite float32, Dynamic range tie on p50 latency "
                               "(95% intervals overlap), so the smaller one is preferred.")
    apart = ranked_rows(error=[None, None], family=["float", "ptq"], accuracy_change_points=[0.0, 0.0],
                        latency_p50_ci_high_ms=[0.0066, 0.0074], latency_p50_ci_low_ms=[0.0063, 0.0069])
    assert sweet_spot(apart, None, 1.0, "latency", "accuracy").tie_note() is None


# --- rows: intervals stored, p-values against the reference when read -----------------------------

def write_workload(folder, lost: int):
    """Kept predictions of a 450-sample workload: baseline 430 right, a variant `lost` fewer."""
    from quantlab import predictions

    labels = np.arange(450) % 10
    baseline = labels.copy()
    baseline[:20] = (labels[:20] + 1) % 10
    variant = baseline.copy()
    variant[20:20 + lost] = (labels[20:20 + lost] + 1) % 10
    paths = {}
    for name, classes in (("labels", labels), ("float", baseline), ("baseline", baseline),
                          ("int8-only", variant)):
        paths[name] = str(predictions.save(folder / f"{name}.npy", predictions.compact(classes, 10)))
    return paths


def stored_row(paths, technique, accuracy, samples_ms):
    from quantlab import uncertainty

    row = {"sweep_id": "s", "result_key": f"k-{technique}", "cached": False, "model_name": "m",
           "model_hash": "mh", "dataset_name": "d", "dataset_hash": "dh", "technique": technique,
           "family": "ptq", "params": {}, "model_bytes": 1000, "accuracy": accuracy,
           "agreement": None, "latency_p50_ms": float(np.median(samples_ms)), "latency_method": "t",
           "details": {"predictions": {"top1": paths[technique], "float_top1": paths["float"],
                                       "labels": paths["labels"]},
                       "latency_samples_ms": list(samples_ms), "latency_others_cpu_share": 0.8}}
    row["agreement"] = float(np.mean(np.load(paths[technique]) == np.load(paths["float"])))
    row.update(uncertainty.row_intervals(row))
    return row


def test_rows_carry_intervals_and_compare_frame_adds_p_against_the_baseline(tmp_path):
    from quantlab.analysis import compare_frame
    from quantlab.store import Store

    paths = write_workload(tmp_path, lost=25)
    samples = np.random.default_rng(5).normal(0.5, 0.02, 200)
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    store.insert_results([stored_row(paths, "baseline", 430 / 450, samples),
                          stored_row(paths, "int8-only", 405 / 450, samples)])
    frame = compare_frame(store, model="m", dataset="d").set_index("technique")
    assert frame.loc["int8-only", "accuracy_ci_low"] == pytest.approx(stats.wilson_interval(405, 450).low)
    assert frame.loc["int8-only", "test_samples"] == 450
    assert bool(frame.loc["int8-only", "latency_cpu_busy"])   # others used 80% of the CPU
    assert frame.loc["int8-only", "latency_p50_ci_low_ms"] < 0.5 < frame.loc["int8-only", "latency_p50_ci_high_ms"]
    assert frame.loc["baseline", "accuracy_change_p"] == 1.0
    assert frame.loc["int8-only", "accuracy_change_p"] < 0.01
    assert frame.loc["int8-only", "accuracy_change_ci_high"] < 0   # points, paired
    assert bool(frame.loc["int8-only", "differs_from_reference"])
    assert frame.loc["int8-only", "agreement_change_p"] < 0.01


def test_exports_carry_the_intervals_and_p_values(tmp_path):
    import json

    from quantlab import share
    from quantlab.analysis import compare_frame
    from quantlab.store import Store

    paths = write_workload(tmp_path, lost=1)
    samples = np.random.default_rng(6).normal(0.5, 0.02, 100)
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    store.insert_results([stored_row(paths, "baseline", 430 / 450, samples),
                          stored_row(paths, "int8-only", 429 / 450, samples)])
    frame = compare_frame(store, model="m", dataset="d")
    header = share.export_csv(frame).decode().splitlines()[0].split(",")
    assert {"accuracy_ci_low", "accuracy_ci_high", "accuracy_change_p", "latency_p50_ci_low_ms",
            "latency_cpu_busy", "differs_from_reference"} <= set(header)
    records = {r["technique"]: r for r in json.loads(share.export_json(frame))}
    assert records["int8-only"]["accuracy_change_p"] == 1.0          # one sample: noise
    assert records["int8-only"]["differs_from_reference"] is False
    report = share.export_html_report(frame)
    assert "accuracy_ci_low" in report and "McNemar" in report


def workload_frame(tmp_path, lost):
    """compare_frame of a 450-sample baseline and an int8-only losing `lost` samples."""
    from quantlab.analysis import compare_frame
    from quantlab.store import Store

    paths = write_workload(tmp_path, lost=lost)
    samples = np.random.default_rng(7).normal(0.5, 0.02, 100)
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    store.insert_results([stored_row(paths, "baseline", 430 / 450, samples),
                          stored_row(paths, "int8-only", (430 - lost) / 450, samples)])
    return compare_frame(store, model="m", dataset="d")


def test_the_table_shows_the_change_with_its_interval_and_whether_it_differs(tmp_path):
    from quantlab.analysis import table_frame

    table = table_frame(workload_frame(tmp_path, lost=1)).set_index("label")
    assert {"accuracy_change_ci", "differs_from_baseline", "latency_cpu_busy"} <= set(table.columns)
    row = table.loc["Integer only (int8 I/O)"]
    assert row["accuracy_change_ci"].startswith("-0.22 [") and row["accuracy_change_ci"].endswith("]")
    low, high = (float(v) for v in row["accuracy_change_ci"][7:-1].split(", "))
    assert low < -0.22 < 0 < high
    assert row["differs_from_baseline"] == "no (p = 1)"
    assert bool(row["latency_cpu_busy"])                      # others used 80% of the CPU
    assert table.loc["Float baseline", "differs_from_baseline"] == "reference"


def test_a_five_point_loss_differs_and_a_frame_without_predictions_says_dash(tmp_path):
    import pandas as pd

    from quantlab.analysis import MISSING, table_frame

    table = table_frame(workload_frame(tmp_path, lost=25)).set_index("label")
    assert table.loc["Integer only (int8 I/O)", "differs_from_baseline"].startswith("yes (p = ")
    bare = pd.DataFrame([{"row_id": "r", "technique": "dynamic", "label": "Dynamic", "family": "ptq",
                          "model_bytes": 1, "accuracy": 0.9, "accuracy_change_points": -0.4}])
    shown = table_frame(bare, "accuracy").iloc[0]
    assert shown["accuracy_change_ci"] == "-0.40" and shown["differs_from_baseline"] == MISSING


def test_a_one_sample_loss_is_described_as_within_noise_and_a_real_loss_with_its_interval(tmp_path):
    from quantlab.analysis import describe_gain

    noise = workload_frame(tmp_path / "a", lost=1).set_index("technique").loc["int8-only"].to_dict()
    assert "-0.2 points (within noise on 450 samples)" in describe_gain(noise, "accuracy")
    real = workload_frame(tmp_path / "b", lost=25).set_index("technique").loc["int8-only"].to_dict()
    text = describe_gain(real, "accuracy")
    assert "-5.6 points (95% CI -" in text and "p = " in text and "on 450 samples" in text
    assert "points (within noise" not in text
    assert text.endswith("1.0x faster (within noise)")    # both timed from the same runs


def test_a_speed_up_inside_the_p50_intervals_is_said_to_be_within_noise():
    from quantlab.analysis import describe_gain

    row = {"x_smaller": 4.0, "accuracy_change_points": 0.0, "speedup": 30.0, "speedup_vs_float32": 1.07,
           "reference_technique": "baseline", "technique": "dynamic", "speedup_within_noise": False,
           "speedup_vs_float32_within_noise": True}
    assert describe_gain(row, "accuracy") == ("4.0x smaller, ±0.0 points, 1.1x faster than TFLite float32 "
                                              "(within noise; 30.0x faster than the Keras model in "
                                              "TensorFlow)")
