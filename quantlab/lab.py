"""What the Calibration lab page asks: prepared workloads, their tensors, calibrator comparisons,
fake-quantized accuracy, per-layer sensitivity and the "keep N layers in float" sweep.

No TensorFlow and no Streamlit here. TensorFlow work (extracting tensors, evaluating a fake-quantized
model, running TFLite's QuantizationDebugger) runs in one long-lived worker process (quantlab.sensitivity)
and its results are cached under cache/lab/:

    weights-<model hash>.npz                      every layer's weights
    activations-<model hash>-<dataset hash>.npz   every layer's output on the calibration split
    sensitivity-<key>.json                        per-layer rmse/scale of the int8 conversion
    evaluate-<key>.json                           accuracy with fake-quantized weights/activations

so that the page itself works from numpy: every redraw quantizes one tensor with quantlab.calibrate.
"""

from __future__ import annotations

import atexit
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .cache import ArtifactCache
from .calibrate import (
    CALIBRATORS,
    KMEANS_MAX_BITS,
    CalibratorRow,
    QuantConfig,
    compute_scale_zero_point,
    fake_quantize,
    integer_range,
    weight_bytes,
)
from .config import SweepSpec, TechniqueSpec
from .analysis import MISSING  # noqa: F401  (the placeholder of a missing value, for the pages)
from .errors import QuantLabError
from .lab_files import (  # noqa: F401  (the Lab's files and request, re-exported for the pages)
    EVALUATION_VERSION,
    FOLDED_ROLE,
    LAB_DIR,
    LAB_FORMAT,
    FakeQuantRequest,
    LabTensors,
    TensorInfo,
    activations_path,
    evaluation_path,
    lab_file,
    load_tensors,
    read_json,
    save_tensors,
    sensitivity_path,
    tensors_ready,
    weights_path,
    write_json,
)
from .pool import neutral_main  # noqa: F401  (re-exported for the tests' AppTest clean-up)
from .store import Store

HISTOGRAM_BINS = 120
MAX_LEVEL_LINES = 256                # more levels than this (16 bit) are thinned out on the chart
MAX_ANALYSIS_VALUES = 100_000        # larger tensors are compared on a seeded sample (extremes kept)
SAMPLE_SEED = 0
IDEAL_RMSE_SCALE = 1 / math.sqrt(12)  # rmse/scale of pure rounding error (~0.29)
INT8_TECHNIQUES = ("int8-fallback", "int8-only")
SELECTIVE_TECHNIQUE = "int8-selective"
CALIBRATOR_COLORS = {"max": "#E45756", "percentile": "#F58518", "kl": "#54A24B", "mse": "#B279A2",
                     "kmeans": "#9D755D"}
WORKER_TIMEOUT_SECONDS = 900.0


# --- where the dashboard keeps its store and cache ------------------------------------------------


@dataclass(frozen=True)
class LabContext:
    """The store and cache the page reads, the options its sweeps run with, and whether it may run."""

    store: Store
    cache: ArtifactCache
    sweep_options: Any = None
    can_run: bool = True


def app_context() -> LabContext:
    """From the dashboard's settings (QUANTLAB_DB, QUANTLAB_CACHE, ...; see quantlab.ui_state)."""
    from .ui_state import AppSettings

    settings = AppSettings.from_env()
    return LabContext(settings.store(), settings.cache(), settings.sweep_options(), settings.can_run)


# --- prepared workloads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A model + dataset prepared by a sweep: its manifest, and the spec of its latest stored sweep."""

    manifest: dict = field(hash=False, compare=False)
    spec: dict | None = field(default=None, hash=False, compare=False)
    model_hash: str = ""
    dataset_hash: str = ""

    @property
    def label(self) -> str:
        m = self.manifest
        return f"{m['model_name']} on {m['dataset_name']} · model {self.model_hash[:8]}"

    @property
    def usable(self) -> bool:
        return self.manifest.get("model_kind") == "keras" and self.input_count <= 1

    @property
    def input_count(self) -> int:
        return len((self.manifest.get("io") or {}).get("inputs") or []) or 1

    @property
    def reason(self) -> str:
        """Why the Lab cannot open this workload ('' when it can)."""
        if self.usable:
            return ""
        kind = self.manifest.get("model_kind")
        if kind == "keras":
            return (f"{self.manifest.get('model_name')} has {self.input_count} inputs: the Lab handles "
                    f"one-input models (sweeps, Compare and Recommend take several)")
        return (f"{self.manifest.get('model_name')} is {'a TensorFlow Lite file' if kind == 'tflite' else 'a SavedModel'}"
                f": the Lab reads layers and weights from tf_keras models only")


