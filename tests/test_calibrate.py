"""Specification of quantlab.calibrate: linear and k-means quantization of one tensor, and its error."""

import math

import numpy as np
import pytest

from quantlab.calibrate import (
    CALIBRATORS,
    QuantConfig,
    compare_calibrators,
    compute_kl_divergences,
    compute_scale_zero_point,
    error_figures,
    fake_quantize,
    find_threshold,
    integer_range,
    quantize_kmeans,
    weight_bytes,
)
from quantlab.errors import QuantLabError


@pytest.fixture
def heavy_tailed() -> np.ndarray:
    """10,000 seeded Student-t (3 degrees of freedom) values: a few values far out in the tails."""
    return np.random.default_rng(0).standard_t(df=3, size=10_000)


# Integer grid ---------------------------------------------------------------------------------


def test_integer_ranges_are_narrow_signed_for_symmetric_and_full_signed_for_asymmetric():
    assert integer_range(8, symmetric=True) == (-127, 127)
    assert integer_range(8, symmetric=False) == (-128, 127)
    assert integer_range(2, symmetric=True) == (-1, 1)
    assert integer_range(16, symmetric=True) == (-32767, 32767)


def test_symmetric_int8_of_a_known_vector():
    x = np.array([-2.54, -1.0, 0.0, 0.333, 2.54])  # max |x| = 2.54, so the scale is 2.54 / 127 = 0.02

    result = fake_quantize(x, QuantConfig(bits=8, symmetric=True))

    assert result.scales[0] == pytest.approx(0.02)
    assert result.zero_points[0] == 0
    np.testing.assert_allclose(result.values, [-2.54, -1.0, 0.0, 0.34, 2.54])  # 0.333 / 0.02 = 16.65 -> 17


def test_asymmetric_zero_point_of_an_all_positive_vector_is_the_lowest_code():
    x = np.array([0.5, 1.0, 2.55])  # the range widens to [0, 2.55] so that zero stays representable

    result = fake_quantize(x, QuantConfig(bits=8, symmetric=False))

    assert result.scales[0] == pytest.approx(2.55 / 255)
    assert result.zero_points[0] == -128
    assert result.levels[0] == 0.0
    np.testing.assert_allclose(result.values, x)


def test_asymmetric_zero_point_of_a_mixed_range():
    scale, zero_point = compute_scale_zero_point(-1.0, 3.0, bits=8, symmetric=False)

    assert scale == pytest.approx(4.0 / 255)
    assert zero_point == -64  # round(-128 + 1 / scale) = round(-64.25)


def test_a_tensor_of_zeros_quantizes_to_zeros():
    result = fake_quantize(np.zeros((2, 3)), QuantConfig(bits=4, per_channel=True))

    np.testing.assert_array_equal(result.values, np.zeros((2, 3)))
    assert result.errors.mse == 0.0


# Per-channel ----------------------------------------------------------------------------------


def test_per_channel_scales_follow_each_channel_of_the_last_axis():
    kernel = np.array([[1.0, -2.0, 4.0], [0.5, 1.0, -3.0]])  # channels (columns) reach 1, 2 and 4

    result = fake_quantize(kernel, QuantConfig(bits=8, per_channel=True))

    np.testing.assert_allclose(result.scales, [1 / 127, 2 / 127, 4 / 127])
    assert result.values.shape == kernel.shape


def test_per_channel_on_axis_zero_uses_rows():
    kernel = np.array([[1.0, -2.0, 4.0], [0.5, 1.0, -3.0]])

    result = fake_quantize(kernel, QuantConfig(bits=8, per_channel=True, axis=0))

    np.testing.assert_allclose(result.scales, [4 / 127, 3 / 127])


def test_per_tensor_uses_one_scale_for_all_channels():
    kernel = np.array([[1.0, -2.0, 4.0], [0.5, 1.0, -3.0]])

    result = fake_quantize(kernel, QuantConfig(bits=8, per_channel=False))

    np.testing.assert_allclose(result.scales, [4 / 127])


def test_per_channel_axis_out_of_range_raises():
    with pytest.raises(QuantLabError, match="out of range"):
        fake_quantize(np.ones((2, 3)), QuantConfig(per_channel=True, axis=2))


# Calibrators ----------------------------------------------------------------------------------


def test_percentile_100_equals_max(heavy_tailed):
    assert find_threshold(heavy_tailed, "percentile", percentile=100) == find_threshold(heavy_tailed, "max")
    assert find_threshold(heavy_tailed, "percentile", percentile=100, symmetric=False) == find_threshold(
        heavy_tailed, "max", symmetric=False
    )


