"""`ldm-finetune evaluate`: does each concept look like the real material, did the model copy its training slices,
do its cuts agree in 3D — with weight-free metrics, each next to the real-vs-real floor (train vs validation).

    ldm-finetune evaluate --real data/composite --generated samples/ --out eval/       (two image sets)
    ldm-finetune evaluate eval.yaml --out eval/                                         (models, probes: config.py)

Per-image statistics (grey histogram, log power spectrum, phase fractions, two-point curves, GLCM features) are
computed once per set; set distances are functions of their means, so bootstrap intervals (resampling the generated
images) cost almost nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_finetune.core.classes import split_class
from ldm_finetune.evaluation import metrics as M
from ldm_finetune.evaluation.imagesets import ImageSet, check_sizes, load_generated, load_real, resized
from ldm_finetune.evaluation.registry import floor_at, floor_draws, set_distances
from ldm_finetune.evaluation.report import write_report
from ldm_finetune.evaluation.results import (
    ClassifierResult,
    ConceptFidelity,
    ConsistencyResult,
    Cuts,
    EvaluationResults,
    MemorisationResult,
    ModelAccuracy,
    ModelFidelity,
    ModelMemorisation,
    NearCopy,
    Ordering,
    ProbeResult,
)
from ldm_finetune.evaluation.stats import Stats, parallel_stats

MIN_IMAGES = 4  # fewer images than this and a per-class statistic is skipped (the report says so)
SWD_IMAGES = 32  # images per set in the pyramid SWD (64 patches each per level)


@dataclass
class Measured:
    """An image set with its statistics, computed once and sliced per class."""
    images: ImageSet
    stats: Stats

    def of_class(self, cls: str | None) -> tuple[ImageSet, Stats]:
        if cls is None:
            return self.images, self.stats
        index = np.flatnonzero(np.array(self.images.classes, dtype=object) == cls)
        return self.images.of_class(cls), self.stats.take(index)


def measure(images: ImageSet, thresholds) -> Measured:
    return Measured(images, parallel_stats(images.images, thresholds) if len(images) else None)


def bootstrap(real: Stats, other: Stats, glcm_scale, rounds: int, seed: int) -> dict[str, list[float]]:
    """95 % percentile intervals of each distance, resampling the other set's images."""
    rng = np.random.default_rng(seed)
    n = len(other.hist)
    samples = [set_distances(real, other.take(rng.integers(0, n, n)), glcm_scale) for _ in range(rounds)]
    return {k: [float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples],
                                                                                        97.5))]
            for k in samples[0]}


def fidelity(train: Measured, val: Measured, generated: dict[str, Measured], rounds: int, seed: int,
             skipped: list) -> dict[str, ConceptFidelity]:
    """Per class: each distance for every generated set with its interval, the real-vs-real floor at that set's
    number of images, and the mean curves (power spectrum, two-point) the report plots."""
    classes = _shared_classes(train.images, {n: g.images for n, g in generated.items()})
    out = {}
    for cls in classes:
        key = cls or "all"
        t_images, t_stats = train.of_class(cls)
        if len(t_images) < MIN_IMAGES:
            skipped.append({"what": f"fidelity {key}", "reason": f"only {len(t_images)} real training images"})
            continue
        scale = t_stats.glcm.std(0) + 1e-8
        entry = ConceptFidelity(len(t_images), {"real": _curves(t_stats)})
        v_images, v_stats = val.of_class(cls) if val.stats is not None else (val.images, None)
        # SWD estimates grow as samples shrink: every SWD of this class uses the same number of images
        g_sizes = [n for n in (len(g.of_class(cls)[0]) for g in generated.values()) if n >= MIN_IMAGES]
        sizes = [len(t_images), len(v_images)] + g_sizes
        n_swd = max(MIN_IMAGES, min([SWD_IMAGES] + [n for n in sizes if n >= MIN_IMAGES]))
        entry.swd_images = n_swd
        rng = np.random.default_rng(seed)
        # a random n_swd of the training slices: the first ones come from a few neighbouring slices
        t_swd = t_images.images[np.sort(rng.choice(len(t_images), n_swd, replace=False))]
        train_pyramid = M.laplacian_pyramid(t_swd, M.pyramid_levels(t_swd))
        floor = None
        if v_stats is not None and len(v_images) >= MIN_IMAGES:
            floor = RealFloor(t_swd, train_pyramid, t_stats, v_images.images, v_stats, scale, seed)
            n_common = min(g_sizes + [len(v_images)])  # the report's floor row: the smallest set's
            entry.floor = floor.at(n_common) | {f"prdc_{k}": v for k, v in _prdc(t_stats, v_stats).items()}
        else:
            skipped.append({"what": f"floor {key}", "reason": f"only {len(v_images)} validation images"})
        for name, gen in generated.items():
            g_images, g_stats = gen.of_class(cls)
            if len(g_images) < MIN_IMAGES:
                skipped.append({"what": f"fidelity {key} / {name}", "reason": f"only {len(g_images)} generated "
                                f"images (at least {MIN_IMAGES} needed)"})
                continue
            values = set_distances(t_stats, g_stats, scale)
            values["swd"] = float(np.mean(M.pyramid_swd(t_swd, g_images.images, seed=seed, max_images=n_swd,
                                                        pyramid_a=train_pyramid)))
            values.update({f"prdc_{k}": v for k, v in _prdc(t_stats, g_stats).items()})
            row = ModelFidelity(len(g_images), values, bootstrap(t_stats, g_stats, scale, rounds, seed))
            if floor is not None and floor.size(len(g_images)) != floor.size(n_common):
                row.floor = entry.floor | floor.at(len(g_images))  # a set of another size: the floor at its size
            entry.models[name] = row
            entry.curves[name] = _curves(g_stats)
        out[key] = entry
    return out


