"""The uncertainty of each stored number, and whether a variant differs from its reference.

Two kinds of figure, kept in two places:
- a row's own intervals (`row_intervals`: Wilson intervals of accuracy and agreement, a bootstrap
  interval of the p50, whether other processes kept the CPU busy while it was timed) depend on that
  row alone, so the worker that measured the row computes them, the cached result keeps them (a
  warm run reuses them: a bootstrap of 1,000 timings takes about 0.2 s) and they are store columns;
- a paired test (`change_test`: exact McNemar on the same samples) needs two rows, and which row is
  the reference is decided when rows are read (the baseline of the selected sweep, else float32), so
  p-values are computed when rows are read (`add_change_tests`, `tests_against_references`) from
  both rows' kept top-1 predictions (see predictions.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import predictions, stats

BUSY_CPU_SHARE = 0.30      # other processes above this share of the CPU while timing: flagged
REFERENCE_TECHNIQUES = ("baseline", "float32")
INTERVAL_COLUMNS = ("accuracy_ci_low", "accuracy_ci_high", "agreement_ci_low", "agreement_ci_high",
                    "latency_p50_ci_low_ms", "latency_p50_ci_high_ms", "latency_cpu_busy",
                    "test_samples")
CHANGE_COLUMNS = ("accuracy_change_p", "agreement_change_p", "accuracy_change_p_vs_float32",
                  "agreement_change_p_vs_float32", "accuracy_change_ci_low", "accuracy_change_ci_high",
                  "agreement_change_ci_low", "agreement_change_ci_high", "differs_from_reference")


def _details(row: Mapping[str, Any]) -> dict[str, Any]:
    details = row.get("details")
    if isinstance(details, str):
        try:
            details = json.loads(details or "{}")
        except ValueError:
            return {}
    return details if isinstance(details, dict) else {}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def correct_vector(row: Mapping[str, Any], against: str) -> np.ndarray | None:
    """Per test sample, whether the row's top-1 equals the label (`against` "labels") or the float
    model's top-1 ("float"); None when the files are not kept."""
    files = predictions.files_of(_details(row))
    mine = predictions.load(files["top1"])
    truth = predictions.load(files["labels" if against == "labels" else "float_top1"])
    if mine is None or truth is None or mine.shape != truth.shape:
        return None
    return mine.astype(np.int64) == truth.astype(np.int64)


def _test_samples(row: Mapping[str, Any]) -> int | None:
    mine = predictions.load(predictions.files_of(_details(row))["top1"])
    if mine is not None:
        return int(mine.size)
    split = _details(row).get("split_sizes") or {}
    return int(split["test"]) if isinstance(split, Mapping) and split.get("test") else None


def _share_interval(row: Mapping[str, Any], column: str, against: str, n: int | None) -> list[float | None]:
    correct = correct_vector(row, against)
    if correct is not None and correct.size:
        interval = stats.wilson_interval(int(correct.sum()), int(correct.size))
        return interval.to_list()
    share = _number(row.get(column))
    if share is None or not n:
        return [None, None]
    return stats.proportion_interval(share, n).to_list()


def row_intervals(row: Mapping[str, Any]) -> dict[str, Any]:
    """The INTERVAL_COLUMNS of one measured row (None where the row lacks what they need)."""
    n = _test_samples(row)
    accuracy = _share_interval(row, "accuracy", "labels", n) if _number(row.get("accuracy")) is not None \
        else [None, None]
    agreement = _share_interval(row, "agreement", "float", n) if _number(row.get("agreement")) is not None \
        else [None, None]
    details = _details(row)
    samples = details.get("latency_samples_ms") or []
    latency = stats.bootstrap_median_interval(samples).to_list() if samples else [None, None]
    share = _number(details.get("latency_others_cpu_share"))
    return {"accuracy_ci_low": accuracy[0], "accuracy_ci_high": accuracy[1],
            "agreement_ci_low": agreement[0], "agreement_ci_high": agreement[1],
            "latency_p50_ci_low_ms": latency[0], "latency_p50_ci_high_ms": latency[1],
            "latency_cpu_busy": None if share is None else share > BUSY_CPU_SHARE,
            "test_samples": n}


@dataclass(frozen=True)
class ChangeTest:
    """A variant against a reference on the same samples: exact McNemar p and the change's interval."""

    p: float
    change_ci_points: stats.Interval       # (variant - reference) * 100, 95% paired interval
    lost: int                              # samples the reference gets right and the variant wrong
    gained: int                            # the reverse
    samples: int

    @property
    def differs(self) -> bool:
        return self.p < stats.SIGNIFICANCE_LEVEL

    def describe(self) -> str:
        if self.lost == self.gained == 0:
            return f"identical on all {self.samples} samples (p = 1)"
        verdict = "differs" if self.differs else "within noise"
        return (f"{verdict}: {self.lost} samples lost, {self.gained} gained of {self.samples} "
                f"(exact McNemar p = {self.p:.3g})")


def change_test(row: Mapping[str, Any], reference: Mapping[str, Any], against: str = "labels"
                ) -> ChangeTest | None:
    """McNemar of `row` against `reference` on correct-vs-label ("labels") or agreement with the
    float model ("float"); None when either row's predictions are not kept or not on the same samples."""
    mine, theirs = correct_vector(row, against), correct_vector(reference, against)
    if mine is None or theirs is None or mine.shape != theirs.shape or not mine.size:
        return None
    lost, gained = stats.discordant_pairs(theirs, mine)
    interval = stats.paired_difference_interval(theirs, mine)
    return ChangeTest(stats.mcnemar_p(lost, gained),
                      stats.Interval(interval.low * 100, interval.high * 100), lost, gained, int(mine.size))


