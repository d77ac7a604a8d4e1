"""Each weight-free metric on synthetic fields whose statistics are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ldm_finetune.evaluation import metrics as M
from ldm_finetune.evaluation.registry import METRICS, set_distances
from ldm_finetune.evaluation.stats import compute_stats


def fields(n, seed, size=64, sigma=2.0):
    """Smooth random fields thresholded into three phases (dark / mid / bright), with a little noise."""
    rng = np.random.default_rng(seed)
    g = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, sigma, sigma))
    g = (g - g.mean()) / g.std()
    phases = np.digitize(g, [-0.5, 0.7])
    return np.clip(np.array([0.1, 0.45, 0.85])[phases] + 0.03 * rng.standard_normal(g.shape), 0, 1).astype(np.float32)


def shuffled(images, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(im.ravel()).reshape(im.shape) for im in images])


def blurred(images):
    return ndimage.gaussian_filter(images, (0, 2, 2)).astype(np.float32)


REAL, OTHER = fields(24, 1), fields(24, 2)


THRESHOLDS = M.multi_otsu(REAL, 3)


def registry_distance(name):
    """A registry distance between two image sets, through the per-image statistics evaluate computes."""
    def distance(a, b):
        real = compute_stats(a, THRESHOLDS)
        return set_distances(real, compute_stats(b, THRESHOLDS), real.glcm.std(0) + 1e-8)[name]
    return distance


@pytest.mark.parametrize("name", ["grey_w1", "spectrum", "swd", "two_point", "glcm"])
def test_same_process_scores_low_and_altered_sets_high(name):
    distance = (registry_distance(name) if METRICS[name].distance is not None
                else lambda a, b: float(np.mean(M.pyramid_swd(a, b))))
    same = distance(REAL, OTHER)
    assert distance(REAL, REAL) <= same + 1e-12
    changed = [distance(REAL, blurred(OTHER))]
    if name != "grey_w1":  # shuffling keeps the histogram exactly: only structure metrics see it
        changed.append(distance(REAL, shuffled(OTHER)))
    assert min(changed) > 3 * same, (same, changed)


def test_grey_w1_of_a_shift_is_the_shift():
    w1 = registry_distance("grey_w1")(REAL * 0.5, REAL * 0.5 + 0.2)
    assert w1 == pytest.approx(0.2, abs=2 / M.GREY_BINS)


def test_every_registry_metric_is_described():
    for m in METRICS.values():
        assert m.better in ("lower", "higher") and m.label and m.unit and m.meaning, m


def test_two_point_correlation_at_zero_is_the_phase_fraction_and_decays_to_its_square():
    thresholds = M.multi_otsu(REAL, 3)
    labels = M.segment(REAL, thresholds)
    fractions = compute_stats(REAL, thresholds).fractions.mean(0)
    assert fractions.sum() == pytest.approx(1.0)
    for phase in range(3):
        s2 = M.two_point_per_image(labels, phase, axis=2, max_lag=30).mean(0)
        assert s2[0] == pytest.approx(fractions[phase], abs=1e-6)
        assert abs(s2[30] - fractions[phase] ** 2) < 0.3 * fractions[phase] ** 2  # uncorrelated far apart
        assert s2[1] < s2[0]


def test_multi_otsu_finds_the_three_grey_levels():
    t = M.multi_otsu(REAL, 3)
    assert 0.1 < t[0] < 0.45 < t[1] < 0.85
    labels = M.segment(REAL, t)
    truth = np.digitize(REAL, [0.275, 0.65])
    assert (labels == truth).mean() > 0.99


def test_glcm_features_react_to_texture():
    smooth, noisy = M.glcm_features(blurred(REAL)[:4]), M.glcm_features(shuffled(REAL)[:4])
    assert (noisy[:, 0] > smooth[:, 0]).all()  # contrast up
    assert (noisy[:, 3] < smooth[:, 3]).all()  # neighbour correlation down


def test_prdc_identical_vs_disjoint():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 5))
    same = M.prdc(real, rng.standard_normal((200, 5)))
    far = M.prdc(real, rng.standard_normal((200, 5)) + 10)
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.8
    assert far["precision"] == 0 and far["coverage"] == 0


def test_descriptor_classifier_separates_classes():
    thresholds = M.multi_otsu(REAL, 3)
    coarse, fine = fields(20, 3, sigma=4.0), fields(20, 4, sigma=1.0)

    def descriptors(images):
        return compute_stats(images, thresholds).descriptors()

    x = descriptors(np.concatenate([coarse, fine]))
    clf = M.DescriptorClassifier(x, ["coarse"] * 20 + ["fine"] * 20)
    test = descriptors(np.concatenate([fields(10, 5, sigma=4.0), fields(10, 6, sigma=1.0)]))
    predicted = clf.predict(test)
    assert sum(p == t for p, t in zip(predicted, ["coarse"] * 10 + ["fine"] * 10)) >= 19
    assert M.confusion(["coarse", "fine"], ["fine", "fine"], clf.classes) == [[0, 1], [0, 1]]


def test_ssim_psnr_colourfulness():
    a = REAL[0]
    assert M.ssim(a, a) == pytest.approx(1.0) and M.psnr(a, a) == float("inf")
    assert M.ssim(a, shuffled(REAL[:1])[0]) < 0.2
    grey = np.repeat(a[..., None], 3, axis=2)
    colour = grey.copy()
    colour[..., 0] = 1.0
    assert M.colourfulness(grey) == pytest.approx(0.0, abs=1e-9) and M.colourfulness(colour) > 50


def test_a_shifted_copy_is_found_by_ncc_not_by_l2():
    train = REAL[:10]
    copy = np.roll(train[3], (7, -5), axis=(0, 1))
    l2 = np.sqrt(M.pairwise_msd(copy[None], train).min())
    bank = M.normalised_fft(train)
    ncc = M.max_ncc_batch(M.normalised_fft(copy), bank, copy.shape)
    assert int(np.argmax(ncc)) == 3 and ncc.max() > 0.99
    fresh = M.max_ncc_batch(M.normalised_fft(OTHER[0]), bank, copy.shape)
    assert fresh.max() < 0.6 and l2 > 0.1


def test_metrics_are_deterministic():
    assert M.pyramid_swd(REAL, OTHER, seed=3) == M.pyramid_swd(REAL, OTHER, seed=3)


def test_ssim_and_glcm_are_scikit_images():
    """Reference values from scikit-image 0.26.0 on the same inputs (structural_similarity with gaussian_weights,
    sigma 1.5, population covariance, data_range 1; graycomatrix at distance 1, angles 0 and pi/2, symmetric, normed,
    32 levels + graycoprops)."""
    a = np.linspace(0, 1, 48 * 40).reshape(48, 40)
    assert M.ssim(a, np.sqrt(a)) == pytest.approx(0.8587295199558417, abs=1e-12)
    rng = np.random.default_rng(1)
    img = np.clip(np.cumsum(rng.random((40, 48)), axis=1) / 30 % 1.0, 0, 1)
    expected = [0.537234, 0.73266, 0.117711, 0.995093, 4.551282, 0.45304, 0.082309, 0.959986]
    np.testing.assert_allclose(M.glcm_features(img[None], levels=32)[0], expected, atol=2e-6)


def test_seam_score_compares_each_direction_with_itself():
    """A layered slice (smooth along x, so its vertical steps are 3x its horizontal ones) has no seam anywhere: its
    rows score ~1.0, where pooling the two directions scored them ~1.5. A real step along a join still shows."""
    layered = ndimage.gaussian_filter1d(np.random.default_rng(0).normal(0, 1, (64, 256)), 1.5, axis=1)
    assert abs(M.seam_score(layered, [16, 32, 48], []) - 1.0) < 0.1
    assert abs(M.seam_score(layered, [16, 48], [32, 96, 160, 224]) - 1.0) < 0.1
    stepped = layered.copy()
    stepped[:, 128:] += 0.3
    assert M.seam_score(stepped, [], [128]) > 1.5


def test_seam_score_compares_joins_with_the_decoder_grid_lines():
    """A latent model's decoder draws 4 x 4 blocks: steps between blocks are larger everywhere, tile or no tile. On
    such an image with no seam, joins on block edges score well above 1.0 against every line, ~1.0 against the other
    block edges; a real step along a join still shows on that reference."""
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.normal(0, 1, (16, 64)), np.ones((4, 4))) + rng.normal(0, 0.3, (64, 256))
    rows, columns = [32], [32, 64, 128, 192]
    assert M.seam_score(blocks, rows, columns) > 1.5
    assert abs(M.seam_score(blocks, rows, columns, grid=4) - 1.0) < 0.1
    stepped = blocks.copy()
    stepped[:, 128:] += 3.0
    assert M.seam_score(stepped, [], [128], grid=4) > 1.5