class RealFloor:
    """The real-vs-real floor of one class at n images (registry.floor_at), with its SWD at the class's SWD size. A
    generated set of n images is measured against the floor at n, so n held-out real slices score about 1x."""

    def __init__(self, t_swd, train_pyramid, t_stats: Stats, v_images: np.ndarray, v_stats: Stats, scale, seed: int):
        self.t_stats, self.v_stats, self.scale, self.seed = t_stats, v_stats, scale, seed
        self.available = len(v_images)
        self.cache: dict[int, dict[str, float]] = {}
        # every SWD of the class compares len(t_swd) images a side; one pyramid of the validation slices, indexed
        v_pyramid = M.laplacian_pyramid(v_images, len(train_pyramid))
        self.swd = float(np.mean([np.mean(M.pyramid_swd(
            t_swd, v_images[d], seed=seed, max_images=len(t_swd), pyramid_a=train_pyramid,
            pyramid_b=[level[d] for level in v_pyramid])) for d in floor_draws(len(v_images), len(t_swd), seed)]))

    def size(self, n: int) -> int:
        return min(n, self.available)

    def at(self, n: int) -> dict[str, float]:
        n = self.size(n)
        if n not in self.cache:
            self.cache[n] = floor_at(self.t_stats, self.v_stats, n, self.scale, self.seed)
        return self.cache[n] | {"swd": self.swd}


def _curves(stats: Stats) -> dict:
    return {"spectrum": stats.spectrum.mean(0).tolist(), "s2_bright_x": stats.s2[:, 1, -1].mean(0).tolist()}


def _prdc(real: Stats, other: Stats) -> dict[str, float]:
    scale = M.Standardizer(real.descriptors())
    return M.prdc(scale(real.descriptors()), scale(other.descriptors()))


def _shared_classes(real: ImageSet, generated: dict[str, ImageSet]) -> list[str | None]:
    gen_classes = sorted({c for g in generated.values() for c in g.known_classes()})
    if not gen_classes or not real.known_classes():
        return [None]
    return [c for c in gen_classes if c in real.known_classes()]


def classifier(train: Measured, val: Measured, generated: dict[str, Measured],
               skipped: list) -> ClassifierResult | None:
    """A descriptor classifier trained on real training slices: its accuracy on validation slices is the ceiling;
    on generated slices it measures whether each prompt produced its concept."""
    classes = train.images.known_classes()
    if len(classes) < 2:
        skipped.append({"what": "concept classifier", "reason": "the real set has fewer than 2 classes"})
        return None
    clf = M.DescriptorClassifier(train.stats.descriptors(), list(train.images.classes))
    out = ClassifierResult(clf.classes)
    if val.stats is not None and len(val.images):
        predicted = clf.predict(val.stats.descriptors())
        out.ceiling_accuracy = float(np.mean([p == t for p, t in zip(predicted, val.images.classes)]))
    for name, gen in generated.items():
        labelled = [i for i, c in enumerate(gen.images.classes) if c in clf.classes]
        if not labelled:
            skipped.append({"what": f"concept classifier / {name}", "reason": "generated images have no class"})
            continue
        truth = [gen.images.classes[i] for i in labelled]
        predicted = clf.predict(gen.stats.take(labelled).descriptors())
        out.models[name] = ModelAccuracy(float(np.mean([p == t for p, t in zip(predicted, truth)])),
                                         M.confusion(truth, predicted, clf.classes))
    return out


