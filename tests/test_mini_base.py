"""The mini base: a shortened build through the same code as `ldm-finetune mini-base`, deterministic for a seed, in
the diffusers layout every recipe loads; the cache builds once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from ldm_finetune.data.world import world_words
from ldm_finetune.models.tokenizer import pieces
from ldm_finetune.models.world_probe import load_probe
from ldm_finetune.training import mini_base
from ldm_finetune.training.mini_base import (
    MiniBaseSettings,
    build_mini_base,
    mini_base_cached,
    pack_mini_base,
    shipped_mini_base,
    unpack_mini_base,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
SHORT = MiniBaseSettings(vae_steps=3, vae_batch=4, steps=3, decay_steps=1, batch=4, world_images=32, probe_steps=3,
                         eval_seeds=1)


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


def test_packing_for_the_repository_keeps_the_weights_to_fp16(short_build, tmp_path):
    out, _ = short_build
    packed = pack_mini_base(out, tmp_path / "packed")
    unpacked = unpack_mini_base(packed, tmp_path / "unpacked")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "probe.safetensors"):
        a, b = load_file(out / part), load_file(unpacked / part)
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), part
    assert StableDiffusionPipeline.from_pretrained(unpacked).tokenizer.model_max_length == 32


def test_mini_base_never_unpacks_over_a_base_of_the_users_own(short_build, monkeypatch, tmp_path, capsys):
    """`mini-base OUT --pack DIR` on a rebuilt OUT once copied the shipped weights over it, then packed those."""
    from ldm_finetune.cli import main

    monkeypatch.setenv("LDM_FINETUNE_CACHE", str(tmp_path / "cache"))
    own = tmp_path / "own"
    shutil.copytree(short_build[0], own)
    unet = own / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()
    assert main(["mini-base", str(own)]) == 2
    assert "another mini base" in capsys.readouterr().err
    assert main(["mini-base", str(own), "--pack", str(tmp_path / "packed")]) == 0
    assert unet.read_bytes() == before
    assert json.loads((tmp_path / "packed" / "mini_base.json").read_text())["settings"]["steps"] == 3
    assert main(["mini-base", str(tmp_path / "fresh")]) == 0  # an empty OUT still gets the shipped base
    assert (tmp_path / "fresh" / "mini_base.json").read_bytes() == (shipped_mini_base() / "mini_base.json").read_bytes()


def world_score(folder: Path, prompts: list[str], probe_from: Path, seeds=(0, 1)) -> float:
    """Share of the prompts' generations the probe reads right."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    probe = load_probe(probe_from)
    ok = []
    for seed in seeds:
        images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, height=32, width=32,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        ok += [r["ok"] for r in probe.check(images, prompts)]
    return sum(ok) / len(ok)


PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a green circle on a white background",
           "a white square on a black background", "a striped texture", "a checkerboard texture", "a dotted texture"]


def test_the_shipped_base_follows_world_prompts_and_an_untrained_one_does_not(short_build, monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_FINETUNE_CACHE", str(tmp_path / "cache"))
    shipped = shipped_mini_base()
    info = json.loads((shipped / "mini_base.json").read_text())
    assert info["probe_accuracy_on_world"] >= 0.98
    # issue 23's goal for the base's own generations: >= 85 % (the shipped base: 16 / 16 here, 98.5 % over the
    # 34-prompt probe; the base before it, 73.5 %)
    assert world_score(shipped, PROMPTS, shipped) >= 0.85
    assert world_score(short_build[0], PROMPTS, shipped) < 0.3  # 3 training steps: the same check fails


def test_the_cache_key_covers_every_module_the_build_runs():
    from ldm_finetune.training.mini_base import PACKAGE, build_code

    files = {str(p.relative_to(PACKAGE)) for p in build_code()}
    assert {"training/mini_base.py", "training/fit.py", "training/loop.py", "training/config.py", "data/world.py",
            "models/mini_base.py", "models/tokenizer.py", "models/world_probe.py", "models/noise.py",
            "data/caches.py"} <= files
    assert not any(f.startswith(("evaluation/", "generation/")) for f in files)  # what the build never runs
