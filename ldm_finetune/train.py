"""The one training loop for every Stable Diffusion recipe.

    accelerate launch -m ldm_finetune.train recipes/lora.yaml [key.sub=value ...] [--dry-run]
    ldm-finetune train recipes/lora.yaml [key.sub=value ...]          (same code, current process)

Reading order: `main` parses and validates the config before anything heavy loads; `train` sets up accelerate, the
models, the adapter, the data (with its caches), then runs `training_step` under gradient accumulation, with
logging, validation images, checkpoints and resume; `finish` writes the shareable files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ldm_finetune.config import RecipeConfig, load_config
from ldm_finetune.configtools import to_dict
from ldm_finetune.errors import TrainingStopped, UserError, run_guarded


def check_environment(cfg: RecipeConfig) -> None:
    """Options that need something this machine may lack: fail now, not after the model loaded."""
    import torch

    if cfg.model.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("model.attention=xformers but xformers is not installed "
                            "(pip install 'ldm_finetune[gpu]'), or use model.attention=sdpa") from None
        if not torch.cuda.is_available():
            raise UserError("model.attention=xformers needs a CUDA GPU; use model.attention=sdpa on CPU")
    if cfg.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("train.optimizer=adamw8bit needs bitsandbytes (pip install 'ldm_finetune[gpu]'), "
                            "or use train.optimizer=adamw") from None
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")


@dataclass
class Run:
    """Everything the step function needs, set up once."""
    cfg: RecipeConfig
    accelerator: object
    components: object
    noise_scheduler: object
    unet: object
    text_encoder: object
    weight_dtype: object  # dtype of the frozen UNet / text encoder
    vae_dtype: object  # the VAE stays fp32 under fp16: its decoder overflows in half precision
    latent_moments: object  # (N, 8, h, w) cached VAE posteriors, or None
    text_cache: dict | None  # caption -> (77, D) hidden states, or None


def build_noise_scheduler(cfg: RecipeConfig, base_scheduler):
    """The model's training schedule with this recipe's prediction type and zero-terminal-SNR choice."""
    from diffusers import DDPMScheduler

    overrides = {}
    if cfg.model.prediction_type:
        overrides["prediction_type"] = cfg.model.prediction_type
    if cfg.noise.zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(base_scheduler.config, **overrides)


def encoder_hidden_states(run: Run, captions: list[str]):
    import torch

    from ldm_finetune.data import tokenize

    if run.cfg.data.caption_dropout > 0:
        # caption dropout: some images train unconditioned, keeping classifier-free guidance meaningful
        drop = torch.rand(len(captions)) < run.cfg.data.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    device = run.accelerator.device
    if run.text_cache is not None:
        return torch.stack([run.text_cache[c] for c in captions]).to(device, run.weight_dtype)
    ids = tokenize(run.components.tokenizer, captions).to(device)
    return run.text_encoder(ids)[0]  # (B, 77, D)


def training_step(run: Run, batch: dict):
    """Per-sample diffusion loss (B,) for one batch: encode, add noise, predict, compare."""
    import torch

    from ldm_finetune.data import sample_latents
    from ldm_finetune.noise import diffusion_loss, perturb_noise, sample_noise, training_target

    cfg, vae = run.cfg, run.components.vae
    scaling = vae.config.scaling_factor
    if run.latent_moments is not None:
        latents = sample_latents(run.latent_moments[batch["index"].cpu()], scaling)
    else:
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(run.accelerator.device, run.vae_dtype)).latent_dist
            latents = latents.sample() * scaling
    latents = latents.to(run.accelerator.device, run.weight_dtype)  # (B, 4, R/8, R/8)
    noise = sample_noise(latents, cfg.noise.offset)
    timesteps = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = run.noise_scheduler.add_noise(latents, perturb_noise(noise, cfg.noise.input_perturbation),
                                                  timesteps)
    target = training_target(run.noise_scheduler, latents, noise, timesteps)
    states = encoder_hidden_states(run, batch["caption"])
    model_pred = run.unet(noisy_latents, timesteps, states, return_dict=False)[0]
    return diffusion_loss(model_pred, target, timesteps, run.noise_scheduler, cfg.noise.min_snr_gamma)


def trainable_parameter_groups(cfg: RecipeConfig, unet, text_encoder) -> list[dict]:
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.train.learning_rate}]
    if cfg.text_encoder_trains:
        lr = cfg.lora.text_encoder_lr or cfg.train.learning_rate
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": lr})
    return groups


def make_optimizer(cfg: RecipeConfig, groups: list[dict]):
    import torch

    if cfg.train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit  # 8-bit optimizer states (Dettmers et al. 2022): ~75 % less memory
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon,
                           weight_decay=cfg.train.weight_decay)


def prepare_models(cfg: RecipeConfig, components, weight_dtype, device):
    """Freeze the base model, attach the adapter, move and cast: frozen weights in weight_dtype, trained in fp32."""
    import torch

    from ldm_finetune.lora import add_lora

    for model in (components.vae, components.text_encoder, components.unet):
        model.requires_grad_(False)
    add_lora(components.unet, components.text_encoder, cfg.lora)
    _move(components.vae, device, torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    _move(components.text_encoder, device, weight_dtype)
    _move(components.unet, device, weight_dtype)
    for model in (components.unet, components.text_encoder):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp16 master weights would lose small updates
    if cfg.model.attention == "xformers":
        components.unet.enable_xformers_memory_efficient_attention()
    if cfg.model.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if cfg.text_encoder_trains:
            components.text_encoder.gradient_checkpointing_enable()
    components.unet.train()
    components.text_encoder.train(cfg.text_encoder_trains)
    components.vae.eval()


def _move(model, device, dtype) -> None:
    model.to(device)
    if next(model.parameters()).dtype != dtype:  # cast only when needed (diffusers warns on every dtype cast)
        model.to(dtype=dtype)


def build_caches(cfg: RecipeConfig, accelerator, components, dataset, weight_dtype):
    """Latent moments and caption embeddings computed once (the main process writes the disk cache first)."""
    import torch

    from ldm_finetune.data import cache_key, encode_captions, encode_latent_moments, load_or_encode_latents

    moments = text_cache = None
    device = accelerator.device
    if cfg.data.cache_latents != "none":
        key = cache_key(dataset.records, cfg.data.resolution, cfg.model.pretrained)
        path = cfg.output_dir / "cache" / f"latents-{key}.safetensors" if cfg.data.cache_latents == "disk" else None
        vae_dtype = next(components.vae.parameters()).dtype
        with accelerator.main_process_first():
            moments = load_or_encode_latents(
                path, lambda: encode_latent_moments(components.vae, dataset, 16, device, vae_dtype))
    if cfg.caches_text:
        captions = [r.caption for r in dataset.records] + [""]
        text_cache = encode_captions(components.tokenizer, components.text_encoder, captions, device)
    if moments is not None and cfg.caches_text:
        components.vae.to("cpu")  # neither encoder is needed on the accelerator any more
        components.text_encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return moments, text_cache


def validation_images(run: Run, step: int, tag: str):
    """Render the fixed prompts x seeds with the current weights (eval mode, no grad), save and log the grid."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_finetune.generate import grid, render

    v = run.cfg.validation
    if not v.prompts or not run.accelerator.is_main_process:
        return None
    unet = run.accelerator.unwrap_model(run.unet)
    text_encoder = run.accelerator.unwrap_model(run.text_encoder)
    components = run.components
    # the encoders may have been parked on the CPU by the caches
    components.vae.to(run.accelerator.device)
    text_encoder.to(run.accelerator.device)
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer,
                                   unet=unet, scheduler=DDIMScheduler.from_config(run.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    try:
        with torch.no_grad(), run.accelerator.autocast():
            rows = render(pipe, v.prompts, v.seeds, v.num_inference_steps, v.guidance_scale, v.negative_prompt,
                          run.cfg.data.resolution, run.cfg.data.resolution)
    finally:
        unet.train(was_training)
        text_encoder.train(run.cfg.text_encoder_trains)
    image = grid(rows)
    path = run.cfg.output_dir / "samples" / f"{tag}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(image), step, dataformats="HWC")
    return path


def resolve_steps(cfg: RecipeConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / cfg.train.gradient_accumulation_steps))
    total = cfg.train.max_steps if cfg.train.max_steps is not None else cfg.train.epochs * per_epoch
    return per_epoch, total


