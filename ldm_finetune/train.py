"""The one training loop for every Stable Diffusion recipe.

    accelerate launch -m ldm_finetune.train recipes/lora.yaml [key.sub=value ...] [--dry-run]
    ldm-finetune train recipes/lora.yaml [key.sub=value ...]          (same code, current process)

Reading order: `main` parses and validates the config before anything heavy loads; `train` sets up accelerate, the
models, the adapter, the data (with its caches), then runs `training_step` under gradient accumulation, with
logging, validation images, checkpoints and resume; `finish` writes the shareable files.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ldm_finetune.config import RecipeConfig, load_config
from ldm_finetune.configtools import to_dict
from ldm_finetune.errors import UserError, run_guarded
from ldm_finetune.loop import Loop, run_loop, start_tracking


def check_environment(cfg: RecipeConfig) -> None:
    """Options that need something this machine may lack: fail now, not after the model loaded."""
    import torch

    if getattr(cfg.model, "attention", "sdpa") == "xformers":
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
    if cfg.train.mixed_precision == "bf16" and not torch.cuda.is_available():
        # measured on a 2-core CPU: the small pixel DDPM took 13.3 s/step under bf16 autocast and 1.15 s in fp32
        print("warning: train.mixed_precision=bf16 on a CPU is about 10x slower than fp32; add "
              "train.mixed_precision=no", file=sys.stderr)


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
    adapter: object = None  # what trains (adapters.py)
    class_moments: object = None  # cached posteriors of the DreamBooth class images, or None


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


def batch_latents(run: Run, batch: dict, prefix: str = ""):
    """(B, 4, R/8, R/8) latents of the batch's images (or of its class images, prefix "class_")."""
    import torch

    from ldm_finetune.data import sample_latents

    moments = run.class_moments if prefix else run.latent_moments
    scaling = run.components.vae.config.scaling_factor
    if moments is not None:
        latents = sample_latents(moments[batch[prefix + "index"].cpu()], scaling)
    else:
        pixels = batch[prefix + "pixel_values"].to(run.accelerator.device, run.vae_dtype)
        with torch.no_grad():
            latents = run.components.vae.encode(pixels).latent_dist.sample() * scaling
    return latents.to(run.accelerator.device, run.weight_dtype)


def training_step(run: Run, batch: dict):
    """The loss of one batch: encode, add noise, predict, compare; plus DreamBooth's prior term when it is on."""
    import torch

    from ldm_finetune.noise import diffusion_loss, perturb_noise, sample_noise, training_target
    from ldm_finetune.objectives import prior_preservation_loss

    cfg = run.cfg
    latents, captions = batch_latents(run, batch), list(batch["caption"])
    n_instance = latents.shape[0]
    if "class_index" in batch:  # DreamBooth with class images: instance and class halves in one forward pass
        latents = torch.cat([latents, batch_latents(run, batch, "class_")])
        captions += batch["class_caption"]
    noise = sample_noise(latents, cfg.noise.offset)
    timesteps = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = run.noise_scheduler.add_noise(latents, perturb_noise(noise, cfg.noise.input_perturbation),
                                                  timesteps)
    target = training_target(run.noise_scheduler, latents, noise, timesteps)
    model_pred = run.unet(noisy_latents, timesteps, encoder_hidden_states(run, captions), return_dict=False)[0]
    per_sample = diffusion_loss(model_pred, target, timesteps, run.noise_scheduler, cfg.noise.min_snr_gamma)
    db = cfg.dreambooth
    if db is None or not db.prior_preservation:
        return per_sample.mean()
    if db.prior == "base_model":
        prior = base_model_prior_loss(run, noisy_latents, timesteps, batch["prior_prompt"])
        return per_sample.mean() + db.prior_loss_weight * prior
    return prior_preservation_loss(per_sample, n_instance, db.prior_loss_weight)


def base_model_prior_loss(run: Run, noisy_latents, timesteps, class_prompts: list[str]):
    """Prior without class images: on the class prompt, the model must keep predicting what the frozen base model
    predicts for the same noisy input (the prior is the base model itself)."""
    import torch

    from ldm_finetune.noise import diffusion_loss

    states = encoder_hidden_states(run, class_prompts)
    unet = run.accelerator.unwrap_model(run.unet)
    with torch.no_grad(), run.adapter.base_model(unet):
        target = unet(noisy_latents, timesteps, states, return_dict=False)[0]
    model_pred = run.unet(noisy_latents, timesteps, states, return_dict=False)[0]
    return diffusion_loss(model_pred, target, timesteps, run.noise_scheduler, run.cfg.noise.min_snr_gamma).mean()


