"""Training checkpoints: `OUTPUT_DIR/checkpoints/checkpoint-<step>/`, written atomically, pruned to a total limit.

A checkpoint is accelerate's full training state (optimizer, LR schedule, RNG of every process, grad scaler) plus only
the *trainable* parameters of each model: a LoRA checkpoint of SD is a few MB, not the 3.4 GB UNet again.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ldm_finetune.core.errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")


STATE_FILE = "training_state.json"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first (half-written ones have a different name)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint to resume from: `latest` (None when there is none yet), or an explicit folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"checkpoint.resume: {path} is not a checkpoint folder (no {STATE_FILE}); "
                        f"use 'latest' or one of {folder}/checkpoint-<step>")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def save_checkpoint(accelerator, folder: Path, step: int, extra: dict, total_limit: int | None) -> Path:
    """Save the state into a temporary folder, rename it into place, then prune the oldest beyond `total_limit`."""
    final = folder / f"checkpoint-{step}"
    tmp = folder / f".checkpoint-{step}.part"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"global_step": step, **extra}, indent=2))
    except OSError as exc:  # e.g. the disk filled up: drop the partial folder, keep every complete checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{tmp.parent}: cannot write checkpoint-{step} ({exc.strerror or exc}); the earlier "
                        "checkpoints are intact: free space, then rerun with checkpoint.resume=latest") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if total_limit:
            for _, old in list_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def register_trainable_only_hooks(accelerator) -> None:
    """Make save_state/load_state store just the parameters that train (requires_grad) of each prepared model."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            if accelerator.is_main_process:
                save_file(trainable, str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()  # accelerate must not write the full models too

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            model = accelerator.unwrap_model(model)
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            expected = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(state) != expected:
                raise UserError(f"{input_dir}: checkpoint does not match this run's trainable parameters "
                                f"({len(set(state) ^ expected)} differ); was it written by another recipe or "
                                "LoRA setting?")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not look for full model files

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
