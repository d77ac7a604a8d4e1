"""The Stable Diffusion task: every SD recipe (LoRA, full, Textual Inversion, pivotal; DreamBooth or captioned
images) is this task with an adapter (what trains, adapters/) and an objective (the batch and its loss).

    accelerate launch -m ldm_finetune.train recipes/lora.yaml [key.sub=value ...] [--dry-run]

Reading order: `check` reads the training images before anything heavy loads; `build` loads the model, makes the
DreamBooth class images with the untouched base model, attaches the adapter, casts (frozen weights in the mixed
precision dtype, trained ones in fp32) and builds the dataset with its caches; `loss` is one training step; `save`
writes the adapter's shareable files, the final samples and the model card. The loop itself is fit.py's.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params

from ldm_finetune.adapters.registry import make_adapter
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.data.caches import (
    cache_key,
    encode_captions,
    encode_latent_moments,
    load_or_encode_latents,
    sample_latents,
    tokenize,
)
from ldm_finetune.data.images import CaptionedImages, PairedImages
from ldm_finetune.data.records import concept_records, pixel_sizes, read_records, scanner_windows
from ldm_finetune.models.ema import EMA
from ldm_finetune.models.noise import DiffusionObjective, Noised
from ldm_finetune.models.stable_diffusion import base_model_info, grid, inference_pipeline, load_components, render
from ldm_finetune.sharing.metadata import training_header, write_model_card
from ldm_finetune.training.config import RecipeConfig
from ldm_finetune.training.dreambooth import (
    check_instance_counts,
    prepare_class_records,
    make_prior,
    warn_split_identifiers,
)
from ldm_finetune.training.task import Task

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StableDiffusionTask(Task):
    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.layout = RunLayout(cfg.output_dir)
        self.adapter = make_adapter(cfg)
        self.records = None  # the (image, caption) pairs trained on
        self.accelerator = self.components = self.noise_scheduler = None
        self.unet = self.text_encoder = None  # as prepared by accelerate (DDP-wrapped, maybe compiled)
        self.weight_dtype = self.vae_dtype = None
        self.latent_moments = None  # (N, 8, h, w) cached VAE posteriors, or None
        self.class_moments = None  # cached posteriors of the DreamBooth class images, or None
        self.text_cache = None  # caption -> (77, D) hidden states, or None
        self.prior_states = None  # base-model prior: class prompt -> (77, D) states of the untouched text encoder

    # --- set-up ------------------------------------------------------------------------------------------------

    def check(self) -> None:
        self.records = training_records(self.cfg, self.adapter.expand_token)

    def num_examples(self) -> int:
        return len(self.records) * self.cfg.data.repeats

    def build(self, accelerator) -> torch.utils.data.Dataset:
        cfg = self.cfg
        self.accelerator = accelerator
        self.weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]  # as fit resolved train.mixed_precision
        components = load_components(cfg.model.pretrained, cfg.model.revision, cfg.model.variant)
        components.noise_scheduler = build_noise_scheduler(cfg, components.noise_scheduler)
        self.components = components
        self.use_schedule(components.noise_scheduler)
        if cfg.dreambooth is not None and accelerator.is_main_process:
            for line in warn_split_identifiers(components.tokenizer, self.records,
                                               [c.class_prompt for c in cfg.data.concepts]):
                print(line, file=sys.stderr)
        # DreamBooth class images come from the base model, so they are made before the adapter changes it
        class_records = prepare_class_records(cfg, accelerator, components)
        self.records = _with_prior_prompts(cfg, self.records)
        self.prior_states = frozen_prior_states(components, self.records, accelerator.device)
        prepare_models(cfg, components, self.adapter, self.weight_dtype, accelerator.device)
        self.vae_dtype = next(components.vae.parameters()).dtype
        self.unet, self.text_encoder = components.unet, components.text_encoder
        dataset, parts = build_dataset(cfg, self.records, class_records)
        moments, self.text_cache = build_caches(cfg, accelerator, components, parts)
        self.latent_moments = moments[0]
        self.class_moments = moments[1] if len(moments) > 1 else None
        return dataset

    def parameter_groups(self) -> list[dict]:
        return self.adapter.parameter_groups(self.components)

    def trained_models(self) -> dict:
        return self.adapter.trained_models(self.components)

    def use_prepared(self, models: dict) -> None:
        self.unet = models.get("unet", self.components.unet)
        self.text_encoder = models.get("text_encoder", self.components.text_encoder)
        if self.cfg.model.compile:
            self.unet = torch.compile(self.unet)

    def make_ema(self):
        settings = self.adapter.ema_settings(self.components)
        self.ema = EMA.of(*settings) if settings is not None else None
        return self.ema

    def checkpoint_objects(self) -> list:
        return self.adapter.checkpoint_objects()

    def before_optimizer_step(self, step: int) -> None:
        self.adapter.before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        self.adapter.after_optimizer_step(step)

    # --- the step ----------------------------------------------------------------------------------------------

    def encoder_hidden_states(self, captions: list[str], droppable: int | None = None):
        """(B, 77, D) text states; caption dropout applies to the first `droppable` captions (default: all), so
        DreamBooth's class captions and prior prompts always keep their text."""
        n = len(captions) if droppable is None else droppable
        if self.cfg.data.caption_dropout > 0 and n > 0:
            # caption dropout: some images train unconditioned, keeping classifier-free guidance meaningful
            drop = torch.rand(n) < self.cfg.data.caption_dropout
            captions = ["" if d else c for c, d in zip(captions[:n], drop.tolist())] + captions[n:]
        device = self.accelerator.device
        if self.text_cache is not None:
            return torch.stack([self.text_cache[c] for c in captions]).to(device, self.weight_dtype)
        ids = tokenize(self.components.tokenizer, captions).to(device)
        if self.cfg.text_encoder_trains:
            return self.text_encoder(ids)[0]  # (B, 77, D)
        with torch.no_grad(), self.frozen_precision():
            return self.text_encoder(ids)[0]

    def frozen_precision(self):
        """The frozen encoders run in their own weights' dtype, outside the step's autocast, as the caches encode
        and as diffusers' training examples run them: bf16 autocast would run the VAE's group norms at full
        resolution in fp32, and fp16 autocast would run the VAE kept in fp32 (fp16 overflows in it) in fp16."""
        return torch.autocast(self.accelerator.device.type, enabled=False)

    def use_schedule(self, noise_scheduler) -> None:
        """The training schedule, the diffusion objective on it and the DreamBooth prior wrapping that objective."""
        self.noise_scheduler = noise_scheduler
        self.objective = DiffusionObjective.from_config(self.cfg.noise, noise_scheduler)
        self.prior = make_prior(self.cfg.dreambooth, self.objective, self.base_model_prior_loss)

    def batch_latents(self, batch: dict, prefix: str = ""):
        """(B, 4, R/8, R/8) latents of the batch's images (or of its class images, prefix "class_")."""
        moments = self.class_moments if prefix else self.latent_moments
        scaling = self.components.vae.config.scaling_factor
        if moments is not None:
            latents = sample_latents(moments[batch[prefix + "index"].cpu()], scaling)
        else:
            pixels = batch[prefix + "pixel_values"].to(self.accelerator.device, self.vae_dtype)
            with torch.no_grad(), self.frozen_precision():
                moments = self.components.vae.encode(pixels).latent_dist.parameters.float()
            latents = sample_latents(moments, scaling)  # drawn in fp32, as from the cache
        return latents.to(self.accelerator.device, self.weight_dtype)

    def loss(self, batch: dict):
        """Encode, noise, predict; the objective's loss, with DreamBooth's prior term when it is on (self.prior)."""
        latents, captions = self.batch_latents(batch), list(batch["caption"])
        n_instance = latents.shape[0]
        if "class_index" in batch:  # DreamBooth with class images: instance and class halves in one forward pass
            latents = torch.cat([latents, self.batch_latents(batch, "class_")])
            captions += batch["class_caption"]
        noised = self.objective.noised(latents)
        states = self.encoder_hidden_states(captions, droppable=n_instance)
        model_pred = self.unet(noised.x_t, noised.timesteps, states, return_dict=False)[0]
        return self.prior.loss(model_pred, noised, n_instance, batch)

    def base_model_prior_target(self, noisy_latents, timesteps, class_prompts: list[str]):
        """What the frozen base model predicts on the class prompt: the base UNet on the states of the untouched
        text encoder (encoded before training), so drift of the class prompt's own text states is seen too."""
        frozen = torch.stack([self.prior_states[p] for p in class_prompts]).to(noisy_latents.device,
                                                                                 self.weight_dtype)
        unet = self.accelerator.unwrap_model(self.unet)
        with torch.no_grad(), self.adapter.base_model(unet):
            return unet(noisy_latents, timesteps, frozen, return_dict=False)[0]

    def base_model_prior_loss(self, noisy_latents, timesteps, class_prompts: list[str]):
        """Prior without class images: on the class prompt, the model (UNet and, when it trains, text encoder) must
        keep predicting what the frozen base model predicts for the same noisy input."""
        target = self.base_model_prior_target(noisy_latents, timesteps, class_prompts)
        model_pred = self.unet(noisy_latents, timesteps, self.encoder_hidden_states(class_prompts, droppable=0),
                               return_dict=False)[0]
        return self.objective.loss(model_pred, Noised(noisy_latents, timesteps, target), weighted=False)

    # --- validation and the result -----------------------------------------------------------------------------

    def validate(self, step: int, tag: str) -> Path | None:
        """Render the fixed prompts x seeds with the current weights (eval mode, no grad), save and log the grid."""
        v = self.cfg.validation
        if not v.prompts or not self.accelerator.is_main_process:
            return None
        unet = self.accelerator.unwrap_model(self.unet)
        text_encoder = self.accelerator.unwrap_model(self.text_encoder)
        # the encoders may have been parked on the CPU by the caches
        self.components.vae.to(self.accelerator.device)
        text_encoder.to(self.accelerator.device)
        pipe = inference_pipeline(self.components, unet=unet, text_encoder=text_encoder)
        was_training = unet.training
        unet.eval()
        text_encoder.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                rows = render(pipe, v.prompts, v.seeds, v.num_inference_steps, v.guidance_scale, v.negative_prompt,
                              self.cfg.data.resolution, self.cfg.data.resolution)
        finally:
            unet.train(was_training)
            text_encoder.train(self.cfg.text_encoder_trains)
        image = grid(rows)
        path = self.layout.sample_grid(tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(image), step, dataformats="HWC")
        return path

    def save(self, global_step: int) -> list[Path]:
        """The shareable result: the adapter's files with the metadata header, final samples and the model card."""
        cfg = self.cfg
        unet = self.accelerator.unwrap_model(self.unet)
        captions = [r.caption for r in self.records]
        trigger_words = sorted(set(captions))
        prediction_type = self.noise_scheduler.config.prediction_type
        header = training_header(cfg, base_model_info(cfg.model.pretrained, unet, prediction_type), captions,
                                 trigger_words, global_step, prediction_type, self.adapter.modelspec_suffix,
                                 len({r.path for r in self.records}), scanner_windows(self.records),
                                 pixel_sizes(self.records, cfg.data.resolution))
        written = self.adapter.save(self, header)
        grid_path = self.validate(global_step, "final")
        write_model_card(self.layout, cfg, self.adapter, header, trigger_words,
                         self.layout.relative(grid_path) if grid_path else None,
                         [self.layout.relative(p) for p in written])
        return written


