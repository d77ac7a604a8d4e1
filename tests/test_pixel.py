"""The from-scratch pixel DDPM: a launch-style run of recipes/ddpm_pixel.yaml on phantom slices, exact resume,
sampling (guidance, trajectory), a model folder plain diffusers loads, the local-score baseline, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

RECIPE = Path(__file__).parent.parent / "recipes" / "ddpm_pixel.yaml"
pytestmark = pytest.mark.slow
TINY = {"data.resolution": 32, "train.batch_size": 4, "train.max_steps": 4, "train.mixed_precision": "no",
        "logging.report_to": "none", "model.base_channels": 16, "model.channel_mult": "[1,2]",
        "model.norm_num_groups": 8, "model.layers_per_block": 1, "model.attention_resolutions": "[16]",
        "validation.steps": 3, "validation.images_per_class": 1, "data.num_workers": 0,
        "checkpoint.every_steps": 2, "train.lr_warmup_steps": 1, "ema.decay": 0.9}


def train(data, out, **extra) -> int:
    from ldm_finetune.train import main

    settings = dict(TINY, **{"data.train_dir": data, "output_dir": out}, **extra)
    return main([str(RECIPE), *[f"{k}={v}" for k, v in settings.items()]])


@pytest.fixture(scope="module")
def pixel_run(small_train_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pixel") / "run"
    assert train(small_train_dir, out) == 0
    return out


def test_training_writes_a_model_that_plain_diffusers_loads(pixel_run, small_train_dir):
    from diffusers import DDPMPipeline

    model = pixel_run / "model"
    classes = json.loads((model / "classes.json").read_text())
    rows = [json.loads(x) for x in (small_train_dir / "metadata.jsonl").read_text().splitlines()]
    assert classes["classes"] == sorted({f"{r['state']}/{r['orientation']}" for r in rows})
    pipe = DDPMPipeline.from_pretrained(model)
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.num_class_embeds == len(classes["classes"]) + 1
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.num_train_timesteps == 1000
    assert not list(model.rglob("*.bin"))
    assert (pixel_run / "samples" / "final.png").is_file()
    # the export holds the EMA weights, which differ from the raw trained ones
    raw = load_file(pixel_run / "checkpoints" / "checkpoint-4" / "trainable_0.safetensors")
    exported = dict(pipe.unet.named_parameters())
    assert any(not torch.equal(raw[k], exported[k].detach()) for k in raw)


def test_resume_gives_the_same_model(small_train_dir, pixel_run, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(pixel_run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    assert train(small_train_dir, resumed, **{"checkpoint.resume": "latest"}) == 0
    a = load_file(pixel_run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # EMA included: it is part of the checkpoint


def read_pngs(folder):
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in sorted(Path(folder).glob("*.png"))])


def test_sampling_guidance_seed_and_trajectory(pixel_run, tmp_path, run_cli):
    def sample(name, *extra):
        code, _, err = run_cli("sample", "--model", pixel_run / "model", "--class", "dry/thickness", "--n", "2",
                               "--steps", "4", "--out", tmp_path / name, *extra)
        assert code == 0, err
        return read_pngs(tmp_path / name)

    plain, again = sample("a"), sample("b")
    np.testing.assert_array_equal(plain, again)
    guided = sample("g", "--guidance", "3")
    assert np.abs(guided - plain).mean() > 0.5
    sample("t", "--trajectory", "999,600", "--sampler", "ddim")
    names = sorted(p.name for p in (tmp_path / "t" / "trajectory").iterdir())
    assert names[0].endswith("_t0666.png") and names[-1].endswith("_t0999.png")  # 600 snaps to a visited step
    record = json.loads((tmp_path / "t" / "sampling.json").read_text())
    assert record["trajectory"] == [999, 666] and record["class"] == "dry/thickness"


def test_guidance_rescale_gives_each_image_the_conditional_contrast():
    """Rescale 1: every image keeps the guided estimate's mean and takes the conditional one's spread; 0: untouched;
    between: the mix."""
    from ldm_finetune.models.pixel_unet import rescaled_guidance

    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(4, 1, 8, 8, generator=g) + 0.5, torch.randn(4, 1, 8, 8, generator=g)
    full = rescaled_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std((1, 2, 3)), cond.std((1, 2, 3)))
    torch.testing.assert_close(full.mean((1, 2, 3)), guided.mean((1, 2, 3)))
    torch.testing.assert_close(rescaled_guidance(guided, cond, 0.0), guided)
    torch.testing.assert_close(rescaled_guidance(guided, cond, 0.3), 0.3 * full + 0.7 * guided)


def test_guidance_rescale_reaches_the_sampler_only_when_guided(pixel_run, tmp_path, run_cli):
    def sample(name, *extra):
        code, _, err = run_cli("sample", "--model", pixel_run / "model", "--class", "dry/thickness", "--n", "2",
                               "--steps", "4", "--bits", "16", "--out", tmp_path / name, *extra)
        assert code == 0, err
        return read_pngs(tmp_path / name)

    assert not np.array_equal(sample("g", "--guidance", "3"), sample("r", "--guidance", "3", "--guidance-rescale", "1"))
    np.testing.assert_array_equal(sample("u", "--guidance-rescale", "1"), sample("p"))  # unguided: nothing to rescale
    assert json.loads((tmp_path / "r" / "sampling.json").read_text())["guidance_rescale"] == 1.0


def test_ddpm_sampler_runs_all_steps(pixel_run, tmp_path, run_cli):
    code, _, err = run_cli("sample", "--model", pixel_run, "--class", "injected/thickness", "--n", "1",
                           "--sampler", "ddpm", "--bits", "16", "--out", tmp_path / "d")
    assert code == 0, err
    (png,) = (tmp_path / "d").glob("*.png")
    assert np.asarray(Image.open(png)).dtype == np.uint16


def test_local_score_baseline_cli(small_train_dir, tmp_path, run_cli):
    code, out, err = run_cli("sample", "--baseline", "local-score", "--train-dir", small_train_dir, "--patch", "3",
                             "--resolution", "32", "--n", "2", "--steps", "20", "--out", tmp_path / "b")
    assert code == 0, err
    record = json.loads((tmp_path / "b" / "sampling.json").read_text())
    assert record["baseline"] == "local-score" and record["training_images"] == 7
    assert read_pngs(tmp_path / "b").shape == (2, 32, 32)


@pytest.mark.parametrize("source", ["model", "baseline"])
def test_sample_tiff_in_the_scanners_grey_levels(source, pixel_run, small_train_dir, tmp_path, run_cli):
    """A pixel DDPM (or the baseline) writes one uint16 grey TIFF per image in the class's state window, with the
    class's pixel size and the facts in the tag."""
    import tifffile

    rows = [json.loads(x) for x in (small_train_dir / "metadata.jsonl").read_text().splitlines()]
    dry = next(r for r in rows if r["state"] == "dry" and r["orientation"] == "thickness")
    what = (["--model", pixel_run] if source == "model" else
            ["--baseline", "local-score", "--train-dir", small_train_dir, "--resolution", "32", "--patch", "3"])
    code, _, err = run_cli("sample", *what, "--class", "dry/thickness", "--n", "2", "--steps", "3", "--format",
                           "tiff", "--out", tmp_path / "t")
    assert code == 0, err
    files = sorted((tmp_path / "t").glob("*.tif"))
    assert len(files) == 2 and not list((tmp_path / "t").glob("*.png"))
    with tifffile.TiffFile(files[0]) as tif:
        image, facts = tif.asarray(), json.loads(tif.pages[0].description)
    lo, hi = dry["window"]
    assert image.dtype == np.uint16 and image.shape == (32, 32) and lo <= image.min() and image.max() <= hi
    assert facts["window"] == [lo, hi] and facts["state"] == "dry" and facts["class"] == "dry/thickness"
    assert facts["pixel_size"] == pytest.approx(dry["pixel_size"]) and facts["pixel_unit"] == "voxel"
    assert facts["steps"] == 3 and facts["generator"] == "ldm_finetune sample"
    assert (len(facts.get("model_sha256", "")) == 64) == (source == "model")


