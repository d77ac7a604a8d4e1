"""`ldm-finetune evaluate CONFIG.yaml --out DIR`: generate what is missing from the models to compare, then run the
weight-free suite (evaluate.py) plus the prompt-drift probes.

    real: data/composite                   # prep output: train/ and validation/
    models:
      - {name: base, kind: sd, model: models/sd21-base}
      - {name: lora, kind: sd, model: models/sd21-base, loras: [runs/lora]}
      - {name: db, kind: sd, model: models/sd21-base, loras: [runs/lora_dreambooth],
         concepts: {dry/thickness: "a w17h3r texture"}}   # its own trigger words; only these classes
      - {name: ddpm, kind: pixel, model: runs/ddpm_pixel/model}
      - {name: mosaic, kind: local_score, patch: 5, classes: [dry/warp]}   # slow: one class only
      - {name: mine, kind: folder, path: my_samples}      # DIR/<state>__<orientation>/*.png
    concepts: {dry/thickness: "sf_dry sf_thickness", ...}  # class -> prompt for the SD models
    probes: [horse on a beach, two zebras, a texture]
    notes: ["what a reader must know first"]           # shown at the top of the report

Images go to OUT/images/<model>/<state>__<orientation>/<seed>.png and OUT/images/<model>/probes/; a rerun reuses
them and only generates the missing ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from PIL import Image

from ldm_finetune.core.classes import CLASS_COLUMNS, class_folder, split_class
from ldm_finetune.core.configtools import from_dict, load_yaml
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path, slug, to_image
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.data.world import SIZE as WORLD_SIZE
from ldm_finetune.data.world import parse_prompt
from ldm_finetune.evaluation import metrics as M
from ldm_finetune.evaluation.evaluate import SuiteSettings, evaluate_sets
from ldm_finetune.evaluation.results import ModelProbes, ProbeResult
from ldm_finetune.evaluation.imagesets import load_generated, load_real, load_rgb, resized
from ldm_finetune.evaluation.metrics import load_set
from ldm_finetune.evaluation.stats import compute_stats
from ldm_finetune.generation.generate import (
    apply_embeddings,
    apply_loras,
    load_pipeline,
    load_vae,
    parse_lora_arg,
    set_scheduler,
)
from ldm_finetune.generation.sample import baseline_slices
from ldm_finetune.models.denoisers import local_denoiser
from ldm_finetune.models.diffusion import make_schedule, sample, seeded
from ldm_finetune.models.pixel_unet import load_pixel_model
from ldm_finetune.models.stable_diffusion import native_side, render
from ldm_finetune.models.world_probe import load_probe
from ldm_finetune.sharing.metadata import trained_side

DEFAULT_PROBES = ["horse on a beach", "two zebras", "a texture"]


@dataclass
class ModelEntry:
    name: str  # label in the report and folder name under OUT/images
    kind: Literal["sd", "pixel", "local_score", "folder"]
    model: Optional[str] = None  # sd: base model (folder or hub id); pixel: OUTPUT_DIR/model of ddpm_pixel
    loras: list[str] = field(default_factory=list)  # sd: LoRA files or folders, "path[:scale]"
    embeddings: list[str] = field(default_factory=list)  # sd: Textual Inversion files or folders
    path: Optional[Path] = None  # folder: already generated images, DIR/<state>__<orientation>/*.png
    patch: int = 5  # local_score: patch side
    base: bool = False  # the reference model of the probes (default: the first sd model without adapters)
    # sd: class -> prompt for this model alone (fine-tunes have their own trigger words); only these classes
    concepts: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # evaluate on these classes only (e.g. a slow baseline)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise UserError(f"models: name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if self.kind in ("sd", "pixel") and not self.model:
            raise UserError(f"models[{self.name}]: kind {self.kind} needs model")
        if self.kind == "folder" and self.path is None:
            raise UserError(f"models[{self.name}]: kind folder needs path")


@dataclass
class SamplerSettings:
    steps: int = 30  # SD sampling steps
    guidance: float = 7.5  # SD classifier-free guidance
    scheduler: Optional[str] = None  # SD scheduler name (generate's --scheduler); null: the model's own
    negative_prompt: str = ""
    # SD image side; null: the size the model's LoRA / embedding was trained at (its header), else the base's own.
    # Sets smaller than the real slices are scored against real slices resized down to them
    resolution: Optional[int] = None
    # SD side of the drift probes; null: the model's own (its UNet sample size x the VAE factor, 512 for SD 1.5,
    # 768 for SD 2.1, 32 for the mini base): drift is what the model now draws where it used to draw well
    probe_resolution: Optional[int] = None
    pixel_sampler: Literal["ddpm", "ddim"] = "ddim"  # pixel DDPM and local-score baseline
    pixel_steps: int = 50
    pixel_eta: float = 0.0  # DDIM eta of the pixel DDPM (1: stochastic, better for a briefly trained model)
    pixel_guidance: float = 1.0
    pixel_guidance_rescale: float = 0.0  # generation/settings.py SampleSettings.guidance_rescale

    def __post_init__(self):
        if not 0.0 <= self.pixel_guidance_rescale <= 1.0:
            raise UserError(f"sampler.pixel_guidance_rescale: {self.pixel_guidance_rescale} is not a share; give "
                            "0 (off) to 1")
        for key in ("resolution", "probe_resolution"):
            side = getattr(self, key)
            if side is not None and side <= 0:
                raise UserError(f"sampler.{key}: {side} is not an image side; give a positive size in pixels "
                                "(a multiple of 8 for Stable Diffusion) or null for the default")


@dataclass
class EvalConfig:
    real: Path  # prep output (train/ + validation/)
    models: list[ModelEntry]
    concepts: dict[str, str] = field(default_factory=dict)  # class -> prompt for SD models (default: all classes)
    probes: list[str] = field(default_factory=lambda: list(DEFAULT_PROBES))  # prompt-drift probes
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7])  # one image per concept and seed
    probe_seeds: list[int] = field(default_factory=lambda: [0, 1])
    size: Optional[int] = None  # compare at this size (default: the real slices' size)
    max_real: Optional[int] = 100  # real slices per class and split
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    bootstrap: int = 50
    copy_ncc: float = 0.95
    seed: int = 0
    clip_model: Optional[Path] = None  # a local CLIP folder enables CLIP text/image scores of the probes
    # also read SD models' concepts against the real slices passed through their VAE (evaluate.decoder_accuracy):
    # one encode and decode per real slice, per base model
    decoder_space: bool = True
    notes: list[str] = field(default_factory=list)  # shown first in the report, after the automatic ones

    def __post_init__(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise UserError(f"models: names must differ (got {names})")
        if not self.seeds:
            raise UserError("seeds: give at least one seed")


def load_eval_config(path: Path) -> EvalConfig:
    try:
        return from_dict(EvalConfig, load_yaml(path))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _save(image: np.ndarray, path: Path, grey: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        to_image(image, grayscale=grey).save(tmp, format="PNG")


def _sd_pipeline(entry: ModelEntry):
    pipe = load_pipeline(entry.model)
    apply_embeddings(pipe, entry.embeddings)
    apply_loras(pipe, [parse_lora_arg(x) for x in entry.loras])
    return pipe


def generate_missing(cfg: EvalConfig, out: Path, classes: list[str], size: int) -> dict[str, Path]:
    """Make every missing concept image (and SD probe image) of every model; returns model -> image folder."""

    folders = {}
    loaded: dict = {}  # pixel models and baseline slices, each loaded once for this run
    for entry in cfg.models:
        if entry.kind == "folder":
            if not Path(entry.path).is_dir():
                raise UserError(f"models[{entry.name}].path: {entry.path} is not a folder")
            folders[entry.name] = Path(entry.path)
            continue
        folder = out / "images" / entry.name
        folders[entry.name] = folder
        wanted = [(c, s) for c in (entry.classes or list(entry.concepts) or classes) for s in cfg.seeds
                  if not (folder / class_folder(c) / f"{s:04d}.png").is_file()]
        probes = [(p, s) for p in cfg.probes for s in cfg.probe_seeds
                  if entry.kind == "sd" and not (folder / "probes" / f"{slug(p)}_{s:04d}.png").is_file()]
        if not wanted and not probes:
            continue
        print(f"generating {len(wanted) + len(probes)} images with {entry.name}")
        if entry.kind == "sd":
            pipe = _sd_pipeline(entry)
            set_scheduler(pipe, cfg.sampler.scheduler)
            side = cfg.sampler.resolution or _trained_side(entry) or native_side(pipe)
            for cls, seeds in _by_class(wanted).items():  # one batched call per class
                prompt = entry.concepts.get(cls) or cfg.concepts.get(cls) or _default_prompt(cls)
                (row,) = render(pipe, [prompt], seeds, cfg.sampler.steps, cfg.sampler.guidance,
                                cfg.sampler.negative_prompt, side, side)
                for seed, image in zip(seeds, row):
                    _save(image, folder / class_folder(cls) / f"{seed:04d}.png", grey=True)
            probe_side = cfg.sampler.probe_resolution or native_side(pipe)
            for prompt, seed in probes:
                (row,) = render(pipe, [prompt], [seed], cfg.sampler.steps, cfg.sampler.guidance,
                                cfg.sampler.negative_prompt, probe_side, probe_side)
                _save(row[0], folder / "probes" / f"{slug(prompt)}_{seed:04d}.png", grey=False)
        else:
            for cls, seeds in _by_class(wanted).items():  # one batch per class, each image from its own seed
                for seed, image in zip(seeds, _pixel_images(entry, cfg, cls, seeds, size, loaded)):
                    _save(image, folder / class_folder(cls) / f"{seed:04d}.png", grey=True)
    return folders


def _by_class(wanted: list[tuple[str, int]]) -> dict[str, list[int]]:
    """(class, seed) pairs grouped into each class's seeds, in order."""
    seeds: dict[str, list[int]] = {}
    for cls, seed in wanted:
        seeds.setdefault(cls, []).append(seed)
    return seeds