def read_manifests(cache: ArtifactCache) -> list[dict]:
    """Every prepared workload under cache/prepared/ whose model and dataset files still exist."""
    manifests = []
    for path in sorted((Path(cache.root) / "prepared").glob("*.json"), key=lambda p: p.stat().st_mtime,
                       reverse=True):
        manifest = read_json(path)
        if not manifest or "model_hash" not in manifest or "dataset_hash" not in manifest:
            continue
        if all(manifest.get(k) and Path(manifest[k]).exists() for k in ("model_path", "dataset_path")):
            manifests.append(manifest)
    return manifests


def stored_specs(store: Store) -> dict[tuple[str, str], dict]:
    """(model hash, dataset hash) -> the sweep spec of the latest sweep with a row for that pair."""
    frame = store.query(
        "SELECT r.model_hash, r.dataset_hash, s.spec FROM results r JOIN sweeps s USING (sweep_id) "
        "WHERE r.model_hash IS NOT NULL QUALIFY row_number() OVER "
        "(PARTITION BY r.model_hash, r.dataset_hash ORDER BY r.recorded_at DESC) = 1")
    specs = {}
    for row in frame.to_dict("records") if len(frame) else []:
        try:
            specs[(row["model_hash"], row["dataset_hash"])] = json.loads(row["spec"])
        except (TypeError, ValueError):
            continue
    return specs


def list_workloads(store: Store, cache: ArtifactCache) -> list[Workload]:
    """Prepared workloads, those with stored results first (newest first within each group)."""
    specs = stored_specs(store)
    seen, swept, unswept = set(), [], []
    for manifest in read_manifests(cache):
        pair = (manifest["model_hash"], manifest["dataset_hash"])
        if pair in seen:
            continue
        seen.add(pair)
        workload = Workload(manifest, specs.get(pair), *pair)
        (swept if workload.spec else unswept).append(workload)
    return swept + unswept


def extract_tensors(manifest: Mapping[str, Any], cache: ArtifactCache,
                    on_event: Callable[[dict], None] | None = None) -> tuple[Path, Path]:
    """Weights and calibration activations as .npz (extracted once, in a worker); their paths."""
    if not tensors_ready(cache, manifest):
        check_usable(manifest)
        run_in_worker({"kind": "lab-extract", "cache_dir": str(cache.root), "manifest": dict(manifest)},
                      on_event)
    return weights_path(cache, manifest), activations_path(cache, manifest)


def check_usable(manifest: Mapping[str, Any]) -> None:
    reason = Workload(dict(manifest)).reason
    if reason:
        raise QuantLabError(reason)


# --- one tensor: histogram, levels, thresholds, calibrator table ----------------------------------


def make_config(bits: int, symmetric: bool, per_channel: bool, calibrator: str, method: str,
                percentile: float = 99.99, axis: int = -1) -> tuple[QuantConfig, list[str]]:
    """A QuantConfig from the page's controls, adjusted where k-means cannot follow; notes say how."""
    notes = []
    if method == "kmeans":
        if per_channel:
            per_channel = False
            notes.append("k-means is per-tensor: per-channel is ignored.")
        if bits > KMEANS_MAX_BITS:
            raise QuantLabError(f"k-means quantization goes up to {KMEANS_MAX_BITS} bits; "
                                f"choose 8 bits or fewer, or linear quantization for 16 bits")
    return QuantConfig(bits=bits, symmetric=symmetric, per_channel=per_channel, axis=axis,
                       calibrator=calibrator, percentile=percentile, method=method), notes


INPUT_CLASSES = ("Input", "InputLayer")


def axis_words(info: TensorInfo) -> tuple[str, str]:
    """What one position of `info`'s channel axis is, singular and plural, by the tensor's layout:
    a kernel's output channels; an activation's last axis, which is a channel only for
    (samples, height, width, channels). A 2-D image fed without a channel axis, (samples, height,
    width), has image columns there; a Dense layer's output, units; other (samples, n) or
    (samples, steps, n) tensors, features."""
    if info.kind == "weight":
        return "output channel", "output channels"
    rank, layer_class = len(info.shape), info.layer_class
    if rank == 4:
        return "channel", "channels"
    if rank == 3 and layer_class in INPUT_CLASSES:
        return "image column", "image columns"
    if rank == 2 and layer_class == "Dense":
        return "unit", "units"
    return "feature", "features"


def channel_rows(values: np.ndarray, axis: int) -> np.ndarray:
    """The tensor as (channels, values per channel)."""
    moved = np.moveaxis(np.asarray(values), axis, 0)
    return moved.reshape(moved.shape[0], -1)


