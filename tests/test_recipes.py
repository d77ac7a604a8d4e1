"""Every recipe on the tiny model for a few steps: the files it writes, that plain diffusers loads them, that they
change generations; the Textual Inversion untouched-rows check; EMA export; DreamBooth priors; pivotal tuning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import lora_overrides

RECIPES = Path(__file__).parent.parent / "recipes"
pytestmark = pytest.mark.slow
TI_CONCEPT = ("[{token: <dry-slice>, initializer: dry, select: {state: dry}, num_images: 9, "
              "caption: 'A {token} of a carbon composite material'}]")
TI_PROMPT = "A <dry-slice> of a carbon composite material"


def train(recipe: str, model, data, out, **extra) -> int:
    from ldm_finetune.train import main

    settings = {"validation.seeds": "[0]"}
    settings.update(extra)
    return main([str(RECIPES / recipe), *lora_overrides(model, data, out, **settings)])


def images(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


# --- full fine-tuning + EMA ----------------------------------------------------------------------------------------

def test_full_finetune_exports_a_pipeline_with_the_ema_weights(tiny_model_dir, small_train_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    assert train("full_finetune.yaml", tiny_model_dir, small_train_dir, out, **{
        "full.ema_decay": 0.5, "checkpoint.every_steps": 3, "train.learning_rate": 1e-3}) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert not list((out / "pipeline").rglob("*.bin"))  # safetensors only
    exported = dict(pipe.unet.named_parameters())
    ckpt = out / "checkpoints" / "checkpoint-3"
    raw = load_file(ckpt / "trainable_0.safetensors")  # the trained (non-averaged) UNet at the last step
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    names = [n for n, _ in StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet.named_parameters()]
    assert ema["steps"] == 3 and len(ema["shadow"]) == len(names)
    for name, shadow in zip(names, ema["shadow"]):
        assert torch.equal(exported[name].detach(), shadow)  # the export is the EMA
    assert any(not torch.equal(raw[n], exported[n].detach()) for n in names)  # which differs from the raw weights
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert np.abs(images(pipe, "sf_dry sf_thickness") - images(base, "sf_dry sf_thickness")).max() > 1e-4
    assert "from_pretrained(\"path/to/this/folder/pipeline\")" in (out / "README.md").read_text()


def test_ema_update_rule():
    from ldm_finetune.models.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, device="cpu")
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # warm-up decay min(0.9, 2/11) = 2/11: shadow = 0 + (1 - 2/11) x (1 - 0)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 9 / 11))


# --- Textual Inversion ---------------------------------------------------------------------------------------------

def test_textual_inversion_changes_only_the_new_rows(tiny_model_dir, small_train_dir, prep_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ti"
    assert train("textual_inversion.yaml", tiny_model_dir, prep_dataset / "train", out, **{
        "data.concepts": TI_CONCEPT, "checkpoint.every_steps": 3, "textual_inversion.num_vectors": 2,
        "validation.prompts": f"['{TI_PROMPT}']"}) == 0
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    original = base.text_encoder.get_input_embeddings().weight.detach()
    trained = load_file(out / "checkpoints" / "checkpoint-3" / "trainable_0.safetensors")
    (weight,) = trained.values()
    vocab = original.shape[0]
    assert weight.shape[0] == vocab + 2  # <dry-slice> and <dry-slice>_1
    assert torch.equal(weight[:vocab], original)  # every other row bit-identical, despite AdamW's weight decay
    init = original[base.tokenizer.convert_tokens_to_ids("dry</w>")]
    assert not torch.equal(weight[vocab], init) and not torch.equal(weight[vocab + 1], init)
    learned = load_file(out / "learned_embeds.safetensors")
    assert list(learned) == ["<dry-slice>"] and learned["<dry-slice>"].shape == (2, original.shape[1])
    before = images(base, TI_PROMPT.replace("<dry-slice>", "dry"))
    base.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    assert np.abs(images(base, TI_PROMPT) - before).max() > 1e-5
    a1111 = load_file(out / "a1111" / "dry-slice.safetensors")
    assert torch.equal(a1111["emb_params"], learned["<dry-slice>"])


@pytest.mark.parametrize("concept, message", [
    ("[{token: <x>, initializer: w17h3r, select: {state: dry}}]", "initializer 'w17h3r' splits into 6 tokens"),
    ("[{token: dry, initializer: dry, select: {state: dry}}]", "placeholder token 'dry</w>' is already"),
])
def test_textual_inversion_bad_tokens(tiny_model_dir, prep_dataset, tmp_path, capsys, concept, message):
    concept = concept.replace("token: dry,", "token: dry</w>,")  # 'dry</w>' is the vocabulary entry of 'dry'
    code = train("textual_inversion.yaml", tiny_model_dir, prep_dataset / "train", tmp_path / "r",
                 **{"data.concepts": concept})
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_generate_loads_embeddings_in_both_layouts(tiny_model_dir, prep_dataset, tmp_path):
    from ldm_finetune.generation.generate import GenerateSettings, generate

    out = tmp_path / "ti"
    assert train("textual_inversion.yaml", tiny_model_dir, prep_dataset / "train", out,
                 **{"data.concepts": TI_CONCEPT}) == 0
    results = {}
    for layout in ("embeddings", "a1111"):
        settings = GenerateSettings(prompts=[TI_PROMPT], n=1, steps=2, height=32, width=32,
                                    embeddings=[str(out / layout)])
        (path,) = generate(str(tiny_model_dir), settings, tmp_path / layout)
        results[layout] = np.asarray(__import__("PIL.Image").Image.open(path))
    np.testing.assert_array_equal(results["embeddings"], results["a1111"])


# --- DreamBooth ----------------------------------------------------------------------------------------------------

def test_prior_preservation_loss_uses_the_class_half_with_its_weight():
    from ldm_finetune.training.dreambooth import prior_preservation_loss

    instance, prior = torch.tensor([1.0, 3.0]), torch.tensor([10.0, 20.0])  # per-sample losses of each half
    assert prior_preservation_loss(instance, prior, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert prior_preservation_loss(instance, prior, 0.0).item() == pytest.approx(2.0)


def test_base_model_context_gives_the_frozen_prediction():
    from ldm_finetune.adapters.lora import LoraAdapter
    from ldm_finetune.models.lora import add_lora
    from ldm_finetune.models.stable_diffusion import build_pipeline
    from ldm_finetune.training.config import load_config

    cfg = load_config(RECIPES / "lora.yaml")
    pipe, base = build_pipeline("tiny"), build_pipeline("tiny")
    add_lora(pipe.unet, pipe.text_encoder, cfg.lora)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    x, t, states = torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = base.unet(x, t, states).sample
        adapted = pipe.unet(x, t, states).sample
        with LoraAdapter(cfg).base_model(pipe.unet):
            frozen = pipe.unet(x, t, states).sample
        after = pipe.unet(x, t, states).sample
    assert torch.allclose(frozen, expected, atol=1e-6) and not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.equal(after, adapted)  # the adapters are back on


def test_dreambooth_class_images_are_generated_once_and_cached(tiny_model_dir, prep_dataset, tmp_path, capsys):
    out = tmp_path / "db"
    common = {"dreambooth.num_class_images": 3, "dreambooth.class_steps": 2, "validation.prompts": "['a texture']"}
    assert train("dreambooth.yaml", tiny_model_dir, prep_dataset / "train", out, **common) == 0
    err = capsys.readouterr().err
    assert "3 generated, 0 reused" in err
    assert "identifier 'w17h3r' splits into 6 tokens" in err
    folder = out / "class_images" / "a-texture"
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png"]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert train("dreambooth.yaml", tiny_model_dir, prep_dataset / "train", out,
                 **(common | {"dreambooth.num_class_images": 4, "checkpoint.resume": "null"})) == 0
    assert "1 generated, 3 reused" in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in files] == stamps  # the first three were not made again
    assert (out / "pipeline" / "model_index.json").is_file()


def test_lora_dreambooth_launch_and_reload(tiny_model_dir, prep_dataset, tmp_path):
    """The study's best single-concept recipe through a real `accelerate launch`, with the base-model prior."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ldb"
    overrides = lora_overrides(tiny_model_dir, prep_dataset / "train", out, **{
        "dreambooth.prior_preservation": "true", "dreambooth.prior": "base_model",
        "validation.prompts": "['a w17h3r texture']", "validation.seeds": "[0]"})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldm_finetune.train",
           str(RECIPES / "lora_dreambooth.yaml"), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    before = images(pipe, "a w17h3r texture")
    pipe.load_lora_weights(out)
    assert np.abs(images(pipe, "a w17h3r texture") - before).max() > 1e-5
    card = (out / "README.md").read_text()
    assert "a w17h3r texture" in card and "a th1ck texture" in card
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["ldm_finetune.config"])
    assert config["dreambooth"]["prior"] == "base_model" and len(config["data"]["concepts"]) == 4


