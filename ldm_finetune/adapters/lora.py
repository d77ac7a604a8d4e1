"""LoRA (Hu et al. 2022) through peft on the UNet's attention (optionally feed-forward / ResNet convolutions and the
text encoder); writes pytorch_lora_weights.safetensors in diffusers' layout and <run name>.safetensors in the kohya
layout that ComfyUI, A1111 and kohya's tools load."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ldm_finetune.adapters.base import Adapter
from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.sharing.lora import save_lora, write_kohya


class LoraAdapter(Adapter):
    recipe = "lora"
    kind = "lora"
    modelspec_suffix = "lora"
    supports_dreambooth = True
    sections = ("lora",)

    @classmethod
    def trains_text_encoder(cls, cfg) -> bool:
        return cfg.lora.text_encoder

    def attach(self, components) -> None:
        add_lora(components.unet, components.text_encoder, self.cfg.lora)

    def text_encoder_lr(self) -> float | None:
        return self.cfg.lora.text_encoder_lr

    @contextlib.contextmanager
    def base_model(self, unet):
        unet.disable_adapters()  # peft: the LoRA layers return the base layer's output
        try:
            yield
        finally:
            unet.enable_adapters()

    def save_diffusers(self, run, header) -> Path:
        """pytorch_lora_weights.safetensors, the file the client-layout one is converted from."""
        unet = run.accelerator.unwrap_model(run.unet)
        text_encoder = run.accelerator.unwrap_model(run.text_encoder) if self.cfg.lora.text_encoder else None
        weights, adapter_metadata = lora_state_dict(unet, text_encoder)
        return save_lora(self.cfg.output_dir, weights, adapter_metadata, header)

    def save(self, run, header):
        diffusers_file = self.save_diffusers(run, header)
        return [diffusers_file, write_kohya(diffusers_file, RunLayout(self.cfg.output_dir).client_lora)]

    def usage_lines(self, base: str, prompt: str) -> list[str]:
        return ["from diffusers import StableDiffusionPipeline", "",
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}")',
                'pipe.load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")',
                f'image = pipe("{prompt}").images[0]']

    def card_rows(self) -> dict[str, str]:
        lora = self.cfg.lora
        return {"LoRA rank / alpha": f"{lora.rank} / {lora.alpha}",
                "LoRA targets": ", ".join(lora.targets) + (" + text encoder" if lora.text_encoder else "")}

    def sharing_note(self) -> str | None:
        name = RunLayout(self.cfg.output_dir).client_lora.name
        return (f"Which file for which tool: diffusers `load_lora_weights` reads `pytorch_lora_weights.safetensors`; "
                f"ComfyUI (LoraLoader), A1111 / Forge and kohya sd-scripts read `{name}` (kohya layout, explicit "
                f"alphas): copy it into their `models/Lora/` folder as is.")
