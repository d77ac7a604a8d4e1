"""What trains, one class per recipe, chosen by `recipe:` through ADAPTERS (the loop in train.py is shared).

- LoraAdapter: peft LoRA on the UNet (and optionally the text encoder); writes pytorch_lora_weights.safetensors.
- FullAdapter: the whole UNet (and optionally the text encoder), with an EMA of the weights; writes a complete
  diffusers pipeline (safetensors), with the EMA weights when EMA is on.
- TextualInversionAdapter (Gal et al. 2022): new placeholder tokens whose embedding rows are the only thing that
  changes; writes learned_embeds files (diffusers) and the A1111 layout.
- PivotalAdapter: Textual Inversion for `pivotal.ti_steps`, then LoRA with the learned tokens frozen; writes both
  standard files and one combined file.

Each adapter says which parameters train (`parameter_groups`), which models go through accelerate.prepare
(`trained_models`), hooks around the optimizer step, how to get the frozen base model's prediction (DreamBooth's
base-model prior) and what to save.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_finetune.errors import UserError

EMBEDDINGS_NAME = "learned_embeds.safetensors"


class Adapter:
    kind = "adapter"  # model-spec suffix in the shared file's header

    def __init__(self, cfg):
        self.cfg = cfg

    def attach(self, components) -> None:
        """Add / unfreeze the trainable parts (everything is frozen before this is called)."""

    def trained_models(self, components) -> dict:
        """The models holding trainable parameters: they go through accelerate.prepare (DDP, autocast)."""
        out = {"unet": components.unet}
        if self.cfg.text_encoder_trains:
            out["text_encoder"] = components.text_encoder
        return out

    def parameter_groups(self, components) -> list[dict]:
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        """Called with the gradients in place, before optimizer.step (step = optimizer steps done so far)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step that updated the weights."""

    def expand_token(self, token: str) -> str:
        return token

    def checkpoint_objects(self) -> list:
        """Extra state that checkpoints must hold (e.g. the EMA weights)."""
        return []

    @contextlib.contextmanager
    def base_model(self, unet):
        """Inside: `unet` predicts like the frozen base model (for DreamBooth's base-model prior)."""
        raise UserError(f"recipe {self.cfg.recipe} has no frozen base prediction; use dreambooth.prior=generate")
        yield  # pragma: no cover

    def save(self, run, header: dict[str, str]) -> list[Path]:
        raise NotImplementedError


def _group(params, lr: float) -> dict:
    return {"params": [p for p in params if p.requires_grad], "lr": lr}


# --- LoRA --------------------------------------------------------------------------------------------------------

class LoraAdapter(Adapter):
    kind = "lora"

    def attach(self, components) -> None:
        from ldm_finetune.lora import add_lora

        add_lora(components.unet, components.text_encoder, self.cfg.lora)

    def parameter_groups(self, components) -> list[dict]:
        groups = [_group(components.unet.parameters(), self.cfg.train.learning_rate)]
        if self.cfg.lora.text_encoder:
            lr = self.cfg.lora.text_encoder_lr or self.cfg.train.learning_rate
            groups.append(_group(components.text_encoder.parameters(), lr))
        return groups

    @contextlib.contextmanager
    def base_model(self, unet):
        unet.disable_adapters()  # peft: the LoRA layers return the base layer's output
        try:
            yield
        finally:
            unet.enable_adapters()

    def save(self, run, header):
        from ldm_finetune.lora import lora_state_dict, save_lora

        unet = run.accelerator.unwrap_model(run.unet)
        text_encoder = run.accelerator.unwrap_model(run.text_encoder) if self.cfg.lora.text_encoder else None
        weights, adapter_metadata = lora_state_dict(unet, text_encoder)
        return [save_lora(self.cfg.output_dir, weights, adapter_metadata, header)]


# --- full fine-tuning with EMA ------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of parameters (fp32 copies), with the usual warm-up of the decay."""

    def __init__(self, params, decay: float, device):
        self.shadow = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in params]
        self.decay, self.steps = decay, 0

    def current_decay(self) -> float:
        # early steps average over fewer updates, so the average is not dominated by the random-ish start
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self, params) -> None:
        self.steps += 1
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.device, p.dtype))

    def averaged_copy(self, model):
        """A copy of `model` holding the averaged weights (the model itself is left as it is)."""
        average = copy.deepcopy(model)
        self.copy_to(average.parameters())
        return average

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)


