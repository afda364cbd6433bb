"""Quantize one tensor in numpy and measure the error: the engine behind the Lab page.

Linear quantization maps a real value x to an integer code q = clip(round(x / scale) + zero_point)
and back to (q - zero_point) * scale. A calibrator picks the clipping range [low, high]:

- ``max``: the full range of the data (never clips).
- ``percentile``: the given percentile of |x| (symmetric) or of each tail (asymmetric).
- ``kl``: TensorRT's entropy calibration: a 2048-bin histogram of |x|, and the threshold whose
  clipped-and-requantized histogram has the smallest KL divergence from the clipped reference one.
  Asymmetric ranges are the data's range clipped to [-t, t]. From 12 bits up there are more levels
  than bins, so it keeps the full range. It minimises a divergence, not the MSE: on small tensors
  (a sparse histogram) its MSE need not fall with every added bit.
- ``mse``: the threshold, among ``MSE_CANDIDATES`` evenly spaced fractions of the full range, that
  gives the smallest mean squared quantization error.

Integer codes follow TensorFlow Lite's signed convention:

- symmetric n-bit: [-(2^(n-1) - 1), 2^(n-1) - 1] with zero point 0 (narrow range, as TFLite weights);
- asymmetric n-bit: [-2^(n-1), 2^(n-1) - 1] with a zero point in that range (as TFLite int8
  activations). The unsigned equivalent is code + 2^(n-1). The range is widened to include 0 so that
  zero is exactly representable.

k-means quantization (``method="kmeans"``, per-tensor, up to 8 bits) replaces the 2^n evenly
spaced levels by 2^n centroids.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np

from quantlab.errors import QuantLabError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
KMEANS_MAX_BITS = 8
CALIBRATORS = ("max", "percentile", "kl", "mse")
METHODS = ("linear", "kmeans")
KL_BINS = 2048
KL_EMPTY_Q = 1e-4  # stands in for a quantized count of 0 where the reference is not 0
MSE_CANDIDATES = 128
KMEANS_SEED = 0
KMEANS_N_INIT = 1
KMEANS_MAX_SAMPLES = 20_000
WEIGHT_BITS = SUPPORTED_BITS + (32,)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one tensor; ``calibrator``, ``symmetric`` and ``percentile`` apply to linear only."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = -1
    calibrator: str = "max"
    percentile: float = 99.99
    method: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        object.__setattr__(self, "percentile", check_percentile(self.percentile))
        if self.method not in METHODS:
            raise QuantLabError(f"Unknown quantization method {self.method!r}; use one of {', '.join(METHODS)}.")
        if self.calibrator not in CALIBRATORS:
            raise QuantLabError(f"Unknown calibrator {self.calibrator!r}; use one of {', '.join(CALIBRATORS)}.")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise QuantLabError(f"Axis must be an integer, got {self.axis!r}; use -1 for the last axis.")
        if self.method == "kmeans" and self.per_channel:
            raise QuantLabError("k-means quantization is per-tensor only; set per_channel=False.")
        if self.method == "kmeans" and self.bits > KMEANS_MAX_BITS:
            raise QuantLabError(
                f"k-means quantization supports up to {KMEANS_MAX_BITS} bits, got {self.bits}; "
                "use method='linear' for 16 bits."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        names = ("bits", "symmetric", "per_channel", "axis", "calibrator", "percentile", "method")
        return cls(**{k: data[k] for k in names if k in data})


@dataclass(frozen=True)
class ErrorFigures:
    """Mean squared error, signal-to-quantization-noise ratio (dB) and the share of values clipped."""

    mse: float
    sqnr_db: float
    clipped_share: float


@dataclass(frozen=True, eq=False)
class QuantResult:
    """A fake-quantized tensor and how it was quantized.

    ``low``/``high``/``scales``/``zero_points`` hold one entry per channel (one for per-tensor);
    ``scales`` and ``zero_points`` are None for k-means. ``levels`` are the representable values
    (of the first channel when per-channel), for drawing on a histogram.
    """

    values: np.ndarray
    levels: np.ndarray
    low: np.ndarray
    high: np.ndarray
    scales: np.ndarray | None
    zero_points: np.ndarray | None
    errors: ErrorFigures
    config: QuantConfig


@dataclass(frozen=True)
class CalibratorRow:
    """One row of the Lab page's calibrator comparison. Its range, like its error figures, is the
    whole tensor's: per channel, from the lowest channel's low to the highest channel's high (not
    the first channel's, which made a per-tensor k-means range look wider than the max
    calibrator's)."""

    method: str
    calibrator: str
    per_channel: bool
    low: float
    high: float
    mse: float
    sqnr_db: float
    clipped_share: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Validation


