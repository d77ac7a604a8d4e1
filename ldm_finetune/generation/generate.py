"""`ldm-finetune generate`: images from prompts with a base model plus LoRA files and embeddings (any layout we
write: diffusers, kohya, A1111, pivotal folders or combined files), with a fit check before anything loads."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors import safe_open

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path, files_sha256, slug, to_image
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.generation.dataset import check_folder, concepts_for, dataset_record, run_concepts, write_dataset
from ldm_finetune.generation.scanner import pixel_size_for, run_pixel_sizes, run_windows, window_for, write_tiff
from ldm_finetune.generation.settings import GenerateSettings  # noqa: F401 (callers import it from here too)
from ldm_finetune.generation.tiled import plan_tiling, tiled
from ldm_finetune.models.hub_ids import load_error
from ldm_finetune.models.stable_diffusion import check_model_source, native_side, quiet_loading, render
from ldm_finetune.sharing.lora import check_lora_fits, lora_file, read_lora

# Sampler name -> diffusers scheduler class name, all built from the model's own scheduler config.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'path' or 'path:SCALE' (a Windows drive letter's colon is not a scale)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and re.fullmatch(r"[+-]?\d+(\.\d*)?|[+-]?\.\d+", scale):
        return path, float(scale)
    return text, 1.0


def set_scheduler(pipe, name: str | None) -> None:
    if name is None:
        return
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def load_pipeline(model: str, device: str | None = None, dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline from a local folder or hub id, with a clear error offline."""

    pipe = _load(model, device, dtype, lambda source, dtype: StableDiffusionPipeline.from_pretrained(
        source, dtype=dtype, safety_checker=None, requires_safety_checker=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(model: str, device: str | None = None, dtype: torch.dtype | None = None):
    """The VAE alone of the pipeline load_pipeline would load (none of the UNet's or text encoder's weights)."""
    return _load(model, device, dtype,
                 lambda source, dtype: AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype))


def _load(model: str, device: str | None, dtype: torch.dtype | None, load):
    """`load(source, dtype)` on `model`'s checked source, on `device` (default: the GPU if any, in fp16 there);
    a missing or offline model is one clear line."""
    source = check_model_source(model, key="--model")
    quiet_loading()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    try:
        loaded = load(source, dtype)
    except (OSError, ValueError) as exc:
        if source == model and not Path(source).exists():
            raise load_error(model, "--model", exc) from None
        raise UserError(f"--model {model}: cannot load ({str(exc).splitlines()[0]})") from None
    return loaded.to(device)


def apply_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Load each LoRA as its own adapter after checking it fits, then activate them all with their scales.

    A pivotal-tuning output works in both forms: its folder (pytorch_lora_weights.safetensors + embeddings/) or its
    one combined file (kohya LoRA keys + bundle_emb.* embeddings).
    """

    names = []
    for i, (path, scale) in enumerate(loras):
        file = lora_file(path)
        weights, metadata = read_lora(file)
        bundled = {k: v for k, v in weights.items() if k.startswith("bundle_emb.")}
        weights = {k: v for k, v in weights.items() if not k.startswith("bundle_emb.")}
        check_lora_fits(weights, pipe, str(file))
        if Path(path).is_dir() and RunLayout(path).embeddings.is_dir():
            apply_embeddings(pipe, [str(RunLayout(path).embeddings)])
        if bundled:
            load_bundled_embeddings(pipe, bundled, metadata)
        name = f"lora{i}"
        # a diffusers-layout file keeps its alpha in the header, which diffusers reads only from a file: handed the
        # tensors alone it takes alpha = rank (twice the strength at alpha = rank / 2). kohya-layout files carry
        # their alphas as tensors, so a combined file's LoRA part can go in as tensors.
        source = {"pretrained_model_name_or_path_or_dict": weights} if bundled else {
            "pretrained_model_name_or_path_or_dict": str(file.parent), "weight_name": file.name}
        pipe.load_lora_weights(**source, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])


def load_bundled_embeddings(pipe, bundled: dict, metadata: dict) -> None:
    """bundle_emb.<name>.string_to_param.* tensors -> tokens (the original token names are in the header)."""
    names = json.loads(metadata.get("ldm_finetune.tokens", "{}"))
    for key, vectors in bundled.items():
        name = key.split(".")[1]
        pipe.load_textual_inversion({names.get(name, name): vectors})


def apply_embeddings(pipe, embeddings: list[str]) -> list[str]:
    """Load Textual Inversion files (diffusers or A1111 layout, or a folder of them); returns the tokens added."""

    files = []
    for path in map(Path, embeddings):
        if path.is_dir():
            files += sorted(path.glob("*.safetensors"))
        elif path.is_file() and path.suffix == ".safetensors":
            files.append(path)
        else:
            raise UserError(f"--embedding {path}: expected a .safetensors embedding file or a folder of them")
    tokens = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
        # diffusers layout: {token: vectors}; A1111 layout: {"emb_params": vectors}, the prompt word is the file name
        token = (meta.get("ldm_finetune.token") or path.stem) if keys == ["emb_params"] else None
        if (token or keys[0]) in pipe.tokenizer.get_vocab():
            continue  # already loaded (e.g. the same embedding in two layouts)
        try:
            pipe.load_textual_inversion(str(path), token=token)
        except ValueError as exc:
            raise UserError(f"--embedding {path}: {str(exc).splitlines()[0]}") from None
        tokens.append(token or keys[0])
    return tokens


def _sha256(path: str) -> str:
    return files_sha256([lora_file(path) if Path(path).is_dir() else Path(path)])


def _facts(model: str, settings: GenerateSettings, pipe) -> dict:
    """What made an image, for its TIFF description: model, sampler, and the sha256 of every LoRA / embedding."""
    return {"model": model, "steps": settings.steps, "guidance": settings.guidance,
            "negative_prompt": settings.negative_prompt, "sampler": type(pipe.scheduler).__name__,
            "loras": [{"file": Path(p).name, "scale": s, "sha256": _sha256(p)} for p, s in settings.loras],
            "embeddings": [{"file": Path(p).name, "sha256": _sha256(p)} for p in settings.embeddings
                           if Path(p).is_file()],
            "generator": "ldm_finetune generate"}


def check_settings(settings: GenerateSettings) -> None:
    if settings.n < 1:
        raise UserError(f"--n {settings.n}: ask for at least one image")
    for side in (settings.height, settings.width):
        if side is not None and side % 8:
            raise UserError(f"--height/--width {side}: must be a multiple of 8")
    if settings.format not in ("png", "tiff"):
        raise UserError(f"--format {settings.format!r}: choose png or tiff")


def prepared_pipeline(model: str, settings: GenerateSettings, pipe=None):
    """The pipeline with the sampler, embeddings and LoRAs asked for, and a function drawing one image (H, W, 3)
    in [0, 1] for (prompt, seed) at the size asked for (tiled beyond the native size)."""
    if pipe is None:
        pipe = load_pipeline(model)
    tiling = plan_tiling(pipe, settings.height, settings.width, settings.tile, settings.tile_overlap,
                         settings.seamless)
    set_scheduler(pipe, settings.scheduler)
    apply_embeddings(pipe, settings.embeddings)
    apply_loras(pipe, settings.loras)
    height, width = settings.height or native_side(pipe), settings.width or native_side(pipe)

    def draw(prompts: list[str], seeds: list[int]) -> list[list]:
        with tiled(pipe, tiling, height, width):
            return render(pipe, prompts, seeds, settings.steps, settings.guidance, settings.negative_prompt,
                          height, width)

    return pipe, draw


def generate(model: str, settings: GenerateSettings, out: str | Path, pipe=None) -> list[Path]:
    """Write OUT/<prompt-slug>_<seed>.png (or .tif in scanner units) for every prompt and seed, and
    OUT/generation.json with the settings."""

    check_settings(settings)
    out = Path(out)
    windows = sizes = None
    if settings.format == "tiff":  # every prompt's window is settled before anything renders
        paths = [model] + [p for p, _ in settings.loras] + settings.embeddings
        recorded, pixel_sizes = run_windows(paths), run_pixel_sizes(paths)  # each file's header read once
        windows = {p: window_for(p, recorded, settings.window) for p in settings.prompts}
        sizes = {p: pixel_size_for(p, pixel_sizes) for p in settings.prompts}
    pipe, draw = prepared_pipeline(model, settings, pipe)
    seeds = [settings.seed + i for i in range(settings.n)]
    rows = draw(settings.prompts, seeds)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    facts = _facts(model, settings, pipe) if windows else None
    for prompt, row in zip(settings.prompts, rows):
        for seed, array in zip(seeds, row):
            if windows:
                window, state = windows[prompt]
                path = write_tiff(out / f"{slug(prompt)}_{seed}.tif", array, window,
                                  facts | sizes[prompt] | {"prompt": prompt, "seed": seed, "state": state})
            else:
                path = out / f"{slug(prompt)}_{seed}.png"
                with atomic_path(path) as tmp:
                    to_image(array, settings.grayscale).save(tmp, format="PNG")
            written.append(path)
    record = {"model": model, **asdict(settings), "files": [p.name for p in written]}
    (out / "generation.json").write_text(json.dumps(record, indent=2))
    return written


def generate_dataset(model: str, settings: GenerateSettings, out: str | Path, per_concept: int, pipe=None,
                     show_progress: bool = True) -> list[Path]:
    """`--dataset OUT --per-concept N`: N images per concept in prep's layout (generation/dataset.py)."""
    check_settings(settings)
    if per_concept < 1:
        raise UserError(f"--per-concept {per_concept}: ask for at least one image per concept")
    if settings.format != "png":
        raise UserError("--dataset writes grey PNGs as prep does (recipes train on them); drop --format tiff")
    paths = [model] + [p for p, _ in settings.loras] + settings.embeddings
    concepts = concepts_for(settings.prompts, run_concepts(paths))
    record = dataset_record(model, settings, paths[1:])
    check_folder(Path(out), record)  # before minutes of loading
    pipe, draw = prepared_pipeline(model, settings, pipe)
    return write_dataset(Path(out), concepts, per_concept, settings.seed,
                         lambda prompt, seed: draw([prompt], [seed])[0][0], record, run_windows(paths),
                         show_progress)