def build_noise_scheduler(cfg: RecipeConfig, base_scheduler):
    """The model's training schedule with this recipe's prediction type and zero-terminal-SNR choice."""
    overrides = {}
    if cfg.model.prediction_type:
        overrides["prediction_type"] = cfg.model.prediction_type
    if cfg.noise.zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(base_scheduler.config, **overrides)


def training_records(cfg: RecipeConfig, expand_token) -> list:
    """The (image, caption) pairs this run trains on: all of data.train_dir, or the data.concepts selections."""
    needs_rows = not cfg.data.concepts or any(c.instance_dir is None for c in cfg.data.concepts)
    rows = read_records(cfg.data.train_dir, cfg.data.caption_column) if needs_rows else None
    if not cfg.data.concepts:
        return rows
    records = concept_records(rows, cfg.data.concepts, expand_token)
    if cfg.dreambooth is not None:
        check_instance_counts(records, cfg)
    return records


def _with_prior_prompts(cfg: RecipeConfig, records: list) -> list:
    """Base-model prior: each instance image carries its concept's class prompt (the prompt the prior acts on)."""
    db = cfg.dreambooth
    if db is None or not db.prior_preservation or db.prior != "base_model":
        return records
    return [replace(r, meta=dict(r.meta, prior_prompt=r.meta["class_prompt"])) for r in records]


