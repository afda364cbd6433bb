"""Sharing a view: its state to and from URL query parameters, and the results as files.

Pure functions, no Streamlit. `decode` never raises: a parameter that is unknown, malformed or out
of range is dropped (and reported by `decode_with_report`), so a hand-edited or stale link still
opens the app. Exports turn a results frame (columns of store.COLUMN_NAMES) into CSV, JSON or a
self-contained HTML report.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlencode

# The app's pages, by the name used in URLs (app.py maps each to its file).
PAGE_NAMES = ("run", "compare", "recommend", "details", "lab")

# Numeric result columns a chart may put on an axis.
METRIC_COLUMNS = ("model_bytes", "gzip_bytes", "accuracy", "agreement", "sqnr_db", "latency_p50_ms",
                  "latency_p90_ms", "latency_mean_ms", "conversion_seconds", "float_ops", "total_ops")

MAX_TEXT_LENGTH = 120
MAX_LATENCY_BUDGET_MS = 1e6
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()\-]*$")  # no slashes: never a server path
ID_PATTERN = re.compile(r"^[0-9a-f]{8,64}$")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# Columns exported first and shown in the report table, in this order.
REPORT_COLUMNS = ("model_name", "dataset_name", "technique", "family", "params", "model_bytes",
                  "gzip_bytes", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_change_p",
                  "agreement", "agreement_ci_low", "agreement_ci_high", "agreement_change_p",
                  "differs_from_reference", "sqnr_db", "latency_p50_ms", "latency_p50_ci_low_ms",
                  "latency_p50_ci_high_ms", "latency_cpu_busy", "latency_p90_ms", "latency_runs",
                  "test_samples", "num_threads", "input_dtype", "output_dtype", "float_ops", "total_ops",
                  "cached", "error", "recorded_at", "row_id")
JSON_TEXT_COLUMNS = ("params", "provenance", "details")


@dataclass(frozen=True)
class ViewState:
    """What a link reproduces: every control that changes what a page concludes.

    `accuracy_drop_pp` is the tolerated accuracy drop in percentage points (1.0 = one point). None (or
    `()`) means "not set": the page uses its default.
    """

    # every page: where the view is
    page: str | None = None
    model: str | None = None
    dataset: str | None = None
    techniques: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    include_errors: bool | None = None
    latest_only: bool | None = None
    x_metric: str | None = None
    y_metric: str | None = None
    row: str | None = None
    sweep: str | None = None
    # Compare's budgets and objective (the drop is also Recommend's tolerance)
    latency_budget_ms: float | None = None
    accuracy_drop_pp: float | None = None
    objective: str | None = None
    # Recommend: the answers to the decision tree's questions
    hardware: str | None = None
    drop_ok: bool | None = None
    representative_data: bool | None = None
    can_retrain: bool | None = None
    integer_io: bool | None = None
    uint8_io: bool | None = None
    # Lab: the workload (a model hash prefix), the tab, the tensor and the quantizer
    workload: str | None = None
    lab_tab: str | None = None
    source: str | None = None
    layer: str | None = None
    bits: int | None = None
    levels: str | None = None
    symmetric: bool | None = None
    per_channel: bool | None = None
    calibrator: str | None = None
    percentile: float | None = None
    channel: int | None = None
    log_scale: bool | None = None
    layer_bits: tuple[str, ...] = ()   # "layer:bits" for the model tab's layers not at `bits`
    activations: bool | None = None
    activation_bits: int | None = None
    keep_float: int | None = None

    def merged(self, newer: "ViewState") -> "ViewState":
        """This state with every field that `newer` sets taken from `newer`."""
        changes = {name: getattr(newer, name) for name in self.__dataclass_fields__
                   if getattr(newer, name) not in (None, ())}
        return replace(self, **changes)

    def with_(self, **changes: Any) -> "ViewState":
        return replace(self, **changes)


# URL parameter name -> ViewState field
PARAM_FIELDS = {"page": "page", "model": "model", "dataset": "dataset", "techniques": "techniques",
                "families": "families", "errors": "include_errors", "latest": "latest_only",
                "x": "x_metric", "y": "y_metric", "budget": "latency_budget_ms",
                "drop": "accuracy_drop_pp", "row": "row", "sweep": "sweep",
                "objective": "objective",
                "hw": "hardware", "drop_ok": "drop_ok", "data": "representative_data",
                "retrain": "can_retrain", "int_io": "integer_io", "uint8": "uint8_io",
                "workload": "workload", "tab": "lab_tab", "source": "source", "layer": "layer",
                "bits": "bits", "levels": "levels", "sym": "symmetric", "per_channel": "per_channel",
                "calibrator": "calibrator", "pct": "percentile", "channel": "channel",
                "log": "log_scale", "layer_bits": "layer_bits", "act": "activations",
                "act_bits": "activation_bits", "keep_float": "keep_float"}
FIELD_PARAMS = {value: key for key, value in PARAM_FIELDS.items()}

# Choices a page offers, as they appear in links (analysis.OBJECTIVES, recommend.HARDWARE and
# calibrate's constants are the sources; tests check they agree).
OBJECTIVES = ("size", "latency", "accuracy")
LAB_TABS = ("tensor", "model", "sensitivity")
LAB_SOURCES = ("weights", "activations")
LAB_LEVELS = ("linear", "kmeans")
BOOLEAN_FIELDS = ("include_errors", "latest_only", "drop_ok", "representative_data", "can_retrain",
                  "integer_io", "uint8_io", "symmetric", "per_channel", "log_scale", "activations")
LAYER_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./:\-]*$")
MAX_CHANNEL = 100_000
MAX_KEEP_FLOAT = 10_000


def _known_techniques() -> tuple[set[str], set[str]]:
    from .techniques import all_techniques

    techniques = all_techniques()
    return {t.id for t in techniques}, {t.family for t in techniques}


def _values(raw: Any) -> list[str]:
    """A parameter's values as strings: one value, a list of values, or comma-separated text."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    values = []
    for item in items:
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            continue
        values.extend(part.strip() for part in str(item).split(","))
    return [v for v in values if v]


