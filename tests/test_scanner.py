"""Slices in the scanner's grey levels: prep's window inverted (round trip on real phantom voxels), the window a run
records per state, and `generate --format tiff` writing uint16 grey TIFFs with their facts, or refusing in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from data_prep.phantom import AIR, GREY_OFFSET, GREY_SCALE, RESIN, YARN
from data_prep.window import to_unit
from ldm_finetune.core.io import quantize
from ldm_finetune.data.records import pixel_sizes, read_records, scanner_windows
from ldm_finetune.generation.scanner import from_unit, scanner_array
from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.models.stable_diffusion import build_pipeline
from ldm_finetune.sharing.lora import save_lora
from ldm_finetune.training.config import LoraConfig

PHASES = {"air": AIR, "resin": RESIN, "yarn": YARN}


@pytest.mark.parametrize("bits", [8, 16])
def test_prep_window_round_trip_on_phantom_voxels(phantom_dir, bits):
    """A real phantom page -> prep's window and quantization -> inverse: the source voxels within one step."""
    volume = tifffile.imread(phantom_dir / "injected.tif")
    page = volume[volume.shape[0] // 2].astype(np.float64)
    window = (float(np.percentile(page, 1)), float(np.percentile(page, 99)))
    top = 255 if bits == 8 else 65535
    back = from_unit(quantize(to_unit(page, window), bits) / top, window)
    inside = (page >= window[0]) & (page <= window[1])
    step = (window[1] - window[0]) / top
    assert np.abs(back - page)[inside].max() <= step  # half a step of rounding, plus prep's float32 arithmetic
    assert np.all(back[page < window[0]] == window[0]) and np.all(back[page > window[1]] == window[1])  # clipped
    # uint16 output: the integer voxels themselves, within a step plus the rounding to an integer
    assert np.abs(scanner_array(quantize(to_unit(page, window), bits) / top, window) - page)[inside].max() \
        <= step + 0.5


def test_a_run_records_each_states_window_and_phases_map_back(prep_dataset):
    manifest = json.loads((prep_dataset / "manifest.json").read_text())
    windows = scanner_windows(read_records(prep_dataset / "train"))
    assert windows == {v["state"]: v["window"] for v in manifest["volumes"]}
    lo, hi = windows["injected"]
    for name, grey in PHASES.items():  # the phantom's phases at their known scanner values
        value = GREY_OFFSET + GREY_SCALE * grey
        if lo <= value <= hi:
            encoded = quantize(to_unit(np.array([value]), (lo, hi)), 16) / 65535
            assert abs(scanner_array(encoded, (lo, hi))[0] - value) <= (hi - lo) / 65535 + 0.5, name


def test_prep_records_each_slices_pixel_size(prep_dataset, phantom_dir, tmp_path):
    """A pixel's side is the tile's side in voxels over the image side (in the spacing's unit when one is given),
    and a run at another resolution scales it."""
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.prep import run_prep

    manifest = json.loads((prep_dataset / "manifest.json").read_text())
    sides = {v["state"]: v["tile_sides"] for v in manifest["volumes"]}
    records = read_records(prep_dataset / "train")
    for r in records:
        assert r.meta["pixel_size"] == pytest.approx(sides[r.meta["state"]][r.meta["orientation"]] / 32, rel=1e-5)
        assert r.meta["pixel_unit"] == "voxel"
    at_16 = pixel_sizes(records, 16)
    assert len(at_16) == 9 and at_16["dry/warp"][0] == pytest.approx(2 * sides["dry"]["warp"] / 32, rel=1e-5)
    out = tmp_path / "um"
    run_prep(PrepConfig(volumes=[VolumeSpec("dry", phantom_dir / "dry.tif")], out=out, resolution=16,
                        spacing=(5.0, 2.5, 2.5), spacing_unit="um", orientations=["thickness"]), show_progress=False)
    (row,) = {(r.meta["pixel_size"], r.meta["pixel_unit"]) for r in read_records(out / "train")}
    side = json.loads((out / "manifest.json").read_text())["volumes"][0]["tile_sides"]["thickness"]
    assert row == (pytest.approx(2.5 * side / 16, rel=1e-5), "um")


@pytest.fixture(scope="module")
def windowed_lora(tmp_path_factory):
    """A LoRA whose header carries two states' windows, as a run on prep data writes it."""
    pipe = build_pipeline("tiny")
    add_lora(pipe.unet, pipe.text_encoder, LoraConfig(rank=4, alpha=4.0))
    weights, meta = lora_state_dict(pipe.unet)
    header = {"ldm_finetune.windows": json.dumps({"dry": [9000.0, 50000.0], "injected": [12000.0, 47000.0]}),
              "ldm_finetune.pixel_sizes": json.dumps({"injected/warp": [12.5, "um"], "dry/warp": [10.0, "um"]})}
    return save_lora(tmp_path_factory.mktemp("lora"), weights, meta, header)


ARGS = ["--n", "2", "--steps", "2", "--height", "32", "--width", "32", "--format", "tiff"]


def test_generate_tiff_in_scanner_units_with_its_facts(tiny_model_dir, windowed_lora, run_cli, tmp_path):
    out = tmp_path / "tif"
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--lora", windowed_lora, "--prompt",
                           "sf_injected sf_warp", *ARGS, "--out", out)
    assert code == 0, err
    files = sorted(out.glob("*.tif"))
    assert len(files) == 2
    with tifffile.TiffFile(files[0]) as tif:
        image, description = tif.asarray(), tif.pages[0].description
    assert image.dtype == np.uint16 and image.ndim == 2 and image.shape == (32, 32)
    assert 12000 <= image.min() and image.max() <= 47000 and image.std() > 0  # the injected window, not dry's
    facts = json.loads(description)
    assert facts["window"] == [12000.0, 47000.0] and facts["state"] == "injected" and facts["seed"] == 0
    assert facts["prompt"] == "sf_injected sf_warp" and facts["steps"] == 2 and facts["sampler"]
    assert len(facts["loras"][0]["sha256"]) == 64
    # the class's pixel size, and in the resolution tags (pixels per cm) so Fiji measures in physical units
    assert facts["pixel_size"] == 12.5 and facts["pixel_unit"] == "um"
    with tifffile.TiffFile(files[0]) as tif:
        tags = tif.pages[0].tags
        numerator, denominator = tags["XResolution"].value
        assert numerator / denominator == pytest.approx(1 / 12.5e-4) and tags["ResolutionUnit"].value == 3
    # the same seed as PNG: the TIFF is its grey level through the window
    png = tmp_path / "png"
    assert run_cli("generate", "--model", tiny_model_dir, "--lora", windowed_lora, "--prompt",
                   "sf_injected sf_warp", *ARGS[:-2], "--out", png)[0] == 0
    from PIL import Image
    rgb = np.asarray(Image.open(sorted(png.glob("*.png"))[0])).astype(np.float64) / 255
    expected = 12000 + rgb.mean(axis=-1) * 35000
    assert np.abs(image - expected).max() <= 35000 / 255  # within the PNG's 8-bit step


