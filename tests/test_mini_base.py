"""The mini base: a shortened build through the same code as `ldm-finetune mini-base`, deterministic for a seed, in
the diffusers layout every recipe loads; the cache builds once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from ldm_finetune.data.world import world_words
from ldm_finetune.models.tokenizer import pieces
from ldm_finetune.training import mini_base
from ldm_finetune.training.mini_base import MiniBaseSettings, build_mini_base, mini_base_cached

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
SHORT = MiniBaseSettings(vae_steps=3, vae_batch=4, steps=3, batch=4, world_images=32, probe_steps=3, eval_seeds=1)


@pytest.fixture(scope="module")
def short_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "base"
    return out, build_mini_base(SHORT, out)


def test_a_short_build_is_a_diffusers_pipeline_with_the_whole_vocabulary(short_build):
    out, info = short_build
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.vae_scale_factor == 4 and pipe.tokenizer.model_max_length == 32
    for word in world_words():
        for piece in pieces(word):
            assert len(pipe.tokenizer.tokenize(piece)) == 1, piece
    assert not list(out.rglob("*.bin")) and (out / "probe.safetensors").is_file()
    assert set(info["parameters_m"]) == {"vae", "unet", "text_encoder"} and 0 <= info["probe_ok"] <= 1
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_the_build_is_deterministic_for_a_seed(short_build, tmp_path):
    out, _ = short_build
    again = tmp_path / "again"
    build_mini_base(SHORT, again)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        a, b = load_file(out / part), load_file(again / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_shipped_textual_inversion_runs_against_it_with_its_initializers(short_build, prep_dataset, tmp_path):
    out, _ = short_build
    cmd = [sys.executable, "-m", "ldm_finetune.train", str(ROOT / "recipes" / "textual_inversion.yaml"),
           f"model.pretrained={out}", f"data.train_dir={prep_dataset / 'train'}", f"output_dir={tmp_path / 'ti'}",
           "train.max_steps=2", "data.resolution=32", "validation.prompts=[]", "logging.report_to=none"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ti" / "embeddings" / "dry-slice.safetensors").is_file()


def test_the_cache_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_FINETUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = mini_base.build_mini_base
    monkeypatch.setattr(mini_base, "build_mini_base", lambda s, out: calls.append(out) or real(s, out))
    first = mini_base_cached(SHORT)
    assert mini_base_cached(SHORT) == first and len(calls) == 1
    assert json.loads((first / "mini_base.json").read_text())["settings"]["steps"] == 3
    other = MiniBaseSettings(**{**SHORT.__dict__, "seed": 1})
    assert mini_base_cached(other) != first and len(calls) == 2  # other settings, another folder
