"""DreamBooth (Ruiz et al. 2023): instance images of a concept under a rare identifier, plus a class prior.

The prior keeps the class noun meaning what it meant ("a texture" must not turn into the material), from
- generate: class images made by the base model from the class prompt, seeded and cached on disk (a rerun makes only
  the missing ones);
- folder: the user's own class images;
- base_model: no class images at all; on the class prompt the model must keep predicting what the frozen base model
  predicts (StableDiffusionTask.base_model_prior_loss).
Each is a wrapper around the task's diffusion objective (`make_prior`): the task's loss is `prior.loss(...)`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path, slug, to_image
from ldm_finetune.data.records import image_folder_records
from ldm_finetune.models.noise import DiffusionObjective, Noised
from ldm_finetune.models.stable_diffusion import inference_pipeline, render


def prior_preservation_loss(instance: torch.Tensor, prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """Mean instance loss + prior_loss_weight x mean prior loss (per-sample losses of each half)."""
    return instance.mean() + prior_loss_weight * prior.mean()


class InstanceLoss:
    """No prior: the objective's loss on the instance images (plain fine-tuning, or DreamBooth without a prior)."""

    def __init__(self, objective: DiffusionObjective):
        self.objective = objective

    def instance(self, model_pred: torch.Tensor, noised: Noised, n_instance: int) -> torch.Tensor:
        # min-SNR weights the instance term only (as diffusers' DreamBooth example): prior terms are plain MSEs
        head = slice(0, n_instance)
        return self.objective.loss(model_pred[head], noised.part(head))

    def loss(self, model_pred: torch.Tensor, noised: Noised, n_instance: int, batch: dict) -> torch.Tensor:
        return self.instance(model_pred, noised, n_instance).mean()


class ClassImagePrior(InstanceLoss):
    """Class images (generated or the user's) ride in the same batch after the instance images."""

    def __init__(self, objective: DiffusionObjective, weight: float):
        super().__init__(objective)
        self.weight = weight

    def loss(self, model_pred, noised, n_instance, batch):
        tail = slice(n_instance, None)
        prior = self.objective.loss(model_pred[tail], noised.part(tail), weighted=False)
        return prior_preservation_loss(self.instance(model_pred, noised, n_instance), prior, self.weight)


class BaseModelPrior(InstanceLoss):
    """No class images: on each row's class prompt, the model must predict what the frozen base model predicts
    for the same noisy input (`base_model_loss(x_t, timesteps, class_prompts)`, per sample)."""

    def __init__(self, objective: DiffusionObjective, weight: float, base_model_loss):
        super().__init__(objective)
        self.weight, self.base_model_loss = weight, base_model_loss

    def loss(self, model_pred, noised, n_instance, batch):
        prior = self.base_model_loss(noised.x_t, noised.timesteps, batch["prior_prompt"])
        return prior_preservation_loss(self.instance(model_pred, noised, n_instance), prior, self.weight)


def make_prior(db, objective: DiffusionObjective, base_model_loss) -> InstanceLoss:
    """The loss a run trains with, from its `dreambooth:` section (None: no DreamBooth)."""
    if db is None or not db.prior_preservation:
        return InstanceLoss(objective)
    if db.prior == "base_model":
        return BaseModelPrior(objective, db.prior_loss_weight, base_model_loss)
    return ClassImagePrior(objective, db.prior_loss_weight)


def check_instance_counts(records, cfg) -> None:
    """Too few instance images is an error; identifiers that split into several tokens get a warning."""
    counts: dict[int, int] = {}
    for r in records:
        counts[r.meta["concept"]] = counts.get(r.meta["concept"], 0) + 1
    minimum = cfg.dreambooth.min_instance_images
    for i, n in sorted(counts.items()):
        if n < minimum:
            raise UserError(f"data.concepts[{i}]: {n} instance image(s); DreamBooth needs at least {minimum} "
                            "(3-10 is typical; lower dreambooth.min_instance_images to force it)")