def analysis_sample(values: np.ndarray, axis: int = -1, limit: int = MAX_ANALYSIS_VALUES,
                    seed: int = SAMPLE_SEED) -> np.ndarray:
    """`values` itself when small; else a seeded sample of whole positions (all channels of each),
    always including each channel's minimum and maximum, returned with the channel axis last.

    Keeping the extremes keeps the `max` calibrator's range exact; sampling positions (not values)
    keeps every channel equally represented for per-channel quantization.
    """
    values = np.asarray(values)
    if values.size <= limit or values.ndim == 0:
        return values
    by_position = channel_rows(values, axis).T                  # (positions, channels)
    positions, channels = by_position.shape
    wanted = max(1, limit // max(channels, 1))
    chosen = np.random.default_rng(seed).choice(positions, size=min(wanted, positions), replace=False)
    extremes = np.concatenate([by_position.argmin(axis=0), by_position.argmax(axis=0)])
    return by_position[np.unique(np.concatenate([chosen, extremes]))]


@dataclass(frozen=True, eq=False)
class CalibratorRun:
    """One calibrator on one tensor: its comparison row, its range per channel and its levels
    (k-means only: the centroids; linear levels follow from the range)."""

    row: CalibratorRow
    low: np.ndarray
    high: np.ndarray
    centroids: np.ndarray | None = None


def calibrator_configs(config: QuantConfig) -> list[QuantConfig]:
    """The configs compare_calibrators runs for `config`'s settings: every linear calibrator, then
    k-means (per-tensor) up to 8 bits. Settings that do not change a run are normalised, so equal
    runs have equal configs (and share a cache entry)."""
    default_percentile = QuantConfig().percentile
    configs = [QuantConfig(bits=config.bits, symmetric=config.symmetric, per_channel=config.per_channel,
                           axis=config.axis if config.per_channel else -1, calibrator=name,
                           percentile=config.percentile if name == "percentile" else default_percentile)
               for name in CALIBRATORS]
    if config.bits <= KMEANS_MAX_BITS:
        configs.append(QuantConfig(bits=config.bits, method="kmeans"))
    return configs


def run_calibrator(sample: np.ndarray, config: QuantConfig) -> CalibratorRun:
    """Quantize `sample` once with `config` (timed), as calibrate.compare_calibrators does per row."""
    started = time.perf_counter()
    result = fake_quantize(sample, config)
    seconds = time.perf_counter() - started
    kmeans = config.method == "kmeans"
    # The row's range is the whole tensor's, as its error figures are: per channel, from the lowest
    # channel's low to the highest channel's high (channel 0's alone made a per-tensor k-means range
    # look wider than the max calibrator's).
    row = CalibratorRow(method=config.method, calibrator="kmeans" if kmeans else config.calibrator,
                        per_channel=config.per_channel, low=float(np.min(result.low)),
                        high=float(np.max(result.high)),
                        mse=result.errors.mse, sqnr_db=result.errors.sqnr_db,
                        clipped_share=result.errors.clipped_share, seconds=seconds)
    return CalibratorRun(row, np.asarray(result.low), np.asarray(result.high),
                         np.asarray(result.levels) if kmeans else None)


@dataclass(frozen=True, eq=False)
class TensorAnalysis:
    """Everything the tensor view draws: a histogram, the chosen grid, every calibrator's range."""

    counts: np.ndarray
    edges: np.ndarray
    levels: np.ndarray            # the representable values of the chosen config (thinned)
    level_step: int               # every level_step-th level is in `levels`
    level_count: int              # how many levels there are in all
    thresholds: dict[str, tuple[float, float]]   # calibrator -> (low, high) for the shown channel
    rows: list[CalibratorRow]
    config: QuantConfig
    channel: int
    channels: int
    sampled_values: int           # values the calibrators compared (== tensor size unless sampled)
    total_values: int
    notes: tuple[str, ...] = ()

    @property
    def chosen(self) -> str:
        return "kmeans" if self.config.method == "kmeans" else self.config.calibrator

    def table(self) -> Any:
        """The calibrators side by side (pandas), the chosen one marked."""
        import pandas as pd

        lines = [{"calibrator": r.calibrator, "chosen": r.calibrator == self.chosen,
                  "method": r.method, "low": r.low, "high": r.high, "MSE": r.mse,
                  "SQNR (dB)": r.sqnr_db, "clipped %": 100 * r.clipped_share, "time (ms)": 1000 * r.seconds}
                 for r in self.rows]
        return pd.DataFrame(lines, columns=["calibrator", "chosen", "method", "low", "high", "MSE",
                                            "SQNR (dB)", "clipped %", "time (ms)"])


def analyze_tensor(values: np.ndarray, config: QuantConfig, channel: int = 0,
                   limit: int = MAX_ANALYSIS_VALUES,
                   run: Callable[[np.ndarray, QuantConfig], CalibratorRun] = run_calibrator,
                   sample: np.ndarray | None = None) -> TensorAnalysis:
    """Histogram of the tensor (or of one channel, per-channel), the chosen config's levels, and
    every calibrator's range and error figures (the rows of calibrate.compare_calibrators).

    The calibrators run on `analysis_sample(values)` (the tensor itself up to `limit` values); `run`
    and `sample` let a caller cache both.
    """
    values = np.asarray(values)
    notes: list[str] = []
    if sample is None:
        sample = analysis_sample(values, config.axis, limit)
    sampled = sample.size < values.size
    if sampled:
        notes.append(f"Calibrators compared on a seeded sample of {sample.size:,} of {values.size:,} values "
                     f"(every channel's minimum and maximum kept).")
    per_channel = config.per_channel and values.ndim > 0
    sample_config = replace(config, axis=-1) if sampled else config
    runs = [run(sample, c) for c in calibrator_configs(replace(sample_config, per_channel=per_channel))]
    shown_rows = channel_rows(values, config.axis) if per_channel else values.reshape(1, -1)
    channels = len(shown_rows)
    channel = int(min(max(channel, 0), channels - 1))
    shown = shown_rows[channel]
    thresholds = {}
    for item in runs:
        index = channel if len(item.low) > 1 else 0
        thresholds[item.row.calibrator] = (float(item.low[index]), float(item.high[index]))
    chosen = "kmeans" if config.method == "kmeans" else config.calibrator
    chosen_run = next(item for item in runs if item.row.calibrator == chosen)
    if chosen_run.centroids is not None:
        levels = chosen_run.centroids
    else:
        low, high = thresholds[chosen]
        scale, zero_point = compute_scale_zero_point(low, high, config.bits, config.symmetric)
        qmin, qmax = integer_range(config.bits, config.symmetric)
        levels = (np.arange(qmin, qmax + 1) - zero_point) * scale
    level_count = len(levels)
    step = max(1, math.ceil(level_count / MAX_LEVEL_LINES))
    if step > 1:
        notes.append(f"{level_count:,} levels: every {step}th is drawn.")
    span_low = float(min([shown.min()] + [t[0] for t in thresholds.values()]))
    span_high = float(max([shown.max()] + [t[1] for t in thresholds.values()]))
    if span_high <= span_low:
        span_low, span_high = span_low - 0.5, span_high + 0.5
    counts, edges = np.histogram(shown, bins=HISTOGRAM_BINS, range=(span_low, span_high))
    return TensorAnalysis(counts=counts, edges=edges, levels=np.asarray(levels)[::step], level_step=step,
                          level_count=level_count, thresholds=thresholds, rows=[item.row for item in runs],
                          config=config, channel=channel, channels=channels, sampled_values=int(sample.size),
                          total_values=int(values.size), notes=tuple(notes))


def histogram_figure(analysis: TensorAnalysis, log_scale: bool = False, title: str = "") -> Any:
    """A Plotly histogram with the chosen grid's levels (thin grey lines) and every calibrator's
    clipping range (dashed lines, one colour each; the chosen calibrator solid)."""
    import plotly.graph_objects as go

    centers = (analysis.edges[:-1] + analysis.edges[1:]) / 2
    figure = go.Figure(go.Bar(x=centers, y=analysis.counts, width=np.diff(analysis.edges), name="values",
                              marker_color="#4C78A8", opacity=0.85,
                              hovertemplate="%{x:.4g}: %{y} values<extra></extra>"))
    level_x = np.repeat(analysis.levels, 3).astype(object)
    level_x[2::3] = None
    level_y = np.tile(np.array([0.0, 1.0, None], dtype=object), len(analysis.levels))
    level_name = "levels" if analysis.level_step == 1 else f"levels (every {analysis.level_step}th)"
    figure.add_trace(go.Scatter(x=level_x, y=level_y, mode="lines", yaxis="y2", name=level_name,
                                line=dict(color="rgba(90,90,90,0.35)", width=1), hoverinfo="skip"))
    chosen = "kmeans" if analysis.config.method == "kmeans" else analysis.config.calibrator
    for name, (low, high) in analysis.thresholds.items():
        figure.add_trace(go.Scatter(
            x=[low, low, None, high, high], y=[0, 1, None, 0, 1], mode="lines", yaxis="y2",
            name=f"{name} range" + (" (chosen)" if name == chosen else ""),
            line=dict(color=CALIBRATOR_COLORS.get(name, "#333"), width=2.5 if name == chosen else 1.5,
                      dash="solid" if name == chosen else "dash"),
            hovertemplate=f"{name}: %{{x:.4g}}<extra></extra>"))
    pad = 0.03 * (analysis.edges[-1] - analysis.edges[0])     # range lines at the data's ends stay visible
    figure.update_layout(
        title=dict(text=title, x=0, xanchor="left") if title else None, bargap=0, height=420,
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
        xaxis=dict(title="value", range=[analysis.edges[0] - pad, analysis.edges[-1] + pad]),
        yaxis=dict(title="count" + (" (log)" if log_scale else ""), type="log" if log_scale else "linear"),
        yaxis2=dict(overlaying="y", range=[0, 1], visible=False, fixedrange=True),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0))
    return figure