@pytest.mark.parametrize("extra, message", [
    ({"dreambooth.prior": "folder"}, "dreambooth.prior=folder needs class_dir"),
    ({"data.concepts": "[{select: {state: dry}, caption: 'a w17h3r texture'}]"}, "needs class_prompt"),
    ({"data.concepts": "[{select: {state: dry}, num_images: 2, caption: 'a w17h3r texture', "
                       "class_prompt: 'a texture'}]", "dreambooth.prior": "base_model"}, "2 instance image(s)"),
    ({"data.concepts": "[{select: {state: wet}, caption: 'a x texture', class_prompt: 'a texture'}]"},
     "no image matches {'state': 'wet'}"),
])
def test_dreambooth_bad_inputs(tiny_model_dir, prep_dataset, tmp_path, capsys, extra, message):
    code = train("dreambooth.yaml", tiny_model_dir, prep_dataset / "train", tmp_path / "r", **extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_class_folder_with_non_images_is_an_error(tiny_model_dir, prep_dataset, tmp_path, capsys):
    folder = tmp_path / "class"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    concept = (f"[{{select: {{state: dry}}, caption: 'a w17h3r texture', class_prompt: 'a texture', "
               f"class_dir: {folder}}}]")
    code = train("dreambooth.yaml", tiny_model_dir, prep_dataset / "train", tmp_path / "r",
                 **{"dreambooth.prior": "folder", "data.concepts": concept})
    err = capsys.readouterr().err
    assert code == 2 and "not images (first: notes.txt)" in err, err


# --- pivotal tuning ------------------------------------------------------------------------------------------------

def test_pivotal_tuning_phases_and_both_file_forms(tiny_model_dir, prep_dataset, tmp_path):
    from PIL import Image

    from ldm_finetune.generation.generate import GenerateSettings, generate

    out = tmp_path / "piv"
    assert train("pivotal_tuning.yaml", tiny_model_dir, prep_dataset / "train", out, **{
        "data.concepts": TI_CONCEPT, "pivotal.ti_steps": 2, "train.max_steps": 4, "checkpoint.every_steps": 2,
        "validation.prompts": f"['{TI_PROMPT}']"}) == 0
    # after the TI phase: LoRA untouched (B still zero), embedding learned; after the LoRA phase: embedding frozen
    unet_2 = load_file(out / "checkpoints" / "checkpoint-2" / "trainable_0.safetensors")
    assert all(not v.any() for k, v in unet_2.items() if "lora_B" in k)
    (emb_2,) = load_file(out / "checkpoints" / "checkpoint-2" / "trainable_1.safetensors").values()
    learned = load_file(out / "learned_embeds.safetensors")["<dry-slice>"]
    assert torch.equal(emb_2[-1:], learned)
    final_lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.any() for k, v in final_lora.items() if "lora_B" in k)
    combined = load_file(out / "piv.safetensors")
    assert torch.equal(combined["bundle_emb.dry-slice.string_to_param.*"], learned)
    outputs = []
    for name, lora in (("folder", out), ("combined", out / "piv.safetensors")):
        settings = GenerateSettings(prompts=[TI_PROMPT], n=1, steps=2, height=32, width=32, loras=[(str(lora), 1.0)])
        (path,) = generate(str(tiny_model_dir), settings, tmp_path / name)
        outputs.append(np.asarray(Image.open(path)))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_identifiers_command(tiny_model_dir, run_cli):
    code, out, err = run_cli("identifiers", "--model", tiny_model_dir, "--n", "5")
    assert code == 0 and len(out.strip().splitlines()) == 6
    code, out, err = run_cli("identifiers", "--model", tiny_model_dir, "--check", "dry", "w17h3r")
    assert code == 2 and "w17h3r: not a single token" in err and "dry              one token" in out
