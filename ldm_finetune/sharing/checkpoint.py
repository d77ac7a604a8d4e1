"""Single-file checkpoints in the original LDM layout (CompVis / Stability's `model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`): what A1111, ComfyUI's checkpoint loader and kohya sd-scripts load.

The key names are those of the original latent-diffusion code (`openaimodel.UNetModel`, the KL autoencoder, and the
text encoders: OpenAI CLIP under `cond_stage_model.transformer.` for SD 1.x, OpenCLIP under `cond_stage_model.model.`
with fused q/k/v for SD 2.x). SD 2.x's OpenCLIP tower has one block more than SD uses (it reads the penultimate
layer); diffusers' CLIPTextModel form holds only the 23 used ones, and so does this file: loaders skip the 24th.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from ldm_finetune.core.io import atomic_path
from ldm_finetune.sharing.metadata import tensors_sha256

# --- UNet ----------------------------------------------------------------------------------------------------------

_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_prefixes(config) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix. LDM numbers the UNet's blocks in one sequence per side: each
    down level holds L (resnet, attention) pairs then its downsampler; each up level L + 1 pairs then its upsampler,
    placed after the attention when the level has one."""
    L = config.layers_per_block
    out = dict(_UNET_TOP)
    for i in range(len(config.down_block_types)):
        for j in range(L):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(L + 1) * i + j + 1}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(L + 1) * i + j + 1}.1."
        out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(L + 1) * (i + 1)}.0.op."
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    for i, kind in enumerate(config.up_block_types):
        for j in range(L + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(L + 1) * i + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(L + 1) * i + j}.1."
        slot = 2 if "CrossAttn" in kind else 1
        out[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{(L + 1) * i + L}.{slot}.conv."
    return _longest_first(out)


def _longest_first(prefixes: dict[str, str]) -> dict[str, str]:
    """The prefixes in the order _rename tries them: 'down_blocks.1.resnets.1.' before 'down_blocks.1.'-style
    shorter ones, so the most specific prefix wins."""
    return dict(sorted(prefixes.items(), key=lambda item: -len(item[0])))


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    """The first (longest) matching module prefix replaced, then the next name through `inner` (a block's own
    names)."""
    module = next(p for p in prefixes if key.startswith(p))
    head, dot, tail = key[len(module):].partition(".")
    return prefixes[module] + (f"{inner.get(head, head)}.{tail}" if dot else head)


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, prefixes, _RESNET if ".resnets." in key else {})
        out["model.diffusion_model." + new] = value
    return out


