"""Bad input and faults a user meets around a training run: each one line, exit status 2, nothing half-written;
a run that is finished stays finished; a resumed run logs each step once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ldm_finetune.core.layout import RunLayout
from ldm_finetune.train import main
from ldm_finetune.training.run_lock import RunLock
from tests.conftest import lora_overrides

pytestmark = pytest.mark.slow


LORA_YAML = Path(__file__).parent.parent / "recipes" / "lora.yaml"


def run_train(*overrides) -> int:
    return main([str(LORA_YAML), *map(str, overrides)])


def copy_dataset(src, dst, edit_rows=None, raw: bytes | None = None):
    shutil.copytree(src, dst)
    meta = dst / "metadata.jsonl"
    if raw is not None:
        meta.write_bytes(raw)
    elif edit_rows is not None:
        rows = [json.loads(x) for x in meta.read_text().splitlines()]
        meta.write_text("".join(json.dumps(r) + "\n" for r in edit_rows(rows)))
    return dst


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("bad_name", ["../../outside.png", "/etc/hostname"])
def test_a_row_pointing_outside_the_dataset_is_refused(tiny_model_dir, small_train_dir, tmp_path, capsys, bad_name):
    (tmp_path / "outside.png").write_bytes((small_train_dir / json.loads(
        (small_train_dir / "metadata.jsonl").read_text().splitlines()[0])["file_name"]).read_bytes())
    data = copy_dataset(small_train_dir, tmp_path / "a" / "b" / "train",
                        lambda rows: rows[:-1] + [dict(rows[-1], file_name=bad_name)])
    code = run_train(*lora_overrides(tiny_model_dir, data, tmp_path / "run"))
    assert code == 2 and "points outside" in one_line_error(capsys) and not (tmp_path / "run").exists()


def test_non_utf8_metadata_is_one_line(tiny_model_dir, small_train_dir, tmp_path, capsys):
    raw = (small_train_dir / "metadata.jsonl").read_bytes().replace(b"sf_dry", b"sf_dr\xe9", 1)
    data = copy_dataset(small_train_dir, tmp_path / "train", raw=raw)
    code = run_train(*lora_overrides(tiny_model_dir, data, tmp_path / "run"))
    assert code == 2 and "not UTF-8" in one_line_error(capsys)


def test_a_second_run_into_a_busy_folder_is_refused(tiny_model_dir, small_train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    held = RunLock(RunLayout(out).lock).acquire()  # a live run holds the folder
    try:
        code = run_train(*lora_overrides(tiny_model_dir, small_train_dir, out))
        err = one_line_error(capsys)
        assert code == 2 and "is in use by a running training run" in err and '"pid"' in err
        assert not RunLayout(out).lora.exists()
    finally:
        held.release()
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, out)) == 0  # free again: it runs


def test_resuming_a_finished_run_changes_nothing(tiny_model_dir, small_train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = lora_overrides(tiny_model_dir, small_train_dir, out, **{"checkpoint.every_steps": 2})
    assert run_train(*args) == 0
    layout = RunLayout(out)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (layout.lora, layout.metrics, layout.config)}
    capsys.readouterr()
    assert run_train(*args, "checkpoint.resume=latest") == 0
    assert "finished at step 3" in capsys.readouterr().out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    # asking for more steps resumes from the last checkpoint and trains on
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, out, **{
        "checkpoint.every_steps": 2, "train.max_steps": 5, "checkpoint.resume": "latest"})) == 0
    steps = [json.loads(x)["step"] for x in layout.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3 was replayed from checkpoint-2 and is logged once