# --- model level: fake-quantized accuracy ---------------------------------------------------------


def folded_twin(tensors: LabTensors, name: str) -> str | None:
    """The name of the folded version of kernel `name`, when its layer is followed by a batch norm."""
    info = tensors.info(name)
    return next((other.name for other in tensors.infos
                 if other.role == FOLDED_ROLE and other.layer == info.layer and other.kind == info.kind), None)


def layer_table(weights: LabTensors, default_bits: int) -> Any:
    """One line per layer with a kernel: its quantized and float parameter counts and a bit width."""
    import pandas as pd

    lines: dict[str, dict[str, Any]] = {}
    for info in weights.infos:
        if info.role == FOLDED_ROLE:  # a view of the kernel, not more parameters
            continue
        line = lines.setdefault(info.layer, {"layer": info.layer, "type": info.layer_class,
                                             "quantized params": 0, "float params": 0, "bits": default_bits})
        line["quantized params" if info.quantized else "float params"] += info.size
    kept = [line for line in lines.values() if line["quantized params"] > 0]
    return pd.DataFrame(kept, columns=["layer", "type", "quantized params", "float params", "bits"])


def bits_from_table(table: Any) -> dict[str, int]:
    return {str(row["layer"]): int(row["bits"]) for row in table.to_dict("records")}


