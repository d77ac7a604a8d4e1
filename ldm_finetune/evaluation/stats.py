"""Per-image statistics of an image set, computed once in one vectorised pass; every set distance of the
registry (registry.py) is a function of their means, so bootstrap intervals cost almost nothing."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ldm_finetune.evaluation import metrics as M

S2_LAGS = 16  # two-point correlation lags, in pixels


@dataclass
class Stats:
    """Per-image statistics of one set (rows align with the set's images)."""
    hist: np.ndarray  # (N, 256)
    spectrum: np.ndarray  # (N, 32) log10 power
    fractions: np.ndarray  # (N, P)
    s2: np.ndarray  # (N, 2 axes, P, lags + 1)
    glcm: np.ndarray  # (N, 8)

    def take(self, index) -> "Stats":
        return Stats(*(getattr(self, f)[index] for f in ("hist", "spectrum", "fractions", "s2", "glcm")))

    def descriptors(self) -> np.ndarray:
        """(N, D) per-image vector for PRDC and the classifier."""
        coarse_hist = self.hist.reshape(len(self.hist), 16, -1).sum(2)
        spec = self.spectrum[:, ::2]
        s2 = self.s2[:, :, :, [1, 2, 4, 8]].reshape(len(self.s2), -1)
        return np.concatenate([coarse_hist, spec, self.fractions, s2, self.glcm], axis=1)


def compute_stats(images: np.ndarray, thresholds: np.ndarray, chunk: int = 32) -> Stats:
    """All per-image statistics of a set in one vectorised pass (chunks bound the memory)."""
    phases = len(thresholds) + 1
    hist = np.empty((len(images), M.GREY_BINS))
    fractions = np.empty((len(images), phases))
    lags = min(S2_LAGS, images.shape[-1] // 2)  # a periodic autocorrelation repeats past half the side
    s2 = np.empty((len(images), 2, phases, lags + 1))
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk]
        c = len(x)
        offset = (np.arange(c) * M.GREY_BINS)[:, None, None]
        codes = offset + np.clip((x * M.GREY_BINS).astype(np.int64), 0, M.GREY_BINS - 1)
        h = np.bincount(codes.ravel(), minlength=c * M.GREY_BINS).reshape(c, M.GREY_BINS)
        hist[start:start + c] = h / h.sum(1, keepdims=True)
        labels = M.segment(x, thresholds)
        f = np.bincount((labels + (np.arange(c) * phases)[:, None, None]).ravel(), minlength=c * phases)
        fractions[start:start + c] = f.reshape(c, phases) / labels[0].size
        for a, axis in enumerate((1, 2)):
            for p in range(phases):
                if p in (0, phases - 1):  # darkest (voids) and brightest (yarns); the middle phase is implied
                    s2[start:start + c, a, p] = M.two_point_per_image(labels, p, axis, lags)
                else:
                    s2[start:start + c, a, p] = 0.0
    return Stats(hist, M.radial_spectrum(images), fractions, s2, M.glcm_features(images))


def parallel_stats(images: np.ndarray, thresholds, chunk: int = 16) -> Stats:
    """compute_stats over chunks in two threads: the FFTs, bincounts and array arithmetic release the GIL, and
    threads share the images (forking a process that holds gigabytes of slices costs more than it saves)."""

    starts = range(0, len(images), chunk)
    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda s: compute_stats(images[s:s + chunk], thresholds), starts))
    return Stats(*(np.concatenate([getattr(r, f) for r in results])
                   for f in ("hist", "spectrum", "fractions", "s2", "glcm")))


