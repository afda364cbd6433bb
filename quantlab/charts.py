"""Plotly figure builders: pure functions of data frames (no store, no Streamlit).

Every point carries its store row_id as the first element of `customdata`, so a click on it can
open that row's details; its hover shows every measured figure of the row.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .analysis import (BASELINE_TECHNIQUE, NO_LABELS, QUALITY, busy_mask, family_rank, pareto_front,
                       points, quality_metric)
from .techniques import params_text, variant_label

# One colour per technique family, stable across pages and sessions (colour-blind-safe Okabe-Ito
# first, then Tableau); a family not listed gets a colour from EXTRA_COLORS by a hash of its name.
FAMILY_COLORS = {
    "baseline": "#000000", "float": "#0072B2", "uploaded": "#999999", "ptq": "#E69F00",
    "qat": "#009E73", "cluster": "#CC79A7", "prune": "#D55E00", "cqat": "#56B4E9",
    "pqat": "#F0E442", "pcqat": "#8c564b", "litert": "#7B2CBF",
}
EXTRA_COLORS = ("#17becf", "#bcbd22", "#7f7f7f", "#9467bd", "#e377c2", "#aec7e8", "#98df8a")
FAMILY_SYMBOLS = {"baseline": "diamond", "float": "square"}
MODEL_COLORS = ("#33415c", "#2a9d8f")
PATH_COLOR = "#d62828"
MUTED = "#b0b0b0"
BUDGET_COLOR = "#6c757d"
WEBGL_ABOVE = 1000          # points per trace above which scatter traces use WebGL
LABEL_POINTS_UP_TO = 30     # write technique names next to points up to this many rows
MIN_QUALITY_SPAN = 5.0      # points: the quality axis never zooms in further (a 1-sample gap stays small)
HOVER_TEMPLATE = "%{hovertext}<extra></extra>"


def family_color(family: str) -> str:
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return EXTRA_COLORS[zlib.crc32(str(family).encode()) % len(EXTRA_COLORS)]


# --- formatting (vectorised over columns) ----------------------------------------------------------


def _fmt(series: pd.Series, fmt: str, unit: str = "", missing: str = "—") -> pd.Series:
    """Formatted text per value (object dtype, also for an empty series: it is added to strings)."""
    numbers = pd.to_numeric(series, errors="coerce")
    return numbers.map(lambda v: missing if pd.isna(v) else format(v, fmt) + unit).astype(object)


def _ci_text(low: pd.Series, high: pd.Series, scale: float = 1.0, fmt: str = ".2f") -> pd.Series:
    """` [93.24–97.10]` (a 95% interval, times `scale`) per row, "" where it is unknown."""
    lows, highs = pd.to_numeric(low, errors="coerce") * scale, pd.to_numeric(high, errors="coerce") * scale
    return pd.Series([" [" + format(a, fmt) + "–" + format(b, fmt) + "]" if pd.notna(a) and pd.notna(b) else ""
                      for a, b in zip(lows, highs)], index=low.index, dtype=object)


def format_bytes(series: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(series, errors="coerce")

    def one(v: float) -> str:
        if pd.isna(v):
            return "—"
        for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
            if v >= size:
                return f"{v / size:.1f} {unit}"
        return f"{int(v)} B"
    return numbers.map(one).astype(object)


def _params_text(series: pd.Series) -> pd.Series:
    return series.map(lambda params: params_text(params) or "none")


def point_labels(frame: pd.DataFrame) -> pd.Series:
    """`dynamic`, or `int8-only(weights=per-tensor)` when a variant's parameters are not the defaults."""
    params = frame["params"] if "params" in frame else pd.Series([{}] * len(frame), index=frame.index)
    return pd.Series([variant_label(str(t), p) for t, p in zip(frame["technique"], params)],
                     index=frame.index, dtype=object)


