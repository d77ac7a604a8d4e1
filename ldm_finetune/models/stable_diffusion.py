"""Stable Diffusion components: load them (hub id or local diffusers folder), or build random-init ones offline.

- `load_components(pretrained)`: tokenizer, CLIP text encoder, VAE, UNet and the training noise scheduler of an SD
  1.x / 2.x model. The prediction type (epsilon, or v_prediction for SD 2.x 768) comes from the scheduler config.
- `build_pipeline(preset)`: a random-init `StableDiffusionPipeline`. "tiny" is what tests, the demo and CI train
  (`ldm-finetune tiny-model OUT` writes it in diffusers layout, with the small CLIP BPE vocabulary shipped in
  `assets/tiny_clip_tokenizer`); "sd15" and "sd21" have the real architectures (no weights) for speed benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_dir, files_sha256, to_image
from ldm_finetune.models.hub_ids import load_error

TINY_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip_tokenizer"


PRESETS = ("tiny", "sd15", "sd21", "tiny-sd15", "tiny-sd21")


# SD's training noise schedule (both 1.x and 2.x): 1000 steps of "scaled_linear" betas 0.00085 -> 0.012.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, clip_sample=False, set_alpha_to_one=False)


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object  # DDPMScheduler with the model's training schedule

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def _arch(preset: str) -> dict:
    """UNet / VAE / text-encoder sizes per preset."""
    if preset == "tiny":
        return dict(
            unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16, sample_size=8),
            # four VAE levels, like SD's, so latents are 1/8 of the image side as in the real models
            vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64),
            text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                      projection_dim=32, hidden_act="quick_gelu"),
            sample_size=64,
        )
    if preset in ("tiny-sd15", "tiny-sd21"):  # the real key structure (levels, blocks, projections, text layers)
        # at small widths: what the interop tests load into other tools' key maps
        four = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8)
        unet = four | dict(sample_size=8, cross_attention_dim=32 if preset == "tiny-sd15" else 48)
        text = dict(intermediate_size=64, num_attention_heads=4, projection_dim=32)
        if preset == "tiny-sd15":
            unet |= dict(attention_head_dim=8)
            text |= dict(hidden_size=32, num_hidden_layers=12, hidden_act="quick_gelu")
        else:  # SD 2.x: linear projections, a fixed head width (heads grow with the level), 23 GELU text layers
            unet |= dict(attention_head_dim=(4, 4, 8, 8), use_linear_projection=True)
            text |= dict(hidden_size=48, num_hidden_layers=23, hidden_act="gelu")
        return dict(unet=unet, vae=four | dict(block_out_channels=(16, 16, 32, 32), sample_size=64), text=text,
                    sample_size=64)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    if preset == "sd15":
        return dict(
            unet=dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                      sample_size=64),
            vae=vae | dict(sample_size=512),
            text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      projection_dim=768, hidden_act="quick_gelu"),
            sample_size=512,
        )
    if preset == "sd21":  # SD 2.1 base: OpenCLIP ViT-H text tower (23 layers used), linear projections, 64 head dim
        return dict(
            unet=dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                      attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, sample_size=64),
            vae=vae | dict(sample_size=512),
            text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                      projection_dim=512, hidden_act="gelu"),
            sample_size=512,
        )
    raise UserError(f"unknown model preset {preset!r}; expected one of {', '.join(PRESETS)}")


def build_pipeline(preset: str = "tiny", seed: int = 0, prediction_type: str = "epsilon"):
    """A random-init StableDiffusionPipeline of the given architecture (no download)."""

    arch = _arch(preset)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer(str(TINY_TOKENIZER / "vocab.json"), str(TINY_TOKENIZER / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")
    # full-size presets get CLIP's real vocabulary size: for speed only the embedding table's size matters
    vocab_size = len(tokenizer) if preset.startswith("tiny") else 49408
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **arch["text"]))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **arch["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(arch["vae"]["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(arch["vae"]["block_out_channels"]),
                        **arch["vae"])
    scheduler = DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULE)
    return sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """The one place a StableDiffusionPipeline is assembled from parts: no safety checker (CT slices), no feature
    extractor; what `save_pretrained` writes from it loads with plain `StableDiffusionPipeline.from_pretrained`."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def inference_pipeline(components: Components, unet=None, text_encoder=None, scheduler=None, device=None):
    """A sampling pipeline over loaded components (optionally with a trained UNet / text encoder in place of
    theirs), DDIM on the training schedule unless told otherwise, no progress bar."""
    text_encoder = text_encoder if text_encoder is not None else components.text_encoder
    unet = unet if unet is not None else components.unet
    if device is not None:
        for model in (components.vae, text_encoder, unet):
            model.to(device)
    pipe = sd_pipeline(components.vae, text_encoder, components.tokenizer, unet,
                       scheduler or DDIMScheduler.from_config(components.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_model(out: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """`ldm-finetune tiny-model OUT`: the tiny random-init pipeline in diffusers layout (safetensors)."""

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "model_index.json").is_file():
            raise UserError(f"{out}: folder is not empty and is not a diffusers model; choose another OUT")
    pipe = build_pipeline("tiny", seed=seed, prediction_type=prediction_type)
    with atomic_dir(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name" has exactly one slash and no leading ./ ~)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def quiet_loading() -> None:
    """No per-file progress bars while loading weights: they bury the one line that matters on errors."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def check_model_source(pretrained: str, key: str = "model.pretrained") -> str:
    """A local diffusers folder (checked) or a hub id, as the string diffusers' from_pretrained takes."""
    path = Path(pretrained).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{key}: {path} is not a diffusers model folder (no model_index.json); "
                            "pass a folder written by save_pretrained / `ldm-finetune tiny-model`, or a hub id")
        return str(path)
    if _looks_local(pretrained):
        raise UserError(f"{key}: {pretrained} does not exist")
    return pretrained


def load_components(pretrained: str, revision: str | None = None, variant: str | None = None) -> Components:
    """Load an SD 1.x/2.x model's parts from a local diffusers folder or a hub id; clear errors when it cannot."""

    source = check_model_source(pretrained)
    quiet_loading()
    kw = dict(revision=revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except (OSError, ValueError) as exc:
        if source == pretrained and not Path(source).exists():
            raise load_error(pretrained, "model.pretrained", exc) from None
        raise UserError(f"model.pretrained: {source}: {str(exc).splitlines()[0]}") from None
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)


def base_model_info(pretrained: str, unet, prediction_type: str = "epsilon") -> dict[str, str]:
    """What a shared file should say about its base model: its name (a hub id, or only the folder's name for a
    local model: local paths do not travel), its family in kohya's terms (sd_v1, sd_v2, sd_v2_v) and ModelSpec's
    architecture id, and the weights' sha256 when local."""
    local = Path(pretrained).expanduser().exists() or _looks_local(pretrained)
    info = {"base_model": Path(pretrained).name if local else pretrained}
    cross = unet.config.cross_attention_dim
    if cross == 768:
        info.update(family="sd_v1", architecture="stable-diffusion-v1")
    elif cross == 1024 and prediction_type == "v_prediction":
        info.update(family="sd_v2_v", architecture="stable-diffusion-v2-768-v")
    elif cross == 1024:
        info.update(family="sd_v2", architecture="stable-diffusion-v2-512")
    else:  # not a Stable Diffusion release (the tiny model, the mini base): say so rather than borrow an id
        info.update(family="other", architecture=f"ldm_finetune-sd-cross{cross}")
    weights = sorted((Path(pretrained).expanduser() / "unet").glob("diffusion_pytorch_model*.safetensors"))
    if weights:
        info["base_model_sha256"] = files_sha256(weights)
    return info


@torch.no_grad()
def native_side(pipe) -> int:
    """The image side a pipeline was trained at (diffusers' own default height): 512 for SD 1.5, 768 for SD 2.1."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


RENDER_BATCH = 8  # images per pipeline call in render()


def render(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, negative_prompt: str = "",
           height: int | None = None, width: int | None = None) -> list[list[np.ndarray]]:
    """images[p][s]: prompt p with seed s, as (H, W, 3) float arrays in [0, 1]. Seeds go through the pipeline
    RENDER_BATCH at a time, each with its own generator: the same starting noise as one call per seed, at the speed
    of a batch."""
    images = []
    for prompt in prompts:
        row = []
        for first in range(0, len(seeds), RENDER_BATCH):
            chunk = seeds[first:first + RENDER_BATCH]
            # CPU generators: the same noise on any device
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in chunk]
            out = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                       guidance_scale=guidance, height=height, width=width, num_images_per_prompt=len(chunk),
                       generator=generators, output_type="np")
            row += list(out.images)
        images.append(row)
    return images


def grid(rows: list[list[np.ndarray]]) -> Image.Image:
    """One row per prompt, one column per seed."""
    h, w = rows[0][0].shape[:2]
    canvas = np.zeros((h * len(rows), w * max(len(r) for r in rows), 3), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return to_image(canvas)
