"""The mini base's architecture: Stable Diffusion's classes in miniature (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel with a CLIP BPE tokenizer, SD's scaled-linear noise schedule), sized so that a
2-core CPU pretrains it on the procedural world (data/world.py) in minutes. Training is training/mini_base.py.

Choices, and why:
- a 4x VAE (three levels) instead of SD's 8x: a 32 px world image becomes 8 x 8 latents and a 64 px CT slice
  16 x 16, enough latent pixels to reconstruct grey CT texture; diffusers pipelines read the factor from the VAE;
- a 32-token text context instead of 77: world captions and the project's prompts are short, and the text
  encoder and cross-attention costs scale with it;
- a word-level vocabulary (models/tokenizer.py): every world word, caption word, drift-probe word and Textual
  Inversion initializer is one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from scipy import ndimage
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_finetune.models.stable_diffusion import SD_SCHEDULE

CONTEXT_TOKENS = 32  # the tokenizer's model_max_length and the text encoder's positions


@dataclass
class MiniArchitecture:
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # three levels: 4x downsampling
    latent_channels: int = 4
    unet_channels: list[int] = field(default_factory=lambda: [64, 128])  # 8 x 8 and 4 x 4 latents at 32 px
    attention_head_dim: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4


def build_vae(arch: MiniArchitecture) -> AutoencoderKL:
    levels = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
                         block_out_channels=tuple(arch.vae_channels),
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=16,
                         sample_size=32)


def build_text_encoder(arch: MiniArchitecture, tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
        num_attention_heads=arch.text_heads, num_hidden_layers=arch.text_layers, projection_dim=arch.text_width,
        max_position_embeddings=CONTEXT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, hidden_act="quick_gelu"))


def build_unet(arch: MiniArchitecture) -> UNet2DConditionModel:
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=8, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        block_out_channels=tuple(arch.unet_channels),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels, cross_attention_dim=arch.text_width,
        attention_head_dim=arch.attention_head_dim, norm_num_groups=16)


def inference_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULE)


def texture_fields(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) generic grey textures for the VAE, never CT: each one is a dead-leaves picture (occluding
    ellipses of random grey), oriented streaks (noise smoothed more along one axis) or a smooth random field, with
    a fine texture laid over it half the time, then a random blur and pixel grain. These are the ingredients any
    grey scan has (flat regions with sharp or soft edges, anisotropic grain, sensor noise) without its content."""
    return np.stack([_generic_texture(rng, size) for _ in range(n)])


def _generic_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        image = _dead_leaves(rng, size)
    elif kind == 1:
        image = _contrast(_streaks(rng, size), rng)
    else:
        sigma = rng.uniform(0.3, 3.0)
        image = _contrast(_smooth(rng, size, sigma), rng)
    if rng.random() < 0.5:  # a fine texture over the regions
        image = image + rng.uniform(0.02, 0.12) * _streaks(rng, size)
    image = ndimage.gaussian_filter(image, rng.uniform(0.0, 1.2))
    image = image + rng.uniform(0.0, 0.1) * rng.standard_normal(image.shape)  # grain
    return np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2).astype(np.float32)


def _standardize(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-6)


def _smooth(rng: np.random.Generator, size: int, sigma) -> np.ndarray:
    return _standardize(ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma))


def _streaks(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance grain elongated along a random axis (rows or columns)."""
    sigma = (rng.uniform(0.3, 1.5), rng.uniform(2.0, 8.0))
    return _smooth(rng, size, sigma if rng.random() < 0.5 else sigma[::-1])


def _contrast(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A standardized field through a random sigmoid: from soft gradients to near-binary regions."""
    return 1 / (1 + np.exp(-field * rng.uniform(0.5, 4.0)))


def _dead_leaves(rng: np.random.Generator, size: int) -> np.ndarray:
    """Ellipses of random grey, size, elongation and angle, each one painted over the ones before."""
    y, x = np.mgrid[:size, :size].astype(np.float32)
    image = np.full((size, size), rng.uniform(0, 1))
    for _ in range(rng.integers(3, 16)):
        cy, cx = rng.uniform(-4, size + 4, 2)
        a, b = rng.uniform(1.5, size / 2), rng.uniform(1.5, size / 3)
        angle = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = (y - cy) * np.cos(angle) - (x - cx) * np.sin(angle)
        image[(u / a) ** 2 + (v / b) ** 2 <= 1] = rng.uniform(0, 1)
    return image
