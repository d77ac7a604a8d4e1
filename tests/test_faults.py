"""Bad input and faults a user meets around a training run: each one line, exit status 2, nothing half-written;
a run that is finished stays finished; a resumed run logs each step once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_finetune.core.layout import RunLayout
from ldm_finetune.train import main
from ldm_finetune.training.run_lock import RunLock
from tests.conftest import lora_overrides

pytestmark = pytest.mark.slow


RECIPES = Path(__file__).parent.parent / "recipes"
LORA_YAML = RECIPES / "lora.yaml"


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


def run_until_killed(recipe: str, args: list[str], metrics: Path, at_step: int, timeout: float = 300) -> bool:
    """Start a training run in a subprocess and SIGKILL it once metrics.jsonl reaches `at_step`; False if it
    finished first."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ldm_finetune.train", str(RECIPES / recipe), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= at_step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait(timeout=60)
    return False


def run_to_end(recipe: str, args: list[str]) -> None:
    """A subprocess like the killed ones: the same thread count, so the same floating point."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ldm_finetune.train", str(RECIPES / recipe), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


TI_CONCEPT = ("[{token: <dry-slice>, initializer: dry, select: {state: dry}, num_images: 9, "
              "caption: 'A {token} of a carbon composite material'}]")
PIXEL = {"data.resolution": 32, "train.batch_size": 4, "train.mixed_precision": "no", "logging.report_to": "none",
         "model.base_channels": 16, "model.channel_mult": "[1,2]", "model.norm_num_groups": 8,
         "model.layers_per_block": 1, "model.attention_resolutions": "[16]", "validation.steps": 3,
         "validation.images_per_class": 1, "data.num_workers": 0, "train.lr_warmup_steps": 1, "ema.decay": 0.9}


@pytest.mark.parametrize("recipe, result", [("lora.yaml", "pytorch_lora_weights.safetensors"),
                                            ("textual_inversion.yaml", "learned_embeds.safetensors"),
                                            ("ddpm_pixel.yaml", "model/unet/diffusion_pytorch_model.safetensors")])
def test_three_sigkills_and_resumes_give_the_uninterrupted_result(tiny_model_dir, small_train_dir, tmp_path,
                                                                  recipe, result):
    import random

    common = {"train.max_steps": 9, "checkpoint.every_steps": 1, "checkpoint.total_limit": 2}

    def args(out, **extra):
        if recipe == "ddpm_pixel.yaml":
            settings = {**PIXEL, **common, "data.train_dir": small_train_dir, "output_dir": out, **extra}
            return [f"{k}={v}" for k, v in settings.items()]
        concepts = {"data.concepts": TI_CONCEPT} if recipe == "textual_inversion.yaml" else {}
        # the in-memory latent cache (every process encodes it alike). With lora.yaml's shipped disk cache, a process
        # that reads the cache and one that wrote it differ in the last bits from the third step on, with the same
        # data and noise (steps 1-2 have equal losses): an open finding, so a resume there is close, not bit-equal
        concepts["data.cache_latents"] = "memory"
        return [str(a) for a in lora_overrides(tiny_model_dir, small_train_dir, out, **common, **concepts, **extra)]

    run_to_end(recipe, args(tmp_path / "straight"))
    out = tmp_path / "killed"
    resume = args(out, **{"checkpoint.resume": "latest"})
    kills = sorted(random.Random(0).sample(range(2, 9), 3))
    killed = [run_until_killed(recipe, resume, RunLayout(out).metrics, step) for step in kills]
    assert sum(killed) >= 2, killed  # the runs really died mid-way (a fast machine may finish one first)
    run_to_end(recipe, resume)  # the last resume runs to the end
    straight, resumed = load_file(tmp_path / "straight" / result), load_file(out / result)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(x)["step"] for x in RunLayout(out).metrics.read_text().splitlines()]
    assert steps == list(range(1, 10))  # every step logged once, despite the replays


def test_a_save_killed_midway_is_never_resumed_from(tiny_model_dir, small_train_dir, tmp_path, monkeypatch):
    """A checkpoint is written under a temporary name and renamed when complete: a save that dies halfway leaves a
    .part folder that `resume=latest` ignores, and the run resumes from the last complete checkpoint."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    common = {"train.max_steps": 4, "checkpoint.every_steps": 2}
    real_save = Accelerator.save_state

    def dying_save(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            real_save(self, output_dir, **kwargs)
            raise SystemExit("killed during the save of step 4")  # after writing, before the rename
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    with pytest.raises(SystemExit):
        run_train(*lora_overrides(tiny_model_dir, small_train_dir, out, **common))
    layout = RunLayout(out)
    assert sorted(p.name for p in layout.checkpoints.iterdir()) == [".checkpoint-4.part", "checkpoint-2"]
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, out, **common,
                                     **{"checkpoint.resume": "latest"})) == 0
    assert [json.loads(x)["step"] for x in layout.metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert (layout.checkpoints / "checkpoint-4").is_dir()
