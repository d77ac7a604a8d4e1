"""Full fine-tuning: the whole UNet (optionally the text encoder), with an EMA of the UNet weights that is what gets
exported; writes a complete diffusers pipeline (safetensors) to OUTPUT_DIR/pipeline."""

from __future__ import annotations

import contextlib
import copy
import json

from diffusers import DDIMScheduler

from ldm_finetune.adapters.base import Adapter
from ldm_finetune.core.io import atomic_dir
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.models.stable_diffusion import sd_pipeline


class FullAdapter(Adapter):
    recipe = "full"
    kind = "full"
    supports_dreambooth = True
    sections = ("full",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.frozen_unet = None

    @classmethod
    def trains_text_encoder(cls, cfg) -> bool:
        return cfg.full.train_text_encoder

    def attach(self, components) -> None:
        components.unet.requires_grad_(True)
        if self.cfg.full.train_text_encoder:
            components.text_encoder.requires_grad_(True)
        if self.cfg.dreambooth is not None and self.cfg.dreambooth.prior == "base_model":
            self.frozen_unet = copy.deepcopy(components.unet).requires_grad_(False)

    def text_encoder_lr(self) -> float | None:
        return self.cfg.full.text_encoder_lr

    def ema_settings(self, components):
        full = self.cfg.full
        return (components.unet, full.ema_decay, full.ema_on_cpu) if full.ema else None

    @contextlib.contextmanager
    def base_model(self, unet):
        # a frozen copy of the starting UNet stands in (one more UNet in memory)
        original_forward = unet.forward
        reference, frozen = next(unet.parameters()), next(self.frozen_unet.parameters())
        if (frozen.device, frozen.dtype) != (reference.device, reference.dtype):
            self.frozen_unet.to(reference.device, reference.dtype)
        unet.forward = self.frozen_unet.forward
        try:
            yield
        finally:
            unet.forward = original_forward

    def save(self, run, header):
        """OUTPUT_DIR/pipeline: a full diffusers pipeline (safetensors); EMA weights when EMA is on."""
        unet = run.accelerator.unwrap_model(run.unet)
        export_unet = run.ema.averaged_copy(unet) if run.ema is not None else unet
        text_encoder = run.accelerator.unwrap_model(run.text_encoder)
        scheduler = DDIMScheduler.from_config(run.noise_scheduler.config,
                                              **({"timestep_spacing": "trailing"}
                                                 if self.cfg.noise.zero_terminal_snr else {}))
        pipe = sd_pipeline(run.components.vae, text_encoder, run.components.tokenizer, export_unet, scheduler)
        folder = RunLayout(self.cfg.output_dir).pipeline
        with atomic_dir(folder, overwrite=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "training_metadata.json").write_text(json.dumps(header, indent=2))
        return [folder]

    def usage_lines(self, base: str, prompt: str) -> list[str]:
        return ["from diffusers import StableDiffusionPipeline", "",
                'pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder/pipeline")',
                f'image = pipe("{prompt}").images[0]']
