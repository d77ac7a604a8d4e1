"""Textual Inversion (Gal et al. 2022): new placeholder tokens whose embedding rows are the only thing that changes;
writes embeddings/<name>.safetensors (diffusers), a1111/<name>.safetensors and learned_embeds.safetensors."""

from __future__ import annotations

import torch

from ldm_finetune.adapters.base import Adapter
from ldm_finetune.core.errors import UserError
from ldm_finetune.sharing.embeddings import save_embeddings


class TextualInversionAdapter(Adapter):
    recipe = "textual_inversion"
    kind = "textual-inversion"
    modelspec_suffix = "textual-inversion"
    sections = ("textual_inversion",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.token_ids: dict[str, list[int]] = {}  # placeholder -> its rows in the embedding matrix
        self.text_encoder = None
        self.original = None
        self.frozen_rows = None

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.data.concepts:
            raise UserError(f"recipe {cfg.recipe} needs data.concepts, each with a token and an initializer")
        tokens = []
        for i, c in enumerate(cfg.data.concepts):
            if not c.token or not c.initializer:
                raise UserError(f"data.concepts[{i}]: Textual Inversion needs token (e.g. '<dry-slice>') and "
                                "initializer (a word such as 'dry')")
            if c.caption and "{token}" not in c.caption:
                raise UserError(f"data.concepts[{i}].caption: {c.caption!r} must contain {{token}}")
            tokens.append(c.token)
        if len(set(tokens)) != len(tokens):
            raise UserError(f"data.concepts: placeholder tokens must differ (got {tokens})")

    @classmethod
    def trains_text_encoder(cls, cfg) -> bool:
        return True  # its input embedding rows

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

    def usage_lines(self, base: str, prompt: str) -> list[str]:
        return ["from diffusers import StableDiffusionPipeline", "",
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}")',
                'pipe.load_textual_inversion("path/to/this/folder/embeddings/NAME.safetensors")  # each token',
                f'image = pipe("{prompt}").images[0]']
