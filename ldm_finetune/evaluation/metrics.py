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
- precision / recall / density / coverage on per-image descriptor vectors (Naeem et al. 2020; the vectors are
  built in evaluate.Stats), and a nine-class descriptor classifier;
- SSIM / PSNR, colourfulness (Hasler & Suesstrunk 2003) for prompt-drift probes;
- nearest-neighbour memorisation by L2 and by shift-tolerant normalised cross-correlation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import fft, ndimage, sparse

from ldm_finetune.core.io import read_pixels

GREY_BINS = 256


FFT_WORKERS = 1  # evaluate.py already runs two threads of statistics; nested FFT threads only add contention


def grey_histogram(images: np.ndarray, bins: int = GREY_BINS) -> np.ndarray:
    """Normalised histogram of all pixels of a set."""
    h = np.bincount(np.clip((images * bins).astype(np.int64), 0, bins - 1).ravel(), minlength=bins)
    return h / h.sum()


def _radial_bins(h: int, w: int, bins: int):
    """Sparse (h * (w//2+1), bins) averaging matrix over rings of the rfft2 plane (radius 0.5 = Nyquist)."""

    radius = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2).ravel()
    index = (radius / 0.5 * bins).astype(int)
    keep = index < bins  # corners beyond Nyquist are dropped
    counts = np.bincount(index[keep], minlength=bins).astype(np.float64)
    rows = np.flatnonzero(keep)
    return sparse.csr_matrix((1.0 / counts[index[keep]], (rows, index[keep])), shape=(len(radius), bins))


def radial_spectrum(images: np.ndarray, bins: int = 32, chunk: int = 32) -> np.ndarray:
    """(N, bins) log10 radially averaged power spectra (mean removed, Hann window against edge leakage)."""

    n, h, w = images.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    rings = _radial_bins(h, w, bins)
    out = np.empty((n, bins))
    for start in range(0, n, chunk):
        x = images[start:start + chunk]
        x = (x - x.mean(axis=(1, 2), keepdims=True)) * window
        power = np.abs(fft.rfft2(x, workers=FFT_WORKERS)) ** 2
        out[start:start + chunk] = np.asarray(rings.T @ power.reshape(len(x), -1).T).T
    return np.log10(out + 1e-12)


def multi_otsu(images: np.ndarray, classes: int = 3, bins: int = 128) -> np.ndarray:
    """Thresholds splitting the grey levels into `classes` phases with the largest between-class variance."""
    step = max(1, int(np.sqrt(images[0].size / 65536)))  # ~64k pixels per image are plenty for a histogram
    hist = grey_histogram(images[:, ::step, ::step], bins)
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
    labels = np.zeros(images.shape, dtype=np.uint8)
    for t in thresholds:  # sorted thresholds: count how many each pixel reaches (much faster than np.digitize)
        labels += images >= t
    return labels


def two_point_per_image(labels: np.ndarray, phase: int, axis: int, max_lag: int) -> np.ndarray:
    """(N, max_lag + 1) S2 curves, one per image: periodic autocorrelation of the phase mask by FFT."""

    mask = (labels == phase).astype(np.float32)
    n = mask.shape[axis]
    f = fft.rfft(mask, axis=axis, workers=FFT_WORKERS)
    corr = fft.irfft(f * np.conj(f), n=n, axis=axis, workers=FFT_WORKERS)
    corr = np.moveaxis(corr, axis, -1)  # (N, other, n)
    return corr.mean(1)[:, :max_lag + 1] / n


def glcm_features(images: np.ndarray, levels: int = 32) -> np.ndarray:
    """(N, 8): contrast, homogeneity, energy, correlation of the symmetric, normalised grey-level co-occurrence
    matrix P at distance 1, horizontally then vertically, as scikit-image's graycoprops defines them: contrast
    sum P (i-j)^2, homogeneity sum P / (1 + (i-j)^2), energy sqrt(sum P^2), correlation (Haralick)."""
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    weights = np.stack([(i - j) ** 2, 1.0 / (1.0 + (i - j) ** 2)]).reshape(2, -1)
    out = np.empty((len(images), 8))
    for k, img in enumerate(images):
        q = np.clip((img * levels).astype(np.int32), 0, levels - 1)
        feats = []
        for a, b in ((q[:, :-1], q[:, 1:]), (q[:-1, :], q[1:, :])):
            m = np.bincount((a * levels + b).ravel(), minlength=levels * levels).reshape(levels, levels)
            m = (m + m.T) / (2.0 * m.sum())  # symmetric, normalised
            mu = (i * m).sum()
            var = ((i - mu) ** 2 * m).sum()
            contrast, homogeneity = weights @ m.ravel()
            energy = np.sqrt((m**2).sum())
            feats += [contrast, homogeneity, energy, ((i - mu) * (j - mu) * m).sum() / var if var > 0 else 1.0]
        out[k] = feats
    return out


