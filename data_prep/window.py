"""Intensity windowing: map raw CT grey levels to [0, 1] before quantizing to 8- or 16-bit PNG.

The window comes from an exact histogram of sample voxels (a few evenly spaced pages): for 8/16-bit integer volumes a
full bincount, for floats the sorted unique sample values. Padding (a constant fill value at either end of the
histogram, written by reconstruction software outside the field of view) and non-finite floats are left out, so the
percentiles describe the material only. A window can also be fixed, or shared by several volumes so that resin in
"injected" keeps its mid grey instead of being stretched to black like air in "dry".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm_finetune.core.errors import UserError

# A value at an end of the histogram is padding when it holds at least this share of the samples and this many
# times more voxels than the next-most-common value nearby: real noisy CT data has no such isolated spike.
_PADDING_SHARE = 0.005
_PADDING_SPIKE = 10.0


@dataclass
class Histogram:
    """Exact histogram of sampled voxels: sorted distinct finite `values` and their `counts`."""

    values: np.ndarray
    counts: np.ndarray
    n_nonfinite: int = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @staticmethod
    def of(voxels: np.ndarray) -> "Histogram":
        voxels = voxels.ravel()
        if voxels.dtype.kind in "ui" and voxels.dtype.itemsize <= 2:
            # bincount over the whole integer range is exact and much faster than sorting.
            offset = int(np.iinfo(voxels.dtype).min)
            counts = np.bincount((voxels.astype(np.int64) - offset), minlength=1)
            values = np.nonzero(counts)[0]
            return Histogram(values + offset, counts[values])
        finite = np.isfinite(voxels) if voxels.dtype.kind == "f" else np.ones(voxels.shape, bool)
        values, counts = np.unique(voxels[finite], return_counts=True)
        return Histogram(values.astype(np.float64), counts, int(voxels.size - finite.sum()))

    @staticmethod
    def pooled(histograms: list["Histogram"]) -> "Histogram":
        values = np.concatenate([h.values for h in histograms])
        counts = np.concatenate([h.counts for h in histograms])
        unique, inverse = np.unique(values, return_inverse=True)
        return Histogram(unique, np.bincount(inverse, weights=counts).astype(np.int64),
                         sum(h.n_nonfinite for h in histograms))

    def without_padding(self) -> tuple["Histogram", list[float]]:
        """Drop isolated spikes at either end (constant padding); return the rest and the values dropped."""
        keep = np.ones(len(self.values), bool)
        dropped = []
        for end, neighbours in ((0, slice(1, 6)), (-1, slice(-6, -1))):
            if len(self.values) < 3:
                break
            spike = self.counts[end]
            nearby = self.counts[neighbours].max()
            if spike >= _PADDING_SHARE * self.total and spike >= _PADDING_SPIKE * nearby:
                keep[end] = False
                dropped.append(float(self.values[end]))
        return Histogram(self.values[keep], self.counts[keep], self.n_nonfinite), dropped

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100) of the sampled voxels, by the inverted CDF (an actual voxel value)."""
        cdf = np.cumsum(self.counts)
        rank = q / 100.0 * (cdf[-1] - 1)
        return float(self.values[np.searchsorted(cdf, rank, side="right")])


def sample_pages(depth: int, n_pages: int) -> list[int]:
    """Evenly spaced page indices (at most n_pages, always including the first and last page)."""
    if depth <= n_pages:
        return list(range(depth))
    return sorted(set(np.linspace(0, depth - 1, n_pages).round().astype(int).tolist()))


def sample_histogram(volume, n_pages: int = 16) -> Histogram:
    """Exact histogram of every voxel of `n_pages` evenly spaced pages of `volume`."""
    parts = [Histogram.of(volume.read(z, z + 1)) for z in sample_pages(volume.shape[0], n_pages)]
    return Histogram.pooled(parts)


def percentile_window(hist: Histogram, low: float, high: float, where: str) -> tuple[float, float]:
    """(lo, hi) grey levels at the given percentiles, padding excluded; constant or empty data is a UserError."""
    if hist.total == 0:
        raise UserError(f"{where}: no finite voxel values (all NaN/inf) in the sampled pages")
    material, _ = hist.without_padding()
    if material.total == 0 or len(material.values) < 2:
        material = hist
    lo, hi = material.percentile(low), material.percentile(high)
    if not hi > lo:
        if len(hist.values) == 1:
            raise UserError(f"{where}: volume is constant (every sampled voxel = {hist.values[0]:g}); "
                            "nothing to window")
        lo, hi = float(material.values[0]), float(material.values[-1])
    return lo, hi


def to_unit(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Raw grey levels -> float32 in [0, 1] through the window; NaN maps to 0 (as air), +inf to 1, -inf to 0."""
    lo, hi = window
    x = np.nan_to_num(image.astype(np.float32, copy=False), nan=lo, posinf=hi, neginf=lo)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0, dtype=np.float32)