def _trained_side(entry: ModelEntry) -> int | None:
    """The side an SD entry's adapters were trained at, when their files record it: a LoRA trained at 32 px on a
    model drawn at 64 would otherwise be judged at a field of view it never saw."""
    paths = [Path(parse_lora_arg(x)[0]) for x in entry.loras] + [Path(p) for p in entry.embeddings]
    files = [f for p in paths
             for f in ([*RunLayout(p).adapter_files(), *sorted(p.glob("*.safetensors"))] if p.is_dir() else [p])]
    return trained_side(files)


def _pixel_images(entry: ModelEntry, cfg: EvalConfig, cls: str, seeds: list[int], size: int,
                  loaded: dict) -> list[np.ndarray]:
    """(H, W, 3) images in [0, 1] from the pixel DDPM or the local-score baseline, one per seed."""

    s = cfg.sampler
    if entry.kind == "pixel":

        if entry.model not in loaded:
            loaded[entry.model] = load_pixel_model(entry.model)
        model = loaded[entry.model]
        images, _ = model.sample(len(seeds), cls, s.pixel_sampler, s.pixel_steps, eta=s.pixel_eta,
                                 guidance=s.pixel_guidance, seed=seeds, guidance_rescale=s.pixel_guidance_rescale)
    else:

        key = ("local-score", cls)
        if key not in loaded:
            loaded[key] = baseline_slices(Path(cfg.real) / "train", cls, CLASS_COLUMNS, size, 64)
        slices = loaded[key]
        schedule = make_schedule("cosine")
        images, _ = sample(local_denoiser(slices.double(), entry.patch, schedule), (len(seeds), *slices.shape[1:]),
                           schedule, s.pixel_sampler, steps=s.pixel_steps, generator=seeded(seeds, len(seeds)),
                           clip=(-1.0, 1.0), dtype=torch.float64)
    grey = ((images[:, 0].float().clamp(-1, 1) + 1) / 2).cpu().numpy()
    return [np.repeat(g[..., None], 3, axis=2) for g in grey]


