"""The adapter registry: every recipe's facts come from its adapter, and a new kind is one class plus one registry
entry (sketched here with DoRA, Liu et al. 2024, through peft's LoRA config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig

from ldm_finetune.adapters import registry
from ldm_finetune.adapters.lora import LoraAdapter
from ldm_finetune.core.errors import UserError
from ldm_finetune.models.lora import TEXT_ENCODER_LORA_TARGETS
from ldm_finetune.models.stable_diffusion import build_pipeline
from ldm_finetune.training.config import load_config

LORA = Path(__file__).parent.parent / "recipes" / "lora.yaml"


class DoraAdapter(LoraAdapter):
    """Weight-decomposed LoRA: peft adds a trainable magnitude vector per adapted layer (use_dora=True)."""
    recipe = "dora"
    kind = "dora"

    def attach(self, components) -> None:
        lora = self.cfg.lora
        components.unet.add_adapter(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, use_dora=True,
                                                   init_lora_weights="gaussian", target_modules=lora.unet_modules()))
        if lora.text_encoder:
            components.text_encoder.add_adapter(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, use_dora=True,
                                                               target_modules=TEXT_ENCODER_LORA_TARGETS))


@pytest.fixture
def with_dora(monkeypatch):
    monkeypatch.setitem(registry.ADAPTERS, "dora", DoraAdapter)  # the one registry line a new kind adds


def test_a_new_adapter_kind_is_one_class_and_one_registry_line(with_dora):
    cfg = load_config(LORA, ["recipe=dora", "lora.rank=2", "model.pretrained=x", "train.mixed_precision=no"])
    adapter = registry.make_adapter(cfg)
    assert isinstance(adapter, DoraAdapter) and not cfg.text_encoder_trains and cfg.caches_text
    pipe = build_pipeline("tiny")
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    adapter.attach(pipe)
    (group,) = adapter.parameter_groups(pipe)
    names = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names) and len(group["params"]) == len(names)
    # it trains: one step moves the output of the adapted UNet
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    states = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    before = pipe.unet(x, t, states).sample.detach()
    optimizer = torch.optim.SGD(group["params"], lr=1.0)
    pipe.unet(x, t, states).sample.square().mean().backward()
    optimizer.step()
    assert not torch.allclose(before, pipe.unet(x, t, states).sample)
    assert "load_lora_weights" in "\n".join(adapter.usage_lines("base", "a prompt"))


def test_an_unknown_recipe_names_the_closest_one():
    with pytest.raises(UserError, match="recipe: 'lroa' is not a recipe.*did you mean 'lora'"):
        load_config(LORA, ["recipe=lroa"])


@pytest.mark.parametrize("recipe, trains_text", [("lora", False), ("full", False), ("textual_inversion", True),
                                                 ("pivotal", True)])
def test_every_shipped_recipe_asks_its_adapter(recipe, trains_text):
    path = Path(__file__).parent.parent / "recipes" / {"lora": "lora.yaml", "full": "full_finetune.yaml",
                                                       "textual_inversion": "textual_inversion.yaml",
                                                       "pivotal": "pivotal_tuning.yaml"}[recipe]
    cfg = load_config(path)
    assert cfg.recipe == recipe and cfg.adapter_class is registry.ADAPTERS[recipe]
    assert cfg.text_encoder_trains == trains_text