@dataclass(frozen=True)
class WeightSize:
    quantized_bytes: int       # kernels at their bit widths (calibrate.weight_bytes)
    float_bytes: int           # biases and other vectors, float32
    float32_bytes: int         # everything float32, for comparison

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.float_bytes

    @property
    def ratio(self) -> float:
        return self.float32_bytes / self.total_bytes if self.total_bytes else math.nan


def weight_size(table: Any) -> WeightSize:
    records = table.to_dict("records")
    counts = {str(r["layer"]): int(r["quantized params"]) for r in records}
    bits = {str(r["layer"]): int(r["bits"]) for r in records}
    other = sum(int(r["float params"]) for r in records)
    return WeightSize(quantized_bytes=weight_bytes(counts, bits), float_bytes=4 * other,
                      float32_bytes=4 * (sum(counts.values()) + other))


def cached_evaluation(cache: ArtifactCache, manifest: Mapping[str, Any], request: FakeQuantRequest) -> dict | None:
    return read_json(evaluation_path(cache, manifest, request))


def evaluate(manifest: Mapping[str, Any], cache: ArtifactCache, request: FakeQuantRequest,
             on_event: Callable[[dict], None] | None = None) -> dict:
    """Test accuracy with fake-quantized weights (and activations): cached, else computed in a worker."""
    path = evaluation_path(cache, manifest, request)
    result = read_json(path)
    if result is None:
        check_usable(manifest)
        result = run_in_worker({"kind": "lab-evaluate", "cache_dir": str(cache.root),
                                "manifest": dict(manifest), "request": request.to_dict()}, on_event)
        write_json(path, result)
    return result


def converted_int8_rows(store: Store, manifest: Mapping[str, Any]) -> Any:
    """The latest successful int8-fallback / int8-only / int8-selective rows for this model+dataset."""
    return store.query(
        "SELECT technique, params, accuracy, agreement, model_bytes, float_ops, total_ops, row_id, "
        "recorded_at FROM results WHERE model_hash = ? AND dataset_hash = ? AND error IS NULL "
        "AND technique IN (?, ?, ?) QUALIFY row_number() OVER (PARTITION BY technique, params "
        "ORDER BY recorded_at DESC) = 1 ORDER BY technique, params",
        [manifest["model_hash"], manifest["dataset_hash"], *INT8_TECHNIQUES, SELECTIVE_TECHNIQUE])


@dataclass(frozen=True)
class Tile:
    """One st.metric of the model view: label, value, delta and help."""

    label: str
    value: str
    delta: str | None = None
    help: str | None = None