def test_asymmetric_max_range_includes_zero():
    assert find_threshold([1.0, 2.0, 3.0], "max", symmetric=False) == (0.0, 3.0)


@pytest.mark.parametrize("calibrator", ["kl", "mse"])
@pytest.mark.parametrize("bits", [4, 8])
def test_kl_and_mse_clip_below_max_on_heavy_tails(heavy_tailed, calibrator, bits):
    full = find_threshold(heavy_tailed, "max")

    threshold = find_threshold(heavy_tailed, calibrator, bits=bits)

    assert 0 < threshold < full


def test_mse_calibrator_beats_max_on_heavy_tails(heavy_tailed):
    by_max = fake_quantize(heavy_tailed, QuantConfig(bits=4, calibrator="max")).errors
    by_mse = fake_quantize(heavy_tailed, QuantConfig(bits=4, calibrator="mse")).errors

    assert by_mse.mse < by_max.mse / 2
    assert by_mse.sqnr_db > by_max.sqnr_db


@pytest.mark.parametrize("calibrator", ["max", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_falls_with_every_added_bit_from_2_to_8(heavy_tailed, calibrator, symmetric):
    errors = [
        fake_quantize(heavy_tailed, QuantConfig(bits=bits, calibrator=calibrator, symmetric=symmetric)).errors.mse
        for bits in range(2, 9)
    ]

    assert all(fewer > more for fewer, more in zip(errors, errors[1:])), errors


def test_kl_error_falls_from_2_to_4_to_8_bits(heavy_tailed):
    # KL minimises a histogram divergence, not the MSE: on 10,000 values its MSE is not strictly
    # monotone bit by bit, but it falls over wider steps.
    errors = [fake_quantize(heavy_tailed, QuantConfig(bits=bits, calibrator="kl")).errors.mse for bits in (2, 4, 8)]

    assert errors[0] > errors[1] > errors[2], errors


def test_kl_divergences_match_a_direct_tensorrt_loop():
    hist = np.random.default_rng(1).integers(0, 5, size=64).astype(float)
    hist[40:50] = 0  # an empty stretch, and outliers beyond it
    quantized_bins = 8

    stops, divergence = compute_kl_divergences(hist, quantized_bins)

    expected = []
    for stop in range(quantized_bins, hist.size + 1):
        reference = hist[:stop].copy()
        reference[-1] += hist[stop:].sum()
        width = stop // quantized_bins
        quantized = np.zeros(stop)
        for group in range(quantized_bins):
            start, end = group * width, (stop if group == quantized_bins - 1 else (group + 1) * width)
            nonzero = reference[start:end] > 0
            if hist[start:end].sum() > 0:
                quantized[start:end][nonzero] = hist[start:end].sum() / nonzero.sum()
        quantized[(reference > 0) & (quantized == 0)] = 1e-4
        p, q = reference / reference.sum(), quantized / hist[:stop].sum()
        kept = p > 0
        expected.append(np.sum(p[kept] * np.log(p[kept] / q[kept])))
    np.testing.assert_array_equal(stops, np.arange(quantized_bins, hist.size + 1))
    np.testing.assert_allclose(divergence, expected, rtol=1e-9, atol=1e-12)


def test_kl_at_16_bits_keeps_the_full_range(heavy_tailed):
    # 2^15 quantized bins exceed the 2048-bin histogram: nothing to search.
    assert find_threshold(heavy_tailed, "kl", bits=16) == find_threshold(heavy_tailed, "max")


def test_16_bits_is_near_lossless():
    x = np.random.default_rng(2).normal(size=5_000)

    result = fake_quantize(x, QuantConfig(bits=16))

    assert result.errors.sqnr_db > 85
    assert np.max(np.abs(result.values - x)) <= result.scales[0] / 2 + 1e-12


# Clipping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_max_calibrator_clips_nothing(heavy_tailed, symmetric):
    result = fake_quantize(heavy_tailed, QuantConfig(calibrator="max", symmetric=symmetric))

    assert result.errors.clipped_share == 0.0


def test_percentile_below_100_clips_the_values_beyond_it():
    x = np.arange(1.0, 101.0)  # the 90th percentile of 1..100 is 90.1: 91..100 are clipped

    result = fake_quantize(x, QuantConfig(calibrator="percentile", percentile=90))

    assert result.high[0] == pytest.approx(90.1)
    assert result.errors.clipped_share == pytest.approx(0.10)
    assert result.values.max() == pytest.approx(90.1)


# k-means --------------------------------------------------------------------------------------


def test_kmeans_with_as_many_centroids_as_distinct_values_is_exact():
    x = np.array([0.1, -0.7, 0.1, 2.3, -0.7, 5.0, 5.0])  # 4 distinct values, 2 bits -> 4 centroids

    result = quantize_kmeans(x, bits=2)

    np.testing.assert_array_equal(result.values, x)
    np.testing.assert_array_equal(result.levels, [-0.7, 0.1, 2.3, 5.0])
    assert result.errors.mse == 0.0
    assert math.isinf(result.errors.sqnr_db)


def test_kmeans_with_fewer_distinct_values_than_centroids_is_exact():
    x = np.array([[1.0, 2.0], [2.0, 3.0]])

    result = quantize_kmeans(x, bits=4)

    np.testing.assert_array_equal(result.values, x)


def test_kmeans_maps_every_value_to_one_of_2_to_the_bits_centroids(heavy_tailed):
    result = quantize_kmeans(heavy_tailed, bits=3)
    again = quantize_kmeans(heavy_tailed, bits=3)

    assert len(result.levels) == 8
    assert set(np.unique(result.values)) <= set(result.levels)
    np.testing.assert_array_equal(result.levels, again.levels)  # seeded: the same every time
    assert result.scales is None


def test_kmeans_beats_linear_max_at_the_same_bits(heavy_tailed):
    kmeans = fake_quantize(heavy_tailed, QuantConfig(bits=3, method="kmeans")).errors
    linear = fake_quantize(heavy_tailed, QuantConfig(bits=3, calibrator="max")).errors

    assert kmeans.mse < linear.mse


# Error figures --------------------------------------------------------------------------------


def test_error_figures_by_hand():
    figures = error_figures([1.0, -1.0], [1.0, -0.5], [False, True])

    assert figures.mse == pytest.approx(0.125)  # (0 + 0.25) / 2
    assert figures.sqnr_db == pytest.approx(10 * math.log10(2 / 0.25))
    assert figures.clipped_share == 0.5


def test_error_figures_reject_mismatched_shapes():
    with pytest.raises(QuantLabError, match="shape"):
        error_figures([1.0, 2.0], [1.0], None)


# Comparison and sizes -------------------------------------------------------------------------


def test_compare_calibrators_gives_one_row_per_calibrator_then_kmeans(heavy_tailed):
    rows = compare_calibrators(heavy_tailed, bits=4, symmetric=True, per_channel=False, percentile=99.9)

    assert [row.calibrator for row in rows] == [*CALIBRATORS, "kmeans"]
    by_name = {row.calibrator: row for row in rows}
    assert by_name["max"].clipped_share == 0.0
    assert by_name["mse"].mse < by_name["max"].mse
    assert set(rows[0].to_dict()) >= {"calibrator", "mse", "sqnr_db", "clipped_share", "seconds"}


def test_compare_calibrators_at_16_bits_has_no_kmeans_row(heavy_tailed):
    rows = compare_calibrators(heavy_tailed, bits=16)

    assert [row.calibrator for row in rows] == list(CALIBRATORS)


def test_weight_bytes_rounds_each_layer_up_to_whole_bytes():
    counts = {"conv": 3, "dense": 10}

    assert weight_bytes(counts, {"conv": 4, "dense": 8}) == 2 + 10  # 1.5 bytes -> 2
    assert weight_bytes(counts, {"conv": 32, "dense": 2}) == 12 + 3  # 2.5 bytes -> 3


def test_weight_bytes_needs_a_bit_width_for_every_layer():
    with pytest.raises(QuantLabError, match="without a bit width"):
        weight_bytes({"conv": 3, "dense": 10}, {"conv": 8})


# Validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 1},
        {"bits": 9},
        {"bits": 32},
        {"bits": True},
        {"calibrator": "minmax"},
        {"method": "pq"},
        {"percentile": 40},
        {"percentile": 100.5},
        {"axis": 1.5},
        {"method": "kmeans", "per_channel": True},
        {"method": "kmeans", "bits": 16},
    ],
)
def test_bad_config_raises(settings):
    with pytest.raises(QuantLabError):
        QuantConfig(**settings)


def test_bad_tensors_raise():
    with pytest.raises(QuantLabError, match="NaN"):
        fake_quantize([1.0, float("nan")])
    with pytest.raises(QuantLabError, match="empty"):
        fake_quantize([])


def test_config_round_trips_through_a_dict():
    config = QuantConfig(bits=4, symmetric=False, per_channel=True, calibrator="kl")

    assert QuantConfig.from_dict(config.to_dict()) == config
