"""Every adapter kind, by the `recipe:` value that chooses it. A new kind: one module in adapters/ + one line here."""

from __future__ import annotations

from ldm_finetune.adapters.base import Adapter
from ldm_finetune.adapters.full import FullAdapter
from ldm_finetune.adapters.lora import LoraAdapter
from ldm_finetune.adapters.pivotal import PivotalAdapter
from ldm_finetune.adapters.textual_inversion import TextualInversionAdapter

ADAPTERS: dict[str, type[Adapter]] = {cls.recipe: cls for cls in (
    LoraAdapter,
    FullAdapter,
    TextualInversionAdapter,
    PivotalAdapter,
)}


def make_adapter(cfg) -> Adapter:
    return ADAPTERS[cfg.recipe](cfg)