def _one(raw: Any) -> str | None:
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    for item in reversed(items):  # the last value wins, as in st.query_params
        if isinstance(item, (str, int, float)) and not isinstance(item, bool):
            text = str(item).strip()
            return text or None
    return None


def _name(text: str | None) -> str | None:
    if text and len(text) <= MAX_TEXT_LENGTH and NAME_PATTERN.match(text) and ".." not in text:
        return text
    return None


def _layer(text: str | None) -> str | None:
    """A layer or tensor name (`conv2d/kernel`): looked up among the model's names, never a path."""
    if text and len(text) <= MAX_TEXT_LENGTH and LAYER_PATTERN.match(text) and ".." not in text:
        return text
    return None


def _number(text: str | None, low: float, high: float) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        return None
    return value


def _integer(text: str | None, allowed: Iterable[int] | range) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value in allowed else None


def _flag(text: str | None) -> bool | None:
    if text is None:
        return None
    text = text.lower()
    return True if text in TRUE_WORDS else False if text in FALSE_WORDS else None


def _choice(text: str | None, allowed: Iterable[str]) -> str | None:
    return text if text in tuple(allowed) else None


def _choices(raw: Any, allowed: set[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in _values(raw) if v in allowed))


def _layer_bits(raw: Any, allowed: Iterable[int]) -> tuple[str, ...]:
    """`layer:bits` pairs with a valid layer name and bit width; the last one of a layer wins."""
    pairs: dict[str, str] = {}
    for value in _values(raw):
        layer, _, bits = value.rpartition(":")
        if _layer(layer) and _integer(bits, allowed) is not None:
            pairs[layer] = str(int(bits))
    return tuple(f"{layer}:{bits}" for layer, bits in pairs.items())


