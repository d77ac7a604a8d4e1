"""The ground-truth probe of the procedural world (data/world.py): given an image and the prompt it was generated
from, is the kind (shape or texture), the colour and the background right?

A tiny CNN with one head per attribute, trained in seconds on freshly drawn world images (seeded, so the probe is
the same on every machine). Training images get mild blur, noise and colour jitter, so that a generated image that
is a little soft or noisy is still read for what it shows. Its accuracy on new world images is measured by `score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from ldm_finetune.data.world import (
    BACKGROUNDS,
    CLASS_NOUN,
    COLOURS,
    KINDS,
    SHAPES,
    TEXTURES,
    WorldItem,
    parse_prompt,
    world_samples,
)

HEADS = {"kind": KINDS, "colour": list(COLOURS), "background": list(BACKGROUNDS)}


class ProbeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 x 4
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU())  # where things are matters for shape
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def _targets(items: list[WorldItem]) -> dict[str, torch.Tensor]:
    """Class indices per head; -100 (ignored by the loss) where an attribute does not apply (textures)."""
    out = {}
    for head, names in HEADS.items():
        values = [getattr(it, head) for it in items]
        out[head] = torch.tensor([names.index(v) if v is not None else -100 for v in values])
    return out


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur, noise and per-image colour jitter: what an imperfect generator adds."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    x = torch.where(blur, F.conv2d(x, kernel, padding=1, groups=3), x)
    x = x + 0.05 * torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator)
    x = x * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5))
    return x.clamp(0, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) in [0, 1] -> (n, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()


@dataclass
class WorldProbe:
    net: ProbeNet

    @torch.no_grad()
    def read(self, images: np.ndarray) -> list[dict[str, str]]:
        """What each image shows: {"kind", "colour", "background"}."""
        self.net.eval()
        logits = self.net(to_tensor(images))
        picks = {k: v.argmax(1).tolist() for k, v in logits.items()}
        return [{k: HEADS[k][picks[k][i]] for k in HEADS} for i in range(len(images))]

    def check(self, images: np.ndarray, prompts: list[str]) -> list[dict[str, bool]]:
        """Per image: is each attribute the prompt asks for right? ("ok": all of them)."""
        out = []
        for seen, prompt in zip(self.read(images), prompts):
            want = parse_prompt(prompt)
            # the bare class noun ("a texture") asks for any texture
            result = {"kind": seen["kind"] in TEXTURES if want.kind == CLASS_NOUN else seen["kind"] == want.kind}
            if want.kind in SHAPES:
                if want.colour is not None:
                    result["colour"] = seen["colour"] == want.colour
                result["background"] = seen["background"] == want.background
            result["ok"] = all(result.values())
            out.append(result)
        return out

    def score(self, n: int = 512, seed: int = 12345) -> float:
        """Share of freshly drawn world images (a seed the probe never trained on) read right on every attribute."""
        images, items = world_samples(n, seed)
        return float(np.mean([r["ok"] for r in self.check(images, [it.caption for it in items])]))


def train_probe(steps: int = 600, batch: int = 64, seed: int = 0, lr: float = 3e-3) -> WorldProbe:
    """Train the probe on world images drawn from `seed` (fresh ones every step); seconds on a CPU."""
    torch.manual_seed(seed)
    net = ProbeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        images, items = world_samples(batch, seed * 1_000_003 + step)
        logits = net(_augment(to_tensor(images), generator))
        targets = _targets(items)
        loss = sum(F.cross_entropy(logits[k], targets[k], ignore_index=-100) for k in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return WorldProbe(net.eval())


def load_probe(folder: Path) -> WorldProbe:
    """The world probe saved with a mini base (its folder's probe.safetensors)."""
    net = ProbeNet()
    net.load_state_dict(load_file(str(Path(folder) / "probe.safetensors")))
    return WorldProbe(net.eval())
