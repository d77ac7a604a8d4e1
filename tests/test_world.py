"""The procedural world the mini base learns, and its ground-truth probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_finetune.data.world import (
    CLASS_NOUN,
    CLASS_PROMPTS,
    KINDS,
    TEXTURES,
    WorldItem,
    draw,
    parse_prompt,
    world_prompts,
    world_samples,
    world_words,
)
from ldm_finetune.models.world_probe import train_probe
from ldm_finetune.models.world_probe import load_probe
from ldm_finetune.training.mini_base import shipped_mini_base


def test_the_world_is_seeded_and_captions_parse_back_to_their_truth():
    a, items = world_samples(64, seed=3)
    b, _ = world_samples(64, seed=3)
    assert np.array_equal(a, b) and a.shape == (64, 32, 32, 3) and 0 <= a.min() and a.max() <= 1
    for item in items:
        parsed = parse_prompt(item.caption)
        if item.caption in CLASS_PROMPTS:  # the bare class noun asks for any texture
            assert parsed.kind == CLASS_NOUN and item.kind in TEXTURES
            continue
        assert (parsed.kind, parsed.colour, parsed.background) == (item.kind, item.colour, item.background)
    assert any(CLASS_NOUN in it.caption for it in items) and {it.kind for it in items} == set(KINDS)
    assert {it.caption for it in items} >= set(CLASS_PROMPTS)


def test_world_prompts_cover_every_kind_and_the_vocabulary_holds_them():
    prompts = world_prompts()
    assert {parse_prompt(p).kind for p in prompts} == set(KINDS)
    words = set(world_words())
    assert all(w in words for p in prompts for w in p.split())
    for needed in ("texture", "horse", "zebras", "compressed", "resin", "dry", "injected", "carbon"):
        assert needed in words


def test_a_shape_is_drawn_in_its_colour_on_its_background():
    image = draw(WorldItem("square", "red", "white", "a red square on a white background"),
                 np.random.default_rng(0))
    colours = {tuple(np.round(c * 255).astype(int)) for c in image.reshape(-1, 3)}
    assert colours == {(220, 40, 40), (245, 245, 245)}


@pytest.mark.slow
def test_the_shipped_probe_reads_fresh_world_images_and_rejects_wrong_prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_FINETUNE_CACHE", str(tmp_path / "cache"))
    probe = load_probe(shipped_mini_base())
    assert probe.score() >= 0.98  # new images, a seed the probe never trained on
    images, items = world_samples(64, seed=999)
    wrong = [f"a {'blue' if it.colour != 'blue' else 'red'} {it.kind}" if it.colour else
             f"a {'dotted' if it.kind != 'dotted' else 'striped'} texture" for it in items]
    assert np.mean([r["ok"] for r in probe.check(images, wrong)]) < 0.05  # the probe can say no


def test_probe_training_runs_and_is_seeded():
    a, b = train_probe(steps=3, batch=8, seed=0), train_probe(steps=3, batch=8, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