def _best_matches(small: np.ndarray, bank: np.ndarray, bank_mag: np.ndarray, candidates: int,
                  bank_fft: np.ndarray | None = None):
    """For each image: (index of the nearest bank image by L2, its RMS distance, best shift-tolerant NCC, index of
    that bank image). NCC is computed on candidates chosen by L2 on pixels and on FFT magnitudes (shift-invariant)."""
    k = min(candidates, len(bank))
    pixel_d2 = M.pairwise_msd(small, bank)
    nearest = pixel_d2.argmin(1)
    mags = np.abs(np.fft.rfft2(small - small.mean((1, 2), keepdims=True)))
    spectrum_d2 = M.pairwise_msd(mags, bank_mag)
    bank_fft = M.normalised_fft(bank) if bank_fft is None else bank_fft
    query_fft = M.normalised_fft(small)
    best_ncc, best_index = [], []
    for i in range(len(small)):
        pool = np.unique(np.concatenate([np.argpartition(pixel_d2[i], k - 1)[:k],
                                         np.argpartition(spectrum_d2[i], k - 1)[:k]]))
        scores = M.max_ncc_batch(query_fft[i], bank_fft[pool], small.shape[1:])
        best_ncc.append(float(scores.max()))
        best_index.append(int(pool[int(np.argmax(scores))]))
    return nearest, np.sqrt(pixel_d2[np.arange(len(small)), nearest]), np.array(best_ncc), best_index


def memorisation(bank_set: ImageSet, real_val: ImageSet, generated: dict[str, ImageSet], copy_ncc: float,
                 candidates: int = 8) -> MemorisationResult:
    """Nearest training slice of each generated one by L2 and by shift-tolerant NCC. Innovation (seed 000) = mean
    nearest L2 distance. Validation slices are new by construction, so their numbers are the reference: woven
    composites are periodic, and a new slice of the same weave can correlate highly with a training one. A generated
    slice is flagged as a near-copy when its NCC reaches both `copy_ncc` and the 99th percentile of validation
    slices' best NCC."""
    size = bank_set.images.shape[1]
    bank = bank_set.images
    bank_mag = np.abs(np.fft.rfft2(bank - bank.mean((1, 2), keepdims=True)))
    bank_fft = M.normalised_fft(bank)
    out = MemorisationResult(copy_ncc)
    if len(real_val):
        val = M.resize_set(real_val.images[:200], size)
        _, d, ncc, _ = _best_matches(val, bank, bank_mag, candidates, bank_fft)
        out.validation_innovation, out.validation_ncc_p99 = float(d.mean()), float(np.quantile(ncc, 0.99))
        out.copy_threshold = max(copy_ncc, out.validation_ncc_p99)
    for name, gen in generated.items():
        small = M.resize_set(gen.images, size)
        index, dist, ncc, twin = _best_matches(small, bank, bank_mag, candidates, bank_fft)
        flags = [NearCopy(str(gen.paths[i]) if gen.paths else str(i), str(bank_set.paths[twin[i]]), float(ncc[i]))
                 for i in np.flatnonzero(ncc >= out.copy_threshold)]
        out.models[name] = ModelMemorisation(float(dist.mean()), dist.tolist(), index.tolist(), ncc.tolist(), flags,
                                             len(flags) / max(1, len(gen)))
    return out


