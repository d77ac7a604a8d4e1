"""Shareable LoRA files: the diffusers and kohya layouts load into plain diffusers with the same effect, a LoRA for
another model is an error, and `generate` is reproducible and honours the LoRA scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.layout import LORA_WEIGHT_NAME
from ldm_finetune.generation.generate import GenerateSettings, generate, parse_lora_arg
from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.models.stable_diffusion import build_pipeline
from ldm_finetune.sharing.lora import (
    DIFFUSERS_METADATA_KEY,
    check_lora_fits,
    read_lora,
    save_lora,
    to_kohya,
)
from ldm_finetune.training.config import LoraConfig


def images(pipe, prompt="sf_dry sf_thickness"):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


@pytest.fixture(scope="module")
def random_lora(tmp_path_factory):
    """A LoRA with large random B matrices (rank 4, alpha 8) on attention, ResNet convs and the text encoder, saved
    the way training saves it, plus the images the adapted pipeline renders."""
    pipe = build_pipeline("tiny")
    add_lora(pipe.unet, pipe.text_encoder, LoraConfig(rank=4, alpha=8.0, targets=["attention", "resnet"],
                                                           text_encoder=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    weights, meta = lora_state_dict(pipe.unet, pipe.text_encoder)
    folder = tmp_path_factory.mktemp("lora")
    save_lora(folder, weights, meta, {"ldm_finetune.recipe": "lora", "modelspec.architecture": "sd-cross32/lora",
                                           "ldm_finetune.tag_frequency": json.dumps({"sf_dry": 3})})
    return folder, images(pipe)


def test_diffusers_loads_our_file_unchanged_and_alpha_survives(random_lora):
    folder, expected = random_lora
    te_keys = [k for k in load_file(folder / LORA_WEIGHT_NAME) if k.startswith("text_encoder.")]
    # the diffusers layout's canonical names, whatever CLIPTextModel's module tree is in the installed transformers
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    pipe = build_pipeline("tiny")
    base = images(pipe)
    pipe.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME)  # diffusers 0.34 offline needs the name
    got = images(pipe)
    assert np.abs(got - base).max() > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-5)  # alpha/rank = 2 applied: the metadata header was read


def test_kohya_export_loads_to_the_same_images(random_lora, tmp_path, run_cli):
    folder, expected = random_lora
    out = tmp_path / "kohya.safetensors"
    code, _, err = run_cli("export", folder, "--format", "kohya", "--out", out)
    assert code == 0, err
    with safe_open(str(out), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert set(alphas.values()) == {8.0}
    assert meta["ldm_finetune.recipe"] == "lora" and json.loads(meta["ss_tag_frequency"]) == {"train": {"sf_dry": 3}}
    pipe = build_pipeline("tiny")
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)  # diffusers 0.34 offline needs the name
    np.testing.assert_allclose(images(pipe), expected, atol=1e-5)


def test_export_refuses_bad_targets(random_lora, tmp_path, run_cli):
    folder, _ = random_lora
    code, _, err = run_cli("export", folder, "--out", tmp_path / "k.pt")
    assert code == 2 and "must end in .safetensors" in err
    code, _, err = run_cli("export", tmp_path / "missing", "--out", tmp_path / "k.safetensors")
    assert code == 2 and "LoRA file not found" in err


def generate_settings(**kw):
    base = dict(prompts=["sf_dry sf_thickness"], n=2, seed=5, steps=2, height=32, width=32)
    base.update(kw)
    return GenerateSettings(**base)


def test_generate_is_reproducible_and_the_lora_scale_matters(random_lora, tiny_model_dir, tmp_path):
    folder, _ = random_lora

    def run(name, **kw):
        files = generate(str(tiny_model_dir), generate_settings(**kw), tmp_path / name)
        return np.stack([np.asarray(Image.open(f), dtype=np.float32) for f in files])

    base, again = run("base"), run("again")
    np.testing.assert_array_equal(base, again)  # same seed, same images
    np.testing.assert_array_equal(run("scale0", loras=[(str(folder), 0.0)]), base)
    full, half = run("scale1", loras=[(str(folder), 1.0)]), run("half", loras=[(str(folder), 0.5)])
    assert np.abs(full - base).mean() > 1 and np.abs(half - base).mean() > 0.5 and np.abs(full - half).mean() > 0.5
    record = json.loads((tmp_path / "half" / "generation.json").read_text())
    assert record["loras"] == [[str(folder), 0.5]] and record["files"] == ["sf-dry-sf-thickness_5.png",
                                                                           "sf-dry-sf-thickness_6.png"]
    # image i uses seed + i whatever n is: the first image of n=1 is the first of n=2. Up to one 8-bit level in a few
    # pixels: some CPUs pick other convolution kernels for another batch size (2 of 3,072 values seen); another seed
    # would change every pixel
    diff = np.abs(run("one", n=1)[0] - base[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_generate_cli_grayscale(random_lora, tiny_model_dir, tmp_path, run_cli):
    folder, _ = random_lora
    code, out, err = run_cli("generate", "--model", tiny_model_dir, "--lora", f"{folder}:0.7", "--prompt", "a",
                             "--prompt", "b", "--n", "1", "--steps", "2", "--height", "32", "--width", "32",
                             "--scheduler", "euler_a", "--grayscale", "--out", tmp_path / "g")
    assert code == 0, err
    files = sorted((tmp_path / "g").glob("*.png"))
    assert [f.name for f in files] == ["a_0.png", "b_0.png"]
    assert Image.open(files[0]).mode == "L" and Image.open(files[0]).size == (32, 32)


def _renamed(weights, old, new):
    return {k.replace(old, new): v for k, v in weights.items()}


def test_a_lora_for_another_model_is_an_error_not_a_silent_no_op(random_lora, tiny_model_dir, tmp_path, run_cli):
    folder, _ = random_lora
    weights = load_file(folder / LORA_WEIGHT_NAME)
    # modules that this UNet does not have (as with an SDXL LoRA on SD 1.x)
    alien = tmp_path / "alien.safetensors"
    save_file(_renamed(weights, "down_blocks.0", "down_blocks.7"), str(alien))
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--lora", alien, "--prompt", "a", "--n", "1",
                           "--steps", "1", "--height", "32", "--width", "32", "--out", tmp_path / "x")
    assert code == 2 and "LoRA modules do not exist in this model" in err and "down_blocks.7" in err
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()
    # right names, wrong widths (as with an SD 1.x LoRA, 768-wide cross-attention, on SD 2.x, 1024)
    key = next(k for k in weights if k.endswith("attn2.to_k.lora_A.weight"))
    wide = dict(weights, **{key: torch.zeros(4, 48)})
    with pytest.raises(UserError, match=r"wrong shape .*attn2.to_k \(LoRA input 48, model 32\)"):
        check_lora_fits(wide, build_pipeline("tiny"), "wide")
    with pytest.raises(UserError, match="no LoRA weights found"):
        check_lora_fits({"foo": torch.zeros(1)}, build_pipeline("tiny"), "empty")


def test_kohya_names_are_checked_too(random_lora):
    folder, _ = random_lora
    weights, meta = read_lora(folder)
    kohya = to_kohya(weights, json.loads(meta[DIFFUSERS_METADATA_KEY]))
    check_lora_fits(kohya, build_pipeline("tiny"), "ok")  # fits
    with pytest.raises(UserError, match="do not exist"):
        check_lora_fits(_renamed(kohya, "lora_unet_up_blocks_1", "lora_unet_up_blocks_9"),
                             build_pipeline("tiny"), "bad")


def test_lora_argument_parsing():
    assert parse_lora_arg("runs/lora") == ("runs/lora", 1.0)
    assert parse_lora_arg("runs/lora:0.6") == ("runs/lora", 0.6)
    assert parse_lora_arg("C:/loras/a.safetensors") == ("C:/loras/a.safetensors", 1.0)
    assert parse_lora_arg("x.safetensors:-1") == ("x.safetensors", -1.0)