def train(cfg: RecipeConfig) -> Path:
    """Run the recipe; returns the output folder."""
    check_environment(cfg)
    from ldm_finetune.data import read_records

    records = read_records(cfg.data.train_dir, cfg.data.caption_column)  # bad data fails before the model loads
    from ldm_finetune.checkpoints import resolve_resume

    resume_from = resolve_resume(cfg.checkpoint.resume, cfg.output_dir / "checkpoints")

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ldm_finetune.checkpoints import read_state, register_trainable_only_hooks, save_checkpoint
    from ldm_finetune.data import CaptionedImages, collate
    from ldm_finetune.models import load_components

    # a second run in the same process (tests, the demo) may ask for another precision: start from a clean state
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir),
                                            logging_dir=str(cfg.output_dir / "logs")),
        # a seeded sampler whose order depends only on (seed, epoch): resuming replays the same data order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise UserError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: each "
                        "would train alone and overwrite the others' files. On CPU-only machines launch with "
                        "`accelerate launch --cpu` or set ACCELERATE_USE_CPU=true")
    set_seed(cfg.seed, device_specific=True)  # different noise per process, reproducible per run
    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]

    components = load_components(cfg.model.pretrained, cfg.model.revision, cfg.model.variant)
    noise_scheduler = build_noise_scheduler(cfg, components.noise_scheduler)
    prepare_models(cfg, components, weight_dtype, accelerator.device)
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    caching_latents = cfg.data.cache_latents != "none"
    dataset = CaptionedImages(records, cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip,
                              cfg.data.repeats, load_pixels=not caching_latents)
    moments, text_cache = build_caches(cfg, accelerator, components, dataset, weight_dtype)
    # the loader's own generator: starting an epoch must not draw from the global RNG that a resume restores
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=cfg.data.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed))

    groups = trainable_parameter_groups(cfg, components.unet, components.text_encoder)
    if cfg.train.scale_lr:
        factor = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
        for g in groups:
            g["lr"] *= factor
    optimizer = make_optimizer(cfg, groups)
    per_epoch, max_steps = resolve_steps(cfg, math.ceil(len(dataloader) / accelerator.num_processes))
    # accelerate steps the schedule once per process per optimizer step, hence the num_processes factors
    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.train.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    unet, text_encoder = components.unet, components.text_encoder
    if cfg.text_encoder_trains:
        unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, dataloader, lr_scheduler)
    else:
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if cfg.model.compile:
        unet = torch.compile(unet)
    register_trainable_only_hooks(accelerator)
    vae_dtype = next(components.vae.parameters()).dtype
    run = Run(cfg, accelerator, components, noise_scheduler, unet, text_encoder, weight_dtype, vae_dtype, moments,
              text_cache)

    global_step = 0
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from}")
        accelerator.load_state(str(resume_from))
        global_step = read_state(resume_from)["global_step"]
    if accelerator.is_main_process:
        tracker_config = {k: str(v) for k, v in _flatten(to_dict(cfg)).items()}
        accelerator.init_trackers("ldm_finetune", config=tracker_config)

    trained = [p for g in groups for p in g["params"]]
    progress = tqdm(total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_main_process)
    last_checkpoint = resume_from
    log_path = cfg.output_dir / "metrics.jsonl"
    started = time.time()
    first_epoch = global_step // per_epoch
    micro_losses = []  # the losses of this optimizer step's micro-batches
    for epoch in range(first_epoch, math.ceil(max_steps / per_epoch)):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and global_step % per_epoch:
            skip = (global_step % per_epoch) * cfg.train.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(dataloader, skip)
        for batch in batches:
            with accelerator.accumulate(unet, *([text_encoder] if cfg.text_encoder_trains else [])):
                loss = training_step(run, batch).mean()
                micro_losses.append(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(trained, cfg.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            mean_loss = accelerator.gather(torch.stack(micro_losses).mean()[None]).mean().item()
            micro_losses.clear()
            if not math.isfinite(mean_loss):
                progress.close()
                raise TrainingStopped(
                    f"loss became {mean_loss} at step {global_step}; stopped without saving. Last good checkpoint: "
                    f"{last_checkpoint or 'none'}. Try a lower train.learning_rate, train.max_grad_norm, or "
                    "train.mixed_precision=bf16 instead of fp16")
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            lr = lr_scheduler.get_last_lr()[0]
            if global_step % cfg.logging.every_steps == 0 or global_step == max_steps:
                accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=global_step)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": global_step, "loss": mean_loss, "lr": lr,
                                        "time": round(time.time() - started, 3)}) + "\n")
            if cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0:
                last_checkpoint = save_checkpoint(accelerator, cfg.output_dir / "checkpoints", global_step,
                                                  {"epoch": epoch}, cfg.checkpoint.total_limit)
            v_every = cfg.validation.every_steps
            if v_every and global_step % v_every == 0 and global_step < max_steps:
                validation_images(run, global_step, f"step-{global_step:06d}")
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(run, records, global_step)
    accelerator.end_training()
    return cfg.output_dir