def change_fields(row: Mapping[str, Any], references: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """CHANGE_COLUMNS of one row against its reference (`references["reference"]`) and TFLite
    float32 (`references["float32"]`), each None when it cannot be computed."""
    fields: dict[str, Any] = {name: None for name in CHANGE_COLUMNS}
    reference, float32 = references.get("reference"), references.get("float32")
    for metric, against in (("accuracy", "labels"), ("agreement", "float")):
        if _number(row.get(metric)) is None:
            continue
        if reference is not None:
            test = change_test(row, reference, against)
            if test is not None:
                fields[f"{metric}_change_p"] = test.p
                fields[f"{metric}_change_ci_low"] = test.change_ci_points.low
                fields[f"{metric}_change_ci_high"] = test.change_ci_points.high
        if float32 is not None:
            test = change_test(row, float32, against)
            if test is not None:
                fields[f"{metric}_change_p_vs_float32"] = test.p
    decisive = fields["accuracy_change_p"] if fields["accuracy_change_p"] is not None \
        else fields["agreement_change_p"]
    fields["differs_from_reference"] = None if decisive is None else decisive < stats.SIGNIFICANCE_LEVEL
    return fields


def stored_references(store: Any, model_hash: str | None, dataset_hash: str | None
                      ) -> dict[str, dict[str, Any] | None]:
    """The newest successful baseline and float32 rows of one model/dataset version, and which of
    them is the reference (the baseline, else float32), as analysis.compare_frame picks them."""
    found: dict[str, dict[str, Any] | None] = {"baseline": None, "float32": None}
    frame = store.query(
        "SELECT * FROM results WHERE technique IN ('baseline', 'float32') AND error IS NULL "
        "AND model_hash IS NOT DISTINCT FROM ? AND dataset_hash IS NOT DISTINCT FROM ? "
        "QUALIFY row_number() OVER (PARTITION BY technique ORDER BY recorded_at DESC) = 1",
        [model_hash, dataset_hash])
    for record in ([] if frame.empty else frame.to_dict(orient="records")):
        found[record["technique"]] = record
    return {"reference": found["baseline"] or found["float32"], "float32": found["float32"]}


def tests_against_references(store: Any, row: Mapping[str, Any]) -> dict[str, Any]:
    """change_fields of one stored row against the stored references of its model/dataset version."""
    return change_fields(row, stored_references(store, row.get("model_hash"), row.get("dataset_hash")))


def add_change_tests(frame: Any, store: Any) -> Any:
    """compare_frame rows with CHANGE_COLUMNS added, each against the reference row compare_frame
    picked (`reference_row_id`) and the float32 row of the same version."""
    if frame is None or frame.empty:
        for name in CHANGE_COLUMNS:
            if frame is not None and name not in frame.columns:
                frame[name] = None
        return frame
    by_id = {r["row_id"]: r for r in frame.to_dict(orient="records")}
    wanted = {rid for rid in frame.get("reference_row_id", []) if isinstance(rid, str) and rid not in by_id}
    if wanted:
        marks = ", ".join("?" for _ in wanted)
        extra = store.query(f"SELECT * FROM results WHERE row_id IN ({marks})", sorted(wanted))
        by_id.update({r["row_id"]: r for r in extra.to_dict(orient="records")})
    float32_of: dict[tuple, Mapping[str, Any] | None] = {}
    for record in by_id.values():
        if record.get("technique") == "float32" and not isinstance(record.get("error"), str):
            key = (record.get("model_hash"), record.get("dataset_hash"))
            newest = float32_of.get(key)
            if newest is None or str(record.get("recorded_at")) > str(newest.get("recorded_at")):
                float32_of[key] = record
    lines = []
    for record in frame.to_dict(orient="records"):
        reference = by_id.get(record.get("reference_row_id"))
        key = (record.get("model_hash"), record.get("dataset_hash"))
        if key not in float32_of:
            float32_of[key] = stored_references(store, *key)["float32"]
        lines.append(change_fields(record, {"reference": reference, "float32": float32_of[key]}))
    for name in CHANGE_COLUMNS:
        frame[name] = [line[name] for line in lines]
    return frame


def json_fields(row: Mapping[str, Any], changes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The interval fields as `python -m quantlab ... --json` prints them: [low, high] pairs
    (None when unknown) and the p-values against the reference and float32."""
    def pair(low: str, high: str) -> list[float] | None:
        values = (_number(row.get(low)), _number(row.get(high)))
        return None if None in values else [values[0], values[1]]

    changes = changes or {}
    busy = row.get("latency_cpu_busy")
    return {"accuracy_ci95": pair("accuracy_ci_low", "accuracy_ci_high"),
            "agreement_ci95": pair("agreement_ci_low", "agreement_ci_high"),
            "latency_p50_ci95_ms": pair("latency_p50_ci_low_ms", "latency_p50_ci_high_ms"),
            "latency_cpu_busy": None if busy is None or (isinstance(busy, float) and math.isnan(busy))
            else bool(busy),
            "accuracy_change_p": changes.get("accuracy_change_p"),
            "agreement_change_p": changes.get("agreement_change_p"),
            "accuracy_change_p_vs_float32": changes.get("accuracy_change_p_vs_float32"),
            "differs_from_reference": changes.get("differs_from_reference")}