def make_optimizer(cfg: RecipeConfig, groups: list[dict]):
    import torch

    if cfg.train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit  # 8-bit optimizer states (Dettmers et al. 2022): ~75 % less memory
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon,
                           weight_decay=cfg.train.weight_decay)


def prepare_models(cfg: RecipeConfig, components, adapter, weight_dtype, device):
    """Freeze the base model, attach the adapter, move and cast: frozen weights in weight_dtype, trained in fp32."""
    import torch

    for model in (components.vae, components.text_encoder, components.unet):
        model.requires_grad_(False)
    adapter.attach(components)
    _move(components.vae, device, torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    _move(components.text_encoder, device, weight_dtype)
    _move(components.unet, device, weight_dtype)
    for model in (components.unet, components.text_encoder):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp16 master weights would lose small updates
    if getattr(cfg.model, "attention", "sdpa") == "xformers":
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


def build_caches(cfg: RecipeConfig, accelerator, components, datasets: list) -> tuple[list, dict | None]:
    """Latent moments per dataset (instance, DreamBooth class) and caption embeddings, computed once; the main
    process writes a disk cache before the others read it."""
    import torch

    from ldm_finetune.data import cache_key, encode_captions, encode_latent_moments, load_or_encode_latents

    moments, text_cache = [None] * len(datasets), None
    device = accelerator.device
    if cfg.data.cache_latents != "none":
        vae_dtype = next(components.vae.parameters()).dtype
        for i, dataset in enumerate(datasets):
            key = cache_key(dataset.records, cfg.data.resolution, cfg.model.pretrained)
            path = (cfg.output_dir / "cache" / f"latents-{key}.safetensors" if cfg.data.cache_latents == "disk"
                    else None)
            with accelerator.main_process_first():
                moments[i] = load_or_encode_latents(
                    path, lambda d=dataset: encode_latent_moments(components.vae, d, 16, device, vae_dtype))
    if cfg.caches_text:
        captions = [""] + [r.caption for d in datasets for r in d.records]
        captions += [r.meta["prior_prompt"] for r in datasets[0].records if "prior_prompt" in r.meta]
        text_cache = encode_captions(components.tokenizer, components.text_encoder, captions, device)
    if cfg.data.cache_latents != "none" and cfg.caches_text:
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


def training_records(cfg: RecipeConfig, expand_token) -> list:
    """The (image, caption) pairs this run trains on: all of data.train_dir, or the data.concepts selections."""
    from ldm_finetune.data import concept_records, read_records

    needs_rows = not cfg.data.concepts or any(c.instance_dir is None for c in cfg.data.concepts)
    rows = read_records(cfg.data.train_dir, cfg.data.caption_column) if needs_rows else None
    if not cfg.data.concepts:
        return rows
    records = concept_records(rows, cfg.data.concepts, expand_token)
    if cfg.dreambooth is not None:
        from ldm_finetune.objectives import check_instance_counts

        check_instance_counts(records, cfg)
    return records


def make_accelerator(cfg: RecipeConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # a second run in the same process (tests, the demo) may ask for another precision: start from a clean state
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
    return accelerator


def build_dataset(cfg: RecipeConfig, records, class_records):
    """The training dataset; with DreamBooth class images, each item also carries a class image (class_* keys)."""
    from ldm_finetune.data import CaptionedImages, PairedImages

    load_pixels = cfg.data.cache_latents == "none"

    def images(recs, repeats=1):
        return CaptionedImages(recs, cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip, repeats,
                               load_pixels=load_pixels)

    instance = images(records, cfg.data.repeats)
    if not class_records:
        return instance, [instance]
    prior = images(class_records)
    return PairedImages(instance, prior), [instance, prior]


def train(cfg: RecipeConfig) -> Path:
    """Run the recipe; returns the output folder."""
    if cfg.recipe == "ddpm_pixel":
        from ldm_finetune.pixel import train_pixel

        return train_pixel(cfg)
    check_environment(cfg)
    from ldm_finetune.adapters import make_adapter
    from ldm_finetune.checkpoints import resolve_resume

    adapter = make_adapter(cfg)
    records = training_records(cfg, adapter.expand_token)  # bad data fails before the model loads
    resume_from = resolve_resume(cfg.checkpoint.resume, cfg.output_dir / "checkpoints")

    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from ldm_finetune.checkpoints import register_trainable_only_hooks
    from ldm_finetune.data import collate
    from ldm_finetune.models import load_components
    from ldm_finetune.objectives import prepare_class_records

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed, device_specific=True)  # different noise per process, reproducible per run
    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]

    components = load_components(cfg.model.pretrained, cfg.model.revision, cfg.model.variant)
    noise_scheduler = build_noise_scheduler(cfg, components.noise_scheduler)
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.dreambooth is not None and accelerator.is_main_process:
        from ldm_finetune.objectives import warn_split_identifiers

        for line in warn_split_identifiers(components.tokenizer, records,
                                           [c.class_prompt for c in cfg.data.concepts]):
            print(line, file=sys.stderr)
    # DreamBooth class images come from the base model, so they are made before the adapter changes it
    class_records = prepare_class_records(cfg, accelerator, components, noise_scheduler)
    records = _with_prior_prompts(cfg, records)
    prepare_models(cfg, components, adapter, weight_dtype, accelerator.device)

    dataset, parts = build_dataset(cfg, records, class_records)
    moments, text_cache = build_caches(cfg, accelerator, components, parts)
    # the loader's own generator: starting an epoch must not draw from the global RNG that a resume restores
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=cfg.data.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed))

    groups = adapter.parameter_groups(components)
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
    trained = adapter.trained_models(components)
    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    models = dict(zip(trained, prepared[:len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained):]
    unet = models.get("unet", components.unet)
    if cfg.model.compile:
        unet = torch.compile(unet)
    register_trainable_only_hooks(accelerator)
    for obj in adapter.checkpoint_objects():
        accelerator.register_for_checkpointing(obj)
    run = Run(cfg, accelerator, components, noise_scheduler, unet, models.get("text_encoder", components.text_encoder),
              weight_dtype, next(components.vae.parameters()).dtype, moments[0], text_cache, adapter,
              moments[1] if len(moments) > 1 else None)

    global_step = start_tracking(cfg, accelerator, resume_from)
    loop = Loop(cfg=cfg, accelerator=accelerator, models=list(models.values()), optimizer=optimizer,
                lr_scheduler=lr_scheduler, dataloader=dataloader, params=[p for g in groups for p in g["params"]],
                step_fn=lambda batch: training_step(run, batch), hooks=adapter,
                validate=lambda step, tag: validation_images(run, step, tag), max_steps=max_steps,
                per_epoch=per_epoch)
    global_step = run_loop(loop, global_step, resume_from)
    if accelerator.is_main_process:
        finish(run, records, global_step)
    accelerator.end_training()
    return cfg.output_dir


def _with_prior_prompts(cfg: RecipeConfig, records: list) -> list:
    """Base-model prior: each instance image carries its concept's class prompt (the prompt the prior acts on)."""
    from dataclasses import replace

    db = cfg.dreambooth
    if db is None or not db.prior_preservation or db.prior != "base_model":
        return records
    return [replace(r, meta=dict(r.meta, prior_prompt=r.meta["class_prompt"])) for r in records]


def finish(run: Run, records, global_step: int) -> None:
    """The shareable result: the adapter's files with the metadata header, final samples and the model card."""
    from ldm_finetune.models import base_model_info
    from ldm_finetune.sharing import training_header, write_model_card

    cfg = run.cfg
    unet = run.accelerator.unwrap_model(run.unet)
    captions = [r.caption for r in records]
    trigger_words = sorted(set(captions))
    header = training_header(cfg, base_model_info(cfg.model.pretrained, unet), captions, trigger_words,
                             global_step, run.noise_scheduler.config.prediction_type, run.adapter.kind)
    written = run.adapter.save(run, header)
    grid_path = validation_images(run, global_step, "final")
    write_model_card(cfg.output_dir, cfg, header, trigger_words,
                     grid_path.relative_to(cfg.output_dir).as_posix() if grid_path else None,
                     [p.relative_to(cfg.output_dir).as_posix() for p in written])
    for path in written:
        print(f"wrote {path}")


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
