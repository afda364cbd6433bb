"""How uncertain a measured number is: intervals and paired tests, in plain numpy and math.

- `wilson_interval`: 95% Wilson score interval of a proportion (accuracy, agreement) from its count.
- `mcnemar_p`: exact two-sided McNemar test of two classifiers scored on the same samples (binomial
  test on the discordant pairs); 1.0 when they are never discordant.
- `bootstrap_median_interval`: seeded percentile-bootstrap 95% interval of the median of timings.
- `paired_difference_interval`: 95% interval of the difference of two paired proportions.
- `intervals_overlap` / `within_noise`: whether two measured values are told apart by their intervals.
- `latency_modes`: whether a latency distribution has two separate modes (a machine switching speeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 12
SIGNIFICANCE_LEVEL = 0.05


@dataclass(frozen=True)
class Interval:
    """A closed interval [low, high] around a measured value."""

    low: float
    high: float

    def to_list(self) -> list[float]:
        return [self.low, self.high]

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low


def wilson_interval(successes: int, trials: int, z: float = Z95) -> Interval:
    """The Wilson score interval of `successes` out of `trials` (95% by default).

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not zero-wide at 0/n or n/n.
    """
    if trials <= 0:
        raise ValueError(f"a proportion needs at least one trial, got {trials}; measure on a "
                         f"non-empty test split")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and {trials}, got {successes}")
    p, n, z2 = successes / trials, trials, z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(low, high)


def proportion_interval(share: float, trials: int) -> Interval:
    """wilson_interval of a measured share (e.g. accuracy 0.9556 on 450 samples -> 430 of 450)."""
    return wilson_interval(int(round(share * trials)), trials)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs.

    `only_first`: samples the first classifier gets right and the second wrong; `only_second` the
    reverse. Under "no difference" each discordant sample goes either way with probability 1/2, so
    p = P(a Binomial(b + c, 1/2) is at least as lopsided as observed), capped at 1. No discordant
    samples (identical right/wrong patterns) give 1.0.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError("discordant pair counts cannot be negative")
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def discordant_pairs(first_correct: Sequence[bool], second_correct: Sequence[bool]) -> tuple[int, int]:
    """(first right and second wrong, second right and first wrong) over the same samples."""
    a, b = np.asarray(first_correct, dtype=bool), np.asarray(second_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} and {b.size} per-sample results cannot be paired; score both "
                         f"variants on the same test split")
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def paired_mcnemar_p(first_correct: Sequence[bool], second_correct: Sequence[bool]) -> float:
    """mcnemar_p of two per-sample right/wrong vectors over the same samples."""
    return mcnemar_p(*discordant_pairs(first_correct, second_correct))


def paired_difference_interval(first_correct: Sequence[bool], second_correct: Sequence[bool],
                               z: float = Z95) -> Interval:
    """95% interval of mean(second) - mean(first) for paired right/wrong vectors (Wald, paired).

    Zero-wide when the two never disagree: then the difference is exactly 0 on these samples.
    """
    only_first, only_second = discordant_pairs(first_correct, second_correct)
    n = len(np.asarray(first_correct))
    if n == 0:
        raise ValueError("no samples to compare; score both variants on a non-empty test split")
    diff = (only_second - only_first) / n
    variance = max(0.0, (only_first + only_second) / n - diff * diff) / n
    half = z * math.sqrt(variance)
    return Interval(max(-1.0, diff - half), min(1.0, diff + half))


def bootstrap_median_interval(samples: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                              seed: int = BOOTSTRAP_SEED) -> Interval:
    """Percentile-bootstrap 95% interval of the median of `samples` (seeded: same input, same result)."""
    values = np.asarray(samples, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no timings to bootstrap; measure latency with at least one run")
    if values.size == 1:
        return Interval(float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    chunk = max(1, 2_000_000 // values.size)  # bound the memory of one batch of resamples
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        picks = rng.integers(0, values.size, size=(stop - start, values.size))
        medians[start:stop] = np.median(values[picks], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return Interval(float(low), float(high))


def intervals_overlap(first: Sequence[float] | Interval | None,
                      second: Sequence[float] | Interval | None) -> bool:
    """True when both intervals are known and share at least one point."""
    a, b = as_interval(first), as_interval(second)
    return a is not None and b is not None and a.overlaps(b)


def within_noise(first: Sequence[float] | Interval | None, second: Sequence[float] | Interval | None,
                 p_value: float | None = None) -> bool:
    """Whether a difference cannot be told from noise: a paired p-value (when given) of at least
    SIGNIFICANCE_LEVEL, otherwise overlapping 95% intervals. Unknown intervals are not noise."""
    if p_value is not None and not (isinstance(p_value, float) and math.isnan(p_value)):
        return p_value >= SIGNIFICANCE_LEVEL
    return intervals_overlap(first, second)


def as_interval(value: Sequence[float] | Interval | None) -> Interval | None:
    """An Interval from [low, high] (None, NaN or a wrong length give None)."""
    if value is None:
        return None
    if isinstance(value, Interval):
        return value
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if math.isnan(low) or math.isnan(high):
        return None
    return Interval(low, high)


# --- latency distribution shape -------------------------------------------------------------------

MODE_MIN_SHARE = 0.1       # each mode holds at least this share of the runs
MODE_SEPARATION = 2.0      # Ashman's D above which two modes are clearly apart
MODE_DIP = 0.5             # runs near the split, at most this share of those near the sparser mode


@dataclass(frozen=True)
class LatencyModes:
    """Two modes of a latency distribution when it has them (`bimodal`), with their centres."""

    bimodal: bool
    fast_ms: float | None = None
    slow_ms: float | None = None
    slow_share: float | None = None
    separation: float | None = None

    def describe(self) -> str:
        if not self.bimodal:
            return "one mode"
        return (f"bimodal: {1 - self.slow_share:.0%} of runs near {self.fast_ms:.3g} ms and "
                f"{self.slow_share:.0%} near {self.slow_ms:.3g} ms (the machine switched speeds or "
                f"another process competed); the p50 depends on the mix, so measure again on a "
                f"quiet machine")


def latency_modes(samples: Sequence[float]) -> LatencyModes:
    """Split the timings in two where that best separates them (Otsu) and call them bimodal when
    both parts hold at least MODE_MIN_SHARE of the runs, Ashman's D exceeds MODE_SEPARATION and the
    density dips between them (any one-mode distribution splits into two parts, but not at a dip)."""
    values = np.sort(np.asarray(samples, dtype=float))
    values = values[np.isfinite(values)]
    n = values.size
    if n < 20:
        return LatencyModes(False)
    cumulative = np.cumsum(values)
    sizes = np.arange(1, n)                        # the fast part is values[:k]
    fast_means = cumulative[:-1] / sizes
    slow_means = (cumulative[-1] - cumulative[:-1]) / (n - sizes)
    between = sizes * (n - sizes) * (fast_means - slow_means) ** 2
    lowest = max(1, int(math.ceil(MODE_MIN_SHARE * n)))
    allowed = (sizes >= lowest) & (n - sizes >= lowest)
    if not allowed.any():
        return LatencyModes(False)
    k = int(sizes[np.argmax(np.where(allowed, between, -1.0))])
    fast, slow = values[:k], values[k:]
    spread = math.sqrt(float(fast.var()) + float(slow.var()))
    separation = math.inf if spread == 0 else math.sqrt(2) * (slow.mean() - fast.mean()) / spread
    fast_centre, slow_centre = float(np.median(fast)), float(np.median(slow))
    window = (slow_centre - fast_centre) / 6

    def near(x: float) -> int:
        return int(np.sum(np.abs(values - x) <= window))

    split = (values[k - 1] + values[k]) / 2
    dips = window > 0 and near(split) <= MODE_DIP * min(near(fast_centre), near(slow_centre))
    bimodal = separation > MODE_SEPARATION and dips
    return LatencyModes(bool(bimodal), fast_centre, slow_centre,
                        float(slow.size / n), float(separation))
