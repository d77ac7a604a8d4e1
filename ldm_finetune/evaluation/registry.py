"""Every number the evaluation reports, declared once: its key in metrics.json, its label, which table it belongs
to, which direction is better, its unit and what it means. `evaluate` computes the set distances through it, the
report lays out its tables and legends from it, and the benchmarks name what they record by it.

A new set distance computed from per-image statistics: one `Metric(...)` line here with its `distance` function
(and the statistic in stats.py if it needs a new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ldm_finetune.evaluation import metrics as M
from ldm_finetune.evaluation.stats import Stats, compute_stats


@dataclass(frozen=True)
class Metric:
    name: str  # the key in metrics.json
    label: str  # the report's column header
    table: str  # "fidelity" (distance to the real set, shown x the real-vs-real floor), "coverage" (PRDC),
    # "probe" (prompt drift: fine-tuned vs base image), "memorisation", "classifier"
    better: str  # "lower" or "higher"
    unit: str
    meaning: str
    distance: Callable[[Stats, Stats, np.ndarray], float] | None = None  # (real, other, GLCM scale) -> value
    fmt: str = ".3g"  # how the report prints it


def _mean_cdf(s: Stats) -> np.ndarray:
    return np.cumsum(s.hist.mean(0))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("grey_w1", "grey W1", "fidelity", "lower", "grey levels (0-1)",
           "Wasserstein-1 between the grey-level distributions: integral of |CDF_real - CDF_generated|",
           lambda r, o, _: float(np.abs(_mean_cdf(r) - _mean_cdf(o)).sum() / M.GREY_BINS)),
    Metric("spectrum", "log spectrum", "fidelity", "lower", "decades of power",
           "mean absolute difference of the sets' mean radial log power spectra (texture scale, sharpness)",
           lambda r, o, _: float(np.abs(r.spectrum.mean(0) - o.spectrum.mean(0)).mean())),
    Metric("swd", "pyramid SWD", "fidelity", "lower", "grey levels",
           "sliced Wasserstein distance between 7x7 patches of each Laplacian-pyramid level, averaged over levels"),
    Metric("phase_fractions", "phase fractions", "fidelity", "lower", "area fraction",
           "L1 difference of the dark / mid / bright phase fractions (multi-Otsu on the real set): voids, resin, yarns",
           lambda r, o, _: float(np.abs(r.fractions.mean(0) - o.fractions.mean(0)).sum())),
    Metric("two_point", "two-point S2", "fidelity", "lower", "probability",
           "mean absolute difference of the two-point correlation curves of the darkest and brightest phases",
           lambda r, o, _: float(np.abs(r.s2.mean(0) - o.s2.mean(0)).mean())),
    Metric("glcm", "GLCM", "fidelity", "lower", "real-set standard deviations",
           "difference of the mean grey-level co-occurrence features, each in units of its real-set spread",
           lambda r, o, scale: float((np.abs(r.glcm.mean(0) - o.glcm.mean(0)) / scale).mean())),
    Metric("prdc_precision", "precision", "coverage", "higher", "share",
           "share of generated slices inside the real slices' k-NN balls (descriptor space): realism"),
    Metric("prdc_recall", "recall", "coverage", "higher", "share",
           "share of real slices inside the generated slices' k-NN balls: diversity"),
    Metric("prdc_density", "density", "coverage", "higher", "ratio",
           "how many real k-NN balls contain each generated slice, on average, / k"),
    Metric("prdc_coverage", "coverage", "coverage", "higher", "share",
           "share of real slices whose k-NN ball holds at least one generated slice"),
    Metric("accuracy", "classifier acc.", "classifier", "higher", "share",
           "share of generated slices the descriptor classifier (trained on real slices) assigns to their prompt's "
           "class; the ceiling is its accuracy on real validation slices", fmt=".0%"),
    Metric("innovation", "innovation", "memorisation", "higher", "grey levels (RMS)",
           "mean RMS distance to the nearest training slice; real validation slices give the reference"),
    Metric("near_copy_rate", "near-copies", "memorisation", "lower", "share",
           "share of generated slices whose best shift-tolerant NCC with a training slice reaches the copy threshold",
           fmt=".0%"),
    Metric("ssim", "SSIM", "probe", "higher", "1 = unchanged",
           "structural similarity of the fine-tuned and the base model's image for the same prompt and seed",
           fmt=".3f"),
    Metric("psnr", "PSNR", "probe", "higher", "dB (capped at 99)",
           "peak signal-to-noise ratio of the same pair", fmt=".1f"),
    Metric("colourfulness_ratio", "colourfulness ratio", "probe", "higher", "ratio",
           "fine-tuned / base colourfulness (Hasler & Suesstrunk); below 1 the images lost colour (CT is grey)",
           fmt=".2f"),
    Metric("ct_leakage", "CT-leakage", "probe", "lower", "share",
           "share of probe images closer to the CT set than to the base model's probes in descriptor space",
           fmt=".0%"),
    Metric("world_probe_base", "world probe: base", "probe", "higher", "share",
           "share of the base model's images for this prompt that the world probe (a classifier of the mini base's "
           "procedural world) reads as what the prompt asks: shape or texture, colour, background", fmt=".0%"),
    Metric("world_probe_tuned", "world probe: fine-tuned", "probe", "higher", "share",
           "the same for the fine-tuned model: the ground truth of drift that the weight-free columns estimate "
           "(world prompts on a mini base only)", fmt=".0%"),
)}


def table(name: str) -> list[Metric]:
    """The metrics of one report table, in their declared order."""
    return [m for m in METRICS.values() if m.table == name]


def set_distances(real: Stats, other: Stats, glcm_scale: np.ndarray) -> dict[str, float]:
    """Every fidelity distance computed from per-image statistics (all 0 for identical sets)."""
    return {m.name: m.distance(real, other, glcm_scale) for m in table("fidelity") if m.distance is not None}


FLOOR_DRAWS = 8  # random draws of real slices averaged into a floor


def floor_draws(available: int, n: int, seed: int) -> list[np.ndarray]:
    """FLOOR_DRAWS random choices of min(n, available) of `available` images (seeded: the same floor each run)."""
    rng = np.random.default_rng(seed)
    return [rng.choice(available, min(n, available), replace=False) for _ in range(FLOOR_DRAWS)]


def floor_at(real: Stats, real_other: Stats, n: int, glcm_scale: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The real-vs-real floor for a set of n images: each distance between `real` and n images of `real_other`
    drawn at random, averaged over the draws. Small sets sit far from any reference by sampling noise alone, so a
    floor from all of `real_other` would put n real slices at several floors (8 per class: 2-3x)."""
    rows = [set_distances(real, real_other.take(d), glcm_scale) for d in floor_draws(len(real_other.hist), n, seed)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def distance_in_floors(real: np.ndarray, real_other: np.ndarray, generated: np.ndarray) -> float:
    """One number for "how far from the real set" of grey image stacks (N, H, W): each fidelity distance divided by
    its real-vs-real floor at the generated set's size (the report's "x floor"), averaged over the distances, so
    that no single statistic decides (1.0: as close as real held-out slices). Phases and the GLCM scale come from
    `real`."""
    thresholds = M.multi_otsu(real, 3)
    stats = compute_stats(real, thresholds)
    scale = stats.glcm.std(0) + 1e-8
    floor = floor_at(stats, compute_stats(real_other, thresholds), len(generated), scale)
    d = set_distances(stats, compute_stats(generated, thresholds), scale)
    return float(np.mean([d[k] / floor[k] for k in floor]))


def formatted(name: str, value) -> str:
    return "-" if value is None else format(value, METRICS[name].fmt)