def _figure(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def quality_text(row: Mapping[str, Any]) -> str:
    """`accuracy 0.9512`, or `no labels, agreement 0.9900` for a dataset without labels."""
    accuracy, agreement = _figure(row.get("accuracy")), _figure(row.get("agreement"))
    if accuracy is not None:
        return f"accuracy {accuracy:.4f}"
    return f"no labels, agreement {agreement:.4f}" if agreement is not None else "accuracy n/a"


def model_view_tiles(result: Mapping[str, Any] | None, rows: Sequence[Mapping[str, Any]]) -> list[Tile]:
    """The prediction (fake-quantized vs float), then each converted int8 row: accuracy, or
    agreement with the float model when the dataset has no labels."""
    from .analysis import NO_LABELS, NO_LABELS_NOTE
    from .techniques import variant_label

    tiles = []
    if result is not None:
        accuracy, agreement = _figure(result.get("accuracy")), _figure(result.get("agreement"))
        float_accuracy = _figure(result.get("float_accuracy"))
        if accuracy is not None:
            # in points, as on the Compare page (0.9000 vs 0.9500: -5.00 points)
            delta = f"{(accuracy - float_accuracy) * 100:+.2f} points vs float" \
                if float_accuracy is not None else None
            tiles.append(Tile("Predicted (fake-quantized)", f"{accuracy:.4f}", delta,
                              f"Agreement with the float model: {agreement:.4f}"
                              if agreement is not None else None))
        else:
            tiles.append(Tile("Predicted agreement (fake-quantized)",
                              "n/a" if agreement is None else f"{agreement:.4f}", help=NO_LABELS_NOTE))
        tiles.append(Tile("Float (Keras)", f"{float_accuracy:.4f}" if float_accuracy is not None
                          else NO_LABELS))
    for row in rows:
        accuracy, agreement = _figure(row.get("accuracy")), _figure(row.get("agreement"))
        value = f"{accuracy:.4f}" if accuracy is not None else \
            f"{agreement:.4f} agreement" if agreement is not None else "n/a"
        tiles.append(Tile(f"Converted: {variant_label(row['technique'], row.get('params'))}", value,
                          help=f"Measured TFLite model, store row {str(row['row_id'])[:8]}"
                          + ("" if accuracy is not None else f"; {NO_LABELS_NOTE}")))
    return tiles


# --- per-layer sensitivity ------------------------------------------------------------------------


def cached_sensitivity(cache: ArtifactCache, manifest: Mapping[str, Any]) -> dict | None:
    return read_json(sensitivity_path(cache, manifest))


def compute_sensitivity(manifest: Mapping[str, Any], cache: ArtifactCache,
                        on_event: Callable[[dict], None] | None = None) -> dict:
    """Per-layer rmse/scale of the int8 conversion: cached, else TFLite's debugger in a worker."""
    path = sensitivity_path(cache, manifest)
    result = read_json(path)
    if result is None:
        result = run_in_worker({"kind": "lab-sensitivity", "cache_dir": str(cache.root),
                                "manifest": dict(manifest)}, on_event)
        write_json(path, result)
    return result


def short_layer_name(tensor_name: str) -> str:
    """A readable name for a TFLite tensor: 'seed_cnn/conv2d/Relu;...' -> 'conv2d'."""
    first = str(tensor_name).split(";")[0]
    parts = first.split("/")
    if first.startswith("StatefulPartitionedCall") or first.startswith("PartitionedCall"):
        return "model output" if len(parts) == 1 else parts[-1]
    return parts[1] if len(parts) > 2 else parts[-1]


def sublayer_name(tensor_name: str) -> str:
    """The layer and its sublayer where Keras named one: 'm/multi_head_attention/key/einsum/Einsum1' ->
    'multi_head_attention/key' (a TensorFlow op's name, capitalised as 'Tensordot', is not a sublayer)."""
    parts = str(tensor_name).split(";")[0].split("/")
    if len(parts) > 3 and parts[2][:1].islower() and not parts[0].startswith(("StatefulPartitionedCall",
                                                                               "PartitionedCall")):
        return f"{parts[1]}/{parts[2]}"
    return short_layer_name(tensor_name)


def sensitivity_frame(result: Mapping[str, Any], keep_float: int = 0) -> Any:
    """Layers in graph order with rmse/scale, rank (1 = most sensitive) and whether N would keep them float."""
    import pandas as pd

    ranking = {name: index + 1 for index, name in enumerate(result.get("ranking", []))}
    layers = result.get("layers", [])
    # one Keras layer may become several ops (Conv1D: EXPAND_DIMS, CONV_2D, RESHAPE; MultiHeadAttention:
    # its query, key, value and output projections): name the sublayer, then the op
    short = [short_layer_name(layer["tensor_name"]) for layer in layers]
    repeated = Counter(short)
    lines = []
    for index, (layer, name) in enumerate(zip(layers, short)):
        rank = ranking.get(layer["tensor_name"])
        label = (f"{index}: {name}" if repeated[name] < 2 else
                 f"{index}: {sublayer_name(layer['tensor_name'])} · {layer['op_name']}")
        lines.append({"#": index, "layer": label,
                      "op": layer["op_name"], "rmse/scale": layer["rmse_scale"], "rank": rank,
                      "kept float": rank is not None and rank <= keep_float,
                      "scale": layer["scale"], "tensor": layer["tensor_name"]})
    return pd.DataFrame(lines, columns=["#", "layer", "op", "rmse/scale", "rank", "kept float", "scale", "tensor"])


def sensitivity_figure(frame: Any) -> Any:
    """Bars of rmse/scale per layer (graph order); the layers to keep in float in red; a line at 0.29."""
    import plotly.graph_objects as go

    colors = ["#E45756" if kept else "#4C78A8" for kept in frame["kept float"]]
    figure = go.Figure(go.Bar(x=frame["layer"], y=frame["rmse/scale"], marker_color=colors,
                              customdata=np.stack([frame["op"], frame["rank"].astype(object)], axis=-1)
                              if len(frame) else None,
                              hovertemplate="%{x} (%{customdata[0]}): %{y:.3f}, rank %{customdata[1]}"
                                            "<extra></extra>"))
    figure.add_hline(y=IDEAL_RMSE_SCALE, line_dash="dot", line_color="#54A24B",
                     annotation_text="ideal rounding ≈ 0.29", annotation_position="top left")
    figure.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), showlegend=False,
                         xaxis_title="layer (graph order)", yaxis_title="RMSE / scale")
    return figure


