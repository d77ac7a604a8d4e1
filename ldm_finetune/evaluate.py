"""`ldm-finetune evaluate`: does each concept look like the real material, did the model copy its training slices,
do its cuts agree in 3D — with weight-free metrics, each next to the real-vs-real floor (train vs validation).

    ldm-finetune evaluate --real data/composite --generated samples/ --out eval/       (two image sets)
    ldm-finetune evaluate eval.yaml --out eval/                                         (models, probes: evalconfig)

Per-image statistics (grey histogram, log power spectrum, phase fractions, two-point curves, GLCM features) are
computed once per set; set distances are functions of their means, so bootstrap intervals (resampling the generated
images) cost almost nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_finetune import metrics as M
from ldm_finetune.errors import UserError
from ldm_finetune.imagesets import ImageSet

S2_LAGS = 16
MIN_IMAGES = 4  # fewer images than this and a per-class statistic is skipped (the report says so)


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


def compute_stats(images: np.ndarray, thresholds: np.ndarray) -> Stats:
    hist = np.stack([M.grey_histogram(im[None]) for im in images])
    labels = M.segment(images, thresholds)
    phases = len(thresholds) + 1
    fractions = np.stack([M.phase_fractions(lab, phases) for lab in labels])
    s2 = np.stack([[[M.two_point(lab[None], p, axis, S2_LAGS) for p in range(phases)] for axis in (1, 2)]
                   for lab in labels])
    return Stats(hist, M.radial_spectrum(images), fractions, s2, M.glcm_features(images))


def set_distances(real: Stats, other: Stats, glcm_scale: np.ndarray) -> dict[str, float]:
    """Distances between two sets from their per-image statistics (all 0 for identical sets)."""
    cdf = lambda s: np.cumsum(s.hist.mean(0))  # noqa: E731
    return {
        "grey_w1": float(np.abs(cdf(real) - cdf(other)).sum() / M.GREY_BINS),
        "spectrum": float(np.abs(real.spectrum.mean(0) - other.spectrum.mean(0)).mean()),
        "phase_fractions": float(np.abs(real.fractions.mean(0) - other.fractions.mean(0)).sum()),
        "two_point": float(np.abs(real.s2.mean(0) - other.s2.mean(0)).mean()),
        "glcm": float((np.abs(real.glcm.mean(0) - other.glcm.mean(0)) / glcm_scale).mean()),
    }


def bootstrap(real: Stats, other: Stats, glcm_scale, rounds: int, seed: int) -> dict[str, list[float]]:
    """95 % percentile intervals of each distance, resampling the other set's images."""
    rng = np.random.default_rng(seed)
    n = len(other.hist)
    samples = [set_distances(real, other.take(rng.integers(0, n, n)), glcm_scale) for _ in range(rounds)]
    return {k: [float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples],
                                                                                        97.5))]
            for k in samples[0]}


def fidelity(real_train: ImageSet, real_val: ImageSet, generated: dict[str, ImageSet], thresholds,
             rounds: int, seed: int, skipped: list) -> dict:
    """Per class: each distance for every generated set with its interval, and the real-vs-real floor."""
    classes = _shared_classes(real_train, generated)
    out = {}
    for cls in classes:
        key = cls or "all"
        train = real_train.of_class(cls)
        if len(train) < MIN_IMAGES:
            skipped.append({"what": f"fidelity {key}", "reason": f"only {len(train)} real training images"})
            continue
        train_stats = compute_stats(train.images, thresholds)
        scale = train_stats.glcm.std(0) + 1e-8
        entry = {"n_real": len(train)}
        val = real_val.of_class(cls)
        if len(val) >= MIN_IMAGES:
            val_stats = compute_stats(val.images, thresholds)
            entry["floor"] = set_distances(train_stats, val_stats, scale)
            entry["floor"]["swd"] = float(np.mean(M.pyramid_swd(train.images, val.images, seed=seed)))
            entry["floor"].update({f"prdc_{k}": v for k, v in _prdc(train_stats, val_stats).items()})
        else:
            skipped.append({"what": f"floor {key}", "reason": f"only {len(val)} validation images"})
        entry["models"] = {}
        for name, gen in generated.items():
            g = gen.of_class(cls)
            if len(g) < MIN_IMAGES:
                skipped.append({"what": f"fidelity {key} / {name}", "reason": f"only {len(g)} generated images "
                                f"(at least {MIN_IMAGES} needed)"})
                continue
            g_stats = compute_stats(g.images, thresholds)
            values = set_distances(train_stats, g_stats, scale)
            values["swd"] = float(np.mean(M.pyramid_swd(train.images, g.images, seed=seed)))
            values.update({f"prdc_{k}": v for k, v in _prdc(train_stats, g_stats).items()})
            entry["models"][name] = {"n": len(g), "values": values,
                                     "ci": bootstrap(train_stats, g_stats, scale, rounds, seed)}
        out[key] = entry
    return out


