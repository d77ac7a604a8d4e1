"""Any field of view: MultiDiffusion tiles on the mini base (native 32 px) give one image without seams where
side-by-side tiles show them, seamless images wrap, one tile is the plain pipeline, and bad sizes are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_finetune.core.errors import UserError
from ldm_finetune.evaluation.metrics import seam_score
from ldm_finetune.generation.generate import GenerateSettings, generate, load_pipeline
from ldm_finetune.generation.tiled import Tiling, plan_tiling, starts, tile_joins, tiled, tiled_forward, windows
from ldm_finetune.models.stable_diffusion import render
from ldm_finetune.training.mini_base import shipped_mini_base

PROMPTS = ["a striped texture", "a dotted texture"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_pipeline(str(shipped_mini_base()), device="cpu")


def test_tiles_cover_the_canvas_and_wrap_only_when_seamless():
    assert starts(16, 8, 4, wrap=False) == [0, 4, 8]
    assert starts(18, 8, 4, wrap=False) == [0, 4, 8, 10]  # the last tile flush with the edge
    assert starts(16, 8, 4, wrap=True) == [0, 4, 8, 12]  # the last one runs over the edge
    tiles = windows(16, 64, Tiling(32, 32, 0.5, seamless=True), factor=4)
    covered = np.zeros((16, 64), int)
    for rows, columns in tiles:
        covered[rows[:, None].numpy(), columns.numpy()] += 1
    assert covered.min() == covered.max() == 4  # every latent pixel under the same number of tiles


def test_the_grid_moves_within_its_stride(mini):
    assert starts(16, 8, 4, wrap=False, offset=1) == [0, 1, 5, 8]  # the first and last tiles stay flush
    assert starts(16, 8, 4, wrap=True, offset=5) == [1, 5, 9, 13]
    assert starts(16, 8, 8, wrap=False, offset=1) == [0, 8]  # side-by-side tiles keep their grid
    assert {s % 4 for offset in range(4) for s in starts(16, 8, 4, wrap=True, offset=offset)} == {0, 1, 2, 3}
    # the UNet's tiled forward moves its grid at each call and comes back to it after the stride (2 latent px here)
    forward = tiled_forward(mini.unet, Tiling(32, 32, 0.75), factor=4)
    sample, context = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 77, 64)
    with torch.no_grad():
        first, second, third = (forward(sample, 500, context, return_dict=False)[0] for _ in range(3))
    assert not torch.equal(first, second) and torch.equal(first, third)


def test_a_seed_draws_the_same_field_whatever_came_before(mini):
    """The moving grid restarts with each sampling run; 3 steps leave a run off its starting offset (stride 4)."""
    with tiled(mini, Tiling(32, 32, 0.5), 64, 64):
        first, again = (render(mini, PROMPTS[:1], [0], 3, 4.0, height=64, width=64)[0][0] for _ in range(2))
    assert np.array_equal(first, again)


def test_one_tile_is_the_plain_pipeline(mini):
    plain = render(mini, PROMPTS[:1], [0], 8, 4.0, height=32, width=32)[0][0]
    with tiled(mini, Tiling(32, 32), 32, 32):
        one = render(mini, PROMPTS[:1], [0], 8, 4.0, height=32, width=32)[0][0]
    assert np.abs(plain - one).max() < 1e-4  # float rounding of the blend over 8 steps; a wrong blend is ~0.1
    assert "forward" not in mini.unet.__dict__  # the UNet is itself again


def test_overlapping_tiles_hide_the_seams_that_side_by_side_tiles_show(mini, tmp_path):
    """256 x 64 from a 32 px model, scored where side-by-side tiles meet against the other edges of the VAE's
    blocks: the default blend (Hann-weighted tiles, overlap 0.5) meets issue 22's goal (<= 1.10) where side-by-side
    tiles fail it on the same seeds, and removes at least half of their excess over a seamless 1.0. With a CT LoRA
    and 20 steps: benchmarks/tiled_generation.py."""
    scores = {}
    for name, flags in (("default", {}), ("side by side", {"tile_overlap": 0.0})):
        settings = GenerateSettings(PROMPTS, n=3, steps=8, guidance=4.0, height=64, width=256, **flags)
        generate("mini", settings, tmp_path / name, pipe=mini)
        rows, columns = tile_joins(64, 256, Tiling(32, 32, 0.0), 4)
        images = [np.asarray(_load(p)) for p in sorted((tmp_path / name).glob("*.png"))]
        assert len(images) == 6 and images[0].shape == (64, 256, 3)
        scores[name] = np.mean([seam_score(i, rows, columns, grid=mini.vae_scale_factor) for i in images])
    assert scores["default"] <= 1.10 < scores["side by side"], scores
    assert scores["default"] - 1 < 0.5 * (scores["side by side"] - 1), scores


def test_seamless_images_wrap(mini):
    """At native size (one tile, circular padding) and beyond it (tiles wrapping round the canvas)."""
    for height, width in ((32, 32), (32, 128)):
        scores = {}
        for seamless in (True, False):
            tiling = plan_tiling(mini, height, width, None, GenerateSettings.tile_overlap, seamless) or Tiling(32, 32)
            with tiled(mini, tiling, height, width):
                rows = render(mini, PROMPTS, [0, 1, 2], 8, 4.0, height=height, width=width)
            images = [i for row in rows for i in row]
            scores[seamless] = np.mean([seam_score(i, [0], [0]) for i in images])  # the wrap edge
        assert scores[True] <= 1.15 and scores[False] > 1.5, (height, width, scores)


def _load(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 64, "width": 100}, "multiple of 8"),
    ({"height": 64, "width": 256, "tile": 96}, "larger than the output"),
    ({"height": 64, "width": 256, "tile": 36}, "multiple of 8"),
    ({"height": 64, "width": 256, "tile_overlap": 1.0}, "below 1"),
])
def test_bad_sizes_are_one_line_and_write_nothing(mini, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message) as error:
        generate("mini", GenerateSettings(PROMPTS, n=1, steps=2, **kwargs), tmp_path / "out", pipe=mini)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_the_cli_takes_the_flags(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_FINETUNE_CACHE", str(tmp_path / "cache"))
    base = shipped_mini_base()
    code, out, err = run_cli("generate", "--model", base, "--prompt", "a striped texture", "--n", "1", "--steps", "2",
                             "--width", "64", "--height", "32", "--seamless", "--out", tmp_path / "g")
    assert code == 0, err
    assert _load(tmp_path / "g" / "a-striped-texture_0.png").size == (64, 32)
    code, _, err = run_cli("generate", "--model", base, "--prompt", "x", "--width", "64", "--height", "32",
                           "--tile", "64", "--out", tmp_path / "bad")
    assert code == 2 and "--tile 64" in err and not (tmp_path / "bad").exists()
