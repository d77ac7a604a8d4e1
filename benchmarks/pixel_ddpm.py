"""Pixel DDPM speed: training images/s and sampling images/s (DDPM 1000 steps vs DDIM 50) of recipes/ddpm_pixel.yaml's
default U-Net (64 -> 512 channels, attention at 16 and 8), random weights, one run.

Training: the recipe's own step (`pixel.pixel_step`: noise, class-label dropout, U-Net, MSE, backward, AdamW) on
random grey 'slices'. Sampling: the project's samplers with the class-conditional denoiser, with and without
classifier-free guidance (guidance doubles the batch through the U-Net).

    python benchmarks/pixel_ddpm.py                        # CPU: 64 px; DDPM timed over --ddpm-steps steps
    python benchmarks/pixel_ddpm.py --resolutions 128 256  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"


def setup(resolution: int, device: str):
    from ldm_finetune.models.diffusion import make_schedule
    from ldm_finetune.models.pixel_unet import PixelModel, build_unet, noise_scheduler_for
    from ldm_finetune.training.config import load_config

    cfg = load_config(ROOT / "recipes" / "ddpm_pixel.yaml", [f"data.resolution={resolution}",
                                                              "data.train_dir=unused"])
    unet = build_unet(cfg, num_classes=9).to(device)
    d = cfg.diffusion
    model = PixelModel(unet, make_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end), d.prediction_type,
                       [f"class{i}" for i in range(9)], {})
    return cfg, unet, noise_scheduler_for(cfg), model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train_speed(cfg, unet, noise_scheduler, batch: int, steps: int, device: str) -> float:
    from accelerate import Accelerator

    from ldm_finetune.models.noise import DiffusionObjective
    from ldm_finetune.training.pixel import PixelDDPMTask

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    task = PixelDDPMTask(cfg)
    task.accelerator, task.model, task.noise_scheduler, task.classes = accelerator, unet, noise_scheduler, \
        [f"class-{i}" for i in range(9)]
    task.objective = DiffusionObjective.from_config(cfg.noise, noise_scheduler)
    r = cfg.data.resolution
    data = {"pixel_values": torch.rand(batch, 1, r, r, device=device) * 2 - 1,
            "label": torch.randint(0, 9, (batch,), device=device)}

    def step():
        with accelerator.autocast():
            loss = task.loss(data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def sample_speed(model, n: int, sampler: str, steps: int, guidance: float, device: str) -> float:
    """images/s for a full sampling run with `steps` denoiser calls (ddpm: steps of the 1000-step chain)."""
    from ldm_finetune.models.diffusion import Schedule

    timed_model = model
    if sampler == "ddpm" and steps < model.schedule.T:
        # time the first `steps` steps of the chain; every step costs the same (one U-Net call)
        timed_model = type(model)(model.unet, Schedule(model.schedule.betas[:steps]), model.prediction_type,
                                  model.classes, {})
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        timed_model.sample(n, model.classes[0], sampler, steps, guidance=guidance, device=device)
    sync(device)
    seconds = (time.perf_counter() - start) * (model.schedule.T / steps if sampler == "ddpm" else 1)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--n", type=int, default=4, help="images per sampling run")
    parser.add_argument("--ddpm-steps", type=int, default=100,
                        help="DDPM steps actually timed (1000 = the whole chain; fewer are extrapolated)")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for r in args.resolutions:
        cfg, unet, noise_scheduler, model = setup(r, args.device)
        row = {"resolution": r, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
               "train_images_per_s": train_speed(cfg, unet, noise_scheduler, args.batch, args.train_steps,
                                                 args.device)}
        unet.eval()
        for guidance in (1.0, 3.0):
            tag = "" if guidance == 1.0 else "_cfg3"
            row[f"ddim50_images_per_s{tag}"] = sample_speed(model, args.n, "ddim", 50, guidance, args.device)
            row[f"ddpm1000_images_per_s{tag}"] = sample_speed(model, args.n, "ddpm", args.ddpm_steps, guidance,
                                                              args.device)
            row[f"ddim_speedup{tag}"] = row[f"ddim50_images_per_s{tag}"] / row[f"ddpm1000_images_per_s{tag}"]
        results.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"pixel_ddpm_{args.device}_{'-'.join(map(str, args.resolutions))}px.json"
    path.write_text(json.dumps({"device": device, "torch": torch.__version__, "settings": vars(args),
                                "results": results}, indent=2))
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
