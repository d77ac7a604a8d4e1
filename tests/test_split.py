"""The split is leakage-free: validation is a separate block along one axis, with a gap no image touches."""

from __future__ import annotations

import json

import pytest

from data_prep.geometry import Footprint, SplitBlocks, plan_tiles
from ldm_finetune.core.errors import UserError


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("tile_size", [None, 20])
def test_blocks_are_disjoint_with_gap(axis, tile_size):
    tiles, blocks = plan_tiles((30, 150, 170), resolution=24, tile_size=tile_size, split_axis=axis,
                               split_fraction=0.2, strides={"thickness": 3, "warp": 2, "weft": 2})
    assert blocks.val_start - blocks.train_end >= 20  # a gap of at least one tile
    for split in ("train", "validation"):
        assert any(t.split == split for t in tiles)
    for t in tiles:
        a0, a1 = t.footprint.extent(axis)
        if t.split == "train":
            assert a1 <= blocks.train_end
        else:
            assert a0 >= blocks.val_start
    train = [t.footprint.extent(axis) for t in tiles if t.split == "train"]
    val = [t.footprint.extent(axis) for t in tiles if t.split == "validation"]
    assert min(v[0] for v in val) - max(t[1] for t in train) >= blocks.val_start - blocks.train_end


def test_assign_drops_gap_and_straddlers():
    blocks = SplitBlocks("x", 100, 60, 80)
    fp = lambda x0, x1: Footprint(0, 1, 0, 1, x0, x1)  # noqa: E731
    assert blocks.assign(fp(0, 60)) == "train"
    assert blocks.assign(fp(80, 100)) == "validation"
    assert blocks.assign(fp(60, 61)) is None  # in the gap
    assert blocks.assign(fp(50, 90)) is None  # straddles


def test_split_too_small():
    with pytest.raises(UserError, match="cannot hold a validation block"):
        plan_tiles((30, 60, 60), resolution=24, split_fraction=0.4, split_gap=30)


def test_split_is_deterministic(tmp_path, phantom_dir, run_cli):
    outs = []
    for name in ("a", "b"):
        code, _, err = run_cli("prep", "--volume", f"dry={phantom_dir / 'dry.tif'}", "--out", tmp_path / name,
                               "--resolution", 32, "--quiet", "--no-hash")
        assert code == 0, err
        outs.append([(tmp_path / name / s / "metadata.jsonl").read_text() for s in ("train", "validation")])
    assert outs[0] == outs[1]
    train = [json.loads(x) for x in outs[0][0].splitlines()]
    val = [json.loads(x) for x in outs[0][1].splitlines()]
    assert not {r["file_name"] for r in train} & {r["file_name"] for r in val}
    # footprints along x (the default split axis) never overlap between splits
    assert max(r["footprint"][5] for r in train) < min(r["footprint"][4] for r in val)