def _default_prompt(cls: str) -> str:
    state, orientation = split_class(cls)
    return f"sf_{state} sf_{orientation}"  # the prep's default caption style


def run_config(path: Path, out: Path) -> Path:
    cfg = load_eval_config(path)
    real = load_real(cfg.real, "train", cfg.size, cfg.max_real)
    classes = list(cfg.concepts) or real.known_classes()
    per_model = [(f"models[{m.name}].{key}", list(getattr(m, key)))
                 for m in cfg.models for key in ("concepts", "classes")]
    for where, names in [("concepts", classes)] + per_model:
        unknown = [c for c in names if c not in real.known_classes()]
        if unknown:
            raise UserError(f"{path}: {where}: {unknown[0]!r} is not a class of {cfg.real} "
                            f"(it has {', '.join(real.known_classes())})")
    size = int(real.images.shape[1])
    folders = generate_missing(cfg, out, classes, size)
    # each set at its own size, shrunk to the real slices' size when larger; evaluate_sets scores smaller ones at
    # their own size against real slices resized down to it
    generated = {name: load_generated(folder, name, None) for name, folder in folders.items()}
    generated = {name: resized(g, size) if g.images.shape[1] > size else g for name, g in generated.items()}
    skipped: list[dict] = []
    probes = probe_metrics(cfg, folders, real, size, skipped)
    suite = SuiteSettings(cfg.real, size, cfg.max_real, cfg.bootstrap, cfg.seed, cfg.copy_ncc)
    evaluate_sets(suite, generated, out, real, notes=_notes(cfg) + cfg.notes, probes=probes, skipped=skipped,
                  decoders=_decoders(cfg) if cfg.decoder_space else {})
    return out


