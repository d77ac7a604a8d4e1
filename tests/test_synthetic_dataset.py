"""`generate --dataset OUT --per-concept N`: a run's concepts drawn into prep's layout, which evaluate scores per class
and a recipe trains on; an interrupted run resumes without duplicates; a folder holding something else is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_finetune.core.errors import UserError
from ldm_finetune.generation.dataset import SyntheticConcept, run_concepts, write_dataset
from ldm_finetune.generation.generate import GenerateSettings, generate_dataset
from ldm_finetune.train import main as train_main
from ldm_finetune.training.mini_base import shipped_mini_base
from tests.conftest import lora_overrides

pytestmark = pytest.mark.slow
LORA_YAML = Path(__file__).parent.parent / "recipes" / "lora.yaml"


@pytest.fixture(scope="module")
def lora_run(prep_dataset, tmp_path_factory):
    """A real (two-step) LoRA run on the mini base over the nine classes of the prep fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        base = shipped_mini_base()  # unpacked into that cache; the folder stays for the module's tests
    run = tmp_path_factory.mktemp("run") / "lora"
    assert train_main([str(LORA_YAML), *lora_overrides(base, prep_dataset / "train", run, **{
        "train.max_steps": 2})]) == 0
    return base, run


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_a_runs_concepts_become_a_dataset_that_evaluate_scores_and_a_recipe_trains_on(lora_run, prep_dataset,
                                                                                      tmp_path, run_cli):
    base, run = lora_run
    concepts = run_concepts([str(run)])
    assert len(concepts) == 9 and all(c.state and c.orientation for c in concepts)  # the training data's classes
    out = tmp_path / "synthetic"
    code, _, err = run_cli("generate", "--model", base, "--lora", run, "--dataset", out, "--per-concept", "2",
                           "--steps", "3")
    assert code == 0, err
    table = rows(out)
    assert len(table) == 18 and len({r["file_name"] for r in table}) == 18
    assert all(r["synthetic"] and r["state"] and r["orientation"] and "window" in r for r in table)
    manifest = json.loads((prep_dataset / "manifest.json").read_text())
    assert {r["state"]: r["window"] for r in table} == {v["state"]: v["window"] for v in manifest["volumes"]}
    assert len({r["model_sha256"] for r in table}) == 1

    code, _, err = run_cli("evaluate", "--real", prep_dataset, "--generated", out, "--out", tmp_path / "eval",
                           "--max-real", "8", "--bootstrap", "5")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "synthetic" in json.dumps(metrics) and "dry/thickness" in metrics["fidelity"]

    assert train_main([str(LORA_YAML), *lora_overrides(base, out, tmp_path / "on_synthetic")]) == 0
    assert (tmp_path / "on_synthetic" / "pytorch_lora_weights.safetensors").is_file()


def test_an_interrupted_dataset_resumes_without_duplicates(tmp_path):
    import numpy as np

    concepts = [SyntheticConcept("a dotted texture", "dry", "warp"), SyntheticConcept("a texture", "dry", "weft")]
    record = {"synthetic": True, "model_sha256": "abc", "settings": {}}
    calls = []

    def draw(prompt, seed, fail_at=None):
        calls.append((prompt, seed))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return np.full((8, 8, 3), seed / 10, np.float32)

    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "d", concepts, 3, 0, lambda p, s: draw(p, s, fail_at=4), record, {}, False)
    assert len(rows(tmp_path / "d")) == 3
    calls.clear()
    written = write_dataset(tmp_path / "d", concepts, 3, 0, draw, record, {}, False)
    assert len(calls) == len(written) == 3  # only what was missing
    names = [r["file_name"] for r in rows(tmp_path / "d")]
    assert len(names) == len(set(names)) == 6
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_folder_holding_something_else_or_other_settings_is_refused(lora_run, tmp_path):
    base, run = lora_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    settings = GenerateSettings([], steps=2, loras=[(str(run), 1.0)])
    with pytest.raises(UserError, match="not a synthetic dataset") as error:
        generate_dataset(str(base), settings, other, 1, show_progress=False)
    assert "\n" not in str(error.value) and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    made = tmp_path / "made"
    generate_dataset(str(base), settings, made, 1, show_progress=False)
    with pytest.raises(UserError, match="other settings"):
        generate_dataset(str(base), GenerateSettings([], steps=3, loras=[(str(run), 1.0)]), made, 2,
                         show_progress=False)
    with pytest.raises(UserError, match="per-concept"):
        generate_dataset(str(base), settings, tmp_path / "none", 0)
    assert not (tmp_path / "none").exists()
