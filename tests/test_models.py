"""The tiny random-init SD pipeline: written offline in diffusers layout, reloaded by plain diffusers; loading
errors."""

from __future__ import annotations

import json

import pytest
import torch

from ldm_finetune.core.errors import UserError
from ldm_finetune.models.stable_diffusion import build_pipeline, load_components


def test_tiny_model_cli_writes_a_diffusers_pipeline(tmp_path, run_cli):
    code, out, err = run_cli("tiny-model", tmp_path / "m", "--prediction-type", "v_prediction")
    assert code == 0, err
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert list((tmp_path / "m" / "unet").glob("*.safetensors")) and not list(tmp_path.glob("m/**/*.bin"))
    assert load_components(str(tmp_path / "m")).prediction_type == "v_prediction"


def test_tiny_model_generates_and_is_seeded(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)

    def gen(seed):
        return pipe("sf_dry sf_thickness", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    a, b, c = gen(0), gen(0), gen(1)
    assert a.shape == (1, 64, 64, 3)
    assert (a == b).all() and not (a == c).all()


def test_components_and_latent_scale(tiny_model_dir):
    c = load_components(str(tiny_model_dir))
    assert c.prediction_type == "epsilon"
    assert 2 ** (len(c.vae.config.block_out_channels) - 1) == 8  # latents are 1/8 of the image side, as in SD
    ids = c.tokenizer("sf_dry sf_thickness", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == c.tokenizer.bos_token_id


@pytest.mark.parametrize("name, message", [
    ("/no/such/model", "does not exist"),
    ("org/not-downloaded-model", "cannot load 'org/not-downloaded-model' from the Hugging Face hub"),
])
def test_loading_errors(name, message):
    with pytest.raises(UserError, match=message):
        load_components(name)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        load_components(str(tmp_path))


def test_full_size_presets_have_sd_shapes():
    """sd15 / sd21: the real architectures (random weights) for speed benchmarks; checked on config only."""
    from ldm_finetune.models.stable_diffusion import _arch

    assert _arch("sd15")["unet"]["cross_attention_dim"] == 768
    assert _arch("sd21")["unet"]["cross_attention_dim"] == 1024
    with pytest.raises(UserError, match="unknown model preset"):
        build_pipeline("sd3")