def test_tiff_window_choice_and_bad_input(tiny_model_dir, windowed_lora, run_cli, tmp_path):
    cases = {  # prompt, extra arguments, expected message
        "no state": ("a woven texture", [], "names no state"),
        "bad window": ("sf_dry", ["--window", "5,3"], "LO must be below HI"),
        "not numbers": ("sf_dry", ["--window", "low,high"], "expected LO,HI"),
    }
    for name, (prompt, extra, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        code, _, err = run_cli("generate", "--model", tiny_model_dir, "--lora", windowed_lora, "--prompt", prompt,
                               *ARGS, *extra, "--out", out)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists()
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--prompt", "sf_dry", *ARGS, "--out", tmp_path / "x")
    assert code == 2 and "carries no scanner window" in err
    out = tmp_path / "override"
    assert run_cli("generate", "--model", tiny_model_dir, "--prompt", "a woven texture", *ARGS, "--window",
                   "100,200", "--out", out)[0] == 0
    image = tifffile.imread(sorted(out.glob("*.tif"))[0])
    assert 100 <= image.min() and image.max() <= 200
    # a window outside uint16's range (float reconstructions, signed units) gives float32
    out = tmp_path / "float"
    assert run_cli("generate", "--model", tiny_model_dir, "--prompt", "sf_dry", *ARGS, "--window=-1000,3000",
                   "--out", out)[0] == 0
    assert tifffile.imread(sorted(out.glob("*.tif"))[0]).dtype == np.float32


def test_a_prompt_names_a_state_as_a_word():
    from ldm_finetune.generation.scanner import window_for

    windows = {"dry": (1.0, 2.0), "dry-compacted": (3.0, 4.0), "injected": (5.0, 6.0)}
    assert window_for("sf_dry sf_weft", windows, None) == ((1.0, 2.0), "dry")
    assert window_for("sf_dry-compacted sf_weft", windows, None) == ((3.0, 4.0), "dry-compacted")
    assert window_for("anything", {"dry": (1.0, 2.0), "injected": (1.0, 2.0)}, None) == ((1.0, 2.0), None)
