"""Caches that skip the frozen encoders: VAE posterior moments per image (a fresh latent is still drawn every
step) and text-encoder hidden states per distinct caption."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

from ldm_finetune.core.io import atomic_path
from ldm_finetune.data.images import RESAMPLING, CaptionedImages
from ldm_finetune.data.records import Record


def cache_key(records: list[Record], resolution: int, model_id: str) -> str:
    """Identifies a latent cache: model, resolution, how images are resized, and every file's name, size and mtime."""
    h = hashlib.sha256(f"{model_id}|{resolution}|{sorted((k, v.name) for k, v in RESAMPLING.items())}".encode())
    for r in records:
        st = r.path.stat()
        h.update(f"|{r.path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_latent_moments(vae, dataset: CaptionedImages, batch_size: int, device, dtype) -> torch.Tensor:
    """(N, 8, R/8, R/8): the VAE posterior's mean and log-variance per image.

    Caching the distribution rather than one sample keeps training identical to encoding on the fly: a fresh latent
    is still drawn from it at every step.
    """
    out = []
    for start in range(0, len(dataset.records), batch_size):
        idx = range(start, min(start + batch_size, len(dataset.records)))
        pixels = torch.stack([dataset.pixels(i) for i in idx]).to(device, dtype)
        out.append(vae.encode(pixels).latent_dist.parameters.float().cpu())
    return torch.cat(out)


def load_or_encode_latents(path: Path | None, encode) -> torch.Tensor:
    """Read the cache at `path` if present, else encode and (when `path` is set) write it atomically."""

    if path is not None and path.is_file():
        return load_file(str(path))["moments"]
    moments = encode()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"moments": moments.contiguous()}, str(tmp))
    return moments


def sample_latents(moments: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A latent drawn from cached (mean, logvar) moments - diffusers' own posterior, as vae.encode() returns it -
    scaled like SD's training latents: (B, 4, h, w)."""
    return DiagonalGaussianDistribution(moments).sample() * scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], device, batch_size: int = 64) -> dict:
    """{caption: (77, D) hidden states} for each distinct caption (a multi-concept set has only a few)."""
    unique = sorted(set(captions))
    cache = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        hidden = text_encoder(tokenize(tokenizer, chunk).to(device))[0]
        cache.update({c: h.float().cpu() for c, h in zip(chunk, hidden)})
    return cache