def _decoders(cfg: EvalConfig) -> dict:
    """Each SD model's VAE round trip; models on one base share it (adapters leave the VAE as it was)."""
    round_trips: dict = {}
    for entry in cfg.models:
        if entry.kind == "sd" and entry.model not in round_trips:
            round_trips[entry.model] = _round_trip(load_vae(entry.model))
    return {entry.name: round_trips[entry.model] for entry in cfg.models if entry.kind == "sd"}


def _round_trip(vae, pixels_per_batch: int = 2**19):
    """(N, H, W) grey images in [0, 1] -> the same through the VAE: encoded (the posterior's mean), decoded. Batches
    hold about `pixels_per_batch` pixels: 512 at 32 px, 2 at SD's 512 px (about 1 GB of decoder activations in fp16)."""
    def decode(images: np.ndarray) -> np.ndarray:
        out = []
        batch = max(1, pixels_per_batch // (images.shape[1] * images.shape[2]))
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).float()[:, None].expand(-1, 3, -1, -1) * 2 - 1
            with torch.no_grad():
                y = vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample
            out.append(((y.float().mean(1).clamp(-1, 1) + 1) / 2).cpu().numpy())
        return np.concatenate(out) if out else images
    return decode


def _notes(cfg: EvalConfig) -> list[str]:
    """Plain warnings for the top of the report, e.g. when a base model is the tiny random-init one."""

    notes = []
    for entry in cfg.models:
        if entry.kind != "sd" or not Path(entry.model).is_dir():
            continue
        config = Path(entry.model) / "unet" / "config.json"
        if config.is_file() and max(json.loads(config.read_text())["block_out_channels"]) < 128:
            notes.append(f"{entry.name}: built on a tiny random-init Stable Diffusion ({entry.model}); its images "
                         "show that the pipeline runs (mechanics only), not what a real model learns.")
    return notes