def hover_text(frame: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """One hover block per row: identity, then every measured figure, then where it came from.
    The change in points follows the quality measure (`metric`, default `quality_metric(frame)`);
    without labels the accuracy reads NO_LABELS."""
    if frame is None or frame.empty:
        return pd.Series([], dtype=object, index=frame.index if frame is not None else None)
    metric = metric or quality_metric(frame)

    def get(name: str) -> pd.Series:
        return frame[name] if name in frame.columns else pd.Series(np.nan, index=frame.index)

    label = get("label").fillna(get("technique")).astype(str)
    change = pd.to_numeric(get(QUALITY[metric].change), errors="coerce")
    change_text = change.map(lambda v: "" if pd.isna(v) else f" ({v:+.2f} points)").astype(object)
    cached = get("cached").map(lambda v: "yes" if v is True or v == 1 else "no").astype(object)
    size = ("size " + format_bytes(get("model_bytes")) + " (" + _fmt(get("x_smaller"), ".2f", "x")
            + " smaller) · gzip " + format_bytes(get("gzip_bytes")) + " ("
            + _fmt(get("x_smaller_gzip"), ".2f", "x") + ")")
    accuracy = _fmt(get("accuracy") * 100, ".2f", "%") + _ci_text(get("accuracy_ci_low"), get("accuracy_ci_high"), 100)
    agreement = _fmt(get("agreement") * 100, ".2f", "%") + _ci_text(get("agreement_ci_low"),
                                                                    get("agreement_ci_high"), 100)
    if metric == "agreement":
        quality = "accuracy " + NO_LABELS + " · agreement " + agreement + change_text
    else:
        quality = "accuracy " + accuracy + change_text + " · agreement " + agreement
    quality = quality + " · SQNR " + _fmt(get("sqnr_db"), ".1f", " dB")
    busy = busy_mask(frame).map(lambda b: " · CPU busy while timed" if b else "").astype(object)
    latency = ("latency p50 " + _fmt(get("latency_p50_ms"), ".3g", " ms")
               + _ci_text(get("latency_p50_ci_low_ms"), get("latency_p50_ci_high_ms"), 1, ".3g") + " · p90 "
               + _fmt(get("latency_p90_ms"), ".3g", " ms") + " (" + _fmt(get("speedup"), ".2f", "x")
               + " vs baseline) · threads " + _fmt(get("num_threads"), ".0f") + busy)
    return ("<b>" + label + "</b> · " + get("family").astype(str) + "<br>" + size + "<br>" + quality
            + "<br>" + latency + "<br>params " + _params_text(get("params")).astype(object)
            + " · cached " + cached + "<br>row " + get("row_id").astype(str).str[:12])


# --- trade-off scatter --------------------------------------------------------------------------


def _plottable(frame: pd.DataFrame, x: str, metric: str = "accuracy") -> pd.DataFrame:
    """The successful rows with a `metric` value and a positive `x`."""
    if frame is None or frame.empty or metric not in frame.columns or x not in frame.columns:
        return pd.DataFrame(columns=list(frame.columns) if frame is not None else [])
    keep = pd.to_numeric(frame[metric], errors="coerce").notna() \
        & (pd.to_numeric(frame[x], errors="coerce") > 0)
    if "error" in frame.columns:
        keep &= frame["error"].isna()
    return frame[keep]


def interval_bars(frame: pd.DataFrame, value: str, low: str, high: str, scale: float = 1.0
                  ) -> dict | None:
    """Plotly error-bar settings (error_x / error_y) from a row's 95% interval columns: the
    distances from `value` up to `high` (`array`) and down to `low` (`arrayminus`), times `scale`
    (100 for a 0..1 share drawn in %); None when no row has the interval. A row without one gets
    no bar (NaN), never a zero-width bar that would look certain."""
    if frame is None or frame.empty or not {value, low, high} <= set(frame.columns):
        return None
    values = pd.to_numeric(frame[value], errors="coerce")
    lows, highs = pd.to_numeric(frame[low], errors="coerce"), pd.to_numeric(frame[high], errors="coerce")
    if (lows.isna() | highs.isna()).all():
        return None
    up = ((highs - values).clip(lower=0) * scale).to_numpy(dtype=float)
    down = ((values - lows).clip(lower=0) * scale).to_numpy(dtype=float)
    return dict(type="data", symmetric=False, array=up, arrayminus=down, thickness=1, width=3,
                color="rgba(60,60,60,0.55)")


BUSY_NAME = "timed on a busy CPU"


def _scatter_class(points: int) -> type:
    return go.Scattergl if points > WEBGL_ABOVE else go.Scatter


def tradeoff_figure(frame: pd.DataFrame, x: str, x_title: str, *, log_x: bool | None = None,
                    sweet_spot_row_id: str | None = None, x_budget: float | None = None,
                    x_budget_name: str = "budget {:g}", max_accuracy_drop_points: float | None = None,
                    title: str = "", show_front: bool = True, metric: str | None = None,
                    x_interval: tuple[str, str] | None = None, mark_busy: bool = False) -> go.Figure:
    """Quality (%) against column `x` (smaller is better): one trace per family, the Pareto
    front as a line, the sweet spot ringed, budgets as dashed lines. Quality is `metric`, by
    default `quality_metric(frame)`: accuracy, or agreement with the float model without labels.
    log_x None: log when the values span more than 10x. Each point carries its 95% interval as an
    error bar: of `metric` on y (`{metric}_ci_low/high`), of x on x when `x_interval` names its
    (low, high) columns. `mark_busy` rings the rows timed on a busy CPU (latency_cpu_busy)."""
    metric = metric or quality_metric(frame)
    words = QUALITY[metric]
    data = _plottable(frame, x, metric)
    fig = go.Figure()
    fig.update_layout(title=title or None, height=470, margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
                      xaxis_title=x_title, yaxis_title=words.axis_title, clickmode="event+select",
                      uirevision=x, hovermode="closest")
    if data.empty:
        fig.add_annotation(text="Nothing measured to plot yet", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        return fig
    xs = pd.to_numeric(data[x], errors="coerce")
    if log_x is None:
        log_x = bool(xs.max() / xs.min() > 10)
    if log_x:
        fig.update_xaxes(type="log")
    hover = hover_text(data, metric)
    label_points = len(data) <= LABEL_POINTS_UP_TO
    front_ids = set(pareto_front(data, x, metric)["row_id"]) if show_front else set(data["row_id"])
    labels = front_labels(data, front_ids) if label_points else None
    positions = label_positions(data, x, front_ids)
    has_star = sweet_spot_row_id is not None and (data["row_id"] == sweet_spot_row_id).any()
    if has_star:  # the star carries its point's label, above the star where nothing hides it
        star_labels = point_labels(data)[data["row_id"] == sweet_spot_row_id] if label_points else None
        if label_points:
            labels = labels.where(data["row_id"] != sweet_spot_row_id, "")
    scatter = _scatter_class(len(data))
    families = data["family"].drop_duplicates()
    for family in families.iloc[np.argsort(family_rank(families).to_numpy(), kind="stable")]:
        part = data[data["family"] == family]
        error_y = interval_bars(part, metric, f"{metric}_ci_low", f"{metric}_ci_high", 100.0)
        error_x = interval_bars(part, x, *x_interval) if x_interval else None
        fig.add_trace(scatter(
            x=part[x], y=part[metric] * 100, name=str(family), legendgroup=str(family),
            mode="markers+text" if label_points else "markers",
            text=labels.loc[part.index] if label_points else None,
            textposition=positions.loc[part.index].tolist(),
            textfont=dict(size=10),
            marker=dict(color=family_color(family), size=11, line=dict(width=1, color="white"),
                        symbol=FAMILY_SYMBOLS.get(family, "circle")),
            customdata=part[["row_id", "technique"]].to_numpy(),
            hovertext=hover.loc[part.index], hovertemplate=HOVER_TEMPLATE,
            **({"error_y": error_y} if error_y else {}), **({"error_x": error_x} if error_x else {})))
    busy = busy_mask(data) if mark_busy else pd.Series(False, index=data.index)
    if busy.any():
        flagged = data[busy]
        fig.add_trace(go.Scatter(
            x=flagged[x], y=flagged[metric] * 100, mode="markers", name=BUSY_NAME,
            marker=dict(symbol="circle-open-dot", size=20, color="#d00000", line=dict(width=1.5)),
            customdata=flagged[["row_id", "technique"]].to_numpy(),
            hovertext=("other processes kept the CPU busy while this row was timed: its latency is "
                       "not comparable<br>" + hover.loc[flagged.index]),
            hovertemplate=HOVER_TEMPLATE))
    if show_front:
        front = pareto_front(data, x, metric)
        if len(front) > 1:
            fig.add_trace(go.Scatter(
                x=front[x], y=front[metric] * 100, mode="lines", name="Pareto front",
                line=dict(color="#555555", width=1.5), hoverinfo="skip"))
    if has_star:
        best = data[data["row_id"] == sweet_spot_row_id]
        fig.add_trace(go.Scatter(
            x=best[x], y=best[metric] * 100, mode="markers+text" if label_points else "markers",
            text=star_labels, textposition="top center", textfont=dict(size=10, color=PATH_COLOR),
            name="Best inside budget",
            marker=dict(symbol="star", size=24, color="rgba(0,0,0,0)",
                        line=dict(width=2.5, color=PATH_COLOR)),
            customdata=best[["row_id", "technique"]].to_numpy(),
            hovertext=hover.loc[best.index], hovertemplate=HOVER_TEMPLATE))
    floor = accuracy_floor(data, max_accuracy_drop_points, metric)
    y_low, y_high = quality_range(frame, max_accuracy_drop_points, metric)
    pad = 0.0
    fig.update_yaxes(range=[y_low, y_high])
    if x_budget is not None and x_budget > 0:
        fig.add_trace(go.Scatter(
            x=[x_budget, x_budget], y=[y_low - pad, y_high + pad], mode="lines",
            name=x_budget_name.format(x_budget), hoverinfo="skip",
            line=dict(color=BUDGET_COLOR, dash="dash", width=1.5)))
    if floor is not None:
        x_low, x_high = min(xs.min(), x_budget or math.inf), max(xs.max(), x_budget or 0)
        fig.add_trace(go.Scatter(
            x=[x_low * (0.8 if log_x else 1), x_high * (1.25 if log_x else 1)], y=[floor, floor],
            mode="lines", name=floor_name(words.noun, max_accuracy_drop_points),
            hoverinfo="skip", line=dict(color=BUDGET_COLOR, dash="dot", width=1.5)))
    return fig


def front_labels(data: pd.DataFrame, front_ids: set) -> pd.Series:
    """Technique names for the points on the Pareto front only; every other point is named on hover."""
    labels = point_labels(data)
    return labels.where(data["row_id"].isin(front_ids), "")


def label_positions(data: pd.DataFrame, x: str, front_ids: set) -> pd.Series:
    """Above and below in turn along x for the labelled points, so neighbours' names do not collide."""
    positions = pd.Series("top center", index=data.index, dtype=object)
    labelled = data[data["row_id"].isin(front_ids)]
    order = pd.to_numeric(labelled[x], errors="coerce").sort_values(kind="stable").index
    for i, index in enumerate(order):
        positions[index] = "top center" if i % 2 == 0 else "bottom center"
    return positions


def quality_range(frame: pd.DataFrame, max_accuracy_drop_points: float | None,
                  metric: str | None = None) -> tuple[float, float]:
    """The quality axis (%) for every chart of `frame`: its measured values and the floor, at least
    MIN_QUALITY_SPAN points tall (extended downwards, the best stays near the top), padded; both
    trade-off charts of one frame get the same range."""
    metric = metric or quality_metric(frame)
    values = pd.Series(dtype=float)
    if frame is not None and not frame.empty and metric in frame.columns:
        rows = frame[frame["error"].isna()] if "error" in frame.columns else frame
        values = (pd.to_numeric(rows[metric], errors="coerce") * 100).dropna()
        # the 95% interval bars drawn on the points: inside the axis, not cut at its edge
        bounds = [pd.to_numeric(rows[c], errors="coerce") * 100 for c in (f"{metric}_ci_low", f"{metric}_ci_high")
                  if c in rows.columns]
        values = pd.concat([values, *bounds]).dropna() if not values.empty else values
    if values.empty:
        return 0.0, 100.0
    floor = accuracy_floor(frame if "error" not in frame.columns else frame[frame["error"].isna()],
                           max_accuracy_drop_points, metric)
    low, high = min(values.min(), floor if floor is not None else math.inf), values.max()
    # at least MIN_QUALITY_SPAN points tall, within 0-100 %: a model at 0 % extends upwards
    low = max(0.0, min(low, high - MIN_QUALITY_SPAN))
    high = min(100.0, max(high, low + MIN_QUALITY_SPAN))
    pad = (high - low) * 0.08
    return float(low - pad), float(high + pad)


def floor_name(noun: str, drop_points: float | None) -> str:
    """`accuracy floor (-1 point)`, or `accuracy floor (no drop)` for a zero tolerance."""
    return f"{noun} floor (no drop)" if not drop_points else f"{noun} floor (-{points(drop_points)})"


def log_ticks(values: pd.Series, unit: str = "") -> tuple[list[float], list[str]]:
    """Tick positions at 1-2-5 steps covering `values` on a log axis, with short labels (25k, 0.5)."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    numbers = numbers[numbers > 0]
    if numbers.empty:
        return [], []
    low, high = numbers.min() / 1.25, numbers.max() * 1.25
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5) if low <= m * 10.0 ** e <= high]

    def label(v: float) -> str:
        for suffix, size in (("M", 1e6), ("k", 1e3)):
            if unit == "bytes" and v >= size:
                return f"{v / size:g}{suffix}"
        return f"{v:g}"
    return ticks, [label(v) for v in ticks]


def accuracy_floor(frame: pd.DataFrame, max_accuracy_drop_points: float | None,
                   metric: str = "accuracy") -> float | None:
    """The reference's `metric` (%) minus the tolerance, or None without a tolerance or reference."""
    change = QUALITY[metric].change
    if max_accuracy_drop_points is None or frame.empty or change not in frame or metric not in frame:
        return None
    reference = (pd.to_numeric(frame[metric], errors="coerce") * 100
                 - pd.to_numeric(frame[change], errors="coerce")).dropna()
    if reference.empty:
        return None
    return float(reference.iloc[0]) - float(max_accuracy_drop_points)


def accuracy_vs_size(frame: pd.DataFrame, *, sweet_spot_row_id: str | None = None,
                     max_accuracy_drop_points: float | None = None, gzip: bool = False,
                     metric: str | None = None) -> go.Figure:
    """Quality (`metric`, default quality_metric(frame)) against the .tflite size, log axis."""
    column = "gzip_bytes" if gzip else "model_bytes"
    metric = metric or quality_metric(frame)
    fig = tradeoff_figure(frame, column, "Model size, bytes" + (" (gzip)" if gzip else "") + " (log)",
                          log_x=True, sweet_spot_row_id=sweet_spot_row_id, metric=metric,
                          max_accuracy_drop_points=max_accuracy_drop_points,
                          title=f"{QUALITY[metric].noun.capitalize()} vs size")
    ticks, labels = log_ticks(_plottable(frame, column, metric)[column], "bytes")
    return fig.update_xaxes(tickvals=ticks, ticktext=labels) if ticks else fig


def accuracy_vs_latency(frame: pd.DataFrame, *, sweet_spot_row_id: str | None = None,
                        latency_budget_ms: float | None = None,
                        max_accuracy_drop_points: float | None = None,
                        metric: str | None = None) -> go.Figure:
    """Quality (`metric`, default quality_metric(frame)) against batch-1 p50 latency."""
    metric = metric or quality_metric(frame)
    data = _plottable(frame, "latency_p50_ms", metric)
    latency = pd.to_numeric(data["latency_p50_ms"], errors="coerce") if not data.empty else data
    log_x = bool(not data.empty and latency.max() / latency.min() > 10)
    fig = tradeoff_figure(frame, "latency_p50_ms",
                          "Latency p50, ms (batch 1)" + (" (log)" if log_x else ""), log_x=log_x,
                          sweet_spot_row_id=sweet_spot_row_id, x_budget=latency_budget_ms,
                          x_budget_name="latency budget {:g} ms",
                          max_accuracy_drop_points=max_accuracy_drop_points, metric=metric,
                          title=f"{QUALITY[metric].noun.capitalize()} vs latency",
                          x_interval=("latency_p50_ci_low_ms", "latency_p50_ci_high_ms"), mark_busy=True)
    if log_x:
        ticks, labels = log_ticks(pd.concat([data["latency_p50_ms"], pd.Series([latency_budget_ms])]))
        fig.update_xaxes(tickvals=ticks, ticktext=labels)
    mark_nodes(fig, data, "latency_p50_ms", metric)
    return fig


NODE_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
UNKNOWN_NODE = "not recorded (local pool)"


def timing_nodes(frame: pd.DataFrame) -> pd.Series:
    """The node each row was timed on (rows stored before nodes were recorded: UNKNOWN_NODE)."""
    if "node" not in frame.columns:
        return pd.Series(UNKNOWN_NODE, index=frame.index)
    return frame["node"].astype(object).where(frame["node"].notna(), UNKNOWN_NODE)


def mark_nodes(fig: go.Figure, data: pd.DataFrame, x: str, metric: str) -> None:
    """Latencies timed on more than one node: ring each point in its node's colour and say so."""
    if data.empty:
        return
    nodes = timing_nodes(data)
    names = list(dict.fromkeys(nodes))
    if len(names) < 2:
        return
    for k, name in enumerate(names):
        part = data[nodes == name]
        fig.add_trace(go.Scatter(
            x=part[x], y=part[metric] * 100, mode="markers", name=f"timed on {name}",
            marker=dict(symbol="circle-open", size=19, color=NODE_COLORS[k % len(NODE_COLORS)],
                        line=dict(width=2)), hoverinfo="skip"))
    title = fig.layout.title.text or ""
    fig.update_layout(title=f"{title} · latencies from {len(names)} nodes (ringed by node): "
                            f"compare within one node")


# --- two models side by side ----------------------------------------------------------------------


QUALITY_CHANGE = "quality_change_points"   # per model: its accuracy, or agreement, change
RELATIVE_METRICS = (("x_smaller", "x smaller"), ("speedup", "x faster (vs baseline)"),
                    (QUALITY_CHANGE, "{} change, points"))


def _quality_words(metrics: Iterable[str]) -> str:
    """`accuracy`, `agreement`, or `accuracy or agreement` for a panel two models share."""
    return " or ".join(dict.fromkeys(QUALITY[m].noun for m in sorted(set(metrics))))


def model_comparison_figure(frame_a: pd.DataFrame, frame_b: pd.DataFrame, name_a: str,
                            name_b: str) -> go.Figure:
    """Baseline-relative figures of the same techniques on two models: one bar group per
    technique in three panels (smaller, faster, quality change). Relative numbers compare fairly
    across models of different sizes. Each model's quality is its own `quality_metric`: a model
    without labels shows its agreement change, and its legend entry says so."""
    frames = [(f, n, c) for f, n, c in ((frame_a, name_a, MODEL_COLORS[0]),
                                         (frame_b, name_b, MODEL_COLORS[1]))
              if f is not None and not f.empty]
    metrics = [quality_metric(f) for f, _, _ in frames]
    titles = [title.format(_quality_words(metrics or ["accuracy"])) for _, title in RELATIVE_METRICS]
    fig = make_subplots(rows=1, cols=len(RELATIVE_METRICS), shared_yaxes=True,
                        subplot_titles=titles, horizontal_spacing=0.04)
    order = _technique_order([f for f, _, _ in frames])
    prepared = []
    for (frame, name, color), metric in zip(frames, metrics):  # one row per technique; hover once
        rows = (_one_per_technique(frame, metric).set_index("technique").reindex(order)
                .dropna(subset=["row_id"]).reset_index())
        rows[QUALITY_CHANGE] = rows[QUALITY[metric].change] if QUALITY[metric].change in rows else np.nan
        rows = _relative_intervals(rows, metric)
        legend = name if metric == "accuracy" else f"{name} (no labels: agreement)"
        prepared.append((rows, hover_text(rows, metric).to_numpy(), rows[["row_id"]].to_numpy(),
                         legend, color))
    baseline_only = [name for (frame, name, _), (rows, *_) in zip(frames, prepared) if rows.empty]
    prepared = [entry for entry in prepared if not entry[0].empty]
    for col, (metric, _) in enumerate(RELATIVE_METRICS, start=1):
        for rows, hover, custom, name, color in prepared:
            fig.add_trace(go.Bar(
                y=rows["label"], x=rows[metric], orientation="h", name=name, legendgroup=name,
                showlegend=col == 1, marker_color=color, customdata=custom, hovertext=hover,
                hovertemplate=HOVER_TEMPLATE,
                error_x=interval_bars(rows, metric, f"{metric}_low", f"{metric}_high")), row=1, col=col)
    fig.update_layout(barmode="group", height=max(260, 60 + 42 * max(len(order), 1)),
                      margin=dict(l=10, r=10, t=70, b=10),
                      title=f"{name_a} vs {name_b}" + "".join(
                          f"<br><sup>{name}: only the Keras baseline is measured</sup>"
                          for name in baseline_only),
                      legend=dict(orientation="h", yanchor="top", y=-0.12, x=0))
    fig.update_yaxes(autorange="reversed")
    if not frames:
        fig.add_annotation(text="Nothing measured to compare yet", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    return fig


def _relative_intervals(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """95% intervals for the relative panels: the quality change's paired interval (points), and the
    speed-up's from the row's own p50 interval (the baseline's spread is not added); size is exact."""
    rows = rows.copy()
    low, high = f"{metric}_change_ci_low", f"{metric}_change_ci_high"
    rows[f"{QUALITY_CHANGE}_low"] = pd.to_numeric(rows[low], errors="coerce") if low in rows else np.nan
    rows[f"{QUALITY_CHANGE}_high"] = pd.to_numeric(rows[high], errors="coerce") if high in rows else np.nan
    if {"speedup", "latency_p50_ms", "latency_p50_ci_low_ms", "latency_p50_ci_high_ms"} <= set(rows.columns):
        p50 = pd.to_numeric(rows["latency_p50_ms"], errors="coerce")
        speedup = pd.to_numeric(rows["speedup"], errors="coerce")
        rows["speedup_low"] = speedup * p50 / pd.to_numeric(rows["latency_p50_ci_high_ms"], errors="coerce")
        rows["speedup_high"] = speedup * p50 / pd.to_numeric(rows["latency_p50_ci_low_ms"], errors="coerce")
    return rows


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    keep = frame["technique"] != BASELINE_TECHNIQUE
    if "error" in frame.columns:
        keep &= frame["error"].isna()
    return frame[keep]


def _one_per_technique(frame: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """The best row (by `metric`) of each technique (a technique swept with several params)."""
    rows = _comparable(frame)
    if metric in rows.columns:
        rows = rows.sort_values(metric, ascending=False, na_position="last")
    return rows.drop_duplicates("technique")


def _technique_order(frames: Iterable[pd.DataFrame]) -> list[str]:
    rows = pd.concat([_comparable(f)[["technique", "family", "model_bytes"]] for f in frames]) \
        if frames else pd.DataFrame(columns=["technique", "family", "model_bytes"])
    if rows.empty:
        return []
    rows = rows.assign(_rank=family_rank(rows["family"])).sort_values(
        ["_rank", "model_bytes"], ascending=[True, False])
    return list(dict.fromkeys(rows["technique"]))


def side_by_side_tradeoff(frame_a: pd.DataFrame, frame_b: pd.DataFrame, name_a: str, name_b: str,
                          x: str = "model_bytes") -> go.Figure:
    """Quality vs `x` for two models in two panels, same family colours, legend shown once; each
    panel's y axis names its model's quality (agreement for a model without labels)."""
    x_title = {"model_bytes": "Model size, bytes (log)",
               "latency_p50_ms": "Latency p50, ms (log)"}.get(x, x)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[name_a, name_b], horizontal_spacing=0.08)
    seen: set[str] = set()
    for col, frame in enumerate((frame_a, frame_b), start=1):
        frame = frame if frame is not None else pd.DataFrame()
        metric = quality_metric(frame)
        panel = tradeoff_figure(frame, x, x_title, log_x=True, metric=metric)
        for trace in panel.data:
            trace.showlegend = trace.name not in seen
            seen.add(trace.name)
            fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(type="log", title_text=x_title, row=1, col=col)
        fig.update_yaxes(title_text=QUALITY[metric].axis_title, row=1, col=col)
    fig.update_layout(height=470, margin=dict(l=10, r=10, t=40, b=10), clickmode="event+select",
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0))
    return fig


# --- the decision tree ---------------------------------------------------------------------------


TREE_PX_PER_STEP = 105      # horizontal room per tree step: a box of 14-character lines at 11 px fits


def decision_tree_figure(nodes: pd.DataFrame, edges: pd.DataFrame) -> go.Figure:
    """The tree from recommend.tree_frames: questions as boxes, leaves as techniques, the
    answered path (nodes and edges flagged `on_path`) drawn in red, the chosen leaf filled."""
    fig = go.Figure()
    for on_path, color, width in ((False, MUTED, 1.2), (True, PATH_COLOR, 3.5)):
        part = edges[edges["on_path"] == on_path]
        xs = np.column_stack([part["x0"], part["x1"], np.full(len(part), np.nan)]).ravel()
        ys = np.column_stack([part["y0"], part["y1"], np.full(len(part), np.nan)]).ravel()
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color=color, width=width),
                                 name="answered path" if on_path else "other branches"))
    for edge in edges.itertuples():
        fig.add_annotation(x=(edge.x0 + edge.x1) / 2, y=(edge.y0 + edge.y1) / 2, text=edge.label,
                           showarrow=False, bgcolor="white", borderpad=1,
                           font=dict(size=10, color=PATH_COLOR if edge.on_path else "#666666"))
    for _, node in nodes.iterrows():
        leaf = node["kind"] == "leaf"
        fill = PATH_COLOR if node["chosen"] else ("#fde2e2" if node["on_path"] else "white")
        text = node["label"] if leaf and pd.notna(node["technique"]) else node["text"]
        fig.add_annotation(
            x=node["x"], y=node["y"], text=_wrap(text, 14),
            showarrow=False, font=dict(size=11, color="white" if node["chosen"] else "#222222"),
            bgcolor=fill, borderpad=4, borderwidth=2 if node["on_path"] else 1,
            bordercolor=PATH_COLOR if node["on_path"] else ("#888888" if leaf else "#bbbbbb"))
    fig.add_trace(go.Scatter(
        x=nodes["x"], y=nodes["y"], mode="markers", showlegend=False, marker=dict(size=30, opacity=0),
        customdata=nodes[["id", "technique"]].to_numpy(),
        hovertext=nodes["text"] + np.where(nodes["technique"].notna(),
                                           "<br>technique: " + nodes["technique"].fillna(""), ""),
        hovertemplate=HOVER_TEMPLATE))
    span = float(nodes["x"].max() - nodes["x"].min()) + 1.4
    fig.update_xaxes(visible=False, range=[nodes["x"].min() - 0.7, nodes["x"].max() + 0.7])
    fig.update_yaxes(visible=False, range=[nodes["y"].min() - 0.6, nodes["y"].max() + 0.5])
    # A fixed width with room for every box: leaves one step apart never overlap, whatever the window.
    fig.update_layout(height=560, width=round(span * TREE_PX_PER_STEP) + 10,
                      margin=dict(l=5, r=5, t=10, b=5), plot_bgcolor="white", dragmode=False)
    return fig