def finish(run: Run, records, global_step: int) -> None:
    """The shareable result: the LoRA file with its metadata header, final samples and the model card."""
    from ldm_finetune.lora import LORA_WEIGHT_NAME, lora_state_dict, save_lora
    from ldm_finetune.models import base_model_info
    from ldm_finetune.sharing import training_header, write_model_card

    cfg, accelerator = run.cfg, run.accelerator
    unet = accelerator.unwrap_model(run.unet)
    text_encoder = accelerator.unwrap_model(run.text_encoder) if cfg.text_encoder_trains else None
    captions = [r.caption for r in records]
    trigger_words = sorted(set(captions))
    header = training_header(cfg, base_model_info(cfg.model.pretrained, unet), captions, trigger_words,
                             global_step, run.noise_scheduler.config.prediction_type)
    weights, adapter_metadata = lora_state_dict(unet, text_encoder)
    save_lora(cfg.output_dir, weights, adapter_metadata, header)
    grid_path = validation_images(run, global_step, "final")
    write_model_card(cfg.output_dir, cfg, header, trigger_words,
                     grid_path.relative_to(cfg.output_dir).as_posix() if grid_path else None, LORA_WEIGHT_NAME)
    print(f"LoRA written to {cfg.output_dir / LORA_WEIGHT_NAME}")


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    from ldm_finetune.cli import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="python -m ldm_finetune.train", description="Train a recipe (one YAML from recipes/). Launch with "
        "`accelerate launch -m ldm_finetune.train CONFIG ...` for mixed precision on GPUs and multi-GPU (DDP).")
    add_train_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    train(cfg)


def main(argv: list[str] | None = None) -> int:
    from ldm_finetune.cli import parse_with_overrides

    return run_guarded(run_from_args, parse_with_overrides(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
