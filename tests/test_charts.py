"""Figure builders: pure functions of (synthetic) frames; traces, colours, customdata, lines."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from quantlab import charts, recommend

ROWS = (("baseline", "baseline", 400_000, 0.950, 2.0, 0.0),
        ("float32", "float", 100_000, 0.950, 1.0, 0.0),
        ("dynamic", "ptq", 26_000, 0.948, 0.8, -0.2),
        ("int8-only", "ptq", 25_000, 0.930, 0.5, -2.0),
        ("int16x8", "ptq", 27_000, 0.949, 20.0, -0.1),
        ("prune", "prune", 24_000, 0.940, 0.9, -1.0))


def synthetic_frame(rows=ROWS, model="synthetic-cnn"):
    frame = pd.DataFrame(rows, columns=["technique", "family", "model_bytes", "accuracy", "latency_p50_ms",
                                        "accuracy_change_points"])
    frame["row_id"] = [f"{model}-{t}" for t in frame["technique"]]
    frame["label"] = frame["technique"].str.upper()
    frame["gzip_bytes"] = frame["model_bytes"] // 2
    frame["x_smaller"] = 400_000 / frame["model_bytes"]
    frame["x_smaller_gzip"] = frame["x_smaller"]
    frame["speedup"] = 2.0 / frame["latency_p50_ms"]
    frame["agreement"], frame["sqnr_db"] = 0.99, 31.5
    frame["latency_p90_ms"] = frame["latency_p50_ms"] * 1.2
    frame["num_threads"], frame["cached"], frame["error"] = 1, False, None
    frame["params"] = '{}'
    frame.loc[frame.technique == "prune", "params"] = '{"target_sparsity": 0.8}'
    return frame


def traces(fig, name):
    return [t for t in fig.data if t.name == name]


def test_one_trace_per_family_in_a_stable_colour():
    fig = charts.accuracy_vs_size(synthetic_frame())
    families = [t.name for t in fig.data if t.mode and "markers" in t.mode]
    assert families == ["baseline", "float", "ptq", "prune"]
    assert traces(fig, "ptq")[0].marker.color == charts.FAMILY_COLORS["ptq"]
    assert charts.family_color("brand-new") == charts.family_color("brand-new")
    assert charts.family_color("brand-new") in charts.EXTRA_COLORS


def test_points_carry_their_row_id_first_for_click_to_details():
    fig = charts.accuracy_vs_size(synthetic_frame())
    ptq = traces(fig, "ptq")[0]
    assert [row[0] for row in ptq.customdata] == ["synthetic-cnn-dynamic", "synthetic-cnn-int8-only",
                                                  "synthetic-cnn-int16x8"]
    assert list(ptq.y) == pytest.approx([94.8, 93.0, 94.9])


def test_hover_shows_every_measured_figure():
    text = traces(charts.accuracy_vs_size(synthetic_frame()), "prune")[0].hovertext[0]
    for expected in ("PRUNE", "23.4 KB", "16.67x smaller", "gzip 11.7 KB", "94.00%", "-1.00 points",
                     "agreement 99.00%", "SQNR 31.5 dB", "p50 0.9 ms", "p90 1.08 ms", "threads 1",
                     "target_sparsity=0.8", "cached no", "row synthetic-cn"):
        assert expected in text


def test_missing_figures_show_a_dash_not_nan():
    frame = synthetic_frame().assign(sqnr_db=np.nan, agreement=np.nan)
    text = charts.hover_text(frame).iloc[0]
    assert "SQNR —" in text and "agreement —" in text and "nan" not in text.lower()


def test_size_axis_is_log_and_the_front_is_a_line_through_undominated_points():
    fig = charts.accuracy_vs_size(synthetic_frame())
    assert fig.layout.xaxis.type == "log"
    front = traces(fig, "Pareto front")[0]
    assert front.mode == "lines"
    assert list(front.x) == [24_000, 26_000, 27_000, 100_000]


def test_sweet_spot_is_ringed_and_budgets_are_dashed_lines():
    fig = charts.accuracy_vs_latency(synthetic_frame(), sweet_spot_row_id="synthetic-cnn-dynamic",
                                     latency_budget_ms=1.0, max_accuracy_drop_points=1.0)
    best = traces(fig, "Best inside budget")[0]
    assert best.customdata[0][0] == "synthetic-cnn-dynamic" and best.marker.symbol == "star"
    budget = traces(fig, "latency budget 1 ms")[0]
    assert list(budget.x) == [1.0, 1.0] and budget.line.dash == "dash"
    floor = traces(fig, "accuracy floor (-1 point)")[0]
    assert list(floor.y) == pytest.approx([94.0, 94.0])


def test_points_are_labelled_with_changed_parameters_and_the_star_carries_its_own_label():
    fig = charts.accuracy_vs_size(synthetic_frame(), sweet_spot_row_id="synthetic-cnn-dynamic")
    ptq = traces(fig, "ptq")[0]
    # dynamic's label moved to the star; int8-only is off the front (prune is smaller and better):
    # named on hover only
    assert list(ptq.text) == ["", "", "int16x8"]
    assert list(traces(fig, "prune")[0].text) == ["prune(target_sparsity=0.8)"]  # default 0.5
    best = traces(fig, "Best inside budget")[0]
    assert list(best.text) == ["dynamic"] and best.textposition == "top center"


def test_latency_axis_is_log_only_when_values_span_more_than_tenfold():
    assert charts.accuracy_vs_latency(synthetic_frame()).layout.xaxis.type == "log"
    narrow = synthetic_frame()[lambda f: f.technique != "int16x8"]
    assert charts.accuracy_vs_latency(narrow).layout.xaxis.type != "log"


def test_failed_and_unmeasured_rows_are_not_plotted():
    frame = synthetic_frame()
    frame.loc[frame.technique == "prune", "error"] = "crashed"
    frame.loc[frame.technique == "int16x8", "accuracy"] = np.nan
    fig = charts.accuracy_vs_size(frame)
    assert not traces(fig, "prune")
    assert len(traces(fig, "ptq")[0].x) == 2


def test_empty_frame_gives_a_figure_that_says_so():
    fig = charts.accuracy_vs_size(synthetic_frame().iloc[0:0])
    assert "Nothing measured" in fig.layout.annotations[0].text


def test_many_points_switch_to_webgl_and_drop_text_labels():
    big = pd.concat([synthetic_frame(model=f"m{i}") for i in range(400)], ignore_index=True)
    fig = charts.accuracy_vs_size(big)
    assert isinstance(traces(fig, "ptq")[0], go.Scattergl)
    assert traces(fig, "ptq")[0].mode == "markers"


def test_builders_do_not_change_their_input():
    frame = synthetic_frame()
    before = frame.copy()
    charts.accuracy_vs_size(frame, sweet_spot_row_id="synthetic-cnn-dynamic", max_accuracy_drop_points=1)
    charts.model_comparison_figure(frame, frame, "a", "b")
    pd.testing.assert_frame_equal(frame, before)


def test_two_models_share_techniques_in_three_relative_panels():
    a, b = synthetic_frame(model="a"), synthetic_frame(ROWS[:3], model="b")
    fig = charts.model_comparison_figure(a, b, "a on d", "b on d")
    assert len(fig.data) == 6  # two models x three panels
    first = fig.data[0]
    assert first.name == "a on d" and first.orientation == "h"
    assert "BASELINE" not in list(first.y)
    assert first.customdata[0][0] == "a-float32"
    other = fig.data[1]
    assert list(other.y) == ["FLOAT32", "DYNAMIC"]
    assert [t.showlegend for t in fig.data] == [True, True, False, False, False, False]


def test_two_models_side_by_side_scatter_shows_each_family_once_in_the_legend():
    fig = charts.side_by_side_tradeoff(synthetic_frame(model="a"), synthetic_frame(model="b"), "a", "b")
    shown = [t.name for t in fig.data if t.showlegend]
    assert len(shown) == len(set(shown))
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"


def test_decision_tree_highlights_the_answered_path():
    advice = recommend.recommend(recommend.Answers(hardware="gpu"))
    nodes, edges = recommend.tree_frames(advice)
    fig = charts.decision_tree_figure(nodes, edges)
    path = [t for t in fig.data if t.name == "answered path"][0]
    assert path.line.color == charts.PATH_COLOR
    assert np.count_nonzero(~np.isnan(np.asarray(path.x, dtype=float))) == 2 * int(edges.on_path.sum())
    chosen = [a for a in fig.layout.annotations if a.bgcolor == charts.PATH_COLOR]
    assert len(chosen) == 1 and "Float16" in chosen[0].text
    assert len(fig.layout.annotations) == len(nodes) + len(edges)  # node boxes and edge labels
    hover = fig.data[-1]
    assert "gpu_float16" in [row[0] for row in hover.customdata]


def test_decision_tree_names_the_blocked_leaf_by_its_advice():
    advice = recommend.recommend(recommend.Answers(hardware="mcu", representative_data=False))
    fig = charts.decision_tree_figure(*recommend.tree_frames(advice))
    chosen = [a for a in fig.layout.annotations if a.bgcolor == charts.PATH_COLOR]
    assert chosen[0].text.replace("<br>", " ") == "Collect data or retrain first"


def test_log_ticks_step_1_2_5_with_short_labels():
    ticks, labels = charts.log_ticks(pd.Series([24_000, 400_000]), "bytes")
    assert labels == ["20k", "50k", "100k", "200k", "500k"]
    assert charts.log_ticks(pd.Series([0.5, 20.0]))[1] == ["0.5", "1", "2", "5", "10", "20"]
    assert charts.log_ticks(pd.Series([], dtype=float)) == ([], [])


def test_only_the_front_and_the_sweet_spot_are_named_above_and_below_in_turn():
    fig = charts.accuracy_vs_size(synthetic_frame(), sweet_spot_row_id="synthetic-cnn-int8-only")
    named = {text: position for trace in fig.data if trace.text is not None and trace.name != "Best inside budget"
             for text, position in zip(trace.text, trace.textposition) if text}
    assert set(named) == {"prune(target_sparsity=0.8)", "dynamic", "int16x8", "float32"}  # the front
    assert list(traces(fig, "Best inside budget")[0].text) == ["int8-only"]  # the star is named anyway
    # along x: prune 24k, dynamic 26k, int16x8 27k, float32 100k (the baseline is off the front)
    assert [named[t] for t in ("prune(target_sparsity=0.8)", "dynamic", "int16x8", "float32")] == [
        "top center", "bottom center", "top center", "bottom center"]


def test_the_quality_axis_keeps_a_minimum_span_and_both_charts_share_it():
    close = synthetic_frame()[lambda f: f.technique.isin(["baseline", "float32", "dynamic"])]
    size, latency = charts.accuracy_vs_size(close, max_accuracy_drop_points=0.0), \
        charts.accuracy_vs_latency(close.assign(latency_p50_ms=[2.0, 1.0, None]), max_accuracy_drop_points=0.0)
    low, high = size.layout.yaxis.range
    assert high - low >= charts.MIN_QUALITY_SPAN       # 94.8 vs 95.0 does not fill the plot
    assert high > 95.0 and low < 95.0 - charts.MIN_QUALITY_SPAN
    assert tuple(latency.layout.yaxis.range) == (low, high)   # the same range, though a point is missing
    assert traces(size, "accuracy floor (no drop)")  # not "(-0 points)"


def test_the_quality_axis_stays_within_0_and_100_percent():
    """A model scoring 0 % (an untrained upload): the axis grows upwards, not to -5 %."""
    zero = synthetic_frame()[lambda f: f.technique.isin(["baseline", "float32"])].assign(accuracy=0.0)
    low, high = charts.accuracy_vs_size(zero).layout.yaxis.range
    assert -1.0 < low < 0.0 and high >= charts.MIN_QUALITY_SPAN
    perfect = zero.assign(accuracy=1.0)
    low, high = charts.accuracy_vs_size(perfect).layout.yaxis.range
    assert 100.0 < high < 101.0 and low <= 100.0 - charts.MIN_QUALITY_SPAN


def test_the_quality_axis_holds_the_interval_bars():
    frame = with_intervals()
    low, high = charts.accuracy_vs_size(frame).layout.yaxis.range
    assert low < 90.0 and high > 96.0  # the intervals run from 90 % to 96 %


# --- uncertainty: error bars and the busy-CPU marker ------------------------------------------------


def with_intervals():
    """Two ptq rows with known 95% intervals (accuracy 0..1, latency ms), one timed on a busy CPU;
    a third without intervals."""
    frame = synthetic_frame(ROWS[2:5])                       # dynamic, int8-only, int16x8 (all ptq)
    frame["accuracy_ci_low"] = [0.930, 0.900, None]
    frame["accuracy_ci_high"] = [0.960, 0.950, None]
    frame["latency_p50_ci_low_ms"] = [0.7, 0.45, None]
    frame["latency_p50_ci_high_ms"] = [1.0, 0.52, None]
    frame["latency_cpu_busy"] = [False, True, None]
    return frame


def test_quality_error_bars_are_the_interval_distances_in_points_on_both_charts():
    frame = with_intervals()
    for fig in (charts.accuracy_vs_size(frame), charts.accuracy_vs_latency(frame)):
        (ptq,) = traces(fig, "ptq")
        assert ptq.error_y.type == "data" and ptq.error_y.symmetric is False
        np.testing.assert_allclose(ptq.error_y.array, [1.2, 2.0, np.nan])        # (high - acc) * 100
        np.testing.assert_allclose(ptq.error_y.arrayminus, [1.8, 3.0, np.nan])   # (acc - low) * 100


def test_latency_error_bars_are_the_p50_interval_on_the_latency_chart_only():
    frame = with_intervals()
    (ptq,) = traces(charts.accuracy_vs_latency(frame), "ptq")
    np.testing.assert_allclose(ptq.error_x.array, [0.2, 0.02, np.nan], atol=1e-12)
    np.testing.assert_allclose(ptq.error_x.arrayminus, [0.1, 0.05, np.nan], atol=1e-12)
    (size_ptq,) = traces(charts.accuracy_vs_size(frame), "ptq")
    assert size_ptq.error_x.array is None


def test_rows_without_intervals_get_no_error_bars():
    (ptq,) = traces(charts.accuracy_vs_size(synthetic_frame()), "ptq")
    assert ptq.error_y.array is None and ptq.error_x.array is None


def test_a_row_timed_on_a_busy_cpu_is_ringed_on_the_latency_chart():
    frame = with_intervals()
    (busy,) = traces(charts.accuracy_vs_latency(frame), charts.BUSY_NAME)
    assert list(busy.customdata[:, 0]) == ["synthetic-cnn-int8-only"]
    assert "CPU busy" in busy.hovertext[0]
    assert not traces(charts.accuracy_vs_size(frame), charts.BUSY_NAME)


def test_hover_shows_the_intervals_and_the_busy_cpu():
    hover = charts.hover_text(with_intervals(), "accuracy")
    assert "accuracy 94.80% [93.00–96.00]" in hover.iloc[0] and "p50 0.8 ms [0.7–1]" in hover.iloc[0]
    assert "CPU busy while timed" in hover.iloc[1] and "CPU busy" not in hover.iloc[0]
    assert "[" not in hover.iloc[2].split("<br>")[2]       # no interval: none shown


def test_two_models_bars_carry_the_quality_change_and_speed_up_intervals_and_size_none():
    a = synthetic_frame(model="a")
    a["accuracy_change_ci_low"] = a["accuracy_change_points"] - 1.5
    a["accuracy_change_ci_high"] = a["accuracy_change_points"] + 0.5
    a["latency_p50_ci_low_ms"], a["latency_p50_ci_high_ms"] = a["latency_p50_ms"] * 0.8, a["latency_p50_ms"] * 1.25
    fig = charts.model_comparison_figure(a, synthetic_frame(model="b"), "a", "b")
    size, faster, quality = (t for t in fig.data if t.name == "a")
    assert size.error_x.array is None                                   # bytes are exact
    assert np.allclose(quality.error_x.array, 0.5) and np.allclose(quality.error_x.arrayminus, 1.5)
    assert np.allclose(faster.error_x.array, faster.x * 0.25) and np.allclose(faster.error_x.arrayminus,
                                                                              faster.x * 0.2)
    b_quality = [t for t in fig.data if t.name == "b"][2]
    assert b_quality.error_x.array is None                               # no interval, no bar


def test_latencies_from_several_nodes_are_ringed_by_node_and_the_title_says_so():
    import pandas as pd

    from quantlab.charts import accuracy_vs_latency

    rows = pd.DataFrame({"row_id": ["a", "b", "c"], "technique": ["float32", "dynamic", "int8-only"],
                         "family": ["float", "ptq", "ptq"], "params": ["{}", "{}", "{}"],
                         "accuracy": [0.95, 0.94, 0.93], "latency_p50_ms": [0.02, 0.01, 0.012],
                         "model_bytes": [100, 30, 30], "node": ["vm/aaaa", "vm/bbbb", "vm/aaaa"]})
    fig = accuracy_vs_latency(rows)
    rings = [t.name for t in fig.data if (t.name or "").startswith("timed on")]
    assert rings == ["timed on vm/aaaa", "timed on vm/bbbb"]
    assert "2 nodes" in fig.layout.title.text
    one_node = accuracy_vs_latency(rows.assign(node="vm/aaaa"))
    assert not [t for t in one_node.data if (t.name or "").startswith("timed on")]
    assert "nodes" not in (one_node.layout.title.text or "")


def test_the_tree_focus_is_the_chosen_leafs_place_across_the_figure():
    def focus(answers):
        nodes, _ = recommend.tree_frames(recommend.recommend(answers))
        return charts.tree_focus(nodes)

    gpu, cpu = focus(recommend.Answers(hardware="gpu")), focus(recommend.Answers(hardware="cpu"))
    assert 0 < gpu < 1 and 0 < cpu < 1 and gpu != cpu
    nodes, _ = recommend.tree_frames(None)                  # nothing answered: nothing to scroll to
    assert charts.tree_focus(nodes) is None