# --- keep the N most sensitive layers in float: a sweep ------------------------------------------


def repeat_with(workload: Workload, technique: TechniqueSpec) -> SweepSpec:
    """The workload's latest sweep with only `technique`: same model, dataset, training and
    measurement settings, so it reuses the prepared baseline and compares like for like."""
    if not workload.spec:
        raise QuantLabError("this workload has no stored sweep to repeat; run a sweep of it on the "
                            "Run page first (its settings are reused here)")
    return replace(SweepSpec.from_dict(workload.spec), techniques=(technique,))


def selective_spec(workload: Workload, keep_float: int) -> SweepSpec:
    """The workload's latest sweep with only int8-selective(keep_float=N)."""
    return repeat_with(workload, TechniqueSpec(SELECTIVE_TECHNIQUE, {"keep_float": int(keep_float)}))


class _BackgroundSweep:
    """What the Lab shows of a sweep it started: its quantlab.sweeps handle (`self.handle`)."""

    handle: Any

    @property
    def finished(self) -> bool:
        return bool(self.handle.finished)

    def summary(self) -> str:
        return self.handle.snapshot().summary()

    def rows(self) -> list[dict]:
        return list(self.handle.snapshot().rows)


@dataclass
class SelectiveSweep(_BackgroundSweep):
    """A running "keep N in float" sweep."""

    keep_float: int
    handle: Any


def start_selective_sweep(workload: Workload, keep_float: int, store: Store, cache: ArtifactCache,
                          options: Any = None) -> SelectiveSweep:
    """Run int8-selective(keep_float=N) as a sweep in the background; it lands in the store like any variant."""
    from . import sweeps

    label = f"{workload.manifest['model_name']}: keep {keep_float} layer(s) in float"
    handle = sweeps.start_sweep(selective_spec(workload, keep_float), store, cache, options, label=label)
    return SelectiveSweep(keep_float, handle=handle)


# --- the Lab's choices as a measured LiteRT Quantizer recipe --------------------------------------

RECIPE_TECHNIQUE = "lq-recipe"
RECIPE_ACTIVATION_BITS = (8, 16)


@dataclass(frozen=True)
class LabRecipe:
    """A recipe made from the Lab's choices: its canonical JSON, what it stands for, what was adapted."""

    text: str
    what: str
    notes: tuple[str, ...] = ()


def mixed_precision_recipe(request: FakeQuantRequest) -> LabRecipe:
    """The model view's per-layer bit widths (and activation bits) as a LiteRT Quantizer recipe:
    weight-only rules when only weights are fake-quantized (float compute, as the prediction), static
    rules with calibrated activations when activations are too."""
    from . import litert_quant

    if request.method != "linear":
        raise QuantLabError("the LiteRT Quantizer quantizes linearly: choose linear quantization to "
                            "measure these bit widths as a recipe (k-means has no TFLite kernel)")
    activation_bits = int(request.activation_bits) if request.activations else None
    if activation_bits is not None and activation_bits not in RECIPE_ACTIVATION_BITS:
        raise QuantLabError(f"the LiteRT Quantizer's static recipes take 8 or 16 activation bits, not "
                            f"{activation_bits}: choose 8 or 16 to measure this as a recipe")
    bits = dict(request.weight_bits)
    counts: dict[int, int] = {}
    for value in bits.values():
        counts[value] = counts.get(value, 0) + 1
    default = max((b for b in counts if b < 32), key=lambda b: (counts[b], -b), default=8)
    recipe, notes = litert_quant.mixed_precision_recipe(bits, default_bits=default,
                                                        activation_bits=activation_bits)
    widths = ", ".join(f"{layer} {'float' if b >= 32 else f'{b}-bit'}" for layer, b in sorted(bits.items()))
    what = f"weights {widths}" + (f"; activations {activation_bits}-bit" if activation_bits else "")
    return LabRecipe(litert_quant.canonical_recipe(recipe), what, tuple(notes))


