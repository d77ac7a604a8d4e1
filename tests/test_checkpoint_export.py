"""`export --format checkpoint`: one LDM-layout file that diffusers' own single-file loader (an independent reading
of the layout) turns back into the same pipeline, for the SD 1.x and SD 2.x key structures (small widths), a
v-prediction model with its A1111 config, LoRAs fused in, fp16; and the bad input it refuses."""

from __future__ import annotations

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.models.stable_diffusion import build_pipeline
from ldm_finetune.sharing.lora import save_lora, write_kohya
from ldm_finetune.training.config import LoraConfig

PREDICTION = {"tiny-sd15": "epsilon", "tiny-sd21": "v_prediction"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny-sd15 (epsilon) and tiny-sd21 (v-prediction) in diffusers layout."""
    out = {}
    for preset, prediction in PREDICTION.items():
        folder = tmp_path_factory.mktemp(preset) / "model"
        build_pipeline(preset, seed=1, prediction_type=prediction).save_pretrained(folder, safe_serialization=True)
        out[preset] = folder
    return out


def lora_for(preset: str, folder, seed: int = 0):
    """A LoRA (UNet + text encoder, alpha = rank / 2) with random up matrices, so it changes the model."""
    pipe = build_pipeline(preset)
    add_lora(pipe.unet, pipe.text_encoder, LoraConfig(rank=4, alpha=2.0, text_encoder=True,
                                                      targets=["attention", "feedforward", "resnet"]))
    weights, meta = lora_state_dict(pipe.unet, pipe.text_encoder)
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v for k, v in weights.items()}
    return save_lora(folder, weights, meta, {"ldm_finetune.base_family": "other"})


def single_file(path, config):
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config), safety_checker=None,
                                                    requires_safety_checker=False)


def image(pipe, prompt="a woven texture"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("preset", PREDICTION)
def test_round_trip_through_diffusers_single_file_loader(preset, models, run_cli, tmp_path):
    out = tmp_path / "model.safetensors"
    code, _, err = run_cli("export", models[preset], "--format", "checkpoint", "--out", out)
    assert code == 0, err
    original = StableDiffusionPipeline.from_pretrained(models[preset])
    loaded = single_file(out, models[preset])
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # fp32: bit for bit
    # the same weights; the images agree to float noise (diffusers' loader leaves some weights as strided views, so a
    # single-threaded matmul may take another kernel)
    assert abs(image(original) - image(loaded)).max() < 1e-5
    with safe_open(str(out), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    text_prefix = "cond_stage_model.model." if preset == "tiny-sd21" else "cond_stage_model.transformer.text_model."
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", text_prefix)) for k in keys)
    v = PREDICTION[preset] == "v_prediction"
    assert header["modelspec.prediction_type"] == ("v" if v else "epsilon")
    sidecar = out.with_suffix(".yaml")
    assert sidecar.is_file() == v
    if v:  # the config A1111 builds the model from: v parameterization, OpenCLIP, linear projections, head width
        params = yaml.safe_load(sidecar.read_text())["model"]["params"]
        assert params["parameterization"] == "v"
        assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
        unet = params["unet_config"]["params"]
        assert unet["use_linear_in_transformer"] and unet["num_head_channels"] == 8 and unet["context_dim"] == 48
        assert unet["channel_mult"] == [1, 1, 2, 2] and unet["attention_resolutions"] == [1, 2, 4]


def test_half_is_within_fp16(models, run_cli, tmp_path):
    out = tmp_path / "half.safetensors"
    assert run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", out, "--half")[0] == 0
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    original = StableDiffusionPipeline.from_pretrained(models["tiny-sd15"]).unet.state_dict()
    loaded = single_file(out, models["tiny-sd15"]).unet.state_dict()
    for key, value in original.items():
        torch.testing.assert_close(loaded[key].float(), value, rtol=1e-3, atol=1e-4)


def test_loras_fused_at_their_scale_and_a_run_folder_fuses_its_own(models, run_cli, tmp_path):
    lora = lora_for("tiny-sd15", tmp_path / "lora")
    out = tmp_path / "fused.safetensors"
    assert run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", out,
                   "--lora", f"{lora}:0.7")[0] == 0
    reference = StableDiffusionPipeline.from_pretrained(models["tiny-sd15"])
    base = image(reference)
    reference.load_lora_weights(str(lora))
    reference.set_adapters(["default_0"], adapter_weights=[0.7])
    with_lora = image(reference)
    fused = image(single_file(out, models["tiny-sd15"]))
    assert abs(with_lora - base).max() > 0.05  # the LoRA matters ...
    assert abs(fused - with_lora).max() < 2e-3  # ... and the fused checkpoint draws what the LoRA draws
    with safe_open(str(out), framework="pt") as f:
        assert '"scale": 0.7' in f.metadata()["ldm_finetune.fused_loras"]

    # a LoRA run's folder: its base (config.yaml's model.pretrained) with its LoRA, the same file as above at 1.0
    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(models["tiny-sd15"])}}))
    (run / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    assert run_cli("export", run, "--format", "checkpoint", "--out", tmp_path / "run.safetensors")[0] == 0
    explicit = tmp_path / "explicit.safetensors"
    assert run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", explicit, "--lora", lora)[0] == 0
    with safe_open(str(tmp_path / "run.safetensors"), framework="pt") as a, safe_open(str(explicit), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_bad_input_is_one_line_and_writes_nothing(models, run_cli, tmp_path):
    sd15_lora = lora_for("tiny-sd15", tmp_path / "sd15")
    cases = {
        "sd1 lora into sd2": (["--lora", sd15_lora], "trained for another base model"),
        "pickled lora": (["--lora", tmp_path / "lora.bin"], "pickled"),
        "kohya file of another base": (["--lora", write_kohya(sd15_lora, tmp_path / "k.safetensors")],
                                       "trained for another base model"),
    }
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04not really a pickle")
    for name, (extra, message) in cases.items():
        out = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        code, _, err = run_cli("export", models["tiny-sd21"], "--format", "checkpoint", "--out", out, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (name, err)
        assert not out.exists() and not out.with_suffix(".yaml").exists() and not list(tmp_path.glob(".*.part"))

    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    code, _, err = run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", existing)
    assert code == 2 and "--overwrite" in err and existing.read_bytes() == b"keep me"
    assert run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", existing, "--overwrite")[0] == 0
    code, _, err = run_cli("export", sd15_lora, "--format", "kohya", "--out", existing)  # the kohya export too
    assert code == 2 and "--overwrite" in err and existing.stat().st_size > 100
    code, _, err = run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", tmp_path / "m.ckpt")
    assert code == 2 and ".safetensors" in err



def test_a_run_with_new_tokens_is_refused(models, run_cli, tmp_path):
    """A checkpoint has no tokenizer: a pivotal run's tokens would only change the text encoder's shape."""
    from safetensors.torch import save_file

    run = tmp_path / "pivotal"
    lora_for("tiny-sd15", run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(models["tiny-sd15"])}}))
    (run / "embeddings").mkdir()
    save_file({"<dry-slice>": torch.randn(1, 32)}, str(run / "embeddings" / "dry-slice.safetensors"))
    out = tmp_path / "pivotal.safetensors"
    code, _, err = run_cli("export", run, "--format", "checkpoint", "--out", out)
    assert code == 2 and "Textual Inversion tokens" in err and not out.exists()
    code, _, err = run_cli("export", models["tiny-sd15"], "--format", "checkpoint", "--out", out,
                           "--lora", run / "pytorch_lora_weights.safetensors")
    assert code == 0, err
