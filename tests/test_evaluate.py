"""`ldm-finetune evaluate` end to end on phantom slices: two-folder form and config form (tiny SD + LoRA, pixel DDPM,
local-score baseline), what the numbers must say about copies / shuffled pixels / real slices, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def rows_of(folder: Path, state: str, orientation: str):
    rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    return [r for r in rows if r["state"] == state and r["orientation"] == orientation]


@pytest.fixture(scope="module")
def generated(prep_dataset, tmp_path_factory):
    """Three 'models' in one folder: exact copies of training slices (dry/warp), pixel-shuffled slices
    (injected/thickness), and real validation slices (dry-compacted/weft)."""
    out = tmp_path_factory.mktemp("gen") / "fake"
    rng = np.random.default_rng(0)
    for (state, orient), kind in {("dry", "warp"): "copy", ("injected", "thickness"): "shuffle",
                                  ("dry-compacted", "weft"): "validation"}.items():
        split = "validation" if kind == "validation" else "train"
        folder = out / f"{state}__{orient}"
        folder.mkdir(parents=True)
        for i, r in enumerate(rows_of(prep_dataset / split, state, orient)[:16]):
            img = np.asarray(Image.open(prep_dataset / split / r["file_name"]))
            if kind == "shuffle":
                img = rng.permutation(img.ravel()).reshape(img.shape)
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return out


@pytest.fixture(scope="module")
def report(prep_dataset, generated, tmp_path_factory):
    from ldm_finetune.cli import main

    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(["evaluate", "--real", str(prep_dataset), "--generated", str(generated), "--out", str(out),
                 "--max-real", "40", "--bootstrap", "20"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_real_slices_score_near_the_floor_and_shuffled_ones_far(report):
    _, m = report
    fid = m["fidelity"]
    real_like = fid["dry-compacted/weft"]
    shuffled = fid["injected/thickness"]
    # a small-sample SWD is noisy (16 images here), so it gets a looser factor than the per-image statistics
    for metric, factor in (("spectrum", 5), ("two_point", 5), ("glcm", 5), ("swd", 3)):
        assert real_like["models"]["fake"]["values"][metric] < 3 * real_like["floor"][metric] + 1e-3, metric
        assert shuffled["models"]["fake"]["values"][metric] > factor * shuffled["floor"][metric], metric
    lo, hi = shuffled["models"]["fake"]["ci"]["spectrum"]
    assert lo <= hi


def test_copies_are_flagged_with_their_training_twin(report, prep_dataset):
    _, m = report
    mem = m["memorisation"]["models"]["fake"]
    flagged = {Path(f["generated"]).parent.name for f in mem["near_copies"]}
    assert flagged == {"dry__warp"}, flagged
    assert len(mem["near_copies"]) == 16 and all(f["ncc"] > 0.99 for f in mem["near_copies"])
    assert all(Path(f["training"]).is_relative_to(prep_dataset / "train") for f in mem["near_copies"])


def test_classifier_consistency_and_report(report):
    out, m = report
    clf = m["classifier"]
    assert 0 < clf["ceiling_accuracy"] <= 1 and len(clf["classes"]) == 9
    assert clf["models"]["fake"]["accuracy"] >= 0
    assert set(m["consistency"]["real"]["fractions"]) == {"dry", "dry-compacted", "injected"}
    page = (out / "report.html").read_text()
    assert page.count("<img") > 20 and "data:image/png;base64" in page
    assert "src=\"http" not in page and "<script" not in page  # self-contained, static
    for heading in ("Summary", "Per concept", "Memorisation", "3D consistency", "Prompt-drift probes", "Skipped"):
        assert f"<h2>{heading}" in page


def test_metrics_are_deterministic(prep_dataset, generated, report, tmp_path):
    from ldm_finetune.cli import main

    assert main(["evaluate", "--real", str(prep_dataset), "--generated", str(generated), "--out",
                 str(tmp_path / "again"), "--max-real", "40", "--bootstrap", "20"]) == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["fidelity"] == report[1]["fidelity"]


def test_size_mismatch_and_too_few_images(prep_dataset, tmp_path, run_cli):
    big = tmp_path / "big" / "dry__warp"
    big.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(big / f"{i}.png")
    code, _, err = run_cli("evaluate", "--real", prep_dataset, "--generated", big.parent, "--out", tmp_path / "o")
    assert code == 2 and "pass --size N" in err
    few = tmp_path / "few" / "dry__warp"
    few.mkdir(parents=True)
    src = rows_of(prep_dataset / "validation", "dry", "warp")[:2]
    for i, r in enumerate(src):
        shutil.copy(prep_dataset / "validation" / r["file_name"], few / f"{i}.png")
    code, _, err = run_cli("evaluate", "--real", prep_dataset, "--generated", few.parent, "--out", tmp_path / "p",
                           "--max-real", "20")
    assert code == 0, err
    skipped = json.loads((tmp_path / "p" / "metrics.json").read_text())["skipped"]
    assert any("only 2 generated images" in s["reason"] for s in skipped)
    assert "only 2 generated images" in (tmp_path / "p" / "report.html").read_text()


def eval_config(tmp_path, prep_dataset, models, **sampler):
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps({
        "real": str(prep_dataset), "models": models, "seeds": [0, 1, 2, 3], "probe_seeds": [0],
        "concepts": {"dry/thickness": "sf_dry sf_thickness", "injected/warp": "sf_injected sf_warp"},
        "probes": ["horse on a beach", "a texture"], "max_real": 20,
        "sampler": {"steps": 2, "pixel_steps": 3, **sampler}}))  # JSON is YAML
    return path


def test_config_form_with_sd_lora_pixel_and_baseline(prep_dataset, tiny_model_dir, small_train_dir, tmp_path,
                                                     run_cli):
    from ldm_finetune.train import main as train
    from tests.conftest import lora_overrides

    lora = tmp_path / "lora"
    assert train([str(Path(__file__).parent.parent / "recipes" / "lora.yaml"),
                  *lora_overrides(tiny_model_dir, small_train_dir, lora, **{"train.learning_rate": 1e-2})]) == 0
    models = [{"name": "base", "kind": "sd", "model": str(tiny_model_dir)},
              {"name": "lora", "kind": "sd", "model": str(tiny_model_dir), "loras": [str(lora)]},
              {"name": "mosaic", "kind": "local_score", "patch": 3}]
    config = eval_config(tmp_path, prep_dataset, models, resolution=32)  # concepts at 32 px, probes at its own 64
    code, out, err = run_cli("evaluate", config, "--out", tmp_path / "ev")
    assert code == 0, err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    images = tmp_path / "ev" / "images" / "lora"
    assert Image.open(images / "dry__thickness" / "0000.png").size == (32, 32)
    assert Image.open(images / "probes" / "a-texture_0000.png").size == (64, 64) and m["probes"]["side"] == 64
    # without sampler.resolution an SD entry is drawn at the size its LoRA was trained at (the header's), not at the
    # base's own 64 px
    from ldm_finetune.evaluation.config import ModelEntry, _trained_side

    assert _trained_side(ModelEntry("lora", "sd", str(tiny_model_dir), loras=[f"{lora}:0.8"])) == 32
    assert _trained_side(ModelEntry("lora", "sd", str(tiny_model_dir), loras=[str(lora / "lora.safetensors")])) == 32
    assert _trained_side(ModelEntry("base", "sd", str(tiny_model_dir))) is None
    assert set(m["fidelity"]) == {"dry/thickness", "injected/warp"}
    assert set(m["fidelity"]["dry/thickness"]["models"]) == {"base", "lora", "mosaic"}
    accuracy = m["classifier"]["models"]  # SD models are also read in their VAE's space; the baseline has none
    assert {"decoder_accuracy", "decoder_ceiling"} <= set(accuracy["lora"]) and "decoder_accuracy" in accuracy["base"]
    assert "decoder_accuracy" not in accuracy.get("mosaic", {})
    assert any("tiny random-init" in n for n in m["notes"])
    probes = m["probes"]["models"]["lora"]["prompts"]
    assert set(probes) == {"horse on a beach", "a texture"} and all(0 <= v["ct_leakage"] <= 1 for v in probes.values())
    # metrics.json holds numbers and paths: the probe grids are the image files, which the report draws
    assert "data:image" not in (tmp_path / "ev" / "metrics.json").read_text()
    grid = m["probes"]["models"]["lora"]["grids"]["a texture"]
    assert [Path(f).name for f in grid["tuned"]] == ["a-texture_0000.png"] and Path(grid["base"][0]).is_file()
    assert any(s["what"] == "CLIP text/image scores" for s in m["skipped"])
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ev" / "images").rglob("*.png")}
    code, out, _ = run_cli("evaluate", config, "--out", tmp_path / "ev")
    assert code == 0 and "generating" not in out  # everything was there already
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ev" / "images").rglob("*.png")} == stamps


def test_config_bad_models(prep_dataset, tmp_path, tiny_model_dir, run_cli):
    config = eval_config(tmp_path, prep_dataset, [{"name": "x", "kind": "sd", "model": "/nonexistent/model"}])
    code, _, err = run_cli("evaluate", config, "--out", tmp_path / "a")
    assert code == 2 and "/nonexistent/model does not exist" in err
    bad_lora = tmp_path / "bad.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.9.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, str(bad_lora))
    config = eval_config(tmp_path, prep_dataset, [{"name": "x", "kind": "sd", "model": str(tiny_model_dir),
                                                   "loras": [str(bad_lora)]}])
    code, _, err = run_cli("evaluate", config, "--out", tmp_path / "b")
    assert code == 2 and "do not exist in this model" in err
    config = eval_config(tmp_path, prep_dataset, [{"name": "x", "kind": "pixel"}])
    code, _, err = run_cli("evaluate", config, "--out", tmp_path / "c")
    assert code == 2 and "kind pixel needs model" in err
    config = eval_config(tmp_path, prep_dataset, [{"name": "x", "kind": "sd", "model": str(tiny_model_dir)}],
                         probe_resolution=-64)
    code, _, err = run_cli("evaluate", config, "--out", tmp_path / "d")
    assert code == 2 and "sampler.probe_resolution: -64 is not an image side" in err and not (tmp_path / "d").exists()
    config = eval_config(tmp_path, prep_dataset, [{"name": "x", "kind": "sd", "model": str(tiny_model_dir)}],
                         pixel_guidance_rescale=1.5)
    code, _, err = run_cli("evaluate", config, "--out", tmp_path / "e")
    assert code == 2 and "sampler.pixel_guidance_rescale: 1.5 is not a share" in err and not (tmp_path / "e").exists()


# --- the report in a real browser ----------------------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,4000"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven through its matching chromedriver (nothing downloads a browser)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("headless Chromium is not installed here (apt-get install chromium chromium-driver; .ci/run "
                    "installs both)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-test.txt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path) -> tuple[list, list]:
    """(images that did not load, console errors) after loading `page`."""
    driver.get(page.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt || i.src.slice(0, 60)])")
    assert images, "the page shows no images at all"
    broken = [name for ok, name in images if not ok]
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return broken, errors


def test_the_report_in_a_real_browser(report, browser):
    out, _ = report
    broken, errors = open_page(browser, out / "report.html")
    assert not broken and not errors, (broken[:3], errors[:3])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[1] >= 1000 and pixels.std() > 5  # a rendered page, not a blank one
    print(f"\nscreenshot of the report: {shot}")


def test_the_browser_check_sees_a_broken_image_and_a_script_error(report, browser, tmp_path):
    out, _ = report
    page = (out / "report.html").read_text()
    bad = tmp_path / "report.html"
    bad.write_text(page.replace("</body>", '<img alt="broken" src="data:image/png;base64,AAAA">'
                                          "<script>undefinedFunction()</script></body>"))
    broken, errors = open_page(browser, bad)
    assert broken == ["broken"] and any("undefinedFunction" in e for e in errors)


def test_a_smaller_model_is_scored_at_its_own_size(prep_dataset, tmp_path, run_cli):
    """Real validation slices shrunk to half size stand in for a model that generates small images: scored at its
    own size (real slices shrunk alike, floor recomputed there) they sit near the floor; upscaled to the real size
    first (the old way) their spectrum and GLCM distances blow up."""
    rows = rows_of(prep_dataset / "validation", "dry-compacted", "weft")[:16]
    side = np.asarray(Image.open(prep_dataset / "validation" / rows[0]["file_name"])).shape[0]
    small = tmp_path / "small" / "dry-compacted__weft"
    small.mkdir(parents=True)
    from ldm_finetune.evaluation.metrics import load_set, resize_set

    shrunk = resize_set(load_set([prep_dataset / "validation" / r["file_name"] for r in rows], None), side // 2)
    for i, img in enumerate(shrunk):  # shrunk the way the evaluation shrinks the real slices
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(small / f"{i:04d}.png")
    results = {}
    for name, extra in (("own", []), ("upscaled", ["--size", str(side)])):
        code, _, err = run_cli("evaluate", "--real", prep_dataset, "--generated", small.parent, "--out",
                               tmp_path / name, "--max-real", "40", "--bootstrap", "5", *extra)
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    own = results["own"]["fidelity"]["dry-compacted/weft"]["models"]["small"]
    assert own["size"] == side // 2 and results["own"]["settings"]["scored_at_own_size"] == {"small": side // 2}
    upscaled = results["upscaled"]["fidelity"]["dry-compacted/weft"]
    ratio_own = {k: own["values"][k] / own["floor"][k] for k in ("spectrum", "glcm")}
    ratio_up = {k: upscaled["models"]["small"]["values"][k] / upscaled["floor"][k] for k in ("spectrum", "glcm")}
    assert all(ratio_own[k] < 5 for k in ratio_own), ratio_own  # 16 images: a little above the floor
    assert all(ratio_up[k] > 2 * ratio_own[k] for k in ratio_own), (ratio_own, ratio_up)
    page = (tmp_path / "own" / "report.html").read_text()
    assert f"floor at {side // 2} px" in page and f"small ({side // 2} px)" in page


def test_probe_rows_name_the_dreambooth_class_prompt(tmp_path):
    """The drift table points at the row prior preservation protects: the class prompt the run trained with."""
    import yaml

    from ldm_finetune.evaluation.config import ModelEntry, class_prompts
    from ldm_finetune.evaluation.report import _probes

    run = tmp_path / "run"
    run.mkdir()
    concepts = [{"caption": "a w17h3r texture", "class_prompt": "a texture"},
                {"caption": "a th1ck texture", "class_prompt": "a texture"}, {"caption": "sf_dry"}]
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"concepts": concepts}}))
    assert class_prompts(ModelEntry("db", "sd", "base", loras=[f"{run}:0.8"])) == ["a texture"]
    assert class_prompts(ModelEntry("db", "sd", "base", loras=[str(run / "lora.safetensors")])) == ["a texture"]
    (run / "embeddings").mkdir()
    assert class_prompts(ModelEntry("db", "sd", "base", embeddings=[str(run / "embeddings")])) == ["a texture"]
    assert class_prompts(ModelEntry("plain", "sd", "base", loras=[str(tmp_path / "elsewhere.safetensors")])) == []
    from ldm_finetune.evaluation.results import ModelProbes, ProbeResult

    page = _probes(ProbeResult("base", {"db": ModelProbes({"a red circle": {}, "a texture": {}}, {}, ["a texture"])}))
    assert page.count("DreamBooth class prompt") == 1
    assert page.index("a red circle") < page.index("a texture") < page.index("DreamBooth class prompt")


def test_typed_results_write_only_what_was_measured():
    """metrics.json is the typed results as plain numbers and paths; a section or field not measured (None) is left
    out rather than written as null, as the report and readers of metrics.json expect."""
    from ldm_finetune.evaluation.results import (ConceptFidelity, EvaluationResults, MemorisationResult,
                                                 ModelFidelity, ModelMemorisation, NearCopy)

    copies = ModelMemorisation(0.2, [0.2], [3], [0.99], [NearCopy("gen/0.png", "train/3.png", 0.99)], 1.0)
    results = EvaluationResults(
        settings={"real": "data"}, consistency={},
        fidelity={"dry/warp": ConceptFidelity(8, {}, {"m": ModelFidelity(8, {"grey": 0.1}, {"grey": [0.1, 0.2]})})},
        classifier=None, memorisation=MemorisationResult(0.95, {"m": copies}))
    plain = results.to_json()
    assert json.loads(json.dumps(plain)) == plain
    assert "classifier" not in plain and "floor" not in plain["fidelity"]["dry/warp"]
    assert plain["fidelity"]["dry/warp"]["models"]["m"] == {"n": 8, "values": {"grey": 0.1}, "ci": {"grey": [0.1, 0.2]}}
    assert plain["memorisation"]["models"]["m"]["near_copies"] == [
        {"generated": "gen/0.png", "training": "train/3.png", "ncc": 0.99}]
    assert "validation_ncc_p99" not in plain["memorisation"]


def test_held_out_real_slices_score_one_floor_at_the_set_size(prep_dataset):
    """The floor is measured at the generated set's size, so 8 held-out real slices per class score about 1x on
    every distance. (A floor from every validation slice put 8 real slices at 2-3x: the noise of a small set.)"""
    from ldm_finetune.evaluation import metrics as M
    from ldm_finetune.evaluation.evaluate import fidelity, measure
    from ldm_finetune.evaluation.imagesets import ImageSet, load_real
    from ldm_finetune.evaluation.report import DISTANCES

    train, val = load_real(prep_dataset, "train", None), load_real(prep_dataset, "validation", None)
    thresholds = M.multi_otsu(train.images, 3)
    measured_train, measured_val = measure(train, thresholds), measure(val, thresholds)
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(3):
        pick = np.concatenate([rng.choice(np.flatnonzero(np.array(val.classes) == c), 8, replace=False)
                               for c in val.known_classes()])
        held_out = ImageSet("held-out", val.images[pick], [val.classes[i] for i in pick], [val.paths[i] for i in pick])
        result = fidelity(measured_train, measured_val, {"held-out": measure(held_out, thresholds)}, 2, 0, [])
        ratios += [entry.models["held-out"].values[d] / entry.floor_of("held-out")[d]
                   for entry in result.values() for d in DISTANCES + ["swd"] if entry.floor_of("held-out")[d] > 0]
    assert 0.7 < np.mean(ratios) < 1.4, np.mean(ratios)


def test_concept_accuracy_in_the_decoders_space_reads_what_was_learned(prep_dataset, tmp_path):
    """A decoder that blurs (here a 1 px Gaussian) hides the fine texture the classifier learned from sharp slices.
    Validation slices of each class drawn through it read as their class in the decoder's space, and far less
    against the sharp slices; the same images asked for the wrong classes read as nothing learned."""
    from scipy import ndimage

    from ldm_finetune.evaluation.evaluate import SuiteSettings, evaluate_sets
    from ldm_finetune.evaluation.imagesets import ImageSet, load_real

    def blur(images):
        return ndimage.gaussian_filter(images, (0, 1.0, 1.0)).astype(np.float32)

    val = load_real(prep_dataset, "validation", None, 12)
    drawn = blur(val.images)
    classes = sorted(set(val.classes))
    wrong = [classes[(classes.index(c) + 1) % len(classes)] for c in val.classes]
    generated = {"learned": ImageSet("learned", drawn, list(val.classes), list(val.paths)),
                 "unlearned": ImageSet("unlearned", drawn, wrong, list(val.paths))}
    results = evaluate_sets(SuiteSettings(prep_dataset, max_real=40, rounds=5), generated, tmp_path,
                            decoders={"learned": blur, "unlearned": blur})
    learned, unlearned = results.classifier.models["learned"], results.classifier.models["unlearned"]
    assert learned.decoder_ceiling >= 0.6 and learned.decoder_accuracy >= 0.6, learned
    assert learned.decoder_accuracy > learned.accuracy + 0.2, learned
    assert unlearned.decoder_accuracy <= 0.2, unlearned
    assert "decoder_accuracy" in json.loads((tmp_path / "metrics.json").read_text())["classifier"]["models"]["learned"]