def keep_float_recipe(sensitivity: Mapping[str, Any], keep_float: int) -> LabRecipe:
    """Static int8 (w8a8) everywhere but the N layers TFLite's debugger ranked most sensitive."""
    from . import litert_quant

    kept = list(sensitivity.get("ranking", []))[:int(keep_float)]
    recipe = litert_quant.keep_float_recipe(kept)
    names = ", ".join(short_layer_name(name) for name in kept) or "none"
    return LabRecipe(litert_quant.canonical_recipe(recipe),
                     f"static int8 with the {len(kept)} most sensitive layer(s) float ({names})")


def recipe_spec(workload: Workload, recipe: LabRecipe) -> SweepSpec:
    """The workload's latest sweep settings with only lq-recipe(recipe=...)."""
    from .techniques import resolve_spec

    return repeat_with(workload, resolve_spec(TechniqueSpec(RECIPE_TECHNIQUE, {"recipe": recipe.text})))


@dataclass
class RecipeSweep(_BackgroundSweep):
    """A running sweep of one Lab-made recipe."""

    recipe: LabRecipe
    handle: Any


def start_recipe_sweep(workload: Workload, recipe: LabRecipe, store: Store, cache: ArtifactCache,
                       options: Any = None) -> RecipeSweep:
    """Measure a Lab-made recipe as an lq-recipe variant, in the background, like any sweep."""
    from . import sweeps

    label = f"{workload.manifest['model_name']}: LiteRT recipe ({recipe.what})"
    handle = sweeps.start_sweep(recipe_spec(workload, recipe), store, cache, options, label=label)
    return RecipeSweep(recipe, handle=handle)


def recipe_rows(store: Store, manifest: Mapping[str, Any], recipe: LabRecipe) -> list[dict]:
    """The newest successful measured row of exactly this recipe on this workload, if any."""
    frame = store.query(
        "SELECT technique, params, accuracy, agreement, model_bytes, row_id, recorded_at FROM results "
        "WHERE model_hash = ? AND dataset_hash = ? AND technique = ? AND error IS NULL "
        "ORDER BY recorded_at DESC", [manifest["model_hash"], manifest["dataset_hash"], RECIPE_TECHNIQUE])
    for row in frame.to_dict("records"):
        try:
            if json.loads(row["params"] or "{}").get("recipe") == recipe.text:
                return [row]
        except (TypeError, ValueError):
            continue
    return []


# --- warming up -----------------------------------------------------------------------------------

_WARMED = threading.Event()


def warm_up() -> None:
    """Import what the first k-means row and chart need in a background thread, once per process
    (scikit-learn alone takes seconds to import on a busy machine)."""
    if _WARMED.is_set():
        return
    _WARMED.set()

    def load() -> None:
        try:
            import plotly.graph_objects  # noqa: F401
            import sklearn.cluster  # noqa: F401
            import threadpoolctl  # noqa: F401
        except ImportError:
            pass
    threading.Thread(target=load, name="quantlab-lab-warm-up", daemon=True).start()


# --- the Lab's worker process ---------------------------------------------------------------------

_WORKER_LOCK = threading.Lock()
_POOL: Any = None


def run_in_worker(payload: dict, on_event: Callable[[dict], None] | None = None) -> dict:
    """Run one Lab task (quantlab.sensitivity.run_task) in the Lab's worker process; one at a time.

    The worker is started on first use and kept (TensorFlow is imported once, not per click); the pool
    replaces it after PoolLimits.max_tasks_per_worker tasks to bound TensorFlow's leaks.
    """
    global _POOL
    from .pool import PoolLimits, WorkerPool
    from .sensitivity import run_task

    with _WORKER_LOCK:
        if _POOL is None:
            _POOL = WorkerPool(run_task, size=1, limits=PoolLimits(task_timeout_seconds=WORKER_TIMEOUT_SECONDS))
        _POOL.start()      # spawns only when no worker is alive; run() then finds one waiting
        outcome = None
        for outcome in _POOL.run([(payload["kind"], payload)],
                                 (lambda task, event: on_event(event)) if on_event else None):
            pass
    if outcome is None or not outcome.ok:
        error = outcome.error if outcome is not None else "no result"
        if outcome is not None and outcome.user_error:
            raise QuantLabError(error)
        raise QuantLabError(f"the Lab's worker failed ({payload['kind']}): {error}")
    return outcome.result


def close_worker() -> None:
    """Stop the Lab's worker process (it is started again when needed)."""
    global _POOL
    with _WORKER_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(close_worker)