def tree_focus(nodes: pd.DataFrame) -> float | None:
    """Where the answer sits across `decision_tree_figure`'s width, from 0 (left) to 1 (right): the
    chosen leaf, else the last answered question. A window narrower than the tree scrolls it into view."""
    focus = nodes[nodes["chosen"]]
    if focus.empty:
        focus = nodes[nodes["on_path"]].sort_values("y").head(1)   # the tree grows downwards
    if focus.empty:
        return None
    left, span = float(nodes["x"].min()) - 0.7, float(nodes["x"].max() - nodes["x"].min()) + 1.4
    return min(1.0, max(0.0, (float(focus["x"].iloc[0]) - left) / span))


def _wrap(text: str, width: int) -> str:
    words, lines, line = str(text).split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "<br>".join(lines)


VALIDATION_KIND_COLORS = {"intermediate": "#7B2CBF", "output": "#d62828"}


def quantizer_validation_figure(rows: list[dict]) -> go.Figure:
    """The LiteRT Quantizer's comparison with the float model, tensor by tensor in model order: SNR
    in dB per activation (higher is closer), MSE and cosine similarity on hover."""
    frame = pd.DataFrame([r for r in rows if "tensor" in r])
    figure = go.Figure()
    if frame.empty:
        return figure
    frame["position"] = [f"{i + 1}. {layer}" for i, layer in enumerate(frame["layer"])]
    frame["snr_shown"] = frame["snr_db"].astype(float)
    for kind, part in frame.groupby("kind", sort=False):
        hover = [f"{t}<br>SNR {'identical' if pd.isna(s) else f'{s:.1f} dB'} · MSE {m:.3g} · cosine {c:.5f}"
                 for t, s, m, c in zip(part["tensor"], part["snr_db"], part["mse"], part["cosine"])]
        figure.add_bar(x=part["position"], y=part["snr_shown"], name=kind,
                       marker_color=VALIDATION_KIND_COLORS.get(kind, MUTED), hovertext=hover,
                       hovertemplate=HOVER_TEMPLATE)
    figure.update_layout(xaxis_title="tensor (model order)", yaxis_title="SNR vs float (dB)",
                         height=360, margin=dict(l=10, r=10, t=30, b=10), legend_title_text="tensor",
                         xaxis=dict(categoryorder="array", categoryarray=list(frame["position"])))
    return figure
