"""`ldm-finetune export SOURCE --format checkpoint --out FILE.safetensors [--lora FILE[:SCALE] ...] [--half]`: one
single-file checkpoint in the original LDM layout, the form A1111, ComfyUI's checkpoint loader and kohya load.

SOURCE is a full fine-tune's run folder (its `pipeline/`, EMA weights when EMA was on), a LoRA run's folder (its
base model with its LoRA fused in), or any diffusers model folder or hub id; `--lora` fuses more LoRAs at their scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm_finetune.core.configtools import load_yaml
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.generation.generate import apply_loras, load_pipeline
from ldm_finetune.models.stable_diffusion import base_model_info
from ldm_finetune.sharing.checkpoint import write_checkpoint
from ldm_finetune.sharing.lora import lora_file
from ldm_finetune.sharing.metadata import file_header


def _resolve(source: str) -> tuple[str, dict[str, str], list[tuple[str, float]]]:
    """(model to load, the training header it carries, LoRAs the source itself implies)."""
    path = Path(source).expanduser()
    layout = RunLayout(path)
    for folder in (layout.pipeline, path):  # a full fine-tune's run folder, or a diffusers model folder
        if (folder / "model_index.json").is_file():
            meta = folder / "training_metadata.json"
            return str(folder), json.loads(meta.read_text()) if meta.is_file() else {}, []
    if layout.lora.is_file() and layout.config.is_file():  # a LoRA run: its base, with its LoRA
        base = load_yaml(layout.config).get("model", {}).get("pretrained")
        if not base:
            raise UserError(f"{layout.config}: no model.pretrained; pass the base model as SOURCE and the run as "
                            "--lora")
        return str(base), {}, [(str(path), 1.0)]
    if path.exists():
        raise UserError(f"{source}: not a diffusers model folder, a full fine-tune's run folder or a LoRA run folder")
    return source, {}, []  # a hub id: load_pipeline says what is wrong with it


def _check_family(family: str, loras: list[tuple[str, float]]) -> None:
    """A LoRA whose header names another SD family than the model's is refused before its widths are even looked
    at (the widths catch SD 1 vs 2; this also catches 2.x-512 vs 2.x-768-v, which share every shape)."""
    for path, _ in loras:
        meta = file_header(lora_file(path))
        theirs = meta.get("ldm_finetune.base_family") or meta.get("ss_base_model_version")
        if theirs in ("sd_v1", "sd_v2", "sd_v2_v") and family in ("sd_v1", "sd_v2", "sd_v2_v") and theirs != family:
            raise UserError(f"--lora {path}: trained for {theirs} ({meta.get('ldm_finetune.base_model', '?')}), "
                            f"the model is {family}; fuse it into a checkpoint of its own base")


def _header(model: str, info: dict[str, str], prediction_type: str, carried: dict[str, str],
            loras: list[tuple[str, float]]) -> dict[str, str]:
    header = {k: v for k, v in carried.items() if k.startswith(("ldm_finetune.", "modelspec."))}
    header.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": info["architecture"],  # a whole model: the base's own id, no adapter suffix
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",  # the LDM key layout
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "ldm_finetune.base_model": carried.get("ldm_finetune.base_model", info["base_model"]),
        "ldm_finetune.base_family": info["family"],
        "ldm_finetune.prediction_type": prediction_type,
    })
    header.setdefault("modelspec.title", Path(model).name)
    if loras:
        fused = [{"file": lora_file(p).name, "scale": s,
                  "sha256": file_header(lora_file(p)).get("modelspec.hash_sha256", "?")} for p, s in loras]
        header["ldm_finetune.fused_loras"] = json.dumps(fused)
    return header


def export_checkpoint(source: str, out: str | Path, loras: list[tuple[str, float]] = (), half: bool = False,
                      overwrite: bool = False) -> list[Path]:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a checkpoint file must end in .safetensors (pickled .ckpt files can run code)")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")
    model, carried, implied = _resolve(source)
    loras = implied + list(loras)
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    prediction_type = pipe.scheduler.config.prediction_type
    info = base_model_info(model, pipe.unet, prediction_type)  # hashes the UNet's weights once
    _check_family(info["family"], loras)
    vocabulary = pipe.text_encoder.get_input_embeddings().num_embeddings
    apply_loras(pipe, loras)  # each one's fit to this model is checked before it loads
    if pipe.text_encoder.get_input_embeddings().num_embeddings != vocabulary:
        # a checkpoint holds no tokenizer: clients tokenize with their own, so new token rows would only break the
        # text encoder's shape in every one of them
        raise UserError(f"{source}: brings Textual Inversion tokens, which a single-file checkpoint cannot carry; "
                        "fuse its LoRA alone (--lora RUN/pytorch_lora_weights.safetensors) and share the embedding "
                        "file beside the checkpoint")
    if loras:
        pipe.fuse_lora(components=["unet", "text_encoder"])  # at the scales apply_loras set
        pipe.unload_lora_weights()  # peft's layers go; the fused base weights stay
    return write_checkpoint(pipe, out, _header(model, info, prediction_type, carried, loras), prediction_type, half)