def consistency(train: Measured, generated: dict[str, Measured]) -> ConsistencyResult:
    """3D consistency per state: the phase fractions of its thickness / warp / weft images should agree (stereology:
    area fractions estimate the same volume fraction in any cut), and orderings between states seen in the real
    data (e.g. more voids in dry than in dry-compacted) should hold."""
    def table(measured: Measured) -> dict[str, dict[str, list[float]]]:
        result: dict[str, dict[str, list[float]]] = {}
        for cls in measured.images.known_classes():
            state, orientation = split_class(cls)
            result.setdefault(state, {})[orientation] = measured.of_class(cls)[1].fractions.mean(0).tolist()
        return result

    def spreads(t):  # per state: largest difference between cuts, per phase
        return {s: np.ptp(np.array(list(cuts.values())), axis=0).tolist() for s, cuts in t.items() if len(cuts) > 1}

    def mean_fraction(cuts, phase):
        return float(np.mean([v[phase] for v in cuts.values()]))

    real_table = table(train)
    phases = len(next(iter(next(iter(real_table.values())).values())))
    out = ConsistencyResult(Cuts(real_table, spreads(real_table)))
    for name, gen in generated.items():
        gen_table = table(gen)
        orderings = []
        states = sorted(set(real_table) & set(gen_table))
        for phase, label in ((0, "darkest phase (voids / air)"), (phases - 1, "brightest phase (yarns)")):
            for i, a in enumerate(states):
                for b in states[i + 1:]:
                    ra, rb = mean_fraction(real_table[a], phase), mean_fraction(real_table[b], phase)
                    ga, gb = mean_fraction(gen_table[a], phase), mean_fraction(gen_table[b], phase)
                    first, second = (a, b) if ra >= rb else (b, a)
                    orderings.append(Ordering(label, f"{first} > {second}", bool((ga >= gb) == (ra >= rb))))
        out.models[name] = Cuts(gen_table, spreads(gen_table), orderings)
    return out


@dataclass(frozen=True)
class SuiteSettings:
    """What the weight-free suite compares generated sets against, and how."""
    real: Path  # a prep output (train/ + validation/) or an image folder
    size: int | None = None  # compare at this size (None: the real slices' own)
    max_real: int | None = 100  # real slices per class and split (None: all)
    rounds: int = 50  # bootstrap rounds of the floors
    seed: int = 0  # of the bootstrap
    copy_ncc: float = 0.95  # normalised cross-correlation above which an image is a near-copy of a training slice


def evaluate_sets(suite: SuiteSettings, generated: dict[str, ImageSet], out: Path,
                  real_train: ImageSet | None = None, notes: list[str] | None = None,
                  probes: ProbeResult | None = None, skipped: list[dict] | None = None,
                  decoders: dict[str, Callable] | None = None) -> EvaluationResults:
    """The weight-free suite for already generated sets; writes metrics.json and report.html. The config form
    passes the real slices it has loaded, its notes, the drift probes it measured, what it skipped, and the round
    trip through each latent model's VAE (decoders: model -> function of (N, H, W) grey images in [0, 1])."""

    real_root, rounds, seed = suite.real, suite.rounds, suite.seed
    if real_train is None:
        real_train = load_real(real_root, "train", suite.size, suite.max_real)
    real_val = _validation(real_root, suite.size, suite.max_real)
    real_size = int(real_train.images.shape[1])
    # a model that makes smaller images than the real slices is scored at its own size (below); memorisation and
    # 3D consistency compare every set at the real size
    native = {n: int(g.images.shape[1]) for n, g in generated.items() if g.images.shape[1] < real_size}
    at_real = {n: resized(g, real_size) if n in native else g for n, g in generated.items()}
    for gen in at_real.values():
        check_sizes(real_train, gen)
    thresholds = M.multi_otsu(real_train.images, 3)
    train, val = measure(real_train, thresholds), measure(real_val, thresholds)
    measured = {name: measure(g, thresholds) for name, g in at_real.items()}
    full_size = {n: m for n, m in measured.items() if n not in native}
    suite_skipped: list[dict] = []  # what the suite could not measure, before what the caller skipped
    results = EvaluationResults(
        settings={"real": str(real_root), "size": real_size, "bootstrap": rounds,
                  "seed": seed, "copy_ncc": suite.copy_ncc, "phase_thresholds": thresholds.tolist(),
                  "sets": {n: len(g) for n, g in generated.items()}, "n_real_train": len(real_train),
                  "n_real_validation": len(real_val), "scored_at_own_size": native},
        fidelity=fidelity(train, val, full_size, rounds, seed, suite_skipped),
        classifier=classifier(train, val, full_size, suite_skipped),
        memorisation=memorisation(_search_bank(real_root, real_train, suite.max_real), real_val, at_real,
                                  suite.copy_ncc),
        consistency=consistency(train, measured) if real_train.known_classes() else None,
        skipped=suite_skipped, notes=list(notes or []), probes=probes)
    for side in sorted(set(native.values())):
        _score_at_own_size(side, {n: generated[n] for n, s in native.items() if s == side}, real_train, real_val,
                           results, rounds, seed)
    decoder_accuracy(real_train, real_val, generated, decoders or {}, results)
    results.skipped += skipped or []
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results.to_json(), indent=2))
    write_report(out / "report.html", results, real_train, at_real)
    return results