def _prdc(real: Stats, other: Stats) -> dict[str, float]:
    scale = M.Standardizer(real.descriptors())
    return M.prdc(scale(real.descriptors()), scale(other.descriptors()))


def _shared_classes(real: ImageSet, generated: dict[str, ImageSet]) -> list[str | None]:
    gen_classes = sorted({c for g in generated.values() for c in g.known_classes()})
    if not gen_classes or not real.known_classes():
        return [None]
    return [c for c in gen_classes if c in real.known_classes()]


def classifier(real_train: ImageSet, real_val: ImageSet, generated: dict[str, ImageSet], thresholds,
               skipped: list) -> dict:
    """A descriptor classifier trained on real training slices: its accuracy on validation slices is the ceiling;
    on generated slices it measures whether each prompt produced its concept."""
    classes = real_train.known_classes()
    if len(classes) < 2:
        skipped.append({"what": "concept classifier", "reason": "the real set has fewer than 2 classes"})
        return {}
    features = compute_stats(real_train.images, thresholds).descriptors()
    clf = M.DescriptorClassifier(features, list(real_train.classes))
    out = {"classes": clf.classes}
    if len(real_val):
        predicted = clf.predict(compute_stats(real_val.images, thresholds).descriptors())
        out["ceiling_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, real_val.classes)]))
    out["models"] = {}
    for name, gen in generated.items():
        labelled = [i for i, c in enumerate(gen.classes) if c in clf.classes]
        if not labelled:
            skipped.append({"what": f"concept classifier / {name}", "reason": "generated images have no class"})
            continue
        truth = [gen.classes[i] for i in labelled]
        predicted = clf.predict(compute_stats(gen.images[labelled], thresholds).descriptors())
        out["models"][name] = {"accuracy": float(np.mean([p == t for p, t in zip(predicted, truth)])),
                               "confusion": M.confusion(truth, predicted, clf.classes)}
    return out


def _best_matches(small: np.ndarray, bank: np.ndarray, bank_mag: np.ndarray, candidates: int):
    """For each image: (index of the nearest bank image by L2, its RMS distance, best shift-tolerant NCC, index of
    that bank image). NCC is computed on candidates chosen by L2 on pixels and on FFT magnitudes (shift-invariant)."""
    k = min(candidates, len(bank))
    pixel_d2 = M.pairwise_msd(small, bank)
    nearest = pixel_d2.argmin(1)
    mags = np.abs(np.fft.rfft2(small - small.mean((1, 2), keepdims=True)))
    spectrum_d2 = M.pairwise_msd(mags, bank_mag)
    best_ncc, best_index = [], []
    for i, img in enumerate(small):
        pool = np.unique(np.concatenate([np.argpartition(pixel_d2[i], k - 1)[:k],
                                         np.argpartition(spectrum_d2[i], k - 1)[:k]]))
        scores = [M.max_ncc(img, bank[j]) for j in pool]
        best_ncc.append(max(scores))
        best_index.append(int(pool[int(np.argmax(scores))]))
    return nearest, np.sqrt(pixel_d2[np.arange(len(small)), nearest]), np.array(best_ncc), best_index


def memorisation(bank_set: ImageSet, real_val: ImageSet, generated: dict[str, ImageSet], copy_ncc: float,
                 candidates: int = 8) -> dict:
    """Nearest training slice of each generated one by L2 and by shift-tolerant NCC. Innovation (seed 000) = mean
    nearest L2 distance. Validation slices are new by construction, so their numbers are the reference: woven
    composites are periodic, and a new slice of the same weave can correlate highly with a training one. A generated
    slice is flagged as a near-copy when its NCC reaches both `copy_ncc` and the 99th percentile of validation
    slices' best NCC."""
    size = bank_set.images.shape[1]
    bank = bank_set.images
    bank_mag = np.abs(np.fft.rfft2(bank - bank.mean((1, 2), keepdims=True)))
    out = {"models": {}}
    threshold = copy_ncc
    if len(real_val):
        val = M.resize_set(real_val.images[:200], size)
        _, d, ncc, _ = _best_matches(val, bank, bank_mag, candidates)
        out.update({"validation_innovation": float(d.mean()), "validation_ncc_p99": float(np.quantile(ncc, 0.99))})
        threshold = max(copy_ncc, out["validation_ncc_p99"])
    out["copy_threshold"] = threshold
    for name, gen in generated.items():
        small = M.resize_set(gen.images, size)
        index, dist, ncc, twin = _best_matches(small, bank, bank_mag, candidates)
        flags = [{"generated": str(gen.paths[i]) if gen.paths else i, "training": str(bank_set.paths[twin[i]]),
                  "ncc": float(ncc[i])} for i in np.flatnonzero(ncc >= threshold)]
        out["models"][name] = {"innovation": float(dist.mean()), "nearest_l2": dist.tolist(),
                               "nearest_index": index.tolist(), "best_ncc": ncc.tolist(), "near_copies": flags,
                               "near_copy_rate": len(flags) / max(1, len(gen))}
    return out


def consistency(real: ImageSet, generated: dict[str, ImageSet], thresholds) -> dict:
    """3D consistency per state: the phase fractions of its thickness / warp / weft images should agree (stereology:
    area fractions estimate the same volume fraction in any cut), and orderings between states seen in the real
    data (e.g. more voids in dry than in dry-compacted) should hold."""
    def table(images: ImageSet) -> dict[str, dict[str, list[float]]]:
        result: dict[str, dict[str, list[float]]] = {}
        for cls in images.known_classes():
            state, orientation = cls.split("/", 1)
            fr = M.phase_fractions(M.segment(images.of_class(cls).images, thresholds), len(thresholds) + 1)
            result.setdefault(state, {})[orientation] = fr.tolist()
        return result

    def spreads(t):  # per state: largest difference between cuts, per phase
        return {s: np.ptp(np.array(list(cuts.values())), axis=0).tolist() for s, cuts in t.items() if len(cuts) > 1}

    def mean_fraction(cuts, phase):
        return float(np.mean([v[phase] for v in cuts.values()]))

    real_table = table(real)
    out = {"real": {"fractions": real_table, "cut_spread": spreads(real_table)}, "models": {}}
    for name, gen in generated.items():
        gen_table = table(gen)
        orderings = []
        states = sorted(set(real_table) & set(gen_table))
        for phase, label in ((0, "darkest phase (voids / air)"), (len(thresholds), "brightest phase (yarns)")):
            for i, a in enumerate(states):
                for b in states[i + 1:]:
                    ra, rb = mean_fraction(real_table[a], phase), mean_fraction(real_table[b], phase)
                    ga, gb = mean_fraction(gen_table[a], phase), mean_fraction(gen_table[b], phase)
                    first, second = (a, b) if ra >= rb else (b, a)
                    orderings.append({"phase": label, "order": f"{first} > {second}",
                                      "holds": bool((ga >= gb) == (ra >= rb))})
        out["models"][name] = {"fractions": gen_table, "cut_spread": spreads(gen_table), "orderings": orderings}
    return out


def evaluate_sets(real_root: Path, generated: dict[str, ImageSet], out: Path, size: int | None,
                  max_real: int | None, rounds: int = 50, seed: int = 0, copy_ncc: float = 0.95,
                  extra: dict | None = None) -> dict:
    """The weight-free suite for already generated sets; writes metrics.json and report.html."""
    from ldm_finetune.imagesets import check_sizes, load_real
    from ldm_finetune.report import write_report

    real_train = load_real(real_root, "train", size, max_real)
    real_val = _validation(real_root, size, max_real)
    for gen in generated.values():
        check_sizes(real_train, gen)
    thresholds = M.multi_otsu(real_train.images, 3)
    skipped: list = []
    results = {
        "settings": {"real": str(real_root), "size": int(real_train.images.shape[1]), "bootstrap": rounds,
                     "seed": seed, "copy_ncc": copy_ncc, "phase_thresholds": thresholds.tolist(),
                     "sets": {n: len(g) for n, g in generated.items()}, "n_real_train": len(real_train),
                     "n_real_validation": len(real_val)},
        "fidelity": fidelity(real_train, real_val, generated, thresholds, rounds, seed, skipped),
        "classifier": classifier(real_train, real_val, generated, thresholds, skipped),
        "memorisation": memorisation(load_real(real_root, "train", min(M.SEARCH_SIZE, real_train.images.shape[1])),
                                     real_val, generated, copy_ncc),
        "consistency": consistency(real_train, generated, thresholds) if real_train.known_classes() else {},
    }
    results.update(extra or {})
    results["skipped"] = skipped + (extra or {}).get("skipped", [])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_report(out / "report.html", results, real_train, generated)
    return results


def _validation(real_root: Path, size, max_real) -> ImageSet:
    from ldm_finetune.imagesets import load_real

    if (Path(real_root) / "validation" / "metadata.jsonl").is_file():
        return load_real(real_root, "validation", size, max_real)
    return ImageSet("real-validation", np.zeros((0, 1, 1), np.float32), [], [])


def run_evaluate(args) -> Path:
    """The CLI: the config form (evalconfig.py) or two folders."""
    from ldm_finetune.imagesets import load_generated

    if args.config is not None:
        from ldm_finetune.evalconfig import run_config

        return run_config(args.config, args.out)
    if args.real is None or not args.generated:
        raise UserError("evaluate needs a CONFIG.yaml, or --real DIR and at least one --generated DIR")
    names = [g.name for g in args.generated]
    if len(set(names)) != len(names):
        names = [f"{g.parent.name}/{g.name}" for g in args.generated]
    generated = {n: load_generated(g, n, args.size) for n, g in zip(names, args.generated)}
    evaluate_sets(args.real, generated, args.out, args.size, args.max_real, args.bootstrap, args.seed, args.copy_ncc)
    return args.out
