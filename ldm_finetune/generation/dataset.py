"""`ldm-finetune generate --dataset OUT --per-concept N`: a synthetic dataset in prep's own layout.

OUT/metadata.jsonl holds one row per image, as prep writes them (file_name, text, state, orientation, window) plus
`synthetic: true`, the seed and the sha256 of what drew it, so `datasets` loads OUT, every recipe trains on it
(data.train_dir=OUT), and `evaluate --generated OUT` scores it per class against the real validation split.

The concepts are the run's own (its DreamBooth / Textual Inversion concepts, or the classes of its training data
with their captions), or the --prompt's. A rerun into OUT makes only what is missing: an image counts once its row
is in metadata.jsonl, and the row is appended only after the image is written, so an interrupted run leaves at most
one image without a row, which the rerun draws again under the same name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path, files_sha256, slug, to_image
from ldm_finetune.core.layout import RunLayout

MARKER = "dataset.json"  # what makes a folder a synthetic dataset we may add to


@dataclass(frozen=True)
class SyntheticConcept:
    prompt: str
    state: str | None = None
    orientation: str | None = None

    def stem(self, seed: int) -> str:
        parts = [p for p in (self.state, self.orientation) if p] + [slug(self.prompt, 40), f"{seed:05d}"]
        return "_".join(parts)


def run_concepts(paths: list[str]) -> list[SyntheticConcept]:
    """The concepts of the first run folder among `paths` (a --lora / --embedding run folder, or a full fine-tune's
    run as --model): its data.concepts, else its training data's classes with their captions."""
    for path in map(Path, paths):
        config = RunLayout(path).config
        if not config.is_file():
            continue
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        if data.get("concepts"):
            return [_config_concept(c) for c in data["concepts"]]
        return _data_concepts(Path(str(data.get("train_dir", ""))), config)
    return []


def _config_concept(c: dict) -> SyntheticConcept:
    caption = str(c.get("caption") or "")
    if c.get("token"):
        caption = caption.format(token=c["token"])
    select = c.get("select") or {}
    return SyntheticConcept(caption, select.get("state"), select.get("orientation"))


def _data_concepts(train_dir: Path, config: Path) -> list[SyntheticConcept]:
    meta = train_dir / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"--dataset: the run ({config}) trained on {train_dir}, which is gone, and lists no "
                        "data.concepts; pass the prompts with --prompt")
    seen = {}
    for line in meta.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            key = (row.get("state"), row.get("orientation"))
            seen.setdefault(key, SyntheticConcept(str(row.get("text", "")), *key))
    return [seen[k] for k in sorted(seen, key=str)]


def concepts_for(prompts: list[str], known: list[SyntheticConcept]) -> list[SyntheticConcept]:
    """--prompt's concepts (state and orientation from a run concept of the same prompt), else the run's own."""
    if not prompts:
        if not known:
            raise UserError("--dataset: no concepts: give --prompt, or a --lora / --embedding run folder whose "
                            "config.yaml lists them")
        return known
    by_prompt = {c.prompt: c for c in known}
    return [by_prompt.get(p, SyntheticConcept(p)) for p in prompts]


def model_sha256(model: str, paths: list[str]) -> str:
    """One hash for everything that draws the images: the base UNet's weights (or the hub id) and every LoRA /
    embedding file."""
    unet = sorted((Path(model) / "unet").glob("*.safetensors")) if Path(model).is_dir() else []
    files = unet + [f for p in map(Path, paths) for f in ([p] if p.is_file() else RunLayout(p).adapter_files())]
    return files_sha256(files) if files else hashlib.sha256(model.encode()).hexdigest()


def check_folder(out: Path, record: dict) -> None:
    """OUT must be new, or a dataset this command made with the same model and settings (nothing is written)."""
    marker = out / MARKER
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise UserError(f"--dataset {out}: folder holds other files and is not a synthetic dataset; choose another")
    if marker.is_file():
        before = json.loads(marker.read_text())
        changed = [k for k in record if before.get(k) != record[k]]
        if changed:
            raise UserError(f"--dataset {out}: made with other settings ({', '.join(changed)}); choose another "
                            "folder to keep both")


def claim(out: Path, record: dict) -> None:
    check_folder(out, record)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MARKER) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def done_files(out: Path) -> set[str]:
    meta = out / "metadata.jsonl"
    if not meta.is_file():
        return set()
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    return {r["file_name"] for r in rows if (out / r["file_name"]).is_file()}


def write_dataset(out: Path, concepts: list[SyntheticConcept], per_concept: int, first_seed: int, draw,
                  record: dict, windows: dict, show_progress: bool = True) -> list[Path]:
    """Draw what is missing: `draw(prompt, seed)` gives one (H, W, 3) image in [0, 1]. Returns the files written."""
    claim(out, record)
    done = done_files(out)
    jobs = [(c, first_seed + i) for c in concepts for i in range(per_concept)
            if f"{c.stem(first_seed + i)}.png" not in done]
    written = []
    with open(out / "metadata.jsonl", "a", encoding="utf-8") as rows:
        for concept, seed in tqdm(jobs, desc="dataset", disable=not show_progress or not jobs):
            name = f"{concept.stem(seed)}.png"
            with atomic_path(out / name) as tmp:
                to_image(draw(concept.prompt, seed), grayscale=True).save(tmp, format="PNG")
            row = {"file_name": name, "text": concept.prompt, "state": concept.state,
                   "orientation": concept.orientation, "synthetic": True, "seed": seed,
                   "model_sha256": record["model_sha256"]}
            if concept.state in windows:
                row["window"] = list(windows[concept.state])
            rows.write(json.dumps(row) + "\n")
            rows.flush()
            written.append(out / name)
    return written


def dataset_record(model: str, settings, paths: list[str]) -> dict:
    """What dataset.json pins: the model and every setting that changes the images."""
    # prompts, count and seeds may grow between runs; the files' paths may move (their hash is what counts)
    fixed = replace(settings, prompts=[], n=1, seed=0, window=None, loras=[], embeddings=[])
    return {"synthetic": True, "model_sha256": model_sha256(model, paths), "settings": asdict(fixed)}