def warn_split_identifiers(tokenizer, records, class_prompts: list[str]) -> list[str]:
    """A DreamBooth identifier should be one rare token; name every caption word that splits into several."""
    class_words = {w for p in class_prompts if p for w in p.lower().split()}
    warnings = []
    for word in sorted({w for r in records for w in r.caption.split()}):
        if word.lower() in class_words or word.lower() in {"a", "an", "the", "of", "photo"}:
            continue
        pieces = tokenizer.tokenize(word)
        if len(pieces) > 1:
            warnings.append(f"warning: identifier {word!r} splits into {len(pieces)} tokens {pieces} in this "
                            "tokenizer; a single rare token binds better (see `ldm-finetune identifiers`)")
    return warnings


def class_folder(cfg, concept) -> Path:
    return concept.class_dir or cfg.output_dir / "class_images" / slug(concept.class_prompt, 50, "class")


def generate_class_images(pipe, folder: Path, prompt: str, model: str, n: int, seed: int, steps: int,
                          guidance: float, resolution: int, owned: bool = True) -> int:
    """Make FOLDER/0000.png ... up to n from `prompt` with the base model; returns how many were generated.

    class_images.json records every setting the images depend on: in the run's own folder (`owned`) images made with
    other settings are made again; in a user's class_dir that is an error rather than silent reuse. Image i uses
    seed + i, so a rerun completes an interrupted folder with the same images.
    """

    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "class_images.json"
    # every setting that changes the images: a folder made with other steps or guidance is not reused
    wanted = {"prompt": prompt, "model": model, "resolution": resolution, "seed": seed, "steps": steps,
              "guidance": guidance}
    if record_path.is_file():
        found = json.loads(record_path.read_text())
        if {k: found.get(k) for k in wanted} != wanted:
            changed = ", ".join(f"{k} {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v)
            if not owned:
                raise UserError(f"{folder}: holds class images made with other settings ({changed}); use another "
                                "class_dir or empty this one")
            print(f"class images in {folder} were made with other settings ({changed}): making them again",
                  file=sys.stderr)
            for old in folder.glob("[0-9][0-9][0-9][0-9].png"):
                old.unlink()
    record_path.write_text(json.dumps(wanted, indent=2))
    missing = [i for i in range(n) if not (folder / f"{i:04d}.png").is_file()]
    for i in missing:
        (image,), = render(pipe, [prompt], [seed + i], steps, guidance, height=resolution, width=resolution)
        with atomic_path(folder / f"{i:04d}.png") as tmp:
            to_image(image).save(tmp, format="PNG")
    return len(missing)


def prepare_class_records(cfg, accelerator, components) -> list:
    """The class images of every concept (generating missing ones on the main process first), or [] when the
    objective needs none."""

    db = cfg.dreambooth
    if db is None or not db.prior_preservation or db.prior == "base_model":
        return []
    records = []
    for i, concept in enumerate(cfg.data.concepts):
        folder = class_folder(cfg, concept)
        if db.prior == "generate":
            with accelerator.main_process_first():
                if accelerator.is_main_process:
                    made = generate_class_images(inference_pipeline(components, device=accelerator.device), folder,
                                                 concept.class_prompt, cfg.model.pretrained, db.num_class_images,
                                                 cfg.seed, db.class_steps, db.class_guidance, cfg.data.resolution,
                                                 owned=concept.class_dir is None)
                    print(f"class images for {concept.class_prompt!r}: {made} generated, "
                          f"{db.num_class_images - made} reused from {folder}", file=sys.stderr)
        found = image_folder_records(folder, concept.class_prompt or "", f"data.concepts[{i}].class_dir")
        if db.prior == "generate":
            found = [r for r in found if re.fullmatch(r"\d{4}\.png", r.path.name)][:db.num_class_images]
        if not found:
            raise UserError(f"data.concepts[{i}].class_dir: {folder} has no class images")
        if not concept.class_prompt and db.prior == "folder":
            raise UserError(f"data.concepts[{i}]: class images need class_prompt (e.g. 'a texture')")
        records += found[:db.num_class_images]
    return records
