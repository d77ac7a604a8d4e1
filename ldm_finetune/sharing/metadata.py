"""What travels with a shared file: training metadata in the safetensors header, and a model card.

Header keys are strings (a safetensors rule). Ours start with `ldm_finetune.`; the `modelspec.*` keys follow
Stability AI's model-spec convention, which A1111 / ComfyUI show in their model browsers.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import torch
import yaml

from ldm_finetune.core.configtools import to_dict

# what a generated slice needs to map back to the scanner (generation/scanner.py): prep's intensity window per state,
# {state: [lo, hi]}, and one pixel's side per class at the training size, {state/orientation: [size, unit]}
WINDOWS_KEY = "ldm_finetune.windows"
PIXEL_SIZES_KEY = "ldm_finetune.pixel_sizes"

_LIBRARIES = ("ldm_finetune", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors")


def library_versions() -> dict[str, str]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma/space-separated word appears in the training captions (A1111 shows these)."""
    counts = collections.Counter(word for c in captions for word in c.replace(",", " ").split())
    return dict(counts.most_common())


def tensors_sha256(tensors: dict) -> str:
    """ModelSpec's hash_sha256 of a file's weights: sha256 over its tensors' bytes in key order (the header, which
    holds this hash, is left out)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "0x" + h.hexdigest()


def file_header(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def trained_side(files: list[Path]) -> int | None:
    """The image side the first of `files` that records one was trained at (`modelspec.resolution`, "RxR")."""
    for f in files:
        if Path(f).is_file() and Path(f).suffix == ".safetensors":
            side = file_header(Path(f)).get("modelspec.resolution", "").partition("x")[0]
            if side.isdigit():
                return int(side)
    return None


def manifest_sha256(train_dir: Path) -> str | None:
    """sha256 of the prep manifest next to the training folder, tying a model to the exact dataset."""
    for candidate in (train_dir / "manifest.json", train_dir.parent / "manifest.json"):
        if candidate.is_file():
            return hashlib.sha256(candidate.read_bytes()).hexdigest()
    return None


def shareable_config(cfg) -> dict:
    """The resolved config as it travels in a shared file: local folders reduced to their names (a path on the
    trainer's machine means nothing elsewhere and can say more than intended)."""
    data = to_dict(cfg)

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or Path(value).exists()):
            return Path(value).name
        return value

    return strip(data)


def training_header(cfg, base: dict[str, str], captions: list[str], trigger_words: list[str], step: int,
                    prediction_type: str, modelspec_suffix: str | None = "lora",
                    num_train_images: int | None = None, windows: dict | None = None,
                    pixel_sizes: dict | None = None) -> dict[str, str]:
    architecture = base["architecture"] + (f"/{modelspec_suffix}" if modelspec_suffix else "")
    header = {
        "ldm_finetune.recipe": cfg.recipe,
        "ldm_finetune.config": json.dumps(shareable_config(cfg), sort_keys=True),
        "ldm_finetune.base_model": base["base_model"],
        "ldm_finetune.base_family": base["family"],
        "ldm_finetune.trigger_words": json.dumps(trigger_words),
        "ldm_finetune.tag_frequency": json.dumps(tag_frequency(captions)),
        "ldm_finetune.global_step": str(step),
        "ldm_finetune.prediction_type": prediction_type,
        "ldm_finetune.versions": json.dumps(library_versions(), sort_keys=True),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": Path(cfg.output_dir).name,
        "modelspec.author": os.environ.get("LDM_FINETUNE_AUTHOR", "ldm_finetune"),
        "modelspec.description": f"{cfg.recipe} adapter for {base['base_model']}, trained with ldm_finetune on "
                                 f"X-ray tomography slices of a 3D-woven composite ({step} steps)",
        "modelspec.trigger_phrase": ", ".join(trigger_words),
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": f"{cfg.data.resolution}x{cfg.data.resolution}",
    }
    if num_train_images is not None:
        header["ldm_finetune.num_train_images"] = str(num_train_images)
    if windows:  # prep's intensity window per state: `generate --format tiff` maps back to scanner units with it
        header[WINDOWS_KEY] = json.dumps(windows, sort_keys=True)
    if pixel_sizes:  # a pixel's side per class at the training size: generated TIFFs carry it for measuring
        header[PIXEL_SIZES_KEY] = json.dumps(pixel_sizes, sort_keys=True)
    if "base_model_sha256" in base:
        header["ldm_finetune.base_model_sha256"] = base["base_model_sha256"]
    digest = manifest_sha256(Path(cfg.data.train_dir))
    if digest:
        header["ldm_finetune.dataset_manifest_sha256"] = digest
    return header


def write_model_card(layout, cfg, adapter, header: dict[str, str], trigger_words: list[str],
                     sample_grid: str | None, files: list[str]) -> Path:
    """README.md with the Hub's front matter, the trigger words, how to load the files (the adapter says), and
    the sample grid."""
    base = header["ldm_finetune.base_model"]
    front = {"base_model": base, "library_name": "diffusers", "license": "other",
             "tags": ["stable-diffusion", "text-to-image", "diffusers", cfg.recipe, "ldm_finetune",
                      "x-ray-tomography"],
             "instance_prompt": trigger_words[0] if trigger_words else None}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(cfg.output_dir).name}", "",
             f"A `{cfg.recipe}` adapter for `{base}` trained with ldm_finetune on X-ray tomography slices of a "
             f"3D-woven composite ({header['ldm_finetune.global_step']} steps at {cfg.data.resolution} px).", "",
             "## Trigger prompts (the training captions)", ""]
    lines += [f"- `{w}`" for w in trigger_words] or ["(none)"]
    prompt = trigger_words[0] if trigger_words else "a texture"
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    lines += ["", "## Use it", "", "```python"] + adapter.usage_lines(base, prompt) + ["```", ""]
    if adapter.sharing_note():
        lines += [adapter.sharing_note(), ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    rows = {"base model sha256": header.get("ldm_finetune.base_model_sha256", "-"),
            "prediction type": header["ldm_finetune.prediction_type"],
            "dataset manifest sha256": header.get("ldm_finetune.dataset_manifest_sha256", "-"),
            "learning rate": cfg.train.learning_rate, "batch size": cfg.train.batch_size,
            "gradient accumulation": cfg.train.gradient_accumulation_steps,
            "mixed precision": cfg.train.mixed_precision, "offset noise": cfg.noise.offset,
            "min-SNR gamma": cfg.noise.min_snr_gamma}
    if WINDOWS_KEY in header:
        rows["scanner window per state (prep)"] = ", ".join(
            f"{k} [{lo:g}, {hi:g}]" for k, (lo, hi) in sorted(json.loads(header[WINDOWS_KEY]).items()))
    if PIXEL_SIZES_KEY in header:
        rows["pixel size per class"] = ", ".join(
            f"{k} {size:g} {unit}" for k, (size, unit) in sorted(json.loads(header[PIXEL_SIZES_KEY]).items()))
    rows.update(adapter.card_rows())
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    if sample_grid:
        lines += ["", "## Samples", "", "Validation prompts (rows) x seeds (columns):", "",
                  f"![samples]({sample_grid})", ""]
        lines += [f"{i + 1}. `{p}`" for i, p in enumerate(cfg.validation.prompts)]
    lines += ["", "The full resolved training config is in `config.yaml` and in the file's header "
              "(`ldm_finetune.config`).", ""]
    path = layout.model_card
    path.write_text("\n".join(lines))
    return path
