"""Pivotal tuning: Textual Inversion for `pivotal.ti_steps`, then LoRA with the learned tokens frozen (the pivot);
writes both standard files and pivotal_combined.safetensors (kohya LoRA + bundled embeddings, one file for A1111)."""

from __future__ import annotations

import json

from safetensors.torch import save_file

from ldm_finetune.adapters.lora import LoraAdapter
from ldm_finetune.adapters.textual_inversion import TextualInversionAdapter
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.sharing.embeddings import token_name
from ldm_finetune.sharing.lora import DIFFUSERS_METADATA_KEY, kohya_header, read_lora, to_kohya


class PivotalAdapter(TextualInversionAdapter):
    """Phase 1 (steps < pivotal.ti_steps): only the new embeddings train. Phase 2: the embeddings are frozen at their
    learned value (the "pivot") and LoRA trains around them."""
    recipe = "pivotal"
    kind = "pivotal"
    modelspec_suffix = "lora"  # ModelSpec has no pivotal kind: its main file is a LoRA (the tokens travel apart)
    sections = ("textual_inversion", "pivotal", "lora")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.train.max_steps is not None and cfg.pivotal.ti_steps >= cfg.train.max_steps:
            raise UserError(f"pivotal.ti_steps: {cfg.pivotal.ti_steps} leaves no LoRA phase within "
                            f"train.max_steps={cfg.train.max_steps}")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lora = LoraAdapter(cfg)
        self.groups = None

    def attach(self, components) -> None:
        super().attach(components)
        self.lora.attach(components)

    def trained_models(self, components) -> dict:
        return {"unet": components.unet, "text_encoder": components.text_encoder}

    def _lr(self) -> float:
        return self.cfg.pivotal.embedding_lr

    def parameter_groups(self, components) -> list[dict]:
        self.groups = super().parameter_groups(components) + self.lora.parameter_groups(components)
        return self.groups

    def before_optimizer_step(self, step: int) -> None:
        # a parameter without a gradient is skipped entirely by AdamW (no update, no weight decay)
        in_ti_phase = step < self.cfg.pivotal.ti_steps
        idle = self.groups[1:] if in_ti_phase else self.groups[:1]
        for group in idle:
            for p in group["params"]:
                p.grad = None

    def base_model(self, unet):
        return self.lora.base_model(unet)

    def save(self, run, header):
        """The standard files (embeddings + pytorch_lora_weights) and pivotal_combined.safetensors: kohya LoRA keys
        plus the embeddings as bundle_emb.<name>.string_to_param.*, the one-file form A1111 reads."""

        written = super().save(run, header) + self.lora.save(run, header)
        weights, metadata = read_lora(written[-1])
        combined = to_kohya(weights, json.loads(metadata[DIFFUSERS_METADATA_KEY]))
        for token, vectors in self.learned().items():
            combined[f"bundle_emb.{token_name(token)}.string_to_param.*"] = vectors
        path = RunLayout(self.cfg.output_dir).pivotal_combined
        with atomic_path(path) as tmp:
            save_file(combined, str(tmp), metadata=kohya_header(header, weights) | {
                "ldm_finetune.tokens": json.dumps({token_name(t): t for t in self.token_ids})})
        return written + [path]

    def usage_lines(self, base: str, prompt: str) -> list[str]:
        return ["from diffusers import StableDiffusionPipeline", "",
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}")',
                'pipe.load_textual_inversion("path/to/this/folder/embeddings/NAME.safetensors")  # each token',
                'pipe.load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")',
                f'image = pipe("{prompt}").images[0]']

    def sharing_note(self) -> str | None:
        return ("For A1111 / ComfyUI: `ldm-finetune export path/to/this/folder --format kohya --out "
                "model.safetensors` (or use `pivotal_combined.safetensors`).")