def _parsers() -> dict[str, Any]:
    """field -> function(raw parameter) -> value or None (dropped)."""
    from .calibrate import CALIBRATORS, SUPPORTED_BITS, WEIGHT_BITS
    from .recommend import HARDWARE

    technique_ids, families = _known_techniques()

    def budget(raw: Any) -> float | None:
        value = _number(_one(raw), 0.0, MAX_LATENCY_BUDGET_MS)
        return value if value else None  # a budget of 0 ms admits nothing

    def hex_id(raw: Any) -> str | None:
        text = (_one(raw) or "").lower()
        return text if ID_PATTERN.match(text) else None

    parsers: dict[str, Any] = {
        "page": lambda raw: _choice(_one(raw), PAGE_NAMES),
        "model": lambda raw: _name(_one(raw)),
        "dataset": lambda raw: _name(_one(raw)),
        "techniques": lambda raw: _choices(raw, technique_ids) or None,
        "families": lambda raw: _choices(raw, families) or None,
        "x_metric": lambda raw: _choice(_one(raw), METRIC_COLUMNS),
        "y_metric": lambda raw: _choice(_one(raw), METRIC_COLUMNS),
        "latency_budget_ms": budget,
        "accuracy_drop_pp": lambda raw: _number(_one(raw), 0.0, 100.0),
        "row": hex_id, "sweep": hex_id, "workload": hex_id,
        "objective": lambda raw: _choice(_one(raw), OBJECTIVES),
        "hardware": lambda raw: _choice(_one(raw), HARDWARE),
        "lab_tab": lambda raw: _choice(_one(raw), LAB_TABS),
        "source": lambda raw: _choice(_one(raw), LAB_SOURCES),
        "layer": lambda raw: _layer(_one(raw)),
        "bits": lambda raw: _integer(_one(raw), SUPPORTED_BITS),
        "activation_bits": lambda raw: _integer(_one(raw), SUPPORTED_BITS),
        "levels": lambda raw: _choice(_one(raw), LAB_LEVELS),
        "calibrator": lambda raw: _choice(_one(raw), CALIBRATORS),
        "percentile": lambda raw: _number(_one(raw), 50.0, 100.0),
        "channel": lambda raw: _integer(_one(raw), range(MAX_CHANNEL + 1)),
        "keep_float": lambda raw: _integer(_one(raw), range(MAX_KEEP_FLOAT + 1)),
        "layer_bits": lambda raw: _layer_bits(raw, WEIGHT_BITS) or None,
    }
    parsers.update({name: (lambda raw: _flag(_one(raw))) for name in BOOLEAN_FIELDS})
    return parsers


def decode_with_report(params: Mapping[str, Any] | None) -> tuple[ViewState, list[str]]:
    """The view state in `params` (a st.query_params-like mapping) and the names of dropped params."""
    parsers = _parsers()
    fields: dict[str, Any] = {}
    dropped: list[str] = []
    try:
        items = list((params or {}).items())
    except Exception:  # not a mapping at all
        return ViewState(), ["(unreadable parameters)"]
    for key, raw in items:
        name = PARAM_FIELDS.get(str(key))
        value = parsers[name](raw) if name is not None else None
        if value is None:
            dropped.append(str(key))
        else:
            fields[name] = value
    return ViewState(**fields), dropped


def decode(params: Mapping[str, Any] | None) -> ViewState:
    """The view state in `params`; whatever is not valid is left out."""
    return decode_with_report(params)[0]


def _format_number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e15 else repr(value)


def encode(state: ViewState, fields: Iterable[str] | None = None) -> dict[str, str]:
    """Query parameters for `state` (only set fields; `fields` limits which), in a stable order."""
    wanted = set(fields) if fields is not None else None
    params: dict[str, str] = {}
    for name, key in FIELD_PARAMS.items():
        if wanted is not None and name not in wanted:
            continue
        value = getattr(state, name)
        if value is None or value == ():
            continue
        if isinstance(value, bool):
            params[key] = "1" if value else "0"
        elif isinstance(value, float):
            params[key] = _format_number(value)
        elif isinstance(value, int):
            params[key] = str(value)
        elif isinstance(value, tuple):
            params[key] = ",".join(value)
        else:
            params[key] = str(value)
    return params


def query_string(state: ViewState, fields: Iterable[str] | None = None) -> str:
    return urlencode(encode(state, fields), safe=",")


def share_url(base_url: str | None, state: ViewState, fields: Iterable[str] | None = None) -> str:
    """`base_url` (the page's address, without a query) with the state as its query."""
    base = (base_url or "").split("?", 1)[0].split("#", 1)[0]
    query = query_string(state, fields)
    return f"{base}?{query}" if query else base