class FullAdapter(Adapter):
    kind = "full"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ema = None
        self.unet = None
        self.frozen_unet = None

    def attach(self, components) -> None:
        components.unet.requires_grad_(True)
        if self.cfg.full.train_text_encoder:
            components.text_encoder.requires_grad_(True)
        self.unet = components.unet
        if self.cfg.dreambooth is not None and self.cfg.dreambooth.prior == "base_model":
            self.frozen_unet = copy.deepcopy(components.unet).requires_grad_(False)

    def parameter_groups(self, components) -> list[dict]:
        groups = [_group(components.unet.parameters(), self.cfg.train.learning_rate)]
        if self.cfg.full.train_text_encoder:
            lr = self.cfg.full.text_encoder_lr or self.cfg.train.learning_rate
            groups.append(_group(components.text_encoder.parameters(), lr))
        if self.cfg.full.ema:
            device = "cpu" if self.cfg.full.ema_on_cpu else next(components.unet.parameters()).device
            self.ema = EMA(components.unet.parameters(), self.cfg.full.ema_decay, device)
        return groups

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.unet.parameters())

    def checkpoint_objects(self) -> list:
        return [self.ema] if self.ema is not None else []

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
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from data_prep.io import atomic_dir

        unet = run.accelerator.unwrap_model(run.unet)
        export_unet = self.ema.averaged_copy(unet) if self.ema is not None else unet
        text_encoder = run.accelerator.unwrap_model(run.text_encoder)
        scheduler = DDIMScheduler.from_config(run.noise_scheduler.config,
                                              **({"timestep_spacing": "trailing"}
                                                 if self.cfg.noise.zero_terminal_snr else {}))
        pipe = StableDiffusionPipeline(vae=run.components.vae, text_encoder=text_encoder,
                                       tokenizer=run.components.tokenizer, unet=export_unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        folder = self.cfg.output_dir / "pipeline"
        with atomic_dir(folder, overwrite=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "training_metadata.json").write_text(json.dumps(header, indent=2))
        return [folder]


# --- Textual Inversion --------------------------------------------------------------------------------------------

def token_name(token: str) -> str:
    """A file-name-safe name for a placeholder token: '<dry-slice>' -> 'dry-slice'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "embedding"


class TextualInversionAdapter(Adapter):
    kind = "textual-inversion"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.token_ids: dict[str, list[int]] = {}  # placeholder -> its rows in the embedding matrix
        self.text_encoder = None
        self.original = None
        self.frozen_rows = None

    def expand_token(self, token: str) -> str:
        n = self.cfg.textual_inversion.num_vectors
        return " ".join([token] + [f"{token}_{i}" for i in range(1, n)])

    def attach(self, components) -> None:
        tokenizer, text_encoder = components.tokenizer, components.text_encoder
        n = self.cfg.textual_inversion.num_vectors
        init_ids = {}
        for c in self.cfg.data.concepts:
            if c.token in tokenizer.get_vocab():
                raise UserError(f"placeholder token {c.token!r} is already in the tokenizer's vocabulary; "
                                "choose a new string such as '<dry-slice>'")
            ids = tokenizer.encode(c.initializer, add_special_tokens=False)
            if len(ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise UserError(f"initializer {c.initializer!r} splits into {len(ids)} tokens {pieces}; choose a "
                                "word that is a single token (`ldm-finetune identifiers --model M --check WORD`)")
            init_ids[c.token] = ids[0]
        for c in self.cfg.data.concepts:
            names = self.expand_token(c.token).split(" ")
            tokenizer.add_tokens(names)
            self.token_ids[c.token] = tokenizer.convert_tokens_to_ids(names)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token, ids in self.token_ids.items():
                weight[ids] = weight[init_ids[token]].clone()  # all vectors start at the initializer's embedding
        weight.requires_grad_(True)
        self.text_encoder = text_encoder
        assert len(next(iter(self.token_ids.values()))) == n

    def trained_models(self, components) -> dict:
        return {"text_encoder": components.text_encoder}

    def parameter_groups(self, components) -> list[dict]:
        weight = components.text_encoder.get_input_embeddings().weight
        # the untouched rows, to restore after every step: AdamW's weight decay would otherwise move them too
        self.original = weight.detach().clone()
        new_rows = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        for ids in self.token_ids.values():
            new_rows[ids] = True
        self.frozen_rows = ~new_rows
        return [{"params": [weight], "lr": self._lr()}]

    def _lr(self) -> float:
        return self.cfg.train.learning_rate

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        weight = self.text_encoder.get_input_embeddings().weight
        weight[self.frozen_rows] = self.original[self.frozen_rows].to(weight.dtype)

    def learned(self) -> dict[str, torch.Tensor]:
        weight = self.text_encoder.get_input_embeddings().weight.detach()
        return {t: weight[ids].to("cpu", torch.float32).contiguous() for t, ids in self.token_ids.items()}

    def save(self, run, header):
        return save_embeddings(self.cfg.output_dir, self.learned(), header)


def save_embeddings(folder: Path, learned: dict[str, torch.Tensor], header: dict[str, str]) -> list[Path]:
    """embeddings/<name>.safetensors ({token: (n, D)}, what diffusers' load_textual_inversion reads, one token per
    file), a1111/<name>.safetensors ({"emb_params": (n, D)}; A1111 uses the file name as the prompt word), and
    learned_embeds.safetensors when there is a single token."""
    from data_prep.io import atomic_path

    written = []
    meta = {k: v for k, v in header.items()}
    for token, vectors in learned.items():
        for sub, data in (("embeddings", {token: vectors}), ("a1111", {"emb_params": vectors})):
            path = folder / sub / f"{token_name(token)}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(data, str(tmp), metadata=meta | {"ldm_finetune.token": token})
            written.append(path)
    if len(learned) == 1:
        token, vectors = next(iter(learned.items()))
        with atomic_path(folder / EMBEDDINGS_NAME) as tmp:
            save_file({token: vectors}, str(tmp), metadata=meta | {"ldm_finetune.token": token})
        written.append(folder / EMBEDDINGS_NAME)
    return written


# --- pivotal tuning -----------------------------------------------------------------------------------------------

class PivotalAdapter(TextualInversionAdapter):
    """Phase 1 (steps < pivotal.ti_steps): only the new embeddings train. Phase 2: the embeddings are frozen at their
    learned value (the "pivot") and LoRA trains around them."""
    kind = "pivotal"

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
        from data_prep.io import atomic_path
        from ldm_finetune.lora import kohya_header, read_lora, to_kohya

        written = super().save(run, header) + self.lora.save(run, header)
        weights, metadata = read_lora(written[-1])
        combined = to_kohya(weights, json.loads(metadata["lora_adapter_metadata"]))
        for token, vectors in self.learned().items():
            combined[f"bundle_emb.{token_name(token)}.string_to_param.*"] = vectors
        path = self.cfg.output_dir / "pivotal_combined.safetensors"
        with atomic_path(path) as tmp:
            save_file(combined, str(tmp), metadata=kohya_header(header, weights) | {
                "ldm_finetune.tokens": json.dumps({token_name(t): t for t in self.token_ids})})
        return written + [path]


ADAPTERS = {"lora": LoraAdapter, "full": FullAdapter, "textual_inversion": TextualInversionAdapter,
            "pivotal": PivotalAdapter}


def make_adapter(cfg) -> Adapter:
    return ADAPTERS[cfg.recipe](cfg)
