"""`fit(run, task)`: the one training run every recipe goes through (SD adapters, the pixel DDPM, ...).

`run` (config.RunSettings) is all fit reads of a config: seed, output folder, train / checkpoint / logging sections,
workers, validation cadence. fit owns what every run needs, written once: the environment check, accelerate
(mixed precision, DDP, trackers), the seed, the dataloader with a resumable seeded order, the optimizer and LR
schedule, the step budget, checkpoint / resume, the EMA's updates, logging and validation hooks (the step loop
itself is loop.py).
A *task* supplies what differs (training/task.py): its models, the batch -> loss step, validation images and what
to save.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from transformers.optimization import get_wsd_schedule

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.data.images import collate
from ldm_finetune.training.checkpoints import register_trainable_only_hooks, resolve_resume
from ldm_finetune.training.config import RunSettings, TrainConfig
from ldm_finetune.training.loop import Loop, run_loop, start_tracking
from ldm_finetune.training.run_lock import RunLock
from ldm_finetune.training.task import Task


def fit(run: RunSettings, task: Task) -> Path:
    """Train `task` as `run` says; returns the run folder."""
    run = with_precision(run, resolve_precision(run.train.mixed_precision))  # config.yaml records what ran
    check_environment(run)
    task.check()  # bad data fails here, before any model loads
    check_batch(run, task.num_examples())
    layout = RunLayout(run.output_dir)
    resume_from = resolve_resume(run.checkpoint.resume, layout.checkpoints)

    accelerator = make_accelerator(run)
    lock = RunLock(layout.lock).acquire() if accelerator.is_main_process else None
    try:
        return _fit(run, task, layout, accelerator, resume_from)
    finally:
        if lock is not None:
            lock.release()


def _fit(run: RunSettings, task: Task, layout: RunLayout, accelerator, resume_from: Path | None) -> Path:
    set_seed(run.seed, device_specific=True)  # different noise per process, reproducible per run
    if run.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    dataset = task.build(accelerator)
    # the loader's own generator: starting an epoch must not draw from the global RNG that a resume restores
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=run.train.batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=run.num_workers,
                                             generator=torch.Generator().manual_seed(run.seed))
    per_epoch, max_steps = resolve_steps(run, math.ceil(len(dataloader) / accelerator.num_processes))
    # a run set in epochs: a schedule longer than it fails here, before config.yaml is written
    run.train.stable_steps(max_steps, f"the run's {max_steps} steps")
    finished = finished_at(layout)
    if run.checkpoint.resume is not None and finished >= max_steps:
        accelerator.print(f"{layout.root} finished at step {finished} (train.max_steps={max_steps}): "
                          "nothing to do; raise train.max_steps to train longer")
        return layout.root
    if accelerator.is_main_process:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.config.write_text(yaml.safe_dump(run.record, sort_keys=False))

    groups = task.parameter_groups()
    if run.train.scale_lr:
        factor = run.train.batch_size * run.train.gradient_accumulation_steps * accelerator.num_processes
        for g in groups:
            g["lr"] *= factor
    optimizer = make_optimizer(run, groups)
    lr_scheduler = make_lr_scheduler(run.train, optimizer, max_steps, accelerator.num_processes)
    trained = task.trained_models()
    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    models = dict(zip(trained, prepared[:len(trained)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trained):]
    task.use_prepared(models)
    register_trainable_only_hooks(accelerator)
    hooks = _Hooks(task, task.make_ema())
    for obj in task.checkpoint_objects() + ([hooks.ema] if hooks.ema is not None else []):
        accelerator.register_for_checkpointing(obj)

    global_step = start_tracking(run, accelerator, resume_from)
    loop = Loop(run=run, accelerator=accelerator, models=list(models.values()), optimizer=optimizer,
                lr_scheduler=lr_scheduler, dataloader=dataloader, params=[p for g in groups for p in g["params"]],
                step_fn=task.loss, hooks=hooks, validate=task.validate, max_steps=max_steps, per_epoch=per_epoch)
    global_step = run_loop(loop, global_step, resume_from)
    if accelerator.is_main_process:
        for path in task.save(global_step):
            print(f"wrote {path}")
        with atomic_path(layout.finished) as tmp:
            tmp.write_text(json.dumps({"global_step": global_step}))
    release_reducers(models.values())
    accelerator.end_training()
    return layout.root


def release_reducers(models) -> None:
    """Drop each DDP wrapper's gradient reducer while the process group is still registered. A reducer freed after
    destroy_process_group holds the group's last reference, and the group's destructor then runs under the GIL and
    joins gloo threads, one of which may be freeing a collective's tensor and waiting for the GIL: a two-process CPU
    run hung so at exit, rank 1 stuck in ~ProcessGroupGloo from ~Reducer (pytorch/pytorch#56297). The group itself
    is then freed by destroy_process_group's own path, which releases the GIL."""
    for model in models:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and hasattr(model, "reducer"):
            del model.reducer


def finished_at(layout: RunLayout) -> int:
    """The last step of a finished run in this folder (-1 when none finished)."""
    if not layout.finished.is_file():
        return -1
    return int(json.loads(layout.finished.read_text())["global_step"])


class _Hooks:
    """The task's hooks around the optimizer step, then the EMA update."""

    def __init__(self, task: Task, ema):
        self.task, self.ema = task, ema

    def before_optimizer_step(self, step: int) -> None:
        self.task.before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        self.task.after_optimizer_step(step)
        if self.ema is not None:
            self.ema.update()


def resolve_precision(requested: str) -> str:
    """"auto" -> bf16 on a CUDA GPU that supports it, else "no" (fp32): bf16 autocast on a CPU is ~10x slower than
    fp32 (measured: 13.3 vs 1.15 s/step for the small pixel DDPM on 2 cores), and fp16 needs loss scaling."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def with_precision(run: RunSettings, precision: str) -> RunSettings:
    """A copy of `run` training in `precision` (its record says so too); the caller's settings stay as they were."""
    record = dict(run.record)
    if "train" in record:
        record["train"] = {**record["train"], "mixed_precision": precision}
    return replace(run, train=replace(run.train, mixed_precision=precision), record=record)


def check_environment(run: RunSettings) -> None:
    """Options that need something this machine may lack: fail now, not after the model loaded."""

    if run.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("model.attention=xformers but xformers is not installed "
                            "(pip install 'ldm_finetune[gpu]'), or use model.attention=sdpa") from None
        if not torch.cuda.is_available():
            raise UserError("model.attention=xformers needs a CUDA GPU; use model.attention=sdpa on CPU")
    if run.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("train.optimizer=adamw8bit needs bitsandbytes (pip install 'ldm_finetune[gpu]'), "
                            "or use train.optimizer=adamw") from None
    if run.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    if run.train.mixed_precision == "bf16" and not torch.cuda.is_available():
        # measured on a 2-core CPU: the small pixel DDPM took 13.3 s/step under bf16 autocast and 1.15 s in fp32
        print("warning: train.mixed_precision=bf16 on a CPU is about 10x slower than fp32; add "
              "train.mixed_precision=no", file=sys.stderr)


def make_optimizer(run: RunSettings, groups: list[dict]):
    settings = dict(betas=(run.train.adam_beta1, run.train.adam_beta2), eps=run.train.adam_epsilon,
                    weight_decay=run.train.weight_decay)
    if run.train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        # 8-bit optimizer states (Dettmers et al. 2022): ~75 % less optimizer memory
        return bnb.optim.AdamW8bit(groups, **settings)
    # the same AdamW update in one fused kernel per step on a GPU instead of a Python loop of small ops
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **settings)


