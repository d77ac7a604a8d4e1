"""Pivotal tuning: Textual Inversion for `pivotal.ti_steps`, then LoRA with the learned tokens frozen (the pivot);
writes both standard files and <run name>.safetensors (kohya LoRA + bundled embeddings: one file for ComfyUI, A1111
and kohya's tools)."""

from __future__ import annotations

import json

from ldm_finetune.adapters.lora import LoraAdapter
from ldm_finetune.adapters.textual_inversion import TextualInversionAdapter
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.sharing.embeddings import token_name
from ldm_finetune.sharing.lora import write_kohya


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
        """The standard files (embeddings + pytorch_lora_weights) and the client file: kohya LoRA keys plus the
        embeddings as bundle_emb.<name>.string_to_param.*, the one-file form A1111 reads."""

        written = super().save(run, header)
        diffusers_file = self.lora.save_diffusers(run, header)
        bundled = {f"bundle_emb.{token_name(t)}.string_to_param.*": v for t, v in self.learned().items()}
        tokens = {"ldm_finetune.tokens": json.dumps({token_name(t): t for t in self.token_ids})}
        client = write_kohya(diffusers_file, RunLayout(self.cfg.output_dir).client_lora, bundled, tokens)
        return written + [diffusers_file, client]

    def usage_lines(self, base: str, prompt: str) -> list[str]:
        return ["from diffusers import StableDiffusionPipeline", "",
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}")',
                'pipe.load_textual_inversion("path/to/this/folder/embeddings/NAME.safetensors")  # each token',
                'pipe.load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")',
                f'image = pipe("{prompt}").images[0]']

    def sharing_note(self) -> str | None:
        name = RunLayout(self.cfg.output_dir).client_lora.name
        return (f"Which file for which tool: diffusers reads the folder (`embeddings/` + "
                f"`pytorch_lora_weights.safetensors`, lines above); ComfyUI, A1111 / Forge and kohya sd-scripts read "
                f"`{name}`: the LoRA in the kohya layout with its tokens bundled (`bundle_emb.*`); copy it into "
                f"`models/Lora/` as is. `ldm-finetune generate --lora` takes either.")
