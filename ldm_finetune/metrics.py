"""Weight-free image-set metrics for grey CT slices: no pretrained network is needed for any of them.

Every function takes sets of grey images as float arrays (N, H, W) in [0, 1] (see `load_set`). Distances compare a
generated set against a real one; each is reported next to the real-vs-real floor (train vs validation) and a
bootstrap interval by evaluate.py.

- grey-level histogram Wasserstein-1;
- radially averaged power spectrum (log) distance;
- multi-phase segmentation (multi-level Otsu on the real set), phase fractions, and two-point correlation S2(r)
  along each image axis (Torquato 2002: the microstructure descriptor of materials science);
- GLCM texture features (Haralick et al. 1973);
- multi-scale sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018);
- per-image descriptor vectors, precision / recall / density / coverage on them (Naeem et al. 2020), and a
  nine-class descriptor classifier;
- SSIM / PSNR, colourfulness (Hasler & Suesstrunk 2003) for prompt-drift probes;
- nearest-neighbour memorisation by L2 and by shift-tolerant normalised cross-correlation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GREY_BINS = 256


# --- grey levels ---------------------------------------------------------------------------------------------------

def grey_histogram(images: np.ndarray, bins: int = GREY_BINS) -> np.ndarray:
    """Normalised histogram of all pixels of a set."""
    h = np.bincount(np.clip((images * bins).astype(np.int64), 0, bins - 1).ravel(), minlength=bins)
    return h / h.sum()


def grey_w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 between the sets' grey-level distributions (in grey units, 0-1): integral of |CDF_a - CDF_b|."""
    return float(np.abs(np.cumsum(grey_histogram(a)) - np.cumsum(grey_histogram(b))).sum() / GREY_BINS)


# --- power spectrum ------------------------------------------------------------------------------------------------

def radial_spectrum(images: np.ndarray, bins: int = 32) -> np.ndarray:
    """(N, bins) log10 radially averaged power spectra (mean removed, Hann window against edge leakage)."""
    n, h, w = images.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    x = (images - images.mean(axis=(1, 2), keepdims=True)) * window
    power = np.abs(np.fft.rfft2(x)) ** 2  # (N, h, w//2 + 1)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    index = np.minimum((radius / 0.5 * bins).astype(int), bins)  # radius 0.5 = Nyquist; corners dropped
    counts = np.bincount(index.ravel(), minlength=bins + 1)[:bins]
    out = np.stack([np.bincount(index.ravel(), weights=p.ravel(), minlength=bins + 1)[:bins] for p in power])
    return np.log10(out / np.maximum(counts, 1) + 1e-12)


def spectrum_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the sets' mean log spectra (decades of power)."""
    return float(np.abs(radial_spectrum(a).mean(0) - radial_spectrum(b).mean(0)).mean())


# --- phases --------------------------------------------------------------------------------------------------------

def multi_otsu(images: np.ndarray, classes: int = 3, bins: int = 128) -> np.ndarray:
    """Thresholds splitting the grey levels into `classes` phases with the largest between-class variance."""
    hist = grey_histogram(images, bins)
    centers = (np.arange(bins) + 0.5) / bins
    p, m = np.cumsum(hist), np.cumsum(hist * centers)

    def between(lo, hi):  # weight x mean^2 of bins [lo, hi)
        w = p[hi - 1] - (p[lo - 1] if lo else 0.0)
        s = m[hi - 1] - (m[lo - 1] if lo else 0.0)
        return s * s / w if w > 0 else 0.0

    if classes == 2:
        best = max(range(1, bins), key=lambda t: between(0, t) + between(t, bins))
        return np.array([best / bins])
    assert classes == 3, "2 or 3 phases"
    best, score = (1, 2), -1.0
    for t1 in range(1, bins - 1):
        first = between(0, t1)
        for t2 in range(t1 + 1, bins):
            s = first + between(t1, t2) + between(t2, bins)
            if s > score:
                best, score = (t1, t2), s
    return np.array(best) / bins


