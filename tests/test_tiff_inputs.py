"""TIFF files as users bring them: BigTIFF, OME-TIFF and compressed stacks prep like plain ones; a folder of slices
of mixed sizes and a volume with no finite value are one-line errors (exit 2) that write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile


@pytest.fixture(scope="module")
def volume():
    return (np.random.default_rng(0).random((24, 64, 64)) * 60000).astype(np.uint16)


@pytest.mark.parametrize("kind", ["bigtiff", "ome", "zlib", "inf"])
def test_tiff_variants_prep_like_a_plain_stack(run_cli, tmp_path, volume, kind):
    path = tmp_path / ("v.ome.tif" if kind == "ome" else "v.tif")
    if kind == "bigtiff":
        tifffile.imwrite(path, volume, bigtiff=True)
    elif kind == "ome":
        tifffile.imwrite(path, volume, ome=True, metadata={"axes": "ZYX"})
    elif kind == "zlib":
        tifffile.imwrite(path, volume, compression="zlib")
    else:  # a float volume with a few inf voxels: they window to the top grey level, not NaN images
        v = volume.astype(np.float32)
        v[3, 10, 10] = np.inf
        tifffile.imwrite(path, v)
    code, out, err = run_cli("prep", "--volume", f"dry={path}", "--out", tmp_path / "ds", "--resolution", "32",
                             "--quiet")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "ds" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert rows and {r["state"] for r in rows} == {"dry"}


@pytest.mark.parametrize("kind, message", [("mixed", "all slices must match"),
                                           ("all_inf", "no finite voxel values")])
def test_bad_tiffs_are_one_line_errors(run_cli, tmp_path, volume, kind, message):
    if kind == "mixed":
        path = tmp_path / "slices"
        path.mkdir()
        for i in range(5):
            tifffile.imwrite(path / f"s{i:03d}.tif", volume[i, :, : 64 if i < 3 else 60])
    else:
        path = tmp_path / "v.tif"
        tifffile.imwrite(path, np.full((8, 32, 32), np.inf, np.float32))
    code, _, err = run_cli("prep", "--volume", f"dry={path}", "--out", tmp_path / "ds", "--resolution", "32",
                           "--quiet")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ds").exists()
