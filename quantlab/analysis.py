"""Baseline-relative comparison of stored variants: the frame every chart and table is drawn from.

Everything row-wise happens in DuckDB SQL, so a store of thousands of rows is read in one query.
Python only post-processes the handful of rows that survive the filters (labels, sorting).

Terms used on screen and here:
- the *reference* of a row is the `baseline` row (the Keras model) of the same model hash and
  dataset hash; when a sweep measured no baseline, the TFLite `float32` row stands in and the
  `reference_technique` column says so;
- `x_smaller` = reference bytes / bytes, `speedup` = reference p50 / p50,
  `accuracy_change_points` = (accuracy - reference accuracy) * 100 (negative = worse),
  `agreement_change_points` the same for agreement;
- the *quality* of a workload is its accuracy, or, for a dataset without labels (every accuracy
  NULL), its top-1 agreement with the float model: `quality_metric` decides, `QUALITY` names it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .store import Store
from .stats import SIGNIFICANCE_LEVEL
from .uncertainty import CHANGE_COLUMNS, add_change_tests

BASELINE_TECHNIQUE = "baseline"
FALLBACK_REFERENCE = "float32"
REFERENCE_NOTES = {
    BASELINE_TECHNIQUE: "Keras baseline",
    FALLBACK_REFERENCE: "TFLite float32 (no baseline row measured)",
}
# Families in the order they are listed; a family not named here comes after, alphabetically.
FAMILY_ORDER = ("baseline", "float", "uploaded", "ptq", "litert", "qat", "cluster", "prune", "cqat", "pqat",
                "pcqat")
OBJECTIVES = {"size": "smallest", "latency": "fastest", "accuracy": "most accurate"}
SWEEP_LIST_LIMIT = 500

# One query: filter, keep the newest row per variant, find each row's reference, divide.
_COMPARE_SQL = """
WITH filtered AS (
    SELECT * FROM results WHERE {where}
),
newest_version AS (   -- the model/dataset version (hashes) measured last, per model and dataset
    SELECT model_name, dataset_name, model_hash, dataset_hash FROM filtered
    QUALIFY row_number() OVER (PARTITION BY model_name, dataset_name ORDER BY recorded_at DESC) = 1
),
picked AS (
    SELECT f.* FROM filtered f
    {version_join}
    {latest_qualify}
),
refs AS (   -- per version: the baseline row if any, else the float32 row; newest first
    SELECT model_hash, dataset_hash, technique AS reference_technique, row_id AS reference_row_id,
           model_bytes AS ref_bytes, gzip_bytes AS ref_gzip_bytes, latency_p50_ms AS ref_p50_ms,
           accuracy AS ref_accuracy, agreement AS ref_agreement,
           latency_p50_ci_low_ms AS ref_p50_low, latency_p50_ci_high_ms AS ref_p50_high,
           latency_method AS reference_latency_method
    FROM results
    WHERE technique IN ('{baseline}', '{fallback}') AND error IS NULL AND {ref_where}
    QUALIFY row_number() OVER (PARTITION BY model_hash, dataset_hash
                               ORDER BY technique = '{baseline}' DESC, {ref_sweep_order}
                                        recorded_at DESC) = 1
),
f32 AS (   -- the TFLite float32 row: same runtime as the other variants, for a like-for-like speedup
    SELECT model_hash, dataset_hash, latency_p50_ms AS f32_p50_ms,
           latency_p50_ci_low_ms AS f32_p50_low, latency_p50_ci_high_ms AS f32_p50_high FROM results
    WHERE technique = '{fallback}' AND error IS NULL AND {ref_where}
    QUALIFY row_number() OVER (PARTITION BY model_hash, dataset_hash
                               ORDER BY {ref_sweep_order} recorded_at DESC) = 1
)
SELECT
    p.*,
    CASE WHEN p.params IN ('{{}}', '') THEN p.technique
         ELSE p.technique || ' (' || regexp_replace(trim(p.params, '{{}}'), '"', '', 'g') || ')'
    END AS variant,
    r.reference_technique,
    r.reference_row_id,
    r.reference_latency_method,
    r.ref_bytes::DOUBLE / NULLIF(p.model_bytes, 0) AS x_smaller,
    r.ref_gzip_bytes::DOUBLE / NULLIF(p.gzip_bytes, 0) AS x_smaller_gzip,
    r.ref_p50_ms / NULLIF(p.latency_p50_ms, 0) AS speedup,
    f.f32_p50_ms / NULLIF(p.latency_p50_ms, 0) AS speedup_vs_float32,
    -- the p50 95% intervals overlap: the speed-up is inside the noise (NULL: an interval unknown)
    (p.latency_p50_ci_low_ms <= r.ref_p50_high AND r.ref_p50_low <= p.latency_p50_ci_high_ms)
        AS speedup_within_noise,
    (p.latency_p50_ci_low_ms <= f.f32_p50_high AND f.f32_p50_low <= p.latency_p50_ci_high_ms)
        AS speedup_vs_float32_within_noise,
    (p.accuracy - r.ref_accuracy) * 100 AS accuracy_change_points,
    (p.agreement - r.ref_agreement) * 100 AS agreement_change_points