def segment(images: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Phase labels 0 (darkest: air / voids) .. len(thresholds) (brightest: yarns)."""
    return np.digitize(images, thresholds).astype(np.uint8)


def phase_fractions(labels: np.ndarray, phases: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=phases)[:phases] / labels.size


def two_point(labels: np.ndarray, phase: int, axis: int, max_lag: int) -> np.ndarray:
    """S2(r), r = 0..max_lag: probability that two pixels r apart along `axis` (1 = rows of the image / y,
    2 = columns / x) both lie in `phase`; S2(0) is the phase fraction. Periodic autocorrelation by FFT."""
    mask = (labels == phase).astype(np.float32)
    n = mask.shape[axis]
    f = np.fft.rfft(mask, axis=axis)
    corr = np.fft.irfft(f * np.conj(f), n=n, axis=axis)
    corr = np.moveaxis(corr, axis, -1)
    return corr.reshape(-1, n).mean(0)[:max_lag + 1] / n


# --- texture -------------------------------------------------------------------------------------------------------

def glcm_features(images: np.ndarray, levels: int = 32) -> np.ndarray:
    """(N, 8): contrast, homogeneity, energy, correlation of the grey-level co-occurrence matrix at distance 1,
    horizontally then vertically."""
    q = np.clip((images * levels).astype(np.int64), 0, levels - 1)
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    out = np.empty((len(images), 8))
    for k, img in enumerate(q):
        feats = []
        for a, b in ((img[:, :-1], img[:, 1:]), (img[:-1, :], img[1:, :])):
            m = np.bincount((a * levels + b).ravel(), minlength=levels * levels).reshape(levels, levels)
            m = (m + m.T) / (2.0 * m.sum())  # symmetric, normalised
            mu = (i * m).sum()
            var = ((i - mu) ** 2 * m).sum()
            feats += [((i - j) ** 2 * m).sum(), (m / (1.0 + np.abs(i - j))).sum(), (m**2).sum(),
                      (((i - mu) * (j - mu) * m).sum() / var) if var > 0 else 1.0]
        out[k] = feats
    return out


# --- sliced Wasserstein on Laplacian pyramids (Karras et al. 2018) --------------------------------------------------

def laplacian_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
    """Finest first; each level is the detail lost by one blur-and-halve; the last is the coarse residual."""
    out, current = [], images.astype(np.float32)
    for _ in range(levels - 1):
        blurred = ndimage.gaussian_filter(current, sigma=(0, 1, 1), mode="reflect")
        small = blurred[:, ::2, ::2]
        up = ndimage.zoom(small, (1, 2, 2), order=1)[:, :current.shape[1], :current.shape[2]]
        out.append(current - up)
        current = small
    out.append(current)
    return out


def _patches(level: np.ndarray, per_image: int, size: int, rng: np.random.Generator) -> np.ndarray:
    n, h, w = level.shape
    ys = rng.integers(0, h - size + 1, (n, per_image))
    xs = rng.integers(0, w - size + 1, (n, per_image))
    offsets = np.arange(size)
    rows = ys[..., None, None] + offsets[None, None, :, None]
    cols = xs[..., None, None] + offsets[None, None, None, :]
    return level[np.arange(n)[:, None, None, None], rows, cols].reshape(-1, size * size)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int, rng: np.random.Generator) -> float:
    """Mean over random unit directions of the 1D Wasserstein-1 between the projected point sets (equal sizes)."""
    d = rng.standard_normal((a.shape[1], projections)).astype(np.float32)
    d /= np.linalg.norm(d, axis=0, keepdims=True)
    pa, pb = np.sort(a @ d, axis=0), np.sort(b @ d, axis=0)
    return float(np.abs(pa - pb).mean())


def pyramid_swd(a: np.ndarray, b: np.ndarray, patch: int = 7, per_image: int = 64, projections: int = 128,
                repeats: int = 4, seed: int = 0) -> list[float]:
    """SWD per pyramid level (finest first) between normalised 7x7 patch sets; levels down to >= 16 px."""
    levels = max(1, int(np.log2(min(a.shape[1:]) / 16)) + 1)
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    result = []
    for la, lb in zip(laplacian_pyramid(a[:n], levels), laplacian_pyramid(b[:n], levels)):
        pa, pb = _patches(la, per_image, patch, rng), _patches(lb, per_image, patch, rng)
        # normalise each patch (Karras et al.): mean and std over the whole set's patches, per position
        both = np.concatenate([pa, pb])
        mean, std = both.mean(0), both.std(0) + 1e-8
        pa, pb = (pa - mean) / std, (pb - mean) / std
        result.append(float(np.mean([sliced_wasserstein(pa, pb, projections, rng) for _ in range(repeats)])))
    return result


# --- descriptors, PRDC, classifier --------------------------------------------------------------------------------

def descriptors(images: np.ndarray, thresholds: np.ndarray, lags=(1, 2, 4, 8)) -> np.ndarray:
    """(N, D) per-image microstructure vector: grey histogram (16 bins), log spectrum (16 bins), phase fractions,
    two-point correlation of the brightest phase along both axes at a few lags, GLCM features."""
    hist = np.stack([np.bincount(np.clip((im * 16).astype(int), 0, 15).ravel(), minlength=16) / im.size
                     for im in images])
    spec = radial_spectrum(images, 16)
    labels = segment(images, thresholds)
    phases = len(thresholds) + 1
    fractions = np.stack([phase_fractions(lab, phases) for lab in labels])
    s2 = []
    for lab in labels:
        row = []
        for axis in (0, 1):
            curve = two_point(lab[None], phases - 1, axis + 1, max(lags))
            row += [curve[lag] for lag in lags]
        s2.append(row)
    return np.concatenate([hist, spec, fractions, np.array(s2), glcm_features(images)], axis=1)


class Standardizer:
    """Feature scaling fitted on the real set only (so generated sets are measured in the real set's units)."""

    def __init__(self, reference: np.ndarray):
        self.mean, self.std = reference.mean(0), reference.std(0) + 1e-8

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of fake vs real feature vectors."""
    def dist(x, y):
        return np.sqrt(np.maximum((x**2).sum(1)[:, None] + (y**2).sum(1)[None] - 2 * x @ y.T, 0))

    k = min(k, len(real) - 1, len(fake) - 1)
    rr, ff, rf = dist(real, real), dist(fake, fake), dist(real, fake)
    r_radius = np.sort(rr, axis=1)[:, k]  # k-th neighbour (index 0 is the point itself)
    f_radius = np.sort(ff, axis=1)[:, k]
    inside = rf < r_radius[:, None]  # (real, fake): fake inside the real point's ball
    return {"precision": float(inside.any(0).mean()),
            "recall": float((rf < f_radius[None, :]).any(1).mean()),
            "density": float(inside.sum(0).mean() / k),
            "coverage": float((rf.min(1) < r_radius).mean())}


class DescriptorClassifier:
    """Ridge-regularised linear classifier (one-hot least squares) on standardised descriptors: deterministic,
    no training loop, and weight-free (it learns from the real training slices only)."""

    def __init__(self, features: np.ndarray, labels: list[str], ridge: float = 1.0):
        self.classes = sorted(set(labels))
        self.scale = Standardizer(features)
        x = np.c_[self.scale(features), np.ones(len(features))]
        y = np.eye(len(self.classes))[[self.classes.index(c) for c in labels]]
        self.w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)

    def predict(self, features: np.ndarray) -> list[str]:
        scores = np.c_[self.scale(features), np.ones(len(features))] @ self.w
        return [self.classes[i] for i in scores.argmax(1)]


def confusion(truth: list[str], predicted: list[str], classes: list[str]) -> list[list[int]]:
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(truth, predicted):
        m[classes.index(t), classes.index(p)] += 1
    return m.tolist()


# --- paired probe metrics ------------------------------------------------------------------------------------------

def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two grey images in [0, 1], Gaussian window."""
    c1, c2 = 0.01**2, 0.03**2
    blur = lambda x: ndimage.gaussian_filter(x.astype(np.float64), sigma)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an (H, W, 3) image in [0, 1] (grey CT texture scores ~0)."""
    r, g, b = (rgb[..., c].astype(np.float64) * 255 for c in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


# --- memorisation --------------------------------------------------------------------------------------------------

SEARCH_SIZE = 64  # nearest-neighbour search resolution


def resize_set(images: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) by linear interpolation (nearest-neighbour search runs at a small common size)."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images
    return ndimage.zoom(images, (1, size / h, size / w), order=1)


def pairwise_msd(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """(Q, B) mean squared difference between every query and bank item (flattened), by one matrix product."""
    q, b = queries.reshape(len(queries), -1).astype(np.float64), bank.reshape(len(bank), -1).astype(np.float64)
    return np.maximum((q**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * q @ b.T, 0) / q.shape[1]


def nearest_l2(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, RMS distance) of each query's nearest bank image."""
    d2 = pairwise_msd(queries, bank)
    index = d2.argmin(1)
    return index, np.sqrt(d2[np.arange(len(queries)), index])


def max_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Shift-tolerant normalised cross-correlation: the best circular-shift correlation of two images (FFT)."""
    a = (a - a.mean()) / (a.std() + 1e-8)
    b = (b - b.mean()) / (b.std() + 1e-8)
    corr = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape)
    return float(corr.max() / a.size)


def load_set(paths, size: int | None = None) -> np.ndarray:
    """Grey float32 (N, H, W) in [0, 1] from image files (8/16-bit grey or RGB, converted to luminance)."""
    from ldm_finetune.data import load_image

    images = []
    for p in paths:
        im = load_image(p)
        if im.ndim == 3:
            im = im @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        images.append(im)
    shapes = {im.shape for im in images}
    if len(shapes) > 1 and size is None:
        raise ValueError(f"images of several sizes {sorted(shapes)[:3]}")
    if size is not None:
        images = [im if im.shape == (size, size) else ndimage.zoom(im, (size / im.shape[0], size / im.shape[1]),
                                                                   order=1) for im in images]
    return np.stack(images).astype(np.float32)
