"""LoRA modules on the diffusers UNet and the CLIP text encoder, through peft: which modules each target group
names, attaching fresh adapters, and reading their weights back (prefixed unet. / text_encoder.)."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict

# The LoRA target groups, by the module names diffusers gives them (peft matches name suffixes).
LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],  # self- and cross-attention projections (the study's choice)
    "feedforward": ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],  # rest of each transformer block
    "resnet": ["conv1", "conv2", "conv_shortcut", "time_emb_proj"],  # ResNet convolutions (LoCon-style)
}
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(unet, text_encoder, cfg) -> None:
    """Attach fresh LoRA adapters (`cfg`: a recipe's `lora:` section); their B matrices start at zero so training
    starts from the base model."""

    unet.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                    init_lora_weights="gaussian", target_modules=cfg.unet_modules()))
    if cfg.text_encoder:
        text_encoder.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                init_lora_weights="gaussian",
                                                target_modules=TEXT_ENCODER_LORA_TARGETS))


def _peft_metadata(model) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    data = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def lora_state_dict(unet, text_encoder=None) -> tuple[dict[str, torch.Tensor], dict]:
    """({'unet.<module>.lora_A.weight': tensor, ...}, {'unet.r': 16, ...}): weights and peft config, prefixed."""

    weights, adapter_metadata = {}, {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        meta = _peft_metadata(model) if model is not None else None
        if meta is None:
            continue
        for key, value in get_peft_model_state_dict(model).items():
            if prefix == "text_encoder" and not key.startswith("text_model."):
                # transformers 5 flattened CLIPTextModel (no .text_model); the diffusers layout, which every
                # diffusers version and kohya / ComfyUI read, keeps the historical text_model.* names
                key = "text_model." + key
            weights[f"{prefix}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
        adapter_metadata.update({f"{prefix}.{k}": v for k, v in meta.items()})
    return weights, adapter_metadata
