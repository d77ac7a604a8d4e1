"""LoRA training throughput of the real SD architectures (random weights, no download) on one GPU.

For each preset (sd15, sd21) at 512 px: images/s of the project's own training step (`ldm_finetune.train.
training_step`, LoRA on the attention layers, bf16 autocast, SDPA, cached latents and text as in recipes/lora.yaml),
peak VRAM, and model FLOPs utilisation = FLOPs of one step (counted with torch.utils.flop_counter, forward and
backward) x steps/s / the GPU's peak dense bf16 FLOP/s.

    python benchmarks/train_gpu.py                                   # sd15 and sd21, batch 8, 512 px
    python benchmarks/train_gpu.py --presets tiny --device cpu --resolution 64 --steps 3   # smoke run on CPU
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
# dense bf16 tensor-core peak, FLOP/s (vendor data sheets; SXM parts)
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def build_run(preset: str, args, device: str):
    """The Stable Diffusion training task as fit() sets it up, on a random-init pipeline of the preset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ldm_finetune.models.stable_diffusion import Components, build_pipeline
    from ldm_finetune.training.config import load_config
    from ldm_finetune.training.stable_diffusion import StableDiffusionTask, build_noise_scheduler, prepare_models

    AcceleratorState._reset_state(reset_partial_state=False)
    precision = "bf16" if device == "cuda" else "no"
    cfg = load_config(ROOT / "recipes" / "lora.yaml", [
        "model.pretrained=random", f"data.resolution={args.resolution}", f"train.batch_size={args.batch}",
        f"train.mixed_precision={precision}", f"model.gradient_checkpointing={str(args.checkpointing).lower()}"])
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    pipe = build_pipeline(preset)
    from diffusers import DDPMScheduler

    components = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                            DDPMScheduler.from_config(pipe.scheduler.config))
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    task = StableDiffusionTask(cfg)
    prepare_models(cfg, components, task.adapter, weight_dtype, accelerator.device)
    unet = accelerator.prepare(components.unet)
    side = args.resolution // 8
    n = 64  # cached latent moments of 64 "images"; their values do not change the cost
    moments = torch.cat([torch.randn(n, 4, side, side), torch.full((n, 4, side, side), -4.0)], dim=1)
    dim = components.text_encoder.config.hidden_size
    text_cache = {"sf_dry sf_thickness": torch.randn(77, dim)}
    components.vae.to("cpu")
    components.text_encoder.to("cpu")
    components.noise_scheduler = build_noise_scheduler(cfg, components.noise_scheduler)
    task.accelerator, task.components = accelerator, components
    task.use_schedule(components.noise_scheduler)
    task.unet, task.text_encoder, task.weight_dtype, task.vae_dtype = unet, components.text_encoder, weight_dtype, \
        torch.float32
    task.latent_moments, task.text_cache = moments, text_cache
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    return task, optimizer


def measure(preset: str, args, device: str) -> dict:
    run, optimizer = build_run(preset, args, device)
    batch = {"index": torch.arange(args.batch) % 64, "caption": ["sf_dry sf_thickness"] * args.batch}

    def step():
        with run.accelerator.autocast():
            loss = run.loss(batch)
        run.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    out = {"preset": preset, "images_per_s": args.batch / seconds, "step_s": seconds,
           "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
           "unet_params_m": sum(p.numel() for p in run.unet.parameters()) / 1e6,
           "lora_params_m": sum(p.numel() for p in run.unet.parameters() if p.requires_grad) / 1e6}
    if device == "cuda":
        out["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_flops(torch.cuda.get_device_name(), args.peak_tflops)
        out["mfu"] = flops / seconds / peak if peak else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["sd15", "sd21"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    results = []
    for preset in args.presets:
        results.append(measure(preset, args, args.device))
        print(json.dumps(results[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    record = {"device": device_name, "torch": torch.__version__, "settings": vars(args), "results": results}
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"train_gpu_{args.resolution}px_b{args.batch}.json"
        path.write_text(json.dumps(record, indent=2))
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