def _score_at_own_size(side: int, generated: dict[str, ImageSet], real_train: ImageSet, real_val: ImageSet,
                       results: EvaluationResults, rounds: int, seed: int) -> None:
    """Fidelity and concept accuracy of models that generate side x side images, against the real slices resized
    down to that side, with the floor and the classifier's ceiling recomputed there. Upscaling the generated images
    instead would add interpolation artefacts that the spectrum and GLCM distances punish. Each model's entry
    carries its own size, floor (fidelity) or ceiling accuracy (classifier)."""
    train_s, val_s = resized(real_train, side), resized(real_val, side)
    thresholds = M.multi_otsu(train_s.images, 3)
    train, val = measure(train_s, thresholds), measure(val_s, thresholds)
    measured = {n: measure(g, thresholds) for n, g in generated.items()}
    for cls, entry in fidelity(train, val, measured, rounds, seed, results.skipped).items():
        target = results.fidelity.setdefault(cls, ConceptFidelity(entry.n_real, {}))
        for name, row in entry.models.items():
            row.size, row.floor = side, row.floor or entry.floor or {}
            target.models[name] = row
            target.curves[f"{name} ({side} px)"] = entry.curves[name]
    clf = classifier(train, val, measured, results.skipped)
    if clf is not None and results.classifier is None:
        results.classifier = ClassifierResult(clf.classes)
    for name, row in (clf.models if clf else {}).items():
        row.size, row.ceiling_accuracy = side, clf.ceiling_accuracy
        results.classifier.models[name] = row


def decoder_accuracy(real_train: ImageSet, real_val: ImageSet, generated: dict[str, ImageSet],
                     decoders: dict[str, Callable], results: EvaluationResults) -> None:
    """Concept accuracy in each latent model's own image space: the classifier trained on the real training slices
    after a round trip through the model's VAE, at the size the model was scored at. Trained on the slices
    themselves, it reads fine texture no decoder of a small latent grid keeps (on the mini base it reads real
    validation slices after the round trip at 21 %, blurred by 1 px at 21 %): it could not tell a LoRA that learned
    its concepts from one that did not. Models sharing a VAE share its round trips."""
    clf = results.classifier
    space: dict = {}
    for name, decode in decoders.items():
        if clf is None or name not in clf.models:
            continue
        side = int(generated[name].images.shape[1])
        if (decode, side) not in space:
            train_s, val_s = (ImageSet(s.name, decode(s.images), s.classes, s.paths)
                              for s in (resized(real_train, side), resized(real_val, side)))
            thresholds = M.multi_otsu(train_s.images, 3)
            space[decode, side] = measure(train_s, thresholds), measure(val_s, thresholds), thresholds
        train, val, thresholds = space[decode, side]
        own = classifier(train, val, {name: measure(generated[name], thresholds)}, [])
        clf.models[name].decoder_accuracy = own.models[name].accuracy
        clf.models[name].decoder_ceiling = own.ceiling_accuracy


def _search_bank(real_root: Path, real_train: ImageSet, max_real) -> ImageSet:
    """Every training slice at the nearest-neighbour search size (reusing the loaded ones when none were capped)."""

    size = min(M.SEARCH_SIZE, real_train.images.shape[1])
    if max_real is None:
        return ImageSet(real_train.name, M.resize_set(real_train.images, size), real_train.classes, real_train.paths)
    return load_real(real_root, "train", size)


def _validation(real_root: Path, size, max_real) -> ImageSet:
    if (Path(real_root) / "validation" / "metadata.jsonl").is_file():
        return load_real(real_root, "validation", size, max_real)
    return ImageSet("real-validation", np.zeros((0, 1, 1), np.float32), [], [])


def evaluate_folders(suite: SuiteSettings, generated_dirs: list[Path], out: Path) -> Path:
    """The two-folder form: real slices (a prep output or an image folder) against generated folders."""
    names = [g.name for g in generated_dirs]
    if len(set(names)) != len(names):
        names = [f"{g.parent.name}/{g.name}" for g in generated_dirs]
    generated = {n: load_generated(g, n, suite.size) for n, g in zip(names, generated_dirs)}
    evaluate_sets(suite, generated, out)
    return out
