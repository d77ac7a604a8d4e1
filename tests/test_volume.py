"""Every reader path returns exactly the stored voxels, slab by slab; broken files fail with one clear line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from data_prep.volume import natural_key, open_volume
from ldm_finetune.core.errors import UserError

SHAPE = (9, 12, 14)


def coords(dtype=np.uint16):
    return (np.arange(np.prod(SHAPE)) % 50000).reshape(SHAPE).astype(dtype)


WRITERS = {
    "contiguous": lambda p, a: tifffile.imwrite(p, a),
    "bigtiff": lambda p, a: tifffile.imwrite(p, a, bigtiff=True),
    "zlib-tiled": lambda p, a: tifffile.imwrite(p, a, compression="zlib", tile=(16, 16)),
    "lzw-striped": lambda p, a: tifffile.imwrite(p, a, compression="lzw", rowsperstrip=3),
    "imagej-plain": lambda p, a: tifffile.imwrite(p, a, imagej=True),
    "imagej-zyx": lambda p, a: tifffile.imwrite(p, a, imagej=True, metadata={"axes": "ZYX"}),
    "ome": lambda p, a: tifffile.imwrite(p, a, ome=True, metadata={"axes": "ZYX"}),
    "big-endian": lambda p, a: tifffile.imwrite(p, a, byteorder=">"),
}


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_tiff_layouts_read_exactly(tmp_path, layout):
    a = coords()
    path = tmp_path / "v.tif"
    WRITERS[layout](path, a)
    with open_volume(path) as vol:
        assert vol.shape == SHAPE and vol.dtype == np.uint16
        slabs = [slab for _, slab in vol.iter_slabs(4)]
        assert [s.shape[0] for s in slabs] == [4, 4, 1]
        np.testing.assert_array_equal(np.concatenate(slabs), a)
    expected = "memmap" if layout in {"contiguous", "bigtiff", "imagej-plain", "imagej-zyx", "ome", "big-endian"} \
        else "pages"
    assert vol.layout == expected


def test_pages_written_one_by_one(tmp_path):
    a = coords()
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        for page in a:
            tif.write(page, compression="zlib")
    with open_volume(path) as vol:
        assert vol.shape == SHAPE
        np.testing.assert_array_equal(vol.read(2, 7), a[2:7])


def test_folder_of_slices_in_natural_order(tmp_path):
    a = coords()
    for z in range(SHAPE[0]):
        tifffile.imwrite(tmp_path / f"slice_{z + 1}.tif", a[z])  # slice_10 must come after slice_9
    (tmp_path / "notes.txt").write_text("ignored")
    with open_volume(tmp_path) as vol:
        assert vol.layout == "folder" and len(vol.files) == SHAPE[0]
        np.testing.assert_array_equal(vol.read(0, SHAPE[0]), a)
    assert sorted(["s10", "s9", "s1"], key=natural_key) == ["s1", "s9", "s10"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_dtypes(tmp_path, dtype):
    a = (coords(np.float32) % 200).astype(dtype)
    if dtype == np.float32:
        a[0, 0, :3] = [np.nan, np.inf, -np.inf]
    tifffile.imwrite(tmp_path / "v.tif", a)
    with open_volume(tmp_path / "v.tif") as vol:
        assert vol.dtype == dtype
        np.testing.assert_array_equal(vol.read(0, SHAPE[0]), a)


def test_channel_choice(tmp_path):
    a = coords()
    stack = np.stack([a, a + 1], axis=1)  # ZCYX
    tifffile.imwrite(tmp_path / "zc.tif", stack, imagej=True, metadata={"axes": "ZCYX"})
    with open_volume(tmp_path / "zc.tif", channel=1) as vol:
        np.testing.assert_array_equal(vol.read(0, SHAPE[0]), a + 1)
    rgb = np.stack([a.astype(np.uint8)] * 3, axis=-1)
    rgb[..., 2] += 1
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", compression="zlib")
    with open_volume(tmp_path / "rgb.tif", channel=2) as vol:
        np.testing.assert_array_equal(vol.read(0, SHAPE[0]), rgb[..., 2])


def test_memmap_reader_does_not_keep_pages_resident(tmp_path):
    """Reading a mapped volume slab by slab leaves resident memory near one slab, not the whole file."""
    big = np.zeros((64, 512, 512), np.uint16)  # 32 MiB
    tifffile.imwrite(tmp_path / "big.tif", big)
    with open_volume(tmp_path / "big.tif") as vol:
        rss = []
        for _, slab in vol.iter_slabs(4):
            slab += 1  # the slab must be a private copy: touching it must not fault mapped file pages back in
            rss.append(_rss_bytes())
            del slab
    assert max(rss) - rss[0] < 8 << 20, [r >> 20 for r in rss]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


BAD = {
    "not a TIFF": (lambda p: p.write_bytes(b"hello, this is text"), "not a readable TIFF"),
    "2D image": (lambda p: tifffile.imwrite(p, np.zeros((12, 14), np.uint16)), "single 2D image"),
    "RGB without channel": (lambda p: tifffile.imwrite(p, np.zeros((9, 12, 14, 3), np.uint8), photometric="rgb"),
                            "--channel N"),
    "complex": (lambda p: tifffile.imwrite(p, np.zeros((9, 12, 14), np.complex64)), "not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files(tmp_path, case):
    write, message = BAD[case]
    path = tmp_path / "bad.tif"
    write(path)
    with pytest.raises(UserError, match=message) as info:
        open_volume(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_file(tmp_path, compression):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, coords(), compression=compression)
    with tifffile.TiffFile(path) as t:  # cut inside the last page's image data, as an interrupted copy does
        data_end = max(o + n for p in t.pages for o, n in zip(p.dataoffsets, p.databytecounts))
    path.write_bytes(path.read_bytes()[: data_end - 50])
    with pytest.raises(UserError, match="truncated") as info:
        with open_volume(path) as vol:
            vol.read(0, SHAPE[0])
    assert str(path) in str(info.value)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no .tif"):
        open_volume(tmp_path)
    tifffile.imwrite(tmp_path / "a1.tif", np.zeros((12, 14), np.uint16))
    tifffile.imwrite(tmp_path / "a2.tif", np.zeros((12, 15), np.uint16))
    with pytest.raises(UserError, match="a2.tif.*must match"):
        open_volume(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        open_volume(tmp_path / "nope.tif")