def check_batch(run: RunSettings, examples: int | None) -> None:
    """An optimizer step must be able to see its full effective batch within one epoch; otherwise every epoch ends
    in a short accumulation and the batch the recipe asks for never happens."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    need = run.train.batch_size * run.train.gradient_accumulation_steps * processes
    if examples is None or need <= examples:
        return
    shown = f"train.batch_size={run.train.batch_size} x train.gradient_accumulation_steps=" \
            f"{run.train.gradient_accumulation_steps}" + (f" x {processes} processes" if processes > 1 else "")
    raise UserError(f"{shown} = {need} images per optimizer step, but the training set gives {examples} per epoch "
                    f"(data.repeats={run.repeats}): lower the batch or accumulation, or raise data.repeats")


def make_lr_scheduler(train: TrainConfig, optimizer, max_steps: int, processes: int):
    """diffusers' schedules, plus warm-up / stable / decay (transformers'): a constant rate that ends in a short
    cosine anneal to 0."""
    # accelerate steps the schedule once per process per optimizer step, hence the `processes` factors
    if train.lr_scheduler != "warmup_stable_decay":
        return get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps * processes,
                             num_training_steps=max_steps * processes)
    return get_wsd_schedule(optimizer, num_warmup_steps=train.lr_warmup_steps * processes,
                            num_stable_steps=train.stable_steps(max_steps, f"the run's {max_steps} steps") * processes,
                            num_decay_steps=train.lr_decay_steps * processes)


def resolve_steps(run: RunSettings, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / run.train.gradient_accumulation_steps))
    total = run.train.max_steps if run.train.max_steps is not None else run.train.epochs * per_epoch
    return per_epoch, total


def make_accelerator(run: RunSettings):
    # a second run in the same process (tests, the demo) may ask for another precision: start from a clean state
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=run.train.gradient_accumulation_steps,
        mixed_precision=run.train.mixed_precision,
        log_with=None if run.logging.report_to == "none" else run.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(run.output_dir),
                                            logging_dir=str(RunLayout(run.output_dir).logs)),
        # a seeded sampler whose order depends only on (seed, epoch): resuming replays the same data order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise UserError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: each "
                        "would train alone and overwrite the others' files. On CPU-only machines launch with "
                        "`accelerate launch --cpu` or set ACCELERATE_USE_CPU=true")
    return accelerator