def check_bits(bits: Any) -> int:
    """Return ``bits`` if it is a supported bit width, else raise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise QuantLabError(f"Unsupported bit width {bits!r}; choose one of {', '.join(map(str, SUPPORTED_BITS))}.")
    return int(bits)


def check_percentile(percentile: Any) -> float:
    """Return ``percentile`` as a float if it lies in [50, 100], else raise."""
    try:
        value = float(percentile)
    except (TypeError, ValueError):
        value = math.nan
    if not 50.0 <= value <= 100.0:
        raise QuantLabError(f"Percentile must be between 50 and 100 (e.g. 99.99), got {percentile!r}.")
    return value


def check_tensor(x: Any) -> np.ndarray:
    """Return ``x`` as a float64 array, raising if it is empty, non-numeric or not finite."""
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise QuantLabError(f"Cannot read the tensor as numbers ({exc}); pass a numeric array.") from None
    if array.size == 0:
        raise QuantLabError("The tensor is empty; pass a tensor with at least one value.")
    if not np.all(np.isfinite(array)):
        raise QuantLabError("The tensor contains NaN or infinite values; remove them before quantizing.")
    return array


# ---------------------------------------------------------------------------------------------
# Integer grid


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes (qmin, qmax): narrow signed range if symmetric, full signed range if not."""
    bits = check_bits(bits)
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def compute_scale_zero_point(low: Any, high: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """Scale and zero point for the range [low, high]; floats for scalar input, arrays for arrays.

    Symmetric uses max(|low|, |high|) and zero point 0. Asymmetric widens the range to include 0.
    A zero-width range gets scale 1.0 (every value then quantizes to 0).
    """
    qmin, qmax = integer_range(bits, symmetric)
    low_arr, high_arr = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if symmetric:
        span = np.maximum(np.abs(low_arr), np.abs(high_arr))
        scale = np.where(span > 0, span / qmax, 1.0)
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        low_arr, high_arr = np.minimum(low_arr, 0.0), np.maximum(high_arr, 0.0)
        span = high_arr - low_arr
        scale = np.where(span > 0, span / (qmax - qmin), 1.0)
        zero_point = np.clip(np.round(qmin - low_arr / scale), qmin, qmax).astype(np.int64)
    if scale.ndim == 0:
        return float(scale), int(zero_point)
    return scale, zero_point


# ---------------------------------------------------------------------------------------------
# Calibrators (each works on rows: one row per channel, or a single row for per-tensor)


def find_threshold(
    values: Any,
    calibrator: str,
    *,
    bits: int = 8,
    symmetric: bool = True,
    percentile: float = 99.99,
) -> float | tuple[float, float]:
    """Clipping threshold for the whole tensor: t (range [-t, t]) if symmetric, else (low, high)."""
    if calibrator not in CALIBRATORS:
        raise QuantLabError(f"Unknown calibrator {calibrator!r}; use one of {', '.join(CALIBRATORS)}.")
    rows = check_tensor(values).reshape(1, -1)
    low, high = find_ranges(rows, calibrator, bits=check_bits(bits), symmetric=symmetric,
                            percentile=check_percentile(percentile))
    if symmetric:
        return float(high[0])
    return float(low[0]), float(high[0])


def find_ranges(
    rows: np.ndarray, calibrator: str, *, bits: int, symmetric: bool, percentile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row clipping range (low, high); symmetric ranges are (-t, t), asymmetric ones include 0."""
    if calibrator == "max":
        return full_ranges(rows, symmetric)
    if calibrator == "percentile":
        return percentile_ranges(rows, percentile, symmetric)
    if calibrator == "kl":
        return kl_ranges(rows, bits, symmetric)
    return mse_ranges(rows, bits, symmetric)


def full_ranges(rows: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """The data's own range per row."""
    if symmetric:
        t = np.abs(rows).max(axis=1)
        return -t, t
    return np.minimum(rows.min(axis=1), 0.0), np.maximum(rows.max(axis=1), 0.0)


def percentile_ranges(rows: np.ndarray, percentile: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Percentile of |x| (symmetric) or the (100 - p, p) percentiles of x (asymmetric) per row."""
    if symmetric:
        t = np.percentile(np.abs(rows), percentile, axis=1)
        return -t, t
    low, high = np.percentile(rows, [100.0 - percentile, percentile], axis=1)
    return np.minimum(low, 0.0), np.maximum(high, 0.0)


def kl_ranges(rows: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """KL-entropy threshold t on |x| per row; asymmetric ranges are the full range clipped to [-t, t].

    The number of quantized bins is 2^(n-1) (one sign's worth of levels), or 2^n for asymmetric
    quantization of one-signed data, where all levels land on one side of zero.
    """
    low, high = full_ranges(rows, symmetric)
    magnitudes = np.abs(rows)
    t_max = magnitudes.max(axis=1)
    one_signed = (rows.min(axis=1) >= 0) | (rows.max(axis=1) <= 0)
    thresholds = np.empty(len(rows))
    for index, (row, top) in enumerate(zip(magnitudes, t_max)):
        quantized_bins = 2 ** bits if (not symmetric and one_signed[index]) else 2 ** (bits - 1)
        thresholds[index] = search_kl_threshold(histogram_row(row, top), top, quantized_bins)
    return np.maximum(low, -thresholds), np.minimum(high, thresholds)


def histogram_row(magnitudes: np.ndarray, top: float, bins: int = KL_BINS) -> np.ndarray:
    """Counts of ``magnitudes`` in ``bins`` equal bins over [0, top]."""
    if top <= 0:
        counts = np.zeros(bins)
        counts[0] = magnitudes.size
        return counts
    index = np.minimum((magnitudes * (bins / top)).astype(np.int64), bins - 1)
    return np.bincount(index, minlength=bins).astype(np.float64)


def search_kl_threshold(hist: np.ndarray, top: float, quantized_bins: int) -> float:
    """The threshold i * bin width whose candidate i has the smallest KL divergence (ties: narrower,
    as TensorRT: tied candidates differ only by empty bins, so they clip the same values)."""
    if top <= 0 or quantized_bins >= hist.size:
        return float(top)
    stops, divergence = compute_kl_divergences(hist, quantized_bins)
    if not np.isfinite(divergence).any():
        return float(top)
    return float(stops[np.argmin(divergence)] * top / hist.size)


def compute_kl_divergences(hist: np.ndarray, quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(reference || quantized) for every candidate i = quantized_bins..len(hist), as TensorRT:
    the reference is the first i bins with the outliers folded into bin i-1; the quantized version
    merges those i bins into ``quantized_bins`` groups of i // quantized_bins bins (the last group
    takes the rest) and spreads each group's count evenly over its non-empty bins.

    Vectorised with cumulative sums: candidates with the same group width share every group but the
    last, so each width's shared part is computed once.
    """
    bins, total = hist.size, hist.sum()
    cum = np.concatenate(([0.0], np.cumsum(hist)))
    cum_nonzero = np.concatenate(([0.0], np.cumsum(hist > 0)))
    cum_h_log_h = np.concatenate(([0.0], np.cumsum(hist * np.log(np.where(hist > 0, hist, 1.0)))))

    widths = np.arange(1, bins // quantized_bins + 1)
    starts = widths[:, None] * np.arange(quantized_bins - 1)[None, :]
    shared_sum = cum[starts + widths[:, None]] - cum[starts]
    shared_nonzero = cum_nonzero[starts + widths[:, None]] - cum_nonzero[starts]
    shared_p_log_q = x_log_ratio(shared_sum, shared_nonzero).sum(axis=1)

    stops = np.arange(quantized_bins, bins + 1)
    width_index = stops // quantized_bins - 1
    last_start = (quantized_bins - 1) * widths[width_index]
    outliers = total - cum[stops]
    last_bin = hist[stops - 1]
    last_sum = cum[stops] - cum[last_start]
    last_nonzero = cum_nonzero[stops] - cum_nonzero[last_start] + ((last_bin == 0) & (outliers > 0))
    last_q = np.where(last_sum > 0, last_sum / np.maximum(last_nonzero, 1.0), KL_EMPTY_Q)
    p_log_q = shared_p_log_q[width_index] + x_log_ratio(last_sum, last_nonzero) + outliers * np.log(last_q)

    last_p = last_bin + outliers
    p_log_p = cum_h_log_h[stops - 1] + last_p * np.log(np.where(last_p > 0, last_p, 1.0))
    kept = cum[stops]
    with np.errstate(divide="ignore"):
        divergence = (p_log_p - p_log_q) / total - np.log(total) + np.log(kept)
    return stops, np.where(np.isfinite(divergence), divergence, np.inf)


def x_log_ratio(counts: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """counts * log(counts / nonzero), 0 where counts is 0."""
    positive = counts > 0
    ratio = np.where(positive, counts, 1.0) / np.maximum(nonzero, 1.0)
    return np.where(positive, counts * np.log(ratio), 0.0)


def mse_ranges(rows: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the fraction k / MSE_CANDIDATES (k = 1..MSE_CANDIDATES) of the full range with the
    smallest quantization MSE; asymmetric ranges shrink both ends by the same fraction.
    The search runs in float32 for speed; the chosen range is then applied in float64.
    """
    full_low, full_high = full_ranges(rows, symmetric)
    qmin, qmax = integer_range(bits, symmetric)
    data = rows.astype(np.float32)
    work = np.empty_like(data)
    best_error = np.full(len(rows), np.inf)
    best_fraction = np.ones(len(rows))
    for fraction in np.arange(1, MSE_CANDIDATES + 1) / MSE_CANDIDATES:
        low, high = full_low * fraction, full_high * fraction
        scale, zero_point = compute_scale_zero_point(low, high, bits, symmetric)
        np.clip(data, low[:, None].astype(np.float32), high[:, None].astype(np.float32), out=work)
        work *= (1.0 / scale)[:, None].astype(np.float32)
        np.rint(work, out=work)
        if not symmetric:                       # symmetric codes already lie in [qmin, qmax]
            np.clip(work, (qmin - zero_point)[:, None], (qmax - zero_point)[:, None], out=work)
        work *= scale[:, None].astype(np.float32)
        work -= data
        np.square(work, out=work)
        error = work.sum(axis=1, dtype=np.float64)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_fraction = np.where(better, fraction, best_fraction)
    return full_low * best_fraction, full_high * best_fraction


# ---------------------------------------------------------------------------------------------
# Quantizing


def quantize_rows(rows: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Fake-quantize each row with its own range: clip to [low, high], round to the grid, dequantize."""
    qmin, qmax = integer_range(bits, symmetric)
    scale, zero_point = compute_scale_zero_point(np.atleast_1d(low), np.atleast_1d(high), bits, symmetric)
    clipped = np.clip(rows, low[:, None], high[:, None])
    codes = np.clip(np.round(clipped / scale[:, None]) + zero_point[:, None], qmin, qmax)
    return (codes - zero_point[:, None]) * scale[:, None]


def fake_quantize(x: Any, config: QuantConfig = QuantConfig()) -> QuantResult:
    """Quantize and dequantize ``x`` as ``config`` says; the result keeps x's shape."""
    if config.method == "kmeans":
        return quantize_kmeans(x, config.bits)
    array = check_tensor(x)
    rows, restore = split_channels(array, config)
    low, high = find_ranges(rows, config.calibrator, bits=config.bits, symmetric=config.symmetric,
                            percentile=config.percentile)
    scale, zero_point = compute_scale_zero_point(low, high, config.bits, config.symmetric)
    dequantized = restore(quantize_rows(rows, low, high, config.bits, config.symmetric))
    clipped = restore((rows < low[:, None]) | (rows > high[:, None]))
    qmin, qmax = integer_range(config.bits, config.symmetric)
    levels = (np.arange(qmin, qmax + 1) - zero_point[0]) * scale[0]
    return QuantResult(
        values=dequantized,
        levels=levels,
        low=low,
        high=high,
        scales=scale,
        zero_points=zero_point,
        errors=error_figures(array, dequantized, clipped),
        config=config,
    )


def split_channels(
    array: np.ndarray, config: QuantConfig
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Rows to quantize (one per channel, or one in all) and a function that restores the shape."""
    if not config.per_channel:
        return array.reshape(1, -1), lambda rows: rows.reshape(array.shape)
    if array.ndim == 0:
        raise QuantLabError("Per-channel quantization needs a tensor with at least one axis; set per_channel=False.")
    if not -array.ndim <= config.axis < array.ndim:
        raise QuantLabError(
            f"Axis {config.axis} is out of range for a tensor of shape {array.shape}; "
            f"choose an axis between {-array.ndim} and {array.ndim - 1}."
        )
    moved = np.moveaxis(array, config.axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    return rows, lambda out: np.moveaxis(out.reshape(moved.shape), 0, config.axis)


def quantize_kmeans(x: Any, bits: int) -> QuantResult:
    """Replace every value by the nearest of 2^bits k-means centroids (exact when there are no
    more distinct values than centroids)."""
    config = QuantConfig(bits=bits, method="kmeans")
    array = check_tensor(x)
    flat = array.reshape(-1)
    centroids = fit_centroids(flat, 2 ** config.bits)
    edges = (centroids[1:] + centroids[:-1]) / 2
    dequantized = centroids[np.searchsorted(edges, flat)].reshape(array.shape)
    no_clipping = np.zeros(array.shape, dtype=bool)
    return QuantResult(
        values=dequantized,
        levels=centroids,
        low=np.array([centroids[0]]),
        high=np.array([centroids[-1]]),
        scales=None,
        zero_points=None,
        errors=error_figures(array, dequantized, no_clipping),
        config=config,
    )


def fit_centroids(flat: np.ndarray, clusters: int) -> np.ndarray:
    """Sorted 1-D k-means centroids; the distinct values themselves when there are few enough.

    Fits on at most KMEANS_MAX_SAMPLES evenly spaced order statistics (deterministic, and keeps the
    extremes), with one k-means++ start seeded by KMEANS_SEED, on one OpenMP thread (many threads
    slowed small fits by 10-50x on a busy 2-core machine).
    """
    distinct = np.unique(flat)
    if distinct.size <= clusters:
        return distinct
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    ordered = np.sort(flat)
    ranks = np.linspace(0, ordered.size - 1, min(ordered.size, KMEANS_MAX_SAMPLES)).round().astype(np.int64)
    sample = ordered[ranks]
    model = KMeans(n_clusters=clusters, n_init=KMEANS_N_INIT, random_state=KMEANS_SEED)
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(sample.reshape(-1, 1))
    return np.unique(model.cluster_centers_.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Error figures and comparisons


def error_figures(original: Any, quantized: Any, clipped_mask: Any = None) -> ErrorFigures:
    """MSE, SQNR in dB (inf when exact) and the share of values clipped (0 without a mask)."""
    original = np.asarray(original, dtype=np.float64)
    quantized = np.asarray(quantized, dtype=np.float64)
    if original.shape != quantized.shape:
        raise QuantLabError(
            f"Original shape {original.shape} differs from quantized shape {quantized.shape}; pass matching tensors."
        )
    noise = float(np.sum((original - quantized) ** 2))
    signal = float(np.sum(original ** 2))
    if noise == 0:
        sqnr_db = math.inf
    elif signal == 0:
        sqnr_db = -math.inf
    else:
        sqnr_db = 10.0 * math.log10(signal / noise)
    clipped_share = 0.0 if clipped_mask is None else float(np.mean(np.asarray(clipped_mask, dtype=bool)))
    return ErrorFigures(mse=noise / max(original.size, 1), sqnr_db=sqnr_db, clipped_share=clipped_share)


def compare_calibrators(
    x: Any,
    bits: int = 8,
    symmetric: bool = True,
    per_channel: bool = False,
    percentile: float = 99.99,
    axis: int = -1,
) -> list[CalibratorRow]:
    """One row per calibrator, then a per-tensor k-means row when bits <= KMEANS_MAX_BITS."""
    array = check_tensor(x)
    configs = [
        QuantConfig(bits=bits, symmetric=symmetric, per_channel=per_channel, axis=axis,
                    calibrator=name, percentile=percentile)
        for name in CALIBRATORS
    ]
    if bits <= KMEANS_MAX_BITS:
        configs.append(QuantConfig(bits=bits, method="kmeans"))
    return [summarize_run(array, config) for config in configs]


def summarize_run(array: np.ndarray, config: QuantConfig) -> CalibratorRow:
    """Quantize once with ``config`` and report it as a comparison row, with the time it took."""
    started = time.perf_counter()
    result = fake_quantize(array, config)
    seconds = time.perf_counter() - started
    return CalibratorRow(
        method=config.method,
        calibrator="kmeans" if config.method == "kmeans" else config.calibrator,
        per_channel=config.per_channel,
        low=float(np.min(result.low)),
        high=float(np.max(result.high)),
        mse=result.errors.mse,
        sqnr_db=result.errors.sqnr_db,
        clipped_share=result.errors.clipped_share,
        seconds=seconds,
    )


def weight_bytes(param_counts: Mapping[str, int], bits_per_layer: Mapping[str, int]) -> int:
    """Bytes of weights under mixed precision: ceil(params * bits / 8) per layer, summed."""
    missing = sorted(set(param_counts) - set(bits_per_layer))
    unknown = sorted(set(bits_per_layer) - set(param_counts))
    if missing or unknown:
        raise QuantLabError(
            f"Layers without a bit width: {missing}; unknown layers: {unknown}; give one bit width per layer."
        )
    total = 0
    for layer, count in param_counts.items():
        bits = bits_per_layer[layer]
        if isinstance(bits, bool) or bits not in WEIGHT_BITS:
            raise QuantLabError(
                f"Layer {layer!r} has bit width {bits!r}; choose one of {', '.join(map(str, WEIGHT_BITS))}."
            )
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise QuantLabError(f"Layer {layer!r} has parameter count {count!r}; pass a non-negative integer.")
        total += -(-int(count) * int(bits) // 8)
    return total
