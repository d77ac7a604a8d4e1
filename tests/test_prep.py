"""`ldm-finetune prep` end to end on the phantom, and every bad input a user will plausibly give it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from data_prep.phantom import STATES
from data_prep.prep import MANIFEST
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path


def volumes_args(phantom_dir):
    return [a for s in STATES for a in ("--volume", f"{s}={phantom_dir / (s + '.tif')}")]


@pytest.fixture(scope="module")
def dataset(phantom_dir, tmp_path_factory):
    from ldm_finetune.cli import main

    out = tmp_path_factory.mktemp("prep") / "ds"
    assert main(["prep", *volumes_args(phantom_dir), "--out", str(out), "--resolution", "32", "--quiet"]) == 0
    return out


def test_datasets_loads_both_splits_with_all_nine_concepts(dataset):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(dataset))
    assert set(ds) == {"train", "validation"}
    for split in ("train", "validation"):
        combos = {(r["state"], r["orientation"]) for r in ds[split].remove_columns("image")}
        assert combos == {(s, o) for s in STATES for o in ("thickness", "warp", "weft")}
    row = ds["train"][0]
    assert row["image"].size == (32, 32) and row["image"].mode == "L"
    assert row["text"] == f"sf_{row['state']} sf_{row['orientation']}"


def test_manifest_provenance(dataset, phantom_dir):
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert [v["state"] for v in manifest["volumes"]] == list(STATES)
    for v in manifest["volumes"]:
        f = v["files"][0]
        assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()
        assert v["dtype"] == "uint16" and v["reader"] == "memmap" and len(v["window"]) == 2
    n_rows = sum(len((dataset / s / "metadata.jsonl").read_text().splitlines()) for s in ("train", "validation"))
    n_counted = sum(c[s] for bo in manifest["counts"].values() for c in bo.values() for s in ("train", "validation"))
    assert n_rows == n_counted == len(list(dataset.glob("*/*.png")))


def test_spooling_to_disk_gives_identical_images(phantom_dir, tmp_path, run_cli):
    """A memory budget too small for the in-memory spool streams through scratch files: same bytes out."""
    common = ["--volume", f"dry={phantom_dir / 'dry.tif'}", "--resolution", "32", "--quiet", "--no-hash"]
    assert run_cli("prep", *common, "--out", tmp_path / "ram")[0] == 0
    assert run_cli("prep", *common, "--out", tmp_path / "disk", "--memory-budget", "1")[0] == 0
    plans = [json.loads((tmp_path / d / MANIFEST).read_text())["volumes"][0]["memory"] for d in ("ram", "disk")]
    assert plans[0]["spool_on_disk"] is False and plans[1]["spool_on_disk"] is True
    ram = sorted((tmp_path / "ram").glob("*/*.png"))
    assert ram and [p.read_bytes() for p in ram] == [
        (tmp_path / "disk" / p.relative_to(tmp_path / "ram")).read_bytes() for p in ram]


def test_caption_styles_and_sixteen_bit(phantom_dir, tmp_path, run_cli):
    code, _, err = run_cli("prep", "--volume", f"injected={phantom_dir / 'injected.tif'}", "--out", tmp_path / "o",
                           "--resolution", "32", "--quiet", "--bits", "16", "--caption-style", "dreambooth")
    assert code == 0, err
    row = json.loads((tmp_path / "o" / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert row["text"] == "a 1nj3C7 th1ck texture"
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "o" / "train" / row["file_name"]))
    assert img.dtype == np.uint16 and len(np.unique(img)) > 256


def test_shared_window_keeps_resin_grey(phantom_dir, tmp_path, run_cli):
    """Per-volume windows stretch resin towards black; a shared window keeps it well above air."""
    args = [*volumes_args(phantom_dir), "--resolution", "32", "--quiet", "--no-hash", "--orientations", "thickness"]
    assert run_cli("prep", *args, "--out", tmp_path / "shared", "--window", "shared")[0] == 0
    windows = [v["window"] for v in json.loads((tmp_path / "shared" / MANIFEST).read_text())["volumes"]]
    assert windows[0] == windows[1] == windows[2]


def test_other_state_names_work(phantom_dir, tmp_path, run_cli):
    code, out, _ = run_cli("prep", "--volume", f"batch_7.b={phantom_dir / 'dry.tif'}", "--volume",
                           f"batch_7.b={phantom_dir / 'injected.tif'}", "--out", tmp_path / "o", "--resolution", "32",
                           "--quiet", "--no-hash")
    assert code == 0 and "batch_7.b" in out
    names = {p.name.split("_thickness")[0] for p in (tmp_path / "o" / "train").glob("*thickness*.png")}
    assert names == {"batch_7.b-1", "batch_7.b-2"}


def test_failure_midway_leaves_nothing(phantom_dir, tmp_path, run_cli, monkeypatch):
    written = []

    def failing_write(path, image):
        if len(written) == 50:
            raise UserError("disk full (simulated)")
        written.append(path)

    monkeypatch.setattr("data_prep.prep.write_png", failing_write)
    code, _, err = run_cli("prep", *volumes_args(phantom_dir), "--out", tmp_path / "ds", "--resolution", "32",
                           "--quiet")
    assert code == 2 and "disk full" in err
    assert os.listdir(tmp_path) == []  # no OUT, no temporary folder


def test_overwrite_replaces_only_prep_outputs(phantom_dir, tmp_path, run_cli):
    args = ["--volume", f"dry={phantom_dir / 'dry.tif'}", "--resolution", "32", "--quiet", "--no-hash"]
    out = tmp_path / "ds"
    assert run_cli("prep", *args, "--out", out)[0] == 0
    code, _, err = run_cli("prep", *args, "--out", out)
    assert code == 2 and "--overwrite" in err
    assert run_cli("prep", *args, "--out", out, "--overwrite", "--stride", "4")[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    code, _, err = run_cli("prep", *args, "--out", mine, "--overwrite")
    assert code == 2 and "not a prep output" in err and (mine / "thesis.tex").exists()


def _bad_inputs(tmp_path, phantom_dir):
    dry = phantom_dir / "dry.tif"
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((40, 40), np.uint16))
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((20, 40, 40, 3), np.uint8), photometric="rgb")
    const = tmp_path / "const.tif"
    tifffile.imwrite(const, np.full((20, 40, 40), 7, np.uint16))
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((20, 40, 40), np.nan, np.float32))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(dry.read_bytes()[:-5000])
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(f"volumes: [{{state: dry, path: {dry}}}]\nout: {tmp_path / 'x'}\nresolutoin: 32\n")
    return {
        "not a TIFF": (["--volume", f"dry={text}"], "not a readable TIFF"),
        "2D image": (["--volume", f"dry={flat}"], "single 2D image"),
        "RGB without channel": (["--volume", f"dry={rgb}"], "--channel N"),
        "constant volume": (["--volume", f"dry={const}"], "constant"),
        "all-NaN volume": (["--volume", f"dry={nan}"], "no finite voxel"),
        "truncated": (["--volume", f"dry={cut}"], "truncated"),
        "missing file": (["--volume", f"dry={tmp_path / 'nope.tif'}"], "no such file"),
        "slash in state": (["--volume", f"dry/wet={dry}"], "cannot be used in file names"),
        "tile larger than slice": (["--volume", f"dry={dry}", "--resolution", "512"], "larger than the"),
        "bad volume flag": (["--volume", f"{dry}"], "expected STATE=PATH"),
        "bad window": (["--volume", f"dry={dry}", "--window", "5,1"], "high > low"),
        "unknown config key": ([bad_cfg], "did you mean 'resolution'"),
        "bad stride": (["--volume", f"dry={dry}", "--stride", "thicknes=2"], "unknown orientation 'thicknes'"),
    }


CASES = ["not a TIFF", "2D image", "RGB without channel", "constant volume", "all-NaN volume", "truncated",
         "missing file", "slash in state", "tile larger than slice", "bad volume flag", "bad window",
         "unknown config key", "bad stride"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, phantom_dir, run_cli, case):
    args, message = _bad_inputs(tmp_path, phantom_dir)[case]
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    extra = [] if case == "unknown config key" else ["--out", out, "--resolution", "32"]
    if case == "tile larger than slice":
        extra = ["--out", out]
    code, _, err = run_cli("prep", *args, *extra, "--quiet")
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert set(os.listdir(tmp_path)) == before  # nothing written, no temporary folder left


def test_console_script_exit_status(tmp_path):
    """The installed entry point itself: one line on stderr, status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "ldm_finetune.cli", "prep", "--volume", f"dry={tmp_path}/x.tif",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_dry_run_prints_resolved_settings(phantom_dir, tmp_path, run_cli):
    code, out, _ = run_cli("prep", "--volume", f"dry={phantom_dir / 'dry.tif'}", "--out", tmp_path / "o",
                           "--dry-run", "--stride", "thickness=2")
    assert code == 0 and "resolution: 512" in out and "thickness: 2" in out
    assert not (tmp_path / "o").exists()


def test_config_file(phantom_dir, tmp_path, run_cli):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(
        "volumes:\n"
        f"  - {{state: dry, path: {phantom_dir / 'dry.tif'}, spacing: [1.0, 1.0, 1.0]}}\n"
        f"  - {{state: injected, path: {phantom_dir / 'injected.tif'}, window: [9000, 50000]}}\n"
        f"out: {tmp_path / 'ds'}\nresolution: 32\nstride: {{thickness: 4, warp: 2, weft: 2}}\n"
        "captions: {style: textual_inversion}\n"
    )
    code, out, err = run_cli("prep", cfg, "--quiet", "--no-hash")
    assert code == 0, err
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert manifest["volumes"][1]["window"] == [9000.0, 50000.0]
    row = json.loads((tmp_path / "ds" / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert row["text"] == "A <dry-thickness> of a carbon composite material"


def test_atomic_path_cleans_up(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_atomic_path_gives_the_permissions_open_would(tmp_path):
    """A shared file written atomically must be readable by others (mkstemp alone makes it 0600)."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
