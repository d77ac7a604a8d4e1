"""LoRA (Hu et al. 2022) through peft on the UNet's attention (optionally feed-forward / ResNet convolutions and the
text encoder); writes pytorch_lora_weights.safetensors in diffusers' layout."""

from __future__ import annotations

import contextlib

from ldm_finetune.adapters.base import Adapter
from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.sharing.lora import save_lora


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

    def save(self, run, header):
        unet = run.accelerator.unwrap_model(run.unet)
        text_encoder = run.accelerator.unwrap_model(run.text_encoder) if self.cfg.lora.text_encoder else None
        weights, adapter_metadata = lora_state_dict(unet, text_encoder)
        return [save_lora(self.cfg.output_dir, weights, adapter_metadata, header)]

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
        return ("For A1111 / ComfyUI: `ldm-finetune export path/to/this/folder --format kohya --out "
                "model.safetensors`.")
