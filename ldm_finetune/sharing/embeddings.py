"""Textual Inversion embedding files: the diffusers layout ({token: (n, D)}, one token per file) and A1111's
({"emb_params": (n, D)}, the file name is the prompt word)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_finetune.core.io import atomic_path
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.sharing.metadata import tensors_sha256


def token_name(token: str) -> str:
    """A file-name-safe name for a placeholder token: '<dry-slice>' -> 'dry-slice'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "embedding"


def save_embeddings(folder: Path, learned: dict[str, torch.Tensor], header: dict[str, str]) -> list[Path]:
    """embeddings/<name>.safetensors ({token: (n, D)}, what diffusers' load_textual_inversion reads, one token per
    file), a1111/<name>.safetensors ({"emb_params": (n, D)}; A1111 uses the file name as the prompt word), and
    learned_embeds.safetensors when there is a single token."""

    layout = RunLayout(folder)
    written = []
    meta = {k: v for k, v in header.items()}
    for token, vectors in learned.items():
        for sub, data in ((layout.embeddings, {token: vectors}), (layout.a1111_embeddings, {"emb_params": vectors})):
            path = sub / f"{token_name(token)}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(data, str(tmp), metadata=meta | {"ldm_finetune.token": token,
                                                           "modelspec.hash_sha256": tensors_sha256(data)})
            written.append(path)
    if len(learned) == 1:
        token, vectors = next(iter(learned.items()))
        with atomic_path(layout.learned_embeds) as tmp:
            save_file({token: vectors}, str(tmp), metadata=meta | {
                "ldm_finetune.token": token, "modelspec.hash_sha256": tensors_sha256({token: vectors})})
        written.append(layout.learned_embeds)
    return written
