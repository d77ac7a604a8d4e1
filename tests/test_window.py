"""Windowing: exact percentiles, padding left out, shared and fixed windows, NaN handling, no 8-bit cast."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.window import Histogram, percentile_window, sample_pages, to_unit
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import quantize


def test_histogram_percentiles_are_exact():
    rng = np.random.default_rng(0)
    v = rng.integers(1000, 60000, size=50_000).astype(np.uint16)
    h = Histogram.of(v)
    for q in (0.5, 50, 99.5):
        assert h.percentile(q) == np.percentile(v, q, method="inverted_cdf")
    f = rng.normal(size=10_001).astype(np.float32)
    assert Histogram.of(f).percentile(10) == pytest.approx(float(np.percentile(f, 10, method="inverted_cdf")))


def test_padding_spike_excluded():
    rng = np.random.default_rng(1)
    material = rng.normal(30000, 3000, size=40_000).clip(1, 65535).astype(np.uint16)
    padded = np.concatenate([material, np.zeros(20_000, np.uint16)])  # a third of the volume is zero padding
    lo, hi = percentile_window(Histogram.of(padded), 0.5, 99.5, "v")
    assert lo == pytest.approx(np.percentile(material, 0.5), rel=0.01)
    assert hi == pytest.approx(np.percentile(material, 99.5), rel=0.01)


def test_shared_window_pools_volumes():
    a, b = Histogram.of(np.full(100, 10, np.uint16)), Histogram.of(np.arange(100, 200, dtype=np.uint16))
    pooled = Histogram.pooled([a, b])
    assert pooled.total == 200 and pooled.values[0] == 10 and pooled.values[-1] == 199


def test_nan_and_inf():
    h = Histogram.of(np.array([np.nan, np.inf, 1.0, 2.0, 3.0], np.float32))
    assert h.total == 3 and h.n_nonfinite == 2
    unit = to_unit(np.array([np.nan, np.inf, -np.inf, 2.0], np.float32), (1.0, 3.0))
    np.testing.assert_allclose(unit, [0.0, 1.0, 0.0, 0.5])
    with pytest.raises(UserError, match="no finite voxel"):
        percentile_window(Histogram.of(np.full(10, np.nan, np.float32)), 1, 99, "v.tif")


def test_constant_volume_rejected():
    with pytest.raises(UserError, match="constant"):
        percentile_window(Histogram.of(np.full(100, 7, np.uint16)), 1, 99, "v.tif")


def test_sixteen_bit_path_keeps_all_levels():
    ramp = np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64)
    q16 = quantize(to_unit(ramp * 50000 + 1000, (1000, 51000)), 16)
    assert q16.dtype == np.uint16 and len(np.unique(q16)) == 4096  # an 8-bit detour would leave <= 256
    assert len(np.unique(quantize(ramp, 8))) == 256


def test_sample_pages():
    assert sample_pages(5, 16) == [0, 1, 2, 3, 4]
    pages = sample_pages(1000, 16)
    assert len(pages) == 16 and pages[0] == 0 and pages[-1] == 999
