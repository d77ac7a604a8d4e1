"""Each output image is exactly the plane it claims to be: checked on a volume whose voxels encode their coordinates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from data_prep.geometry import plan_tiles, spread
from ldm_finetune.core.errors import UserError

D, H, W = 16, 40, 56  # z < 16, y < 64, x < 64: value = z*4096 + y*64 + x fits in uint16 exactly


def coordinate_volume():
    z, y, x = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    return (z * 4096 + y * 64 + x).astype(np.uint16)


def decode(image):
    v = image.astype(np.int64)
    return v // 4096, (v // 64) % 64, v % 64


@pytest.fixture
def coordinate_dataset(tmp_path, run_cli):
    """16-bit output, window 0..65535, tiles at native scale: pixel values are the source voxel values exactly."""

    def make(*extra):
        tifffile.imwrite(tmp_path / "coords.tif", coordinate_volume())
        out = tmp_path / "ds"
        code, _, err = run_cli("prep", "--volume", f"dry={tmp_path / 'coords.tif'}", "--out", out, "--bits", 16,
                               "--window", "0,65535", "--resolution", 16, "--tile-size", 16, "--quiet",
                               "--split-gap", 4, "--overwrite", *extra)
        assert code == 0, err
        rows = []
        for split in ("train", "validation"):
            for line in (out / split / "metadata.jsonl").read_text().splitlines():
                row = json.loads(line)
                row["pixels"] = np.asarray(Image.open(out / split / row["file_name"]))
                rows.append(row)
        return rows

    return make


@pytest.mark.parametrize("warp_axis", ["y", "x"])
def test_every_image_is_its_plane(coordinate_dataset, warp_axis):
    rows = coordinate_dataset("--warp-axis", warp_axis)
    vol = coordinate_volume()
    seen = set()
    for row in rows:
        img = row["pixels"]
        assert img.dtype == np.uint16 and img.shape == (16, 16)
        r0, r1, c0, c1 = row["tile_box"]
        i = row["slice_index"]
        normal = {"thickness": "z", "warp": warp_axis, "weft": "x" if warp_axis == "y" else "y"}[row["orientation"]]
        plane = {"z": lambda: vol[i], "y": lambda: vol[:, i, :], "x": lambda: vol[:, :, i]}[normal]()
        np.testing.assert_array_equal(img, plane[r0:r1, c0:c1])
        # and the recorded footprint is exactly the voxel box the pixels came from
        z, y, x = decode(img)
        z0, z1, y0, y1, x0, x1 = row["footprint"]
        assert (z.min(), z.max() + 1, y.min(), y.max() + 1, x.min(), x.max() + 1) == (z0, z1, y0, y1, x0, x1)
        seen.add(row["orientation"])
    assert seen == {"thickness", "warp", "weft"}


def test_depth_resampled_for_anisotropic_voxels(coordinate_dataset):
    """spacing z=2: warp planes get twice as many rows; row r comes from depth r/2 (linear interpolation)."""
    rows = coordinate_dataset("--spacing", "2,1,1", "--orientations", "warp")
    warp = [r for r in rows if r["orientation"] == "warp"]
    assert warp
    for row in warp:
        r0, r1, _, _ = row["tile_box"]
        assert r1 <= 2 * D
        z0, z1 = row["footprint"][:2]
        assert z0 == r0 // 2 and z1 == min(D, -(-r1 // 2))
        # pixel-centre-aligned linear resampling: output row R samples depth R/2 - 1/4 (clamped at the ends)
        depth = np.clip((np.arange(r0, r1) + 0.5) / 2 - 0.5, 0, D - 1)
        column = row["pixels"][:, 0].astype(np.float64)
        np.testing.assert_allclose(column - column[0], (depth - depth[0]) * 4096, atol=1.0)


def test_default_tiles_full_depth_and_scale():
    tiles, _ = plan_tiles((24, 100, 200), resolution=32, split_fraction=0.2)
    sides = {t.orientation: t.box[1] - t.box[0] for t in tiles}
    assert sides == {"thickness": 32, "warp": 24, "weft": 24}  # thickness native crops, cuts full depth
    assert all(t.box[0] == 0 for t in tiles if t.orientation != "thickness")


def test_spread_covers_evenly():
    assert spread(0, 100, 32) == [0, 23, 45, 68]
    assert spread(10, 42, 32) == [10]
    assert spread(0, 31, 32) == []


def test_tile_larger_than_slice():
    with pytest.raises(UserError, match="larger than the"):
        plan_tiles((24, 100, 200), resolution=128)