FROM picked p
LEFT JOIN refs r ON p.model_hash IS NOT DISTINCT FROM r.model_hash
                AND p.dataset_hash IS NOT DISTINCT FROM r.dataset_hash
LEFT JOIN f32 f ON p.model_hash IS NOT DISTINCT FROM f.model_hash
               AND p.dataset_hash IS NOT DISTINCT FROM f.dataset_hash
ORDER BY p.model_name, p.dataset_name, p.model_bytes DESC NULLS LAST, p.technique
"""

COMPARE_COLUMNS = ("variant", "reference_technique", "reference_note", "reference_row_id",
                   "reference_latency_method", "x_smaller", "x_smaller_gzip", "speedup",
                   "speedup_vs_float32", "speedup_within_noise", "speedup_vs_float32_within_noise",
                   "accuracy_change_points", "agreement_change_points", "label")


def _label_map() -> dict[str, str]:
    from .techniques import all_techniques

    return {t.id: t.label for t in all_techniques()}


def technique_label(technique_id: str) -> str:
    """The registry's label, or the id itself for a technique this install does not know."""
    return _label_map().get(technique_id, technique_id)


def compare_frame(store: Store, *, model: str | None, dataset: str | None,
                  sweep_id: str | None = None, latest_only: bool = True,
                  include_errors: bool = False, plan_id: str | None = None) -> pd.DataFrame:
    """Stored rows of one model on one dataset with baseline-relative columns computed in SQL.

    `model`/`dataset` None means every model/dataset. With `latest_only` and no sweep, only the
    newest version (model and dataset hash) of each model/dataset pair is shown, one row per
    variant (technique + params), the newest. Failed rows are left out unless `include_errors`.
    Columns: every `results` column, then COMPARE_COLUMNS. Empty frame when nothing matches.
    """
    where, params = ["TRUE"], []
    for column, value in (("model_name", model), ("dataset_name", dataset), ("sweep_id", sweep_id)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if not include_errors:
        where.append("error IS NULL")
    if plan_id:  # the sweeps of one plan (python -m quantlab plan)
        where.append("sweep_id IN (SELECT sweep_id FROM sweeps WHERE plan_id = ?)")
        params.append(plan_id)
    ref_where, ref_params = ["TRUE"], []
    for column, value in (("model_name", model), ("dataset_name", dataset)):
        if value:
            ref_where.append(f"{column} = ?")
            ref_params.append(value)
    ref_sweep_order = ""
    if sweep_id:
        ref_sweep_order = "(sweep_id = ?) DESC,"
    version_join = latest_qualify = ""
    if latest_only and not sweep_id:
        version_join = ("SEMI JOIN newest_version n ON f.model_name = n.model_name "
                        "AND f.dataset_name = n.dataset_name "
                        "AND f.model_hash IS NOT DISTINCT FROM n.model_hash "
                        "AND f.dataset_hash IS NOT DISTINCT FROM n.dataset_hash")
    if latest_only:
        latest_qualify = ("QUALIFY row_number() OVER (PARTITION BY f.model_hash, f.dataset_hash, "
                          "f.technique, f.params, coalesce(f.error, '') "
                          "ORDER BY f.recorded_at DESC) = 1")
    sql = _COMPARE_SQL.format(where=" AND ".join(where), version_join=version_join,
                              latest_qualify=latest_qualify, ref_where=" AND ".join(ref_where),
                              ref_sweep_order=ref_sweep_order, baseline=BASELINE_TECHNIQUE,
                              fallback=FALLBACK_REFERENCE)
    sweep_params = [sweep_id] if sweep_id else []
    all_params = params + ref_params + sweep_params + ref_params + sweep_params
    frame = store.query(sql, all_params)
    if frame.empty:
        return _empty_compare_frame()
    frame["reference_note"] = frame["reference_technique"].map(REFERENCE_NOTES).fillna(
        "no reference measured (run the baseline or float32 technique)")
    frame["label"] = frame["technique"].map(_label_map()).fillna(frame["technique"])
    return add_change_tests(frame.reset_index(drop=True), store)


def _empty_compare_frame() -> pd.DataFrame:
    from .store import COLUMN_NAMES

    return pd.DataFrame(columns=[*COLUMN_NAMES, *COMPARE_COLUMNS, *CHANGE_COLUMNS])


def family_rank(families: pd.Series) -> pd.Series:
    """Sort key: FAMILY_ORDER first, unknown families after them."""
    order = {name: i for i, name in enumerate(FAMILY_ORDER)}
    return families.map(order).fillna(len(FAMILY_ORDER))


# --- which quality the rows are judged by ---------------------------------------------------------


@dataclass(frozen=True)
class Quality:
    """One quality metric: its 0..1 column, its baseline-relative column and its words."""

    metric: str                  # accuracy | agreement
    change: str                  # the column of its change against the reference, in points
    noun: str                    # in sentences and titles
    axis_title: str              # the trade-off charts' y axis
    points_suffix: str = ""      # after "points" in sentences: "-0.4 points of agreement"

    def points(self, value: float) -> str:
        """`1 point`, `0.5 points of agreement`."""
        return points(value) + self.points_suffix


NO_LABELS = "no labels"
NO_LABELS_NOTE = "no labels: quality is top-1 agreement with the float model"
QUALITY = {
    "accuracy": Quality("accuracy", "accuracy_change_points", "accuracy", "Accuracy (%)"),
    "agreement": Quality("agreement", "agreement_change_points", "agreement",
                         "Agreement with the float model (%) · no labels", " of agreement"),
}


def _says_no_labels(details: Any) -> bool:
    if isinstance(details, str):
        try:
            details = json.loads(details or "{}")
        except ValueError:
            return False
    return isinstance(details, Mapping) and details.get("labels") is False


def quality_metric(rows: pd.DataFrame | Mapping[str, Any] | None) -> str:
    """"accuracy", or "agreement" when the rows come from a dataset without labels.

    Agreement when no successful row has an accuracy and one has an agreement (or its details say
    `"labels": false`); accuracy otherwise, also when nothing is measured yet. Pass the rows of one
    model on one dataset (they share their labels): a mixed frame is judged as a whole.
    """
    if rows is None:
        return "accuracy"
    frame = pd.DataFrame([dict(rows)]) if isinstance(rows, Mapping) else rows
    if frame.empty or "accuracy" not in frame.columns:
        return "accuracy"
    measured = frame[frame["error"].isna()] if "error" in frame.columns else frame
    if pd.to_numeric(measured["accuracy"], errors="coerce").notna().any():
        return "accuracy"
    has_agreement = "agreement" in measured.columns and \
        pd.to_numeric(measured["agreement"], errors="coerce").notna().any()
    says_so = "details" in frame.columns and frame["details"].map(_says_no_labels).any()
    return "agreement" if has_agreement or says_so else "accuracy"


def workload_quality(store: Store, model: str | None, dataset: str | None) -> str:
    """quality_metric of every stored row of `model` on `dataset` (before any other filter)."""
    if not model or not dataset:
        return "accuracy"
    return quality_metric(store.query(
        "SELECT accuracy, agreement, error, details FROM results "
        "WHERE model_name = ? AND dataset_name = ?", [model, dataset]))


def quality(rows: pd.DataFrame | Mapping[str, Any] | None) -> Quality:
    """QUALITY of `quality_metric(rows)`."""
    return QUALITY[quality_metric(rows)]


# --- Pareto front and the sweet spot --------------------------------------------------------------


def pareto_mask(frame: pd.DataFrame, x: str, y: str, minimize_x: bool = True,
                maximize_y: bool = True) -> pd.Series:
    """True for the rows no other row beats on both x and y (rows missing x or y are False)."""
    mask = pd.Series(False, index=frame.index)
    data = frame[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
    if data.empty:
        return mask
    xs = data[x].to_numpy(dtype=float) * (1 if minimize_x else -1)
    ys = data[y].to_numpy(dtype=float) * (1 if maximize_y else -1)
    order = np.lexsort((-ys, xs))              # best x first; on equal x, best y first
    ys_sorted = ys[order]
    best_before = np.concatenate(([-np.inf], np.maximum.accumulate(ys_sorted)[:-1]))
    on_front = ys_sorted > best_before
    mask.loc[data.index[order[on_front]]] = True
    return mask


def pareto_front(frame: pd.DataFrame, x: str, y: str, minimize_x: bool = True,
                 maximize_y: bool = True) -> pd.DataFrame:
    """The non-dominated rows, sorted along x (best x first)."""
    front = frame[pareto_mask(frame, x, y, minimize_x, maximize_y)]
    return front.sort_values(x, ascending=minimize_x)


@dataclass(frozen=True)
class SweetSpot:
    """The best variant inside the budgets, or None with the reason nothing fits."""

    row: dict[str, Any] | None
    reason: str
    candidates: int = 0          # rows inside both budgets
    objective: str = "size"
    metric: str = "accuracy"     # the quality the drop was measured in (quality_metric)
    tie_break: str = ""          # rank_with_ties' explanation when the pick was a tie ("" otherwise)

    @property
    def found(self) -> bool:
        return self.row is not None

    @property
    def row_id(self) -> str | None:
        return None if self.row is None else self.row["row_id"]

    def headline(self) -> str:
        if self.row is None:
            return f"None fits, because {self.reason}."
        return (f"Best inside your budget: {self.row['label']} — "
                f"{describe_gain(self.row, self.metric)}")

    def tie_note(self) -> str | None:
        """`Picked from a tie: ...` when differences inside the 95% intervals tied the pick with
        others and the next criterion decided; None when the pick won outright."""
        if self.row is None or not self.tie_break:
            return None
        return f"Picked from a tie: {self.tie_break}."


def points(value: float) -> str:
    """`1 point`, `0.5 points`, `2 points`."""
    return f"{value:g} point" + ("" if value == 1 else "s")


def _fmt_ms(value: float) -> str:
    return f"{value:.3g} ms"


SORT_KEYS = {"size": ("model_bytes", "latency_p50_ms", "{quality}"),
             "latency": ("latency_p50_ms", "model_bytes", "{quality}"),
             "accuracy": ("{quality}", "model_bytes", "latency_p50_ms")}


def is_ready_tflite(frame: pd.DataFrame) -> bool:
    """Whether every row is of an uploaded .tflite (as-uploaded, or a LiteRT Quantizer recipe applied
    to it): there is no float model, so no baseline or float32 row can ever be measured."""
    if frame is None or frame.empty:
        return False
    if "model_name" in frame.columns:
        return bool(frame["model_name"].astype(str).str.lower().str.endswith(".tflite").all())
    return set(frame["technique"]) == {"as-uploaded"}


def sweet_spot(frame: pd.DataFrame, latency_budget_ms: float | None,
               max_accuracy_drop_points: float | None, objective: str = "size",
               metric: str | None = None) -> SweetSpot:
    """The best deployable variant (any technique but the Keras baseline) inside both budgets.

    `objective`: size (fewest bytes), latency (lowest p50) or accuracy (highest quality). A None
    budget is no constraint. The drop is measured in `metric` (default: `quality_metric(frame)`,
    agreement for a dataset without labels). The pick is rank_with_ties: differences inside the
    95% intervals are ties, broken by the next criterion (smaller, then faster, then more
    accurate), and the reason says so; rows without a latency never fit a latency budget.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    metric = metric or quality_metric(frame)
    spot = {"objective": objective, "metric": metric}
    if frame is None or frame.empty:
        return SweetSpot(None, "nothing is measured for this selection yet; run a sweep first", **spot)
    tflite = frame[frame["technique"] != BASELINE_TECHNIQUE]
    usable = tflite[tflite["error"].isna()]
    if usable.empty and not tflite.empty:
        return SweetSpot(None, f"every TFLite variant here failed ({len(tflite)}); their errors are "
                               f"under \"variants failed\" below", **spot)
    if usable.empty:
        return SweetSpot(None, "only the Keras baseline is measured here; run some TFLite "
                               "techniques", **spot)
    words = QUALITY[metric]
    latency = pd.to_numeric(usable["latency_p50_ms"], errors="coerce")
    change = pd.to_numeric(usable.get(words.change, pd.Series(np.nan, usable.index)),
                           errors="coerce")
    fast = latency <= latency_budget_ms if latency_budget_ms is not None else pd.Series(True, usable.index)
    if max_accuracy_drop_points is not None:
        if change.isna().all() and is_ready_tflite(usable):
            return SweetSpot(None, f"a ready .tflite is measured as it is, with no float model to "
                                   f"measure its {words.noun} drop against; upload its Keras model to "
                                   f"compare techniques", **spot)
        if change.isna().all():
            return SweetSpot(None, f"there is no baseline or float32 row to measure the {words.noun} "
                                   f"drop against; add the baseline technique to the sweep", **spot)
        accurate = change >= -float(max_accuracy_drop_points) - 1e-9
    else:
        accurate = pd.Series(True, usable.index)
    inside = usable[fast & accurate]
    if inside.empty:
        return SweetSpot(None, _why_none(usable, fast, accurate, latency, change, latency_budget_ms,
                                         max_accuracy_drop_points, words), **spot)
    ranking = rank_with_ties(inside, objective, metric)
    best = ranking.row
    budget_words = []
    if latency_budget_ms is not None:
        budget_words.append(f"p50 within {_fmt_ms(latency_budget_ms)}")
    if max_accuracy_drop_points is not None:
        budget_words.append(f"losing at most {words.points(max_accuracy_drop_points)}")
    best_word = "closest to the float model" if objective == "accuracy" and metric == "agreement" \
        else OBJECTIVES[objective]
    reason = (f"the {best_word} of {len(inside)} variant(s) "
              f"{' and '.join(budget_words) or 'measured (no budget set)'}")
    if ranking.explanation:
        reason += f"; {ranking.explanation}"
    return SweetSpot(best, reason, candidates=len(inside), tie_break=ranking.explanation, **spot)


# --- ranking that treats differences inside the intervals as ties ---------------------------------


@dataclass(frozen=True)
class Criterion:
    """One thing variants are ranked on: its column, direction and 95% interval columns (if any)."""

    column: str
    lower_is_better: bool
    words: str                   # "smaller", "faster", "more accurate"
    noun: str                    # "size", "p50 latency", "accuracy"
    interval: tuple[str, str] | None = None


def ranking_criteria(objective: str, metric: str = "accuracy") -> tuple[Criterion, ...]:
    """The objective first, then the others in the order smaller, faster, more accurate."""
    size = Criterion("model_bytes", True, "smaller", "size")
    latency = Criterion("latency_p50_ms", True, "faster", "p50 latency",
                        ("latency_p50_ci_low_ms", "latency_p50_ci_high_ms"))
    quality_criterion = Criterion(metric, False, "closer to the float model" if metric == "agreement"
                                  else "more accurate", QUALITY[metric].noun,
                                  (f"{metric}_ci_low", f"{metric}_ci_high"))
    order = {"size": (size, latency, quality_criterion), "latency": (latency, size, quality_criterion),
             "accuracy": (quality_criterion, size, latency)}
    if objective not in order:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    return order[objective]


@dataclass(frozen=True)
class Ranking:
    """The winner of rank_with_ties, the rows it was tied with, and why it won, in words."""

    row: dict[str, Any]
    tied_with: tuple[str, ...] = ()
    explanation: str = ""


def _interval_of(frame: pd.DataFrame, index: Any, criterion: Criterion) -> tuple[float, float] | None:
    if criterion.interval is None or not all(c in frame.columns for c in criterion.interval):
        return None
    low, high = (pd.to_numeric(pd.Series([frame.at[index, c]]), errors="coerce").iloc[0]
                 for c in criterion.interval)
    return None if pd.isna(low) or pd.isna(high) else (float(low), float(high))


def rank_with_ties(frame: pd.DataFrame, objective: str = "size", metric: str = "accuracy") -> Ranking:
    """The best row of `frame` for `objective`, where a difference inside the 95% intervals is a tie.

    Criterion by criterion (ranking_criteria: the objective, then smaller, faster, more accurate),
    the rows whose interval overlaps the best row's interval stay in (rows without an interval only
    when their value equals the best); the next criterion decides among them. Rows missing a value
    go last. The explanation names the ties and what broke them.
    """
    if frame is None or frame.empty:
        raise ValueError("nothing to rank; measure some variants first")
    criteria = ranking_criteria(objective, metric)
    candidates = frame
    steps: list[str] = []
    for position, criterion in enumerate(criteria):
        if len(candidates) == 1 or criterion.column not in candidates.columns:
            continue
        values = pd.to_numeric(candidates[criterion.column], errors="coerce")
        if values.notna().sum() == 0:
            continue
        candidates, values = candidates[values.notna()], values[values.notna()]
        best = values.idxmin() if criterion.lower_is_better else values.idxmax()
        best_interval = _interval_of(candidates, best, criterion)
        tied = []
        for index in candidates.index:
            interval = _interval_of(candidates, index, criterion)
            if index == best or values[index] == values[best] or (
                    best_interval is not None and interval is not None
                    and interval[0] <= best_interval[1] and best_interval[0] <= interval[1]):
                tied.append(index)
        if len(tied) > 1 and position < len(criteria) - 1:
            names = ", ".join(str(candidates.at[i, "label"] if "label" in candidates.columns
                                  else candidates.at[i, "technique"]) for i in tied)
            how = "95% intervals overlap" if best_interval is not None else "equal"
            steps.append(f"{names} tie on {criterion.noun} ({how}), so the "
                         f"{criteria[position + 1].words} one is preferred")
        candidates = candidates.loc[tied]
    # Still tied after every criterion: the best point values decide, in the same order.
    columns = [c.column for c in criteria if c.column in candidates.columns]
    ordered = candidates.sort_values(columns, ascending=[c.lower_is_better for c in criteria
                                                         if c.column in candidates.columns],
                                     na_position="last")
    winner = ordered.iloc[0]
    label_column = "label" if "label" in ordered.columns else "technique"
    return Ranking(winner.to_dict(), tuple(str(v) for v in ordered[label_column].iloc[1:]),
                   "; ".join(steps))


def _why_none(usable: pd.DataFrame, fast: pd.Series, accurate: pd.Series, latency: pd.Series,
              change: pd.Series, budget: float | None, tolerance: float | None,
              words: Quality = QUALITY["accuracy"]) -> str:
    def name(index: Any) -> str:
        return str(usable.at[index, "label"])

    if not fast.any():
        if latency.isna().all():
            return "no variant has a latency measurement"
        fastest = latency.idxmin()
        return (f"no variant runs within {_fmt_ms(budget)} (fastest: {name(fastest)} at "
                f"{_fmt_ms(latency[fastest])})")
    if not accurate.any():
        closest = change.idxmax()
        return (f"every variant loses more than {words.points(tolerance)} (smallest loss: "
                f"{name(closest)}, {change[closest]:+.1f} points)")
    fast_change, accurate_latency = change[fast].dropna(), latency[accurate].dropna()
    fast_words = (f"each lose more than {words.points(tolerance)} (best of them: "
                  f"{name(fast_change.idxmax())}, {fast_change.max():+.1f} points)"
                  if not fast_change.empty else f"have no {words.noun} change measured")
    slow_words = (f"are too slow (fastest: {name(accurate_latency.idxmin())} at "
                  f"{_fmt_ms(accurate_latency.min())})" if not accurate_latency.empty
                  else "have no latency measurement")
    return (f"the {int(fast.sum())} variant(s) within {_fmt_ms(budget)} {fast_words}, and the "
            f"{int(accurate.sum())} within the {words.noun} tolerance {slow_words}")


# --- words ---------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and \
        not pd.isna(value)


def describe_gain(row: Mapping[str, Any], metric: str | None = None) -> str:
    """`3.9x smaller, -0.4 points, 1.8x faster` from one compare_frame row (`-0.4 points of
    agreement` when `metric`, by default `quality_metric(row)`, is agreement). When the reference
    is the Keras baseline, which runs in TensorFlow (another runtime, with Python overhead per
    call), the speed-up against TFLite float32 leads and the one against Keras follows in brackets."""
    words = QUALITY[metric or quality_metric(row)]
    parts = []
    smaller = row.get("x_smaller")
    if _is_number(smaller):
        parts.append(f"{smaller:.1f}x smaller" if smaller >= 1 else f"{1 / smaller:.1f}x larger")
    change = row.get(words.change)
    if _is_number(change):
        noise = change_noise(row, words.metric)
        parts.append(("±0.0 points" if round(change, 1) == 0 else f"{change:+.1f} points")
                     + words.points_suffix + (f" ({noise})" if noise else ""))
    else:
        parts.append(f"{words.noun} change unknown")
    speedup = row.get("speedup")
    if _is_number(speedup):
        text = _times(speedup, "faster", "slower")
        like_for_like = row.get("speedup_vs_float32")
        if row.get("reference_technique") == BASELINE_TECHNIQUE and _is_number(like_for_like) \
                and row.get("technique") != FALLBACK_REFERENCE:
            notes = [n for n in (_latency_noise(row, "speedup_vs_float32_within_noise"),
                                 f"{text} than the Keras model in TensorFlow"
                                 + (", within noise" if _latency_noise(row, "speedup_within_noise")
                                    else "")) if n]
            text = f"{_times(like_for_like, 'faster', 'slower')} than TFLite float32 ({'; '.join(notes)})"
        elif _latency_noise(row, "speedup_within_noise"):
            text += " (within noise)"
        parts.append(text)
    return ", ".join(parts)


def _latency_noise(row: Mapping[str, Any], column: str) -> str:
    """`within noise` when the row's p50 interval overlaps its comparison's (`column`, from
    compare_frame), else "": a speed-up inside the noise is not called one without saying so."""
    value = row.get(column)
    return "within noise" if value is True or (_is_number(value) and bool(value)) else ""


def change_noise(row: Mapping[str, Any], metric: str = "accuracy") -> str | None:
    """How a row's change in `metric` against its reference stands against the noise, from the
    compare_frame columns (exact McNemar p, paired 95% interval, test samples): `within noise on
    450 samples`, or `95% CI -7.9 to -3.3 points, p = 0.0001 on 450 samples`; None when the
    per-sample predictions needed for the test are not kept."""
    p = row.get(f"{metric}_change_p")
    if not _is_number(p):
        return None
    samples = row.get("test_samples")
    on = f" on {int(samples)} samples" if _is_number(samples) and samples else ""
    if float(p) >= SIGNIFICANCE_LEVEL:
        return f"within noise{on}"
    low, high = row.get(f"{metric}_change_ci_low"), row.get(f"{metric}_change_ci_high")
    interval = f"95% CI {low:+.1f} to {high:+.1f} points, " if _is_number(low) and _is_number(high) else ""
    return f"{interval}p = {float(p):.2g}{on}"


def change_ci_text(row: Mapping[str, Any], metric: str = "accuracy") -> str:
    """`-0.22 [-0.89, +0.44]`: the change in points and its paired 95% interval (MISSING when the
    change is unknown; the change alone when its interval is)."""
    change = row.get(QUALITY[metric].change)
    if not _is_number(change):
        return MISSING
    low, high = row.get(f"{metric}_change_ci_low"), row.get(f"{metric}_change_ci_high")
    if not (_is_number(low) and _is_number(high)):
        return f"{change:+.2f}"
    return f"{change:+.2f} [{low:+.2f}, {high:+.2f}]"


def differs_text(row: Mapping[str, Any], metric: str = "accuracy") -> str:
    """`yes (p = 0.0003)`, `no (p = 1)` against the reference, `reference` for the reference row
    itself, MISSING when the per-sample predictions are not kept."""
    if row.get("row_id") is not None and row.get("row_id") == row.get("reference_row_id"):
        return "reference"
    p = row.get(f"{metric}_change_p")
    if not _is_number(p):
        return MISSING
    return f"{'yes' if float(p) < SIGNIFICANCE_LEVEL else 'no'} (p = {float(p):.2g})"


def busy_mask(frame: pd.DataFrame) -> pd.Series:
    """Per row, whether other processes kept the CPU busy while it was timed (latency_cpu_busy)."""
    if frame is None or frame.empty or "latency_cpu_busy" not in frame.columns:
        return pd.Series(False, index=frame.index if frame is not None else None, dtype=bool)
    return frame["latency_cpu_busy"].map(lambda v: v is True or (_is_number(v) and bool(v))).astype(bool)


def busy_labels(frame: pd.DataFrame) -> list[str]:
    """Labels of the rows timed while other processes kept the CPU busy (latency_cpu_busy)."""
    if frame is None or frame.empty:
        return []
    names = frame["label"] if "label" in frame.columns else frame["technique"]
    return [str(n) for n in names[busy_mask(frame)]]


def _times(ratio: float, more: str, less: str) -> str:
    return f"{ratio:.1f}x {more}" if ratio >= 1 else f"{1 / ratio:.1f}x {less}"


def measurement_note(frame: pd.DataFrame) -> str:
    """How the latencies of these rows were measured, from their own latency_method and threads."""
    if frame is None or frame.empty:
        return ""
    measured = frame[frame["latency_method"].notna()]
    if measured.empty:
        return "No latency measurements in these rows."
    methods = measured.groupby(measured["technique"] == BASELINE_TECHNIQUE)["latency_method"].agg(
        lambda s: sorted(set(s)))
    parts = []
    for is_baseline, names in methods.items():
        parts.append(("Keras baseline: " if is_baseline else "TFLite variants: ") + "; ".join(names))
    threads = sorted({int(t) for t in measured["num_threads"].dropna()})
    runs = pd.to_numeric(measured["latency_runs"], errors="coerce").dropna()
    extra = []
    if threads:
        extra.append(f"interpreter threads: {', '.join(map(str, threads))}")
    if not runs.empty:
        extra.append(f"{int(runs.min())}–{int(runs.max())} timed runs per variant"
                     if runs.min() != runs.max() else f"{int(runs.min())} timed runs per variant")
    cpu = _first_provenance(measured, "cpu_model")
    if cpu:
        extra.append(f"CPU: {cpu}")
    text = " ".join(p.rstrip(".") + "." for p in parts)
    if extra:
        text += " " + "; ".join(extra) + "."
    if measured["technique"].eq(BASELINE_TECHNIQUE).any():
        text += (" The speedup column divides by the Keras baseline's p50 (a different runtime); "
                 "speedup_vs_float32 compares within LiteRT.")
    return text


def _first_provenance(frame: pd.DataFrame, key: str) -> str | None:
    for text in frame["provenance"].dropna().head(5):
        try:
            value = json.loads(text).get(key)
        except (TypeError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return None


# --- filters -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What the filter widgets offer: models, datasets, their pairs, and sweeps (newest first)."""

    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    sweeps: pd.DataFrame = field(default_factory=pd.DataFrame)
    plans: list[str] = field(default_factory=list)  # plan ids, newest first

    @property
    def empty(self) -> bool:
        return not self.models

    def datasets_for(self, model: str | None) -> list[str]:
        if self.pairs.empty:
            return []
        if not model:
            return list(self.datasets)
        return list(self.pairs.loc[self.pairs["model_name"] == model, "dataset_name"])

    def sweeps_for(self, model: str | None, dataset: str | None) -> pd.DataFrame:
        if self.sweeps.empty:
            return self.sweeps
        keep = pd.Series(True, index=self.sweeps.index)
        if model:
            keep &= self.sweeps["model_name"] == model
        if dataset:
            keep &= self.sweeps["dataset_name"] == dataset
        return self.sweeps[keep]


def list_filters(store: Store) -> Filters:
    """Distinct models, datasets, model/dataset pairs and sweeps, in one connection."""
    if not store.exists():
        return Filters()
    with store.connect() as con:
        has_table = con.execute("SELECT count(*) FROM information_schema.tables "
                                "WHERE table_name = 'results'").fetchone()[0]
        if not has_table:
            return Filters()
        models = [r[0] for r in con.execute(
            "SELECT DISTINCT model_name FROM results ORDER BY model_name").fetchall()]
        datasets = [r[0] for r in con.execute(
            "SELECT DISTINCT dataset_name FROM results ORDER BY dataset_name").fetchall()]
        pairs = con.execute(
            "SELECT model_name, dataset_name, count(*) AS rows, max(recorded_at) AS last_recorded "
            "FROM results GROUP BY model_name, dataset_name ORDER BY last_recorded DESC").df()
        sweeps = con.execute(
            "SELECT sweep_id, model_name, dataset_name, min(recorded_at) AS started_at, "
            "count(*) AS variants, count(error) AS failed FROM results "
            "GROUP BY sweep_id, model_name, dataset_name ORDER BY started_at DESC "
            f"LIMIT {SWEEP_LIST_LIMIT}").df()
        has_plans = con.execute("SELECT count(*) FROM information_schema.columns WHERE "
                                "table_name = 'sweeps' AND column_name = 'plan_id'").fetchone()[0]
        plans = [r[0] for r in con.execute(
            "SELECT plan_id FROM sweeps WHERE plan_id IS NOT NULL GROUP BY plan_id "
            "ORDER BY max(started_at) DESC").fetchall()] if has_plans else []
    return Filters(models, datasets, pairs, sweeps, plans)


def sweep_label(sweep: Mapping[str, Any]) -> str:
    """`2025-05-01 14:03 · 8 variants (1 failed) · 3f2a9c1b` for a sweep selectbox; a sweep that did
    not finish says how it ended (`· interrupted`, `· cancelled`) or that it still runs."""
    started = pd.Timestamp(sweep["started_at"])
    failed = int(sweep.get("failed") or 0)
    status = sweep.get("status")
    return (f"{started:%Y-%m-%d %H:%M} · {int(sweep['variants'])} variants"
            + (f" ({failed} failed)" if failed else "")
            + (f" · {status}" if status in ("running", "cancelled", "interrupted") else "")
            + f" · {str(sweep['sweep_id'])[:8]}")


# What a reader compares first (the change in quality, the latency, the speed-ups, the size), then
# the rest of the measurements, then where the row came from.
TABLE_COLUMNS = ("label", "accuracy_change_points", "accuracy_change_ci", "differs_from_baseline",
                 "latency_p50_ms", "latency_cpu_busy", "speedup_vs_float32", "speedup",
                 "x_smaller", "model_bytes", "accuracy", "agreement", "sqnr_db", "latency_p90_ms",
                 "x_smaller_gzip", "gzip_bytes", "variant", "family", "num_threads", "input_dtype",
                 "output_dtype", "cached", "recorded_at", "row_id")
TEXT_COLUMNS = ("label", "accuracy_change_ci", "agreement_change_ci", "differs_from_baseline", "variant",
                "family", "input_dtype", "output_dtype")
MISSING = "—"


def table_columns(metric: str = "accuracy") -> tuple[str, ...]:
    """TABLE_COLUMNS, with Δ agreement in place of Δ accuracy for a dataset without labels."""
    if metric != "agreement":
        return TABLE_COLUMNS
    swap = {"accuracy_change_points": QUALITY["agreement"].change,
            "accuracy_change_ci": "agreement_change_ci"}
    return tuple(swap.get(c, c) for c in TABLE_COLUMNS)


def table_frame(frame: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """The baseline-relative table: the columns a reader compares first, families in their order;
    a missing text reads MISSING (a dash).

    Without labels (`metric` agreement, by default `quality_metric(frame)`), the accuracy column
    says NO_LABELS and Δ agreement replaces Δ accuracy. `{metric}_change_ci` is the change with its
    paired 95% interval (change_ci_text), `differs_from_baseline` the McNemar verdict against the
    reference (differs_text); `latency_cpu_busy` flags a p50 timed on a busy machine.
    """
    metric = metric or quality_metric(frame)
    columns = table_columns(metric)
    if frame.empty:
        return pd.DataFrame(columns=list(columns))
    records = frame.to_dict(orient="records")
    ordered = frame.assign(_rank=family_rank(frame["family"]),
                           **{f"{metric}_change_ci": [change_ci_text(r, metric) for r in records],
                              "differs_from_baseline": [differs_text(r, metric) for r in records]}
                           ).sort_values(["_rank", "model_bytes"], ascending=[True, False])
    table = ordered[[c for c in columns if c in ordered.columns]].reset_index(drop=True)
    if metric == "agreement" and "accuracy" in table.columns:
        table["accuracy"] = NO_LABELS
    for column in (c for c in TEXT_COLUMNS if c in table.columns):
        table[column] = table[column].astype(object).where(table[column].notna(), MISSING)
    return table


def last_sweep_spec(store: Store, model: str | None, dataset: str | None) -> dict[str, Any] | None:
    """The spec (JSON) of the newest sweep of this model on this dataset, to rerun with the same
    model file, training and measurement settings; None if there is none."""
    if not model or not dataset or not store.exists():
        return None
    with store.connect() as con:
        if not con.execute("SELECT count(*) FROM information_schema.tables "
                           "WHERE table_name = 'sweeps'").fetchone()[0]:
            return None
        found = con.execute("SELECT spec FROM sweeps WHERE model_name = ? AND dataset_name = ? "
                            "AND spec IS NOT NULL ORDER BY started_at DESC LIMIT 1",
                            [model, dataset]).fetchone()
    if not found:
        return None
    try:
        spec = json.loads(found[0])
    except (TypeError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None
