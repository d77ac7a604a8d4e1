"""`ldm-finetune sample`: grey slices from a trained pixel DDPM, or from the training-free local-score baseline
(reverse diffusion with the locally constrained optimal denoiser of seed 000), with the project's DDPM / DDIM
samplers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ldm_finetune.core.classes import CLASS_COLUMNS
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path, files_sha256, load_image
from ldm_finetune.data.images import to_pixel_values
from ldm_finetune.data.records import (class_name, pixel_sizes, read_records, scanner_windows, select_records,
                                       training_classes)
from ldm_finetune.generation.scanner import (parse_window, pixel_size_for, run_pixel_sizes, run_windows, window_for,
                                             write_tiff)
from ldm_finetune.generation.settings import SampleSettings
from ldm_finetune.models.denoisers import local_denoiser
from ldm_finetune.models.diffusion import ddim_timesteps, make_schedule, sample
from ldm_finetune.models.pixel_unet import load_pixel_model, to_grey_arrays


def baseline_slices(train_dir: Path, wanted: str | None, columns: list[str], resolution: int,
                    max_images: int) -> torch.Tensor:
    """(N, 1, R, R) training slices in [-1, 1] for the local-score baseline (one class, or all)."""

    records = read_records(train_dir)
    if wanted is not None:
        known = training_classes(records, columns)
        if wanted not in known:
            raise UserError(f"--class {wanted!r} is not in {train_dir}; it has {', '.join(known)}")
        records = [r for r in records if class_name(r, columns) == wanted]
    records = select_records(records, {}, max_images)
    return torch.stack([to_pixel_values(load_image(r.path), resolution, rgb=False) for r in records])


def _trajectory_steps(text: str, sampler: str, steps: int, T: int = 1000) -> list[int]:
    """The requested timesteps; with DDIM each snaps to the nearest timestep the sampler visits."""

    try:
        wanted = [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--trajectory {text!r}: expected timesteps separated by commas, e.g. 999,500,100") from None
    if any(not 0 <= t < T for t in wanted):
        raise UserError(f"--trajectory {text!r}: timesteps run from {T - 1} (pure noise) down to 0")
    if sampler == "ddim":
        visited = ddim_timesteps(T, steps)
        wanted = [min(visited, key=lambda v: abs(v - t)) for t in wanted]
    return sorted(set(wanted), reverse=True)


def sample_images(s: SampleSettings) -> list[Path]:
    """Write OUT/<class>_<seed>_<i>.png (8- or 16-bit grey) or .tif (scanner units), the trajectory images and
    sampling.json."""

    trajectory = _trajectory_steps(s.trajectory, s.sampler, s.steps) if s.trajectory else []
    if s.n < 1:
        raise UserError(f"--n {s.n}: ask for at least one image")
    if not 0.0 <= s.guidance_rescale <= 1.0:
        raise UserError(f"--guidance-rescale {s.guidance_rescale}: a share from 0 (off) to 1 (the whole rescale)")
    if s.baseline == "local-score" and s.train_dir is None:
        raise UserError("--baseline local-score needs --train-dir (a prep output's train/ folder)")
    if s.baseline != "local-score" and s.model is None:
        raise UserError("sample needs --model DIR (a pixel DDPM model folder) or --baseline local-score")
    scanner = _scanner_settings(s) if s.format == "tiff" else None  # refusals before minutes of sampling
    if s.baseline == "local-score":
        schedule = make_schedule(s.schedule)
        slices = baseline_slices(s.train_dir, s.class_name, CLASS_COLUMNS, s.resolution,
                                 s.max_images)
        images, saved = sample(local_denoiser(slices.double(), s.patch, schedule), (s.n, *slices.shape[1:]),
                               schedule, s.sampler, steps=s.steps, eta=s.eta,
                               generator=torch.Generator().manual_seed(s.seed), clip=(-1.0, 1.0),
                               trajectory=set(trajectory), dtype=torch.float64)
        source = {"baseline": "local-score", "patch": s.patch, "train_dir": str(s.train_dir),
                  "training_images": len(slices), "schedule": s.schedule}
    else:
        model = load_pixel_model(s.model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        images, saved = model.sample(s.n, s.class_name, s.sampler, s.steps, s.eta, s.guidance,
                                     s.seed, trajectory, device, s.guidance_rescale)
        source = {"model": str(s.model), "guidance": s.guidance, "guidance_rescale": s.guidance_rescale}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (s.class_name or "all").replace("/", "-")
    written = []
    if scanner is not None:
        window, facts = scanner
        facts |= {**source, "class": s.class_name, "sampler": s.sampler, "steps": s.steps, "eta": s.eta}
        for i, image in enumerate(((images.float().clamp(-1, 1) + 1) / 2).cpu().numpy()):
            written.append(write_tiff(out / f"{stem}_{s.seed}_{i:03d}.tif", image[0], window,
                                      facts | {"seed": s.seed, "index": i}))
    else:
        for i, array in enumerate(to_grey_arrays(images.float(), s.bits)):
            path = out / f"{stem}_{s.seed}_{i:03d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
            written.append(path)
    for t, x_t in saved.items():
        for i, array in enumerate(to_grey_arrays(x_t.float(), 8)):
            folder = out / "trajectory"
            folder.mkdir(exist_ok=True)
            Image.fromarray(array).save(folder / f"{stem}_{s.seed}_{i:03d}_t{t:04d}.png")
    record = {**source, "class": s.class_name, "n": s.n, "sampler": s.sampler, "steps": s.steps,
              "eta": s.eta, "seed": s.seed, "trajectory": trajectory, "files": [p.name for p in written]}
    (out / "sampling.json").write_text(json.dumps(record, indent=2))
    return written


def _scanner_settings(s: SampleSettings) -> tuple[tuple[float, float], dict]:
    """The window and the facts a TIFF of this class gets: from the model folder's record, or for the baseline from
    its training slices' metadata rows."""
    if s.baseline == "local-score":
        records = read_records(s.train_dir)
        windows = {k: tuple(v) for k, v in scanner_windows(records).items()}
        sizes = {k: tuple(v) for k, v in pixel_sizes(records, s.resolution).items()}
        model_facts = {}
    else:
        paths = [str(s.model)]
        windows, sizes = run_windows(paths), run_pixel_sizes(paths)
        weights = sorted(Path(s.model).rglob("diffusion_pytorch_model.safetensors"))
        model_facts = {"model_sha256": files_sha256(weights)} if weights else {}
    named = (s.class_name or "").replace("/", " ")  # 'dry-compacted/warp' names dry-compacted and warp as words
    window, state = window_for(named, windows, parse_window(s.window) if s.window else None, what="--class")
    facts = {**model_facts, **pixel_size_for(named, sizes), "state": state, "generator": "ldm_finetune sample"}
    return window, facts