# --- exports --------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-safe version of one cell: NaN and NaT become None, timestamps ISO text."""
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        try:
            return value.isoformat()
        except ValueError:  # NaT
            return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        import pandas as pd

        if not isinstance(value, (list, dict, tuple)) and pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def _ordered(frame: Any) -> Any:
    first = [c for c in REPORT_COLUMNS if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def export_csv(frame: Any) -> bytes:
    """The frame as UTF-8 CSV, the most useful columns first; JSON columns stay JSON text."""
    if frame is None or len(frame.columns) == 0:
        return b""
    return _ordered(frame).to_csv(index=False).encode("utf-8")


def export_records(frame: Any) -> list[dict[str, Any]]:
    """The frame as a list of dicts with JSON columns decoded and every value JSON-safe."""
    if frame is None or len(frame.columns) == 0:
        return []
    records = []
    for record in _ordered(frame).to_dict(orient="records"):
        row = {}
        for key, value in record.items():
            if key in JSON_TEXT_COLUMNS and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            row[str(key)] = _plain(value)
        records.append(row)
    return records


def export_json(frame: Any) -> bytes:
    """The frame as a UTF-8 JSON array of objects (JSON columns as nested objects)."""
    return json.dumps(export_records(frame), indent=1, default=str).encode("utf-8")


def measurement_methods(frame: Any) -> list[str]:
    """The distinct latency methods of the rows, each with its thread counts and run counts."""
    if frame is None or "latency_method" not in getattr(frame, "columns", ()):
        return []
    lines = []
    for method, group in frame.dropna(subset=["latency_method"]).groupby("latency_method", sort=True):
        parts = [str(method)]
        if "num_threads" in group and group["num_threads"].notna().any():
            threads = sorted({int(t) for t in group["num_threads"].dropna()})
            parts.append(f"threads: {', '.join(map(str, threads))}")
        if "latency_runs" in group and group["latency_runs"].notna().any():
            runs = group["latency_runs"].dropna()
            parts.append(f"runs per variant: {int(runs.min())}-{int(runs.max())}"
                         if runs.min() != runs.max() else f"runs per variant: {int(runs.min())}")
        lines.append("; ".join(parts))
    return lines


METRIC_NOTES = (
    "accuracy: top-1 accuracy on the dataset's test split",
    "agreement: share of test samples whose top-1 class equals the float reference model's",
    "SQNR: signal-to-quantization-noise ratio of the outputs against the float reference, in dB",
    "size: bytes of the .tflite file (gzip: the same file gzip-compressed, a proxy for download size)",
    "*_ci_low / *_ci_high: 95% intervals: Wilson score intervals for accuracy and agreement over the "
    "test_samples, a seeded bootstrap of the median over the timed runs for the p50",
    "*_change_p: exact McNemar test against the reference row on the same samples (1.0: identical); "
    "differs_from_reference: p below 0.05. A difference inside the intervals is noise, not a ranking",
    "latency_cpu_busy: other processes used more than 30% of the CPU while the row was timed",
)


def _report_table(frame: Any) -> str:
    if frame is None or frame.empty:
        return "<p>No results.</p>"
    columns = [c for c in REPORT_COLUMNS if c in frame.columns and c not in ("row_id",)]
    table = frame[columns].copy()
    for column in table.columns:
        table[column] = [_plain(v) for v in table[column]]
        table[column] = ["" if v is None else f"{v:.4g}" if isinstance(v, float) else v
                         for v in table[column]]
    return table.to_html(index=False, escape=True, border=0, classes="results", na_rep="")


REPORT_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222}
h1{margin-bottom:.2rem} .meta{color:#666;margin-top:0}
table.results{border-collapse:collapse;font-size:.85rem}
table.results th,table.results td{padding:.25rem .5rem;border-bottom:1px solid #ddd;text-align:right}
table.results th{background:#f4f4f4}
table.results td:nth-child(-n+5){text-align:left}
"""


def export_html_report(frame: Any, figures: Sequence[Any] = (), title: str = "QuantLab report", *,
                       generated_at: datetime | None = None, notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page: the figures (plotly.js embedded once), the table, the method."""
    generated = (generated_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>Generated {generated.strftime('%Y-%m-%d %H:%M:%S')} UTC by QuantLab; "
        f"{0 if frame is None else len(frame)} result rows.</p>",
    ]
    parts.extend(f"<p>{html.escape(str(note))}</p>" for note in notes)
    embedded = False
    for figure in figures or ():
        if figure is None:
            continue
        parts.append(figure.to_html(full_html=False, include_plotlyjs=not embedded))
        embedded = True
    parts.append("<h2>Results</h2>")
    parts.append(_report_table(frame))
    parts.append("<h2>How these numbers were measured</h2><ul>")
    methods = measurement_methods(frame)
    parts.extend(f"<li>latency: {html.escape(line)}</li>" for line in methods)
    if not methods:
        parts.append("<li>latency: no latency method recorded for these rows</li>")
    parts.extend(f"<li>{html.escape(line)}</li>" for line in METRIC_NOTES)
    parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def export_file_name(state: ViewState, suffix: str) -> str:
    """A file name that says what the export holds, e.g. quantlab-seed-cnn-digits-28.csv."""
    words = ["quantlab", state.model or "", state.dataset or ""]
    stem = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", w) for w in words if w)
    return f"{stem}.{suffix.lstrip('.')}"


__all__ = ["PAGE_NAMES", "METRIC_COLUMNS", "ViewState", "decode", "decode_with_report", "encode",
           "query_string", "share_url", "export_csv", "export_json", "export_records",
           "export_html_report", "measurement_methods", "export_file_name"]