def test_sample_tiff_refuses_a_bad_window(pixel_run, tmp_path, run_cli):
    code, _, err = run_cli("sample", "--model", pixel_run, "--n", "1", "--steps", "2", "--format", "tiff",
                           "--class", "dry/thickness", "--window", "7,3", "--out", tmp_path / "x")
    assert code == 2 and "LO must be below HI" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli("sample", "--baseline", "local-score", "--format", "tiff", "--out", tmp_path / "y")
    assert code == 2 and "needs --train-dir" in err and not (tmp_path / "y").exists()
    code, _, err = run_cli("sample", "--format", "tiff", "--out", tmp_path / "z")
    assert code == 2 and "sample needs --model" in err and not (tmp_path / "z").exists()


@pytest.mark.parametrize("args, message", [
    (["--class", "wet/warp"], "--class 'wet/warp' is not a class of this model"),
    ([], "this model is class-conditional; choose one of"),
    (["--class", "dry/thickness", "--trajectory", "1200"], "timesteps run from 999"),
    (["--class", "dry/thickness", "--guidance-rescale", "1.5"], "--guidance-rescale 1.5: a share from 0"),
])
def test_sample_bad_inputs(pixel_run, tmp_path, run_cli, args, message):
    code, _, err = run_cli("sample", "--model", pixel_run / "model", "--n", "1", "--steps", "2",
                           "--out", tmp_path / "x", *args)
    assert code == 2 and message in err, err


def test_bad_training_inputs(small_train_dir, tmp_path, capsys):
    assert train(small_train_dir, tmp_path / "a", **{"data.resolution": 33}) == 2
    assert "33 px is not divisible by 2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    assert train(empty, tmp_path / "b") == 2
    assert "lists no images" in capsys.readouterr().err
    assert train(small_train_dir, tmp_path / "c", **{"data.class_columns": "[material]"}) == 2
    assert "metadata.jsonl has no column 'material'" in capsys.readouterr().err
    code = __import__("ldm_finetune.cli", fromlist=["main"]).main(
        ["sample", "--baseline", "local-score", "--train-dir", str(small_train_dir), "--class", "wet/x",
         "--out", str(tmp_path / "d")])
    assert code == 2 and "--class 'wet/x' is not in" in capsys.readouterr().err


@pytest.mark.parametrize("shift, factor", [("default", 1), ("scale_shift", 2)])
def test_resnet_time_scale_shift_reaches_every_resnet_block(shift, factor):
    """scale_shift (adaptive GroupNorm) projects the time + class embedding to a scale and a shift per channel."""
    from types import SimpleNamespace

    from ldm_finetune.models.pixel_unet import build_unet
    from ldm_finetune.training.config import PixelModelConfig

    model = PixelModelConfig(base_channels=16, channel_mult=[1, 2], norm_num_groups=8, attention_resolutions=[],
                             resnet_time_scale_shift=shift)
    unet = build_unet(SimpleNamespace(model=model, data=SimpleNamespace(resolution=16)), num_classes=3)
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert resnets and unet.config.resnet_time_scale_shift == shift
    assert all(r.time_emb_proj.out_features == factor * r.conv1.out_channels for r in resnets)
