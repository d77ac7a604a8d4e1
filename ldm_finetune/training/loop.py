"""The step loop inside `fit` (fit.py), shared by every task.

Given a prepared accelerator, models, optimizer, LR schedule and dataloader, and a `step_fn(batch) -> loss`, it runs
gradient accumulation, clipping, the optimizer and schedule, adapter hooks around the step, the NaN/inf stop,
progress bar, logging (tensorboard + metrics.jsonl), checkpoints and validation, and resumes mid-epoch with the same
data order (`skip_first_batches` on a seeded sampler).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ldm_finetune.core.errors import TrainingStopped
from ldm_finetune.core.io import atomic_path
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.training.checkpoints import read_state, save_checkpoint
from ldm_finetune.training.config import RunSettings


@dataclass
class Loop:
    run: RunSettings
    accelerator: Any
    models: list  # the prepared models that hold trainable parameters (for gradient accumulation)
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    params: list  # trainable parameters (gradient clipping)
    step_fn: Callable  # batch -> scalar loss
    hooks: Any  # before_optimizer_step(step) / after_optimizer_step(step)
    validate: Callable  # (step, tag) -> path of the saved images, or None
    max_steps: int
    per_epoch: int  # optimizer steps per epoch


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def start_tracking(run: RunSettings, accelerator, resume_from: Path | None) -> int:
    """Load the checkpoint to resume from (if any), start the trackers; returns the global step to start at."""

    global_step = 0
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from}")
        accelerator.load_state(str(resume_from))
        global_step = read_state(resume_from)["global_step"]
    if accelerator.is_main_process:
        keep_metrics_until(RunLayout(run.output_dir).metrics, global_step)
        accelerator.init_trackers("ldm_finetune", config={k: str(v) for k, v in flatten(run.record).items()})
    return global_step


def keep_metrics_until(path: Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: their earlier lines go, so each step is logged once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (line_step := _step_of(line)) is not None and line_step <= step]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line torn by a kill in the middle of writing it."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def run_loop(loop: Loop, global_step: int, last_checkpoint: Path | None) -> int:
    """Train from `global_step` to `loop.max_steps`; returns the final step."""

    progress = tqdm(total=loop.max_steps, initial=global_step, desc="train",
                    disable=not loop.accelerator.is_main_process)
    try:
        global_step = _train_steps(loop, global_step, last_checkpoint, progress)
    finally:
        progress.close()  # the bar ends its line before any error message is printed
    loop.accelerator.wait_for_everyone()
    return global_step


def _train_steps(loop: Loop, global_step: int, last_checkpoint: Path | None, progress) -> int:
    run, accelerator = loop.run, loop.accelerator
    layout = RunLayout(run.output_dir)
    log_path = layout.metrics
    started = time.time()
    first_epoch = global_step // loop.per_epoch
    micro_losses = []  # the losses of this optimizer step's micro-batches
    for epoch in range(first_epoch, math.ceil(loop.max_steps / loop.per_epoch)):
        loop.dataloader.set_epoch(epoch)
        batches = loop.dataloader
        if epoch == first_epoch and global_step % loop.per_epoch:
            skip = (global_step % loop.per_epoch) * run.train.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(loop.dataloader, skip)
        for batch in batches:
            with accelerator.accumulate(*loop.models), accelerator.autocast():
                loss = loop.step_fn(batch)
                micro_losses.append(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    loop.hooks.before_optimizer_step(global_step)
                    if run.train.max_grad_norm:
                        accelerator.clip_grad_norm_(loop.params, run.train.max_grad_norm)
                loop.optimizer.step()
                loop.lr_scheduler.step()
                loop.optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    loop.hooks.after_optimizer_step(global_step)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            mean_loss = accelerator.gather(torch.stack(micro_losses).mean()[None]).mean().item()
            micro_losses.clear()
            if not math.isfinite(mean_loss):
                raise TrainingStopped(
                    f"loss became {mean_loss} at step {global_step}; stopped without saving. Last good checkpoint: "
                    f"{last_checkpoint or 'none'}. Try a lower train.learning_rate, train.max_grad_norm, or "
                    "train.mixed_precision=bf16 instead of fp16")
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            lr = loop.lr_scheduler.get_last_lr()[0]
            if global_step % run.logging.every_steps == 0 or global_step == loop.max_steps:
                accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=global_step)
            if accelerator.is_main_process:
                record = {"step": global_step, "loss": mean_loss, "lr": lr, "time": round(time.time() - started, 3)}
                if torch.cuda.is_available():  # the number to watch when tuning batch size against out-of-memory
                    record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if run.checkpoint.every_steps and global_step % run.checkpoint.every_steps == 0:
                last_checkpoint = save_checkpoint(accelerator, layout.checkpoints, global_step,
                                                  {"epoch": epoch}, run.checkpoint.total_limit)
            every = run.validate_every
            if every and global_step % every == 0 and global_step < loop.max_steps:
                loop.validate(global_step, f"step-{global_step:06d}")
            if global_step >= loop.max_steps:
                break
        if global_step >= loop.max_steps:
            break
    return global_step