# --- VAE -----------------------------------------------------------------------------------------------------------

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _vae_prefixes(config) -> dict[str, str]:
    """LDM's decoder numbers its up levels from the lowest resolution's end (up.{n-1} runs first)."""
    n = len(config.block_out_channels)
    out = {}
    for side in ("encoder", "decoder"):
        out[f"{side}.conv_in."] = f"{side}.conv_in."
        out[f"{side}.conv_out."] = f"{side}.conv_out."
        out[f"{side}.conv_norm_out."] = f"{side}.norm_out."
        out[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        out[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        out[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    for i in range(n):
        for j in range(config.layers_per_block):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        out[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        for j in range(config.layers_per_block + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        out[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{n - 1 - i}.upsample.conv."
    out["quant_conv."] = "quant_conv."
    out["post_quant_conv."] = "post_quant_conv."
    return _longest_first(out)


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefixes(config)
    out = {}
    for key, value in state_dict.items():
        if ".attentions." in key:  # LDM's VAE attention is 1x1 convolutions: (C, C) -> (C, C, 1, 1)
            for old, new in _VAE_ATTENTION.items():
                key = key.replace("." + old, "." + new)
            value = value[:, :, None, None] if value.ndim == 2 else value
        out["first_stage_model." + _rename(key, prefixes, _VAE_RESNET if ".resnets." in key else {})] = value
    return out


# --- text encoders -------------------------------------------------------------------------------------------------

def _text_model_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel's keys under text_model.* (transformers 5 dropped the prefix; LDM files have it)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state_dict.items()
            if not k.endswith("position_ids")}


_OPENCLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_LAYER_KEY = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x: OpenAI CLIP's transformers layout under cond_stage_model.transformer."""
    return {"cond_stage_model.transformer." + k: v for k, v in _text_model_keys(state_dict).items()}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP's own layout under cond_stage_model.model. (q, k, v fused into in_proj, the positional
    embedding a bare parameter)."""
    sd = _text_model_keys(state_dict)
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           p + "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           p + "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
           p + "ln_final.bias": sd.pop("text_model.final_layer_norm.bias")}
    layers = sorted({int(_LAYER_KEY.match(k).group(1)) for k in sd})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{x}_proj.{kind}")
                                                          for x in ("q", "k", "v")])
        for key in [k for k in sd if k.startswith(src)]:
            rest = key[len(src):]
            name = next(n for n in _OPENCLIP_LAYER if rest.startswith(n))
            out[dst + _OPENCLIP_LAYER[name] + rest[len(name):]] = sd.pop(key)
    assert not sd, f"text-encoder keys left unmapped: {sorted(sd)[:3]}"
    return out


def uses_open_clip(text_encoder) -> bool:
    """SD 2.x's text tower is OpenCLIP (GELU); SD 1.x's is OpenAI CLIP (quick GELU). The activation, not the width,
    tells them apart, so small test models of either kind take the right layout."""
    return text_encoder.config.hidden_act == "gelu"


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, text encoder) as one LDM-layout state dict, contiguous tensors."""
    sd = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    sd |= vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    text = pipe.text_encoder.state_dict()
    sd |= open_clip_to_ldm(text) if uses_open_clip(pipe.text_encoder) else clip_to_ldm(text)
    return {k: v.detach().contiguous() for k, v in sd.items()}


# --- the config file A1111 reads beside a checkpoint ---------------------------------------------------------------

def ldm_config(pipe, prediction_type: str) -> dict:
    """The original inference config of this pipeline's architecture (what the latent-diffusion code builds from);
    A1111 reads it from FILE.yaml beside FILE.safetensors, which is how it learns that a model predicts v."""
    unet, vae, sched = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    base = unet.block_out_channels[0]
    heads = unet.attention_head_dim
    attention_levels = [2 ** i for i, kind in enumerate(unet.down_block_types) if "CrossAttn" in kind]
    open_clip = uses_open_clip(pipe.text_encoder)
    unet_params = {
        "image_size": 32, "in_channels": unet.in_channels, "out_channels": unet.out_channels, "model_channels": base,
        "attention_resolutions": attention_levels, "num_res_blocks": unet.layers_per_block,
        "channel_mult": [c // base for c in unet.block_out_channels], "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": unet.cross_attention_dim, "legacy": False,
        "use_linear_in_transformer": bool(unet.use_linear_projection), "use_checkpoint": False, "use_fp16": False}
    # diffusers' attention_head_dim is the number of heads (a historical misnomer): SD 1.x has 8 at every level;
    # SD 2.x has a fixed head width of 64, so its count grows with the level (5, 10, 20, 20)
    if isinstance(heads, (list, tuple)):
        unet_params["num_head_channels"] = base // heads[0]
    else:
        unet_params["num_heads"] = heads
    params = {
        "linear_start": sched.beta_start, "linear_end": sched.beta_end, "num_timesteps_cond": 1,
        "timesteps": sched.num_train_timesteps, "first_stage_key": "jpg", "cond_stage_key": "txt",
        "image_size": unet.sample_size, "channels": unet.in_channels, "cond_stage_trainable": False,
        "conditioning_key": "crossattn", "scale_factor": vae.scaling_factor, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae.latent_channels, "ddconfig": {
                "double_z": True, "z_channels": vae.latent_channels, "resolution": 256, "in_channels": vae.in_channels,
                "out_ch": vae.out_channels, "ch": vae.block_out_channels[0],
                "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
                "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                               "params": {"freeze": True, "layer": "penultimate"}} if open_clip else
                              {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}),
    }
    if prediction_type == "v_prediction":
        params["parameterization"] = "v"
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def ldm_config_yaml(pipe, prediction_type: str) -> str:
    return yaml.safe_dump(ldm_config(pipe, prediction_type), sort_keys=False)


# --- the file --------------------------------------------------------------------------------------------------------

def write_checkpoint(pipe, out: Path, header: dict[str, str], prediction_type: str, half: bool) -> list[Path]:
    """OUT (safetensors, LDM layout, metadata in the header) and, for a v-prediction model, OUT.yaml: A1111 builds a
    checkpoint from the config file of the same name beside it, and without `parameterization: v` it samples a v
    model as an epsilon one (grey noise). (ComfyUI tells an SD 2.x v model from a statistic of its weights, which a
    fine-tune of SD 2.1-v keeps; no key in the file changes its mind, so none is written.)"""
    sd = pipeline_to_ldm(pipe)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    header = dict(header, **{"modelspec.hash_sha256": tensors_sha256(sd)})
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if prediction_type == "v_prediction":
        sidecar = out.with_suffix(".yaml")
        with atomic_path(sidecar) as tmp:
            tmp.write_text(ldm_config_yaml(pipe, prediction_type))
        written.append(sidecar)
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata=header)
    return [out] + written