def frozen_prior_states(components, records, device) -> dict | None:
    """The base-model prior's class prompts through the text encoder as loaded (before any adapter or training):
    {prompt: (77, D)}, or None when the prior is not the base model."""
    prompts = sorted({r.meta["prior_prompt"] for r in records if "prior_prompt" in r.meta})
    if not prompts:
        return None
    components.text_encoder.to(device)
    with torch.no_grad():
        return encode_captions(components.tokenizer, components.text_encoder, prompts, device)


def prepare_models(cfg: RecipeConfig, components, adapter, weight_dtype, device) -> None:
    """Freeze the base model, attach the adapter, move and cast: frozen weights in weight_dtype, trained in fp32."""
    for model in (components.vae, components.text_encoder, components.unet):
        model.requires_grad_(False)
    adapter.attach(components)
    _move(components.vae, device, torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    _move(components.text_encoder, device, weight_dtype)
    _move(components.unet, device, weight_dtype)
    cast_training_params([components.unet, components.text_encoder])  # fp32 trained weights: fp16 would lose updates
    if cfg.model.channels_last:  # convolutions then pick NHWC kernels; inputs follow the weights' layout
        components.unet.to(memory_format=torch.channels_last)
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


def build_dataset(cfg: RecipeConfig, records, class_records):
    """The training dataset; with DreamBooth class images, each item also carries a class image (class_* keys)."""
    load_pixels = cfg.data.cache_latents == "none"

    def images(recs, repeats=1):
        return CaptionedImages(recs, cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip, repeats,
                               load_pixels=load_pixels)

    instance = images(records, cfg.data.repeats)
    if not class_records:
        return instance, [instance]
    prior = images(class_records)
    return PairedImages(instance, prior), [instance, prior]


def build_caches(cfg: RecipeConfig, accelerator, components, datasets: list) -> tuple[list, dict | None]:
    """Latent moments per dataset (instance, DreamBooth class) and caption embeddings, computed once; the main
    process writes a disk cache before the others read it."""
    moments, text_cache = [None] * len(datasets), None
    device = accelerator.device
    if cfg.data.cache_latents != "none":
        vae_dtype = next(components.vae.parameters()).dtype
        for i, dataset in enumerate(datasets):
            key = cache_key(dataset.records, cfg.data.resolution, cfg.model.pretrained)
            path = (RunLayout(cfg.output_dir).cache / f"latents-{key}.safetensors"
                    if cfg.data.cache_latents == "disk" else None)
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