_BINOMIAL = np.array([1, 4, 6, 4, 1], dtype=np.float32) / 16  # the 5-tap filter of Burt & Adelson / Karras et al.


def _down(x: np.ndarray) -> np.ndarray:
    """Binomial blur then keep every other row and column (rows filtered first, on half the work)."""
    x = ndimage.convolve1d(x, _BINOMIAL, axis=1, mode="reflect")[:, ::2]
    return ndimage.convolve1d(x, _BINOMIAL, axis=2, mode="reflect")[:, :, ::2]


def _up_axis(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Double `axis` with the polyphase form of 2 x binomial interpolation: even samples (a + 6b + c) / 8, odd
    samples (b + c) / 2 (edges reflected) -- the same as blurring a zero-inserted signal, at a quarter of the cost."""
    x = np.moveaxis(x, axis, -1)
    padded = np.concatenate([x[..., :1], x, x[..., -1:]], axis=-1)
    prev, cur, nxt = padded[..., :-2], padded[..., 1:-1], padded[..., 2:]
    out = np.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    out[..., 0::2] = (prev + 6 * cur + nxt) / 8
    out[..., 1::2] = (cur + nxt) / 2
    return np.moveaxis(out[..., :length], -1, axis)


def laplacian_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
    """Finest first; each level is the detail lost by one blur-and-halve; the last is the coarse residual."""
    out, current = [], images.astype(np.float32)
    for _ in range(levels - 1):
        small = _down(current)
        up = _up_axis(_up_axis(small, 1, current.shape[1]), 2, current.shape[2])
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


def pyramid_levels(images: np.ndarray) -> int:
    return max(1, int(np.log2(min(images.shape[1:]) / 16)) + 1)


def pyramid_swd(a: np.ndarray, b: np.ndarray, patch: int = 7, per_image: int = 64, projections: int = 128,
                repeats: int = 4, seed: int = 0, max_images: int = 32, pyramid_a: list | None = None,
                pyramid_b: list | None = None) -> list[float]:
    """SWD per pyramid level (finest first) between normalised 7x7 patch sets; levels down to >= 16 px.
    `pyramid_a` / `pyramid_b`: the pyramid of a's / b's images, made once when a set is compared several times."""
    levels = pyramid_levels(a)
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b), max_images)
    if pyramid_a is None or len(pyramid_a[0]) < n:
        pyramid_a = laplacian_pyramid(a[:n], levels)
    if pyramid_b is None or len(pyramid_b[0]) < n:
        pyramid_b = laplacian_pyramid(b[:n], levels)
    result = []
    for la, lb in zip((level[:n] for level in pyramid_a), (level[:n] for level in pyramid_b)):
        pa, pb = _patches(la, per_image, patch, rng), _patches(lb, per_image, patch, rng)
        # normalise each patch (Karras et al.): mean and std over the whole set's patches, per position
        both = np.concatenate([pa, pb])
        mean, std = both.mean(0), both.std(0) + 1e-8
        pa, pb = (pa - mean) / std, (pb - mean) / std
        result.append(float(np.mean([sliced_wasserstein(pa, pb, projections, rng) for _ in range(repeats)])))
    return result


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


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two grey images in [0, 1]: Gaussian window (sigma 1.5, cut at 3.5 sigma, so
    11 x 11), population covariances, mean over the pixels whose window lies inside the image - the settings of the
    paper's reference code, and the value scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1) returns (tests/test_metrics.py pins one pair)."""
    c1, c2 = 0.01**2, 0.03**2
    blur = lambda x: ndimage.gaussian_filter(x.astype(np.float64), sigma, truncate=3.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    r = int(3.5 * sigma + 0.5)  # the window's radius: border pixels see the reflected padding, not the image
    return float(s[r:-r, r:-r].mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an (H, W, 3) image in [0, 1] (grey CT texture scores ~0)."""
    r, g, b = (rgb[..., c].astype(np.float64) * 255 for c in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


SEARCH_SIZE = 64  # nearest-neighbour search resolution


def seam_score(image: np.ndarray, rows: list[int], columns: list[int], grid: int = 1) -> float:
    """Mean absolute grey step across the given joins, each step in units of the mean step in its own direction
    elsewhere on lines of the same phase modulo `grid` (1.0: no seam). `rows` / `columns` are pixel indices where a
    tile begins: the step across join j is between pixels j - 1 and j. Index 0 is the wrap edge, the step from the
    last pixel back to the first (a periodic image has none there).
    Directions are kept apart because CT slices are anisotropic (a warp or weft slice's layers make its vertical steps
    2-3.6x its horizontal ones), so pooling them would score a line of rows above 1.0 with no seam at all. `grid` is
    a latent model's VAE factor: its decoder draws each latent pixel as a grid x grid block, so the steps between
    blocks differ from those inside them with no tile anywhere; joins lie between blocks and are compared with the
    other lines between blocks."""
    grey = image.mean(-1) if image.ndim == 3 else image
    normalised = []
    for axis, joins in ((0, rows), (1, columns)):
        steps = np.moveaxis(np.abs(np.roll(grey, -1, axis=axis) - grey), axis, 0)  # steps[i]: pixels i, i + 1 (mod n)
        n = steps.shape[0]
        at = np.zeros(n, bool)
        at[[(j - 1) % n for j in joins]] = True
        inside = np.arange(n) < n - 1  # the wrap edge counts only when asked for as a join: it is not inside
        for phase in {(j - 1) % n % grid for j in joins}:
            here = np.arange(n) % grid == phase
            away = steps[here & inside & ~at].mean()
            normalised.append(steps[here & at].ravel() / away)
    return float(np.concatenate(normalised).mean()) if normalised else float("nan")


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    # BOX when shrinking: each output pixel averages its block (no aliasing); bilinear when enlarging
    method = Image.BOX if size < min(image.shape) else Image.BILINEAR
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), method))


def resize_set(images: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) (nearest-neighbour search runs at a small common size)."""
    if images.shape[1:] == (size, size):
        return images
    if not len(images):  # e.g. a real folder with no validation split
        return np.zeros((0, size, size), images.dtype)
    return np.stack([_resize(im, size) for im in images])


def pairwise_msd(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """(Q, B) mean squared difference between every query and bank item (flattened), by one matrix product."""
    q, b = queries.reshape(len(queries), -1).astype(np.float64), bank.reshape(len(bank), -1).astype(np.float64)
    return np.maximum((q**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * q @ b.T, 0) / q.shape[1]


def normalised_fft(images: np.ndarray) -> np.ndarray:
    """rfft2 of each image after zero-mean / unit-variance normalisation (for batched NCC)."""
    x = (images - images.mean((-2, -1), keepdims=True)) / (images.std((-2, -1), keepdims=True) + 1e-8)
    return np.fft.rfft2(x)


def max_ncc_batch(query_fft: np.ndarray, bank_fft: np.ndarray, shape) -> np.ndarray:
    """Best circular-shift NCC of one query (its normalised_fft) against several bank images."""
    corr = np.fft.irfft2(query_fft[None] * np.conj(bank_fft), s=shape)
    return corr.reshape(len(bank_fft), -1).max(1) / (shape[0] * shape[1])


def _grey(pixels: np.ndarray, full_scale: float) -> np.ndarray:
    image = pixels.astype(np.float32) / np.float32(full_scale)
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if image.ndim == 3 else image


def load_set(paths, size: int | None = None) -> np.ndarray:
    """Grey float32 (N, H, W) in [0, 1] from image files (8/16-bit grey or RGB, converted to luminance).

    Images are decoded one at a time into a preallocated array: no list of float copies, no final stack."""

    paths = list(paths)
    out = None
    for i, path in enumerate(paths):
        pixels, full_scale = read_pixels(path)
        shape = (size, size) if size is not None else pixels.shape[:2]
        if out is None:
            out = np.empty((len(paths), *shape), dtype=np.float32)
        elif pixels.shape[:2] != out.shape[1:] and size is None:
            raise ValueError(f"images of several sizes {sorted({pixels.shape[:2], out.shape[1:]})}")
        if pixels.ndim == 2 and size is None:  # the common case: scale straight into the output, no temporary
            np.divide(pixels, np.float32(full_scale), out=out[i], casting="unsafe")
        else:
            image = _grey(pixels, full_scale)
            out[i] = _resize(image, size) if size is not None else image
    return out if out is not None else np.empty((0, 1, 1), dtype=np.float32)