def probe_metrics(cfg: EvalConfig, folders: dict[str, Path], real, size: int,
                  skipped: list) -> ProbeResult | None:
    """Base vs each fine-tuned SD model on the probe prompts with identical seeds: SSIM / PSNR, colourfulness ratio,
    CT-leakage (share of fine-tuned probe images nearer the CT set than the base model's probes, in descriptor
    space). CLIP scores only with a local CLIP model."""

    sd = [m for m in cfg.models if m.kind == "sd"]
    base = next((m for m in sd if m.base), None) or next((m for m in sd if not m.loras and not m.embeddings), None)
    if base is None or len(sd) < 2 or not cfg.probes:
        skipped.append({"what": "prompt-drift probes", "reason": "need a base SD model and a fine-tuned one"})
        return None
    skipped.append({"what": "LPIPS, KID", "reason": "need pretrained network weights; none are configured "
                    "(only the weight-free probes ran)"})
    if cfg.clip_model is None:
        skipped.append({"what": "CLIP text/image scores", "reason": "no local CLIP model (set clip_model: PATH)"})
    thresholds = M.multi_otsu(real.images, 3)
    real_desc = compute_stats(real.images, thresholds).descriptors()
    scale = M.Standardizer(real_desc)
    out = ProbeResult(base.name)
    # a mini base carries the probe that reads its world: the ground truth the weight-free scores are checked against
    probe_file = Path(base.model) / "probe.safetensors"
    world_probe = load_probe(Path(base.model)) if probe_file.is_file() else None
    for entry in sd:
        if entry is base:
            continue
        rows, grids, all_base, all_ft = {}, {}, [], []
        for prompt in cfg.probes:
            files = [f"{slug(prompt)}_{s:04d}.png" for s in cfg.probe_seeds]
            b_rgb = [load_rgb(folders[base.name] / "probes" / f) for f in files]
            f_rgb = [load_rgb(folders[entry.name] / "probes" / f) for f in files]
            b_grey = load_set([folders[base.name] / "probes" / f for f in files], size)
            f_grey = load_set([folders[entry.name] / "probes" / f for f in files], size)
            all_base.append(b_grey)
            all_ft.append(f_grey)
            colour_b = np.mean([M.colourfulness(x) for x in b_rgb])
            colour_f = np.mean([M.colourfulness(x) for x in f_rgb])
            rows[prompt] = {"ssim": float(np.mean([M.ssim(a, b) for a, b in zip(b_grey, f_grey)])),
                            "psnr": float(np.mean([min(M.psnr(a, b), 99.0) for a, b in zip(b_grey, f_grey)])),
                            "colourfulness_ratio": float(colour_f / colour_b) if colour_b > 0 else float("nan")}
            if world_probe is not None and _is_world_prompt(prompt):
                rows[prompt]["world_probe_base"] = _world_probe_ok(world_probe, b_rgb, prompt)
                rows[prompt]["world_probe_tuned"] = _world_probe_ok(world_probe, f_rgb, prompt)
            # metrics.json holds numbers and paths: the report draws the images from these files
            grids[prompt] = {side: [str(folders[name] / "probes" / f) for f in files]
                             for side, name in (("base", base.name), ("tuned", entry.name))}
        base_desc = scale(compute_stats(np.concatenate(all_base), thresholds).descriptors())
        ct = scale(real_desc)
        for i, prompt in enumerate(cfg.probes):
            ft_desc = scale(compute_stats(all_ft[i], thresholds).descriptors())
            near_ct = M.pairwise_msd(ft_desc, ct).min(1)
            near_base = M.pairwise_msd(ft_desc, base_desc).min(1)
            rows[prompt]["ct_leakage"] = float((near_ct < near_base).mean())
        out.models[entry.name] = ModelProbes(rows, grids, class_prompts(entry))
        out.side = int(b_rgb[0].shape[1])
    return out


def class_prompts(entry: ModelEntry) -> list[str]:
    """The DreamBooth class prompts the model's runs trained with (their config.yaml's data.concepts), so the report
    can point at the probe row prior preservation exists to protect."""
    found = []
    for text in entry.loras + entry.embeddings:
        path = Path(parse_lora_arg(text)[0])
        # a run folder, a file in one, or a folder in one (the embeddings/ folder)
        config = next((c for c in (RunLayout(path).config, RunLayout(path.parent).config) if c.is_file()), None)
        if config is not None:
            concepts = (load_yaml(config).get("data") or {}).get("concepts") or []
            found += [c["class_prompt"] for c in concepts if c.get("class_prompt")]
    return list(dict.fromkeys(found))


def _is_world_prompt(prompt: str) -> bool:
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def _world_probe_ok(probe, images: list[np.ndarray], prompt: str) -> float:
    """Share of the images the world probe reads as the prompt asks (at the world's own size)."""
    small = np.stack([np.asarray(Image.fromarray(np.round(x * 255).astype(np.uint8)).resize(
        (WORLD_SIZE, WORLD_SIZE), Image.BILINEAR), dtype=np.float32) / 255 for x in images])
    return float(np.mean([c["ok"] for c in probe.check(small, [prompt] * len(images))]))


