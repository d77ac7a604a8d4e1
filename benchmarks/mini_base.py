"""The mini base as a base: build time, sizes, how well its own generations follow world prompts, and how well its
VAE (trained on the world and generic textures, never on CT) reconstructs phantom CT slices it never saw, next to
the same VAE architecture trained on phantom slices for the same number of steps.

    python benchmarks/mini_base.py                      # builds the default mini base (or uses --base DIR)
    python benchmarks/mini_base.py --base /tmp/mb_full  # an existing build
    python benchmarks/mini_base.py --guidance 2.5 4 7.5  # only: the shipped base's generations per guidance scale

Reconstruction is measured at the demo's fine-tuning resolution (64 px) on the phantom's validation slices.
Results go to results/mini_base_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from data_prep.config import PrepConfig, VolumeSpec
from data_prep.phantom import STATES, write_phantoms
from data_prep.prep import run_prep
from ldm_finetune.data.world import world_samples
from ldm_finetune.training.fit import fit
from ldm_finetune.models.world_probe import load_probe
from ldm_finetune.training.mini_base import (
    MiniBaseSettings,
    VaeTask,
    build_mini_base,
    score_base,
    shipped_mini_base,
    vae_phase_config,
)

RESULTS = Path(__file__).parent / "results"


def phantom_slices(work: Path, resolution: int) -> Path:
    volumes = write_phantoms(work / "volumes", (96, 192, 256), seed=0)
    run_prep(PrepConfig(volumes=[VolumeSpec(s, volumes[s]) for s in STATES], out=work / "data",
                        resolution=resolution), show_progress=False)
    return work / "data"


def load_grey(folder: Path) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]: grey slices repeated over RGB, as SD's VAE sees them."""
    paths = sorted(folder.glob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255) for p in paths])
    return x[:, None].repeat(1, 3, 1, 1) * 2 - 1


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction (posterior mode) of x in [-1, 1], clamped to it."""
    return torch.cat([vae.decode(vae.encode(b).latent_dist.mode()).sample.clamp(-1, 1) for b in x.split(32)])


def psnr_db(reconstruction: torch.Tensor, x: torch.Tensor) -> float:
    """Mean PSNR (dB) over images, in [0, 1] grey levels."""
    mse = ((reconstruction - x) / 2).pow(2).mean((1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def psnr(vae: AutoencoderKL, x: torch.Tensor) -> float:
    return psnr_db(reconstruct(vae, x), x)


class CtCrops(torch.utils.data.Dataset):
    """Random 32 px crops of phantom training slices (the reference VAE's data, the same crop size as the world)."""

    def __init__(self, slices: torch.Tensor, n: int, seed: int):
        self.slices, self.n, self.seed = slices, n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.slices[int(torch.randint(len(self.slices), (1,), generator=g))]
        top, left = torch.randint(0, s.shape[1] - 31, (2,), generator=g).tolist()
        return {"pixel_values": s[:, top:top + 32, left:left + 32]}


class CtVaeTask(VaeTask):
    def __init__(self, settings, out, slices):
        super().__init__(settings, out)
        self.slices = slices

    def build(self, accelerator):
        super().build(accelerator)
        return CtCrops(self.slices, self.settings.vae_steps * self.settings.vae_batch, self.settings.seed)


@torch.no_grad()
def world_reconstruction(vae: AutoencoderKL, probe, n: int = 512, seed: int = 77) -> dict:
    """How well the VAE keeps the world: PSNR on fresh world images, and the share of its reconstructions the probe
    still reads right (the ceiling of what the UNet can learn to draw through this VAE)."""
    images, items = world_samples(n, seed)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)) * 2 - 1
    rec = reconstruct(vae, x)
    checks = probe.check(((rec + 1) / 2).permute(0, 2, 3, 1).numpy(), [it.caption for it in items])
    return {"world_images": n, "psnr_db": round(psnr_db(rec, x), 2),
            "probe_ok": round(float(np.mean([c["ok"] for c in checks])), 4),
            "probe_colour": round(float(np.mean([c["colour"] for c in checks if "colour" in c])), 4)}


def guidance_sweep(base: Path, scales: list[float], seeds: int, out: Path) -> None:
    """The world probe's verdict on the base's generations per guidance scale (the build scores one scale)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    probe = load_probe(base)
    record = json.loads(out.read_text()) if out.is_file() else {}
    sweep = {"seeds": seeds, "threads": torch.get_num_threads(), "by_guidance": {}}
    for scale in scales:
        sweep["by_guidance"][str(scale)] = {k: round(v, 4) for k, v in score_base(pipe, probe, seeds, scale).items()}
        print(scale, sweep["by_guidance"][str(scale)], flush=True)
    record["generations_by_guidance"] = sweep
    out.write_text(json.dumps(record, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="an existing mini base folder (default: build one here)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "mini_base_cpu.json")
    parser.add_argument("--guidance", type=float, nargs="+",
                        help="only score the base's own generations (34 world prompts, DDIM 20) at these guidance "
                             "scales, --seeds each, into the record's generations_by_guidance")
    parser.add_argument("--seeds", type=int, default=6, help="with --guidance: generations per prompt")
    args = parser.parse_args()
    if args.guidance:
        return guidance_sweep(args.base or shipped_mini_base(), args.guidance, args.seeds, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = args.base
        if base is None:
            base = work / "base"
            build_mini_base(MiniBaseSettings(), base)
        info = json.loads((base / "mini_base.json").read_text())
        settings = MiniBaseSettings(**{k: v for k, v in info["settings"].items() if k not in ("arch", "noise")})
        data = phantom_slices(work, args.resolution)
        train, val = load_grey(data / "train"), load_grey(data / "validation")
        started = time.time()
        reference = work / "ct_vae"
        fit(vae_phase_config(work / "ct_vae_run", settings), CtVaeTask(settings, reference, train))
        reference_seconds = time.time() - started
        mini = AutoencoderKL.from_pretrained(base / "vae").eval()
        ct = AutoencoderKL.from_pretrained(reference).eval()
        record = {
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "build": {k: info[k] for k in ("seconds", "parameters_m",
                                                                       "probe_accuracy_on_world", "probe_ok",
                                                                       "probe_kind", "probe_colour",
                                                                       "probe_background")},
            "settings": info["settings"],
            "vae_psnr_db": {"phantom_validation_slices": len(val), "resolution": args.resolution,
                            "mini_base_vae (world + textures)": round(psnr(mini, val), 2),
                            "same_vae_trained_on_phantom_slices": round(psnr(ct, val), 2),
                            "reference_training_seconds": round(reference_seconds, 1)},
            "vae_on_world": world_reconstruction(mini, load_probe(base)),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
