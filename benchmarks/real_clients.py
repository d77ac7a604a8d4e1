"""Our shareable files, loaded by the real clients' own loader code: ComfyUI and kohya sd-scripts.

Three bases with the real architectures and widths (random weights: loading does not care what the weights are):
SD 1.5, SD 2.1-base (512, epsilon) and SD 2.1 (768, v-prediction). For each, `make` (this project's venv) runs two
real training runs through `python -m ldm_finetune.train` (2 steps at 64 px on phantom slices, a large learning rate
so the adapters move): LoRA (attention + feed-forward + ResNet, text encoder, rank 16, alpha 8: alpha != rank, so a
client that misses the alpha shows it) and pivotal tuning; then `ldm-finetune export --format checkpoint` of the base.
It also records what diffusers makes of each file, as the reference: per adapted module, the fused weight change
(W_fused - W_base) applied to fixed random probe vectors, and the base UNet's / VAE's output on fixed inputs.

`comfyui` and `kohya` (each in its own venv, with the client's source folder) load every file through the client's
own code and compare with that reference:
- ComfyUI: `comfy.sd.load_state_dict_guess_config` (the checkpoint loader), `comfy.sd.load_lora_for_models` (what
  the LoraLoader node calls) with the patches applied, `comfy.sd1_clip.load_embed` (the embedding loader);
- kohya: `library.model_util.load_models_from_stable_diffusion_checkpoint`, `networks.lora.create_network_from_weights`
  + `load_state_dict` + `merge_to`, and `networks/check_lora_weights.py`.
Per file and client: keys present / matched, modules built / patched, and the largest relative difference between
the client's weight change and diffusers' (probes), or between the client's model output and diffusers'.

    python benchmarks/real_clients.py make --work W                       # project venv (~4 GB per base in W)
    CVENV/bin/python benchmarks/real_clients.py comfyui --work W --source ComfyUI/
    KVENV/bin/python benchmarks/real_clients.py kohya --work W --source sd-scripts/
    python benchmarks/real_clients.py report --work W                      # -> results/real_clients.json

The client venvs hold only what each client's requirements name (see benchmarks/README.md for the lists used).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
ARCHS = {"sd15": ("sd15", "epsilon"), "sd21-base": ("sd21", "epsilon"), "sd21-v": ("sd21", "v_prediction")}
PROBES = 2  # random probe vectors per module
LORA = {"lora.rank": 16, "lora.alpha": 8, "lora.text_encoder": "true",
        "lora.targets": "[attention,feedforward,resnet]"}


# --- make (this project's venv) ------------------------------------------------------------------------------------

def _train(recipe: str, base: Path, data: Path, out: Path, extra: dict) -> None:
    settings = {"model.pretrained": base, "data.train_dir": data, "output_dir": out, "data.resolution": 64,
                "data.num_workers": 0, "data.cache_latents": "memory", "train.batch_size": 1, "train.max_steps": 2,
                "train.mixed_precision": "no", "train.lr_warmup_steps": 0, "train.learning_rate": 1e-2,
                "validation.prompts": "[]", "logging.report_to": "none", "checkpoint.every_steps": "null", **extra}
    cmd = [sys.executable, "-m", "ldm_finetune.train", str(ROOT / "recipes" / recipe)]
    cmd += [f"{k}={v}" for k, v in settings.items()]
    subprocess.run(cmd, check=True, cwd=ROOT)


def _probes(shape: tuple[int, ...], key: str) -> torch.Tensor:
    """Fixed random vectors over a weight's input side (in_features, or in_channels x kh x kw)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    width = int(torch.tensor(shape[1:]).prod())
    return torch.randn(width, PROBES, generator=g, dtype=torch.float64)


def _fused_deltas(base: Path, lora_folder: Path) -> dict[str, torch.Tensor]:
    """diffusers' reading of a LoRA folder: per adapted weight, (W_fused - W_base) @ probes, keyed
    'unet.<module>.weight' / 'text_encoder.<module>.weight' in diffusers' names."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}
    pipe.load_lora_weights(str(lora_folder), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    out = {}
    for component, old in before.items():
        for key, value in getattr(pipe, component).state_dict().items():
            name = key if component == "unet" or key.startswith("text_model.") else "text_model." + key
            if key in old and not torch.equal(value, old[key]) and value.ndim >= 2:
                delta = (value - old[key]).double().reshape(value.shape[0], -1)
                probes = _probes(tuple(value.shape), f"{component}.{name}")
                out[f"{component}.{name}"] = delta @ probes
                out[f"probe::{component}.{name}"] = probes
    return out


def _model_outputs(base: Path, prediction: str) -> dict[str, torch.Tensor]:
    """The base UNet on a fixed (x, t, context) and the VAE decoder on a fixed latent: what a client's loaded model
    must compute."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([500])
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    # CLIP's start and end ids around two words of its vocabulary, padded with the end id: the same ids go to the
    # client's text encoder, whatever its tokenizer
    ids = torch.tensor([[49406, 320, 2368] + [49407] * 74])
    with torch.no_grad():
        eps = unet(x, t, encoder_hidden_states=context).sample
        image = vae.decode(z).sample
        hidden = text_encoder(ids).last_hidden_state  # (1, 77, D): what SD conditions on
    return {"x": x, "t": t, "context": context, "unet_out": eps, "z": z, "vae_out": image, "ids": ids,
            "text_out": hidden}


def _keep_one_per_concept(train: Path) -> None:
    rows, seen = [], set()
    for line in (train / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if (row["state"], row["orientation"]) not in seen:
            seen.add((row["state"], row["orientation"]))
            rows.append(row)
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make(work: Path, archs: list[str]) -> None:
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.phantom import STATES, write_phantoms
    from data_prep.prep import run_prep
    from ldm_finetune.generation.checkpoint import export_checkpoint
    from ldm_finetune.models.stable_diffusion import build_pipeline

    data = work / "data"
    if not (data / "train" / "metadata.jsonl").is_file():
        write_phantoms(work / "phantom", (48, 80, 128), seed=3)
        run_prep(PrepConfig(volumes=[VolumeSpec(s, work / "phantom" / f"{s}.tif") for s in STATES], out=data,
                            resolution=64), show_progress=False)
        _keep_one_per_concept(data / "train")  # a few images: the runs exist to write files, not to learn
    for arch in archs:
        preset, prediction = ARCHS[arch]
        folder = work / arch
        base = folder / "base"
        t0 = time.time()
        if not (base / "model_index.json").is_file():
            build_pipeline(preset, seed=0, prediction_type=prediction).save_pretrained(base, safe_serialization=True)
        if not (folder / "lora" / "training_finished.json").is_file():
            _train("lora.yaml", base, data / "train", folder / "lora", LORA)
        if not (folder / "pivotal" / "training_finished.json").is_file():
            _train("pivotal_tuning.yaml", base, data / "train", folder / "pivotal", {
                **LORA, "pivotal.ti_steps": 1,
                "data.concepts": "[{token: <dry-slice>, initializer: dry, select: {state: dry}, "
                "num_images: 3, caption: 'A {token} of a carbon composite material'}]",
                "pivotal.embedding_lr": 1e-1, "validation.prompts": "[]"})
        checkpoint = folder / "checkpoint.safetensors"
        if not checkpoint.is_file():
            export_checkpoint(str(base), checkpoint)
        reference = folder / "reference.safetensors"
        if not reference.is_file():
            ref = _model_outputs(base, prediction)
            for run in ("lora", "pivotal"):
                ref |= {f"{run}/{k}": v for k, v in _fused_deltas(base, folder / run).items()}
            save_file({k: v.contiguous() for k, v in ref.items()}, str(reference))
        print(f"{arch}: made in {time.time() - t0:.0f} s", flush=True)


# --- shared by the client sides ------------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, Path]:
    """The shareable files of a base's runs, by a short label."""
    out = {"checkpoint": folder / "checkpoint.safetensors"}
    for run in ("lora", "pivotal"):
        out[f"{run}: pytorch_lora_weights.safetensors"] = folder / run / "pytorch_lora_weights.safetensors"
        out[f"{run}: {run}.safetensors (client file)"] = folder / run / f"{run}.safetensors"
    out["pivotal: a1111/dry-slice.safetensors"] = folder / "pivotal" / "a1111" / "dry-slice.safetensors"
    out["pivotal: embeddings/dry-slice.safetensors"] = folder / "pivotal" / "embeddings" / "dry-slice.safetensors"
    return out


def _compare_deltas(reference: dict, run: str, deltas: dict[str, torch.Tensor]) -> dict:
    """Client weight changes (full tensors keyed like the reference) against diffusers' probes."""
    expected = {k[len(run) + 1:]: v for k, v in reference.items()
                if k.startswith(run + "/") and "probe::" not in k}
    worst, compared = 0.0, 0
    for key, want in expected.items():
        got = deltas.get(key)
        if got is None:
            continue
        probes = reference[f"{run}/probe::{key}"]
        got = got.double().reshape(got.shape[0], -1) @ probes
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-30)))
        compared += 1
    return {"modules_expected": len(expected), "modules_patched": compared,
            "modules_missing": sorted(set(expected) - set(deltas))[:5],
            "max_rel_diff_vs_diffusers": worst if compared else None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured_logs():
    handler = _Log()
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def _save(work: Path, client: str, results: dict) -> None:
    (work / f"{client}.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))



# --- ComfyUI (its venv, its source folder) ------------------------------------------------------------------------

def _comfy_checkpoint(path: Path, reference: dict, base: Path) -> tuple[dict, object, object]:
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    present = len(sd)
    with _captured_logs() as lines:
        # fp32 weights (ComfyUI's CPU default casts the text encoder to fp16): the comparison is about the file
        model, clip, vae = comfy.sd.load_state_dict_guess_config(
            sd, output_vae=True, output_clip=True, metadata=metadata, model_options={"dtype": torch.float32},
            te_model_options={"dtype": torch.float32})[:3]
    left_over = len(sd)  # the loader pops every key it uses
    problems = [line[:300] for line in lines if line.startswith(("unet missing", "unet unexpected", "clip missing",
                                                                  "clip unexpected", "Missing VAE", "Leftover VAE"))]
    unet = model.model.diffusion_model.float()
    encoder = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)  # clip_l (SD 1) / clip_h (SD 2)
    with torch.no_grad():
        out = unet(reference["x"], timesteps=reference["t"].float(), context=reference["context"])
        image = vae.first_stage_model.float().decode(reference["z"])
        conditioning = encoder([reference["ids"][0].tolist()])[0]  # SD 2: the penultimate layer, normed
    # text encoder: ComfyUI keeps transformers-style names under clip_l / clip_h; compare with the diffusers folder
    ours = {("text_model." + k if not k.startswith("text_model.") else k): v
            for k, v in load_file(str(base / "text_encoder" / "model.safetensors")).items()}
    theirs = {k.split(".transformer.", 1)[1]: v for k, v in clip.cond_stage_model.state_dict().items()
              if ".transformer.text_model." in k}
    shared = [k for k in ours if k in theirs]
    return {
        "keys_present": present, "keys_matched": present - left_over, "problems": problems,
        "model_class": type(model.model).__name__, "prediction": str(model.model.model_type).split(".")[-1],
        "unet_rel_diff_vs_diffusers": _rel(out, reference["unet_out"]),
        "vae_decode_rel_diff_vs_diffusers": _rel(image, reference["vae_out"]),
        "conditioning_rel_diff_vs_diffusers": _rel(conditioning, reference["text_out"]),
        "text_encoder_tensors_compared": f"{len(shared)}/{len(ours)}",
        "text_encoder_max_rel_diff": max(_rel(theirs[k].float(), ours[k].float()) for k in shared),
    }, model, clip


def _comfy_lora(path: Path, model, clip, reference: dict, run: str) -> dict:
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path))
    with _captured_logs() as lines:
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    not_loaded = [line.split(" ", 4)[-1] for line in lines if line.startswith(("lora key not loaded", "NOT LOADED"))]
    to_diffusers = {ldm: d for d, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
    deltas = {}
    for patcher, prefix in ((patched_model, "diffusion_model."), (patched_clip.patcher, "")):
        state = patcher.model.state_dict()
        for key, patches in patcher.patches.items():
            base = state[key].float()
            delta = comfy.lora.calculate_weight(patches, base.clone(), key) - base
            if key.startswith("diffusion_model."):
                deltas["unet." + to_diffusers.get(key[len(prefix):], key)] = delta
            else:
                deltas["text_encoder." + key.split(".transformer.", 1)[1]] = delta
    modules_in_file = {k.rsplit(".", 2)[0] for k in lora if k.endswith(("lora_down.weight", "lora_A.weight"))}
    return {"modules_in_file": len(modules_in_file), "keys_not_loaded": len(not_loaded),
            "first_not_loaded": not_loaded[:3], **_compare_deltas(reference, run, deltas)}


def _comfy_embedding(path: Path, reference_vectors: torch.Tensor, width: int) -> dict:
    import comfy.sd1_clip

    vectors = comfy.sd1_clip.load_embed(path.stem, str(path.parent), width)
    if vectors is None:
        return {"loaded": False}
    return {"loaded": True, "shape": list(vectors.shape), "equal": bool(torch.equal(vectors, reference_vectors))}


def comfyui(work: Path, source: Path, archs: list[str], commit: str | None) -> None:
    sys.path.insert(0, str(source.resolve()))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    torch.set_grad_enabled(False)
    results = {"client": "ComfyUI", "commit": commit, "torch": torch.__version__, "per_base": {}}
    for arch in archs:
        folder = work / arch
        reference = load_file(str(folder / "reference.safetensors"))
        files = _files(folder)
        row, (model, clip) = {}, (None, None)
        row["checkpoint"], model, clip = _comfy_checkpoint(files["checkpoint"], reference, folder / "base")
        for label, path in files.items():
            if label == "checkpoint":
                continue
            run = label.split(":")[0]
            if "embeddings/" in label or "a1111/" in label:
                learned = next(iter(load_file(str(files["pivotal: embeddings/dry-slice.safetensors"])).values()))
                row[label] = _comfy_embedding(path, learned, learned.shape[-1])
            else:
                row[label] = _comfy_lora(path, model, clip, reference, run)
        results["per_base"][arch] = row
        del model, clip
    _save(work, "comfyui", results)



# --- kohya sd-scripts (its venv, its source folder) ----------------------------------------------------------------

def _kohya_checkpoint(path: Path, v2: bool, reference: dict, base: Path) -> tuple[dict, object, object]:
    from library import model_util

    with _captured_logs() as lines:
        text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, str(path))
    load_infos = [line for line in lines if line.startswith(("loading u-net", "loading vae", "loading text encoder"))]
    with torch.no_grad():
        out = unet(reference["x"], reference["t"], encoder_hidden_states=reference["context"]).sample
        image = vae.decode(reference["z"]).sample
        conditioning = text_encoder(reference["ids"]).last_hidden_state
    ours = {("text_model." + k if not k.startswith("text_model.") else k): v
            for k, v in load_file(str(base / "text_encoder" / "model.safetensors")).items()}
    theirs = text_encoder.state_dict()
    shared = [k for k in ours if k in theirs]
    return {"load_infos": load_infos,  # torch's strict load_state_dict: '<All keys matched successfully>'
            "unet_rel_diff_vs_diffusers": _rel(out, reference["unet_out"]),
            "vae_decode_rel_diff_vs_diffusers": _rel(image, reference["vae_out"]),
            "conditioning_rel_diff_vs_diffusers": _rel(conditioning, reference["text_out"]),
            "text_encoder_tensors_compared": f"{len(shared)}/{len(ours)}",
            "text_encoder_max_rel_diff": max(_rel(theirs[k].float(), ours[k].float()) for k in shared)}, \
        text_encoder, unet


def _kohya_lora(path: Path, text_encoder, unet, reference: dict, run: str, source: Path) -> dict:
    import networks.lora as kohya_lora

    weights = load_file(str(path))
    network, weights = kohya_lora.create_network_from_weights(1.0, str(path), None, text_encoder, unet,
                                                              weights_sd=weights, for_inference=True)
    names = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    # what network.load_state_dict(weights, strict=False) would leave unloaded, without hooking the models
    unexpected = [k for k in weights if k.split(".")[0] not in names and not k.startswith("bundle_emb.")]
    built = len(names)
    before = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
              "text_encoder": {k: v.clone() for k, v in text_encoder.state_dict().items()}}
    network.merge_to(text_encoder, unet, weights, torch.float32, "cpu")
    deltas = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for key, value in model.state_dict().items():
            if not torch.equal(value, before[component][key]):
                deltas[f"{component}.{key}"] = value.float() - before[component][key].float()
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):  # undo the merge for the next file
        model.load_state_dict(before[component])
    check = subprocess.run([sys.executable, str(source / "networks" / "check_lora_weights.py"), str(path)],
                           cwd=source, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                               filter(None, [str(source), os.environ.get("PYTHONPATH")]))))
    counted = [line for line in check.stdout.splitlines() if line.startswith("number of LoRA modules")]
    zero = [line.split(",")[0] for line in check.stdout.splitlines()[1:] if line.count(",") == 3
            and float(line.split(",")[2]) == 0.0]
    modules_in_file = {k.rsplit(".", 2)[0] for k in weights if k.endswith(("lora_down.weight", "lora_A.weight"))}
    return {"modules_in_file": len(modules_in_file), "modules_built": built,
            "unexpected_keys_dropped": len(unexpected), "first_unexpected": unexpected[:3],
            "check_lora_weights": counted[0] if counted else check.stderr.strip()[-200:],
            "all_zero_matrices": len(zero), **_compare_deltas(reference, run, deltas)}


def kohya(work: Path, source: Path, archs: list[str], commit: str | None) -> None:
    source = source.resolve()
    sys.path.insert(0, str(source))
    torch.set_grad_enabled(False)
    results = {"client": "kohya sd-scripts", "commit": commit, "torch": torch.__version__, "per_base": {}}
    for arch in archs:
        folder = work / arch
        reference = load_file(str(folder / "reference.safetensors"))
        files = _files(folder)
        row = {}
        row["checkpoint"], text_encoder, unet = _kohya_checkpoint(files["checkpoint"], arch != "sd15", reference,
                                                                  folder / "base")
        for label, path in files.items():
            if label != "checkpoint" and "embeddings/" not in label and "a1111/" not in label:
                row[label] = _kohya_lora(path, text_encoder, unet, reference, label.split(":")[0], source)
        results["per_base"][arch] = row
    _save(work, "kohya", results)


def report(work: Path) -> None:
    out = {"date": time.strftime("%Y-%m-%d"), "archs": {a: {"preset": p, "prediction": q} for a, (p, q) in
                                                         ARCHS.items()}}
    for client in ("comfyui", "kohya"):
        path = work / f"{client}.json"
        if path.is_file():
            out[client] = json.loads(path.read_text())
    target = ROOT / "benchmarks" / "results" / "real_clients.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {target}\n")
    print(markdown_table(out))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}" if x else "0"


def markdown_table(out: dict) -> str:
    """docs/sharing.md's table: one row per base and file, ComfyUI and kohya side by side."""
    rows = ["| base | file | ComfyUI | kohya sd-scripts |", "|---|---|---|---|"]
    comfy, kohya_ = (out.get(c, {}).get("per_base", {}) for c in ("comfyui", "kohya"))
    for arch in out["archs"]:
        c, k = comfy.get(arch, {}), kohya_.get(arch, {})
        for label in dict.fromkeys([*c, *k]):
            a, b = c.get(label), k.get(label)
            if label == "checkpoint":
                left = (f"{a['keys_matched']}/{a['keys_present']} keys, {a['model_class']} {a['prediction']}; UNet "
                        f"{_fmt(a['unet_rel_diff_vs_diffusers'])}, VAE {_fmt(a['vae_decode_rel_diff_vs_diffusers'])}, "
                        f"text encoder {_fmt(a['conditioning_rel_diff_vs_diffusers'])}") if a else "-"
                right = (("all keys matched" if all("All keys matched" in i for i in b["load_infos"]) else
                          "; ".join(b["load_infos"])) + f"; UNet {_fmt(b['unet_rel_diff_vs_diffusers'])}, VAE "
                         f"{_fmt(b['vae_decode_rel_diff_vs_diffusers'])}, text encoder "
                         f"{_fmt(b['conditioning_rel_diff_vs_diffusers'])}") if b else "-"
            elif a and "loaded" in a:
                left, right = ("loaded, equal" if a.get("equal") else f"loaded: {a['loaded']}"), "-"
            else:
                left = (f"{a['modules_patched']}/{a['modules_expected']} modules patched, {a['keys_not_loaded']} keys "
                        f"not loaded; {_fmt(a['max_rel_diff_vs_diffusers'])}") if a else "-"
                right = (f"{b['modules_built']}/{b['modules_in_file']} modules built, {b['unexpected_keys_dropped']} "
                         f"keys dropped; {_fmt(b['max_rel_diff_vs_diffusers'])}") if b else "-"
            rows.append(f"| {arch} | {label} | {left} | {right} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["make", "comfyui", "kohya", "report"])
    parser.add_argument("--work", type=Path, required=True, help="folder for the bases, runs and results")
    parser.add_argument("--source", type=Path, help="the client's source folder (comfyui / kohya)")
    parser.add_argument("--commit", help="the client source's commit, recorded with its results")
    parser.add_argument("--arch", action="append", choices=list(ARCHS), help="only these bases (default: all)")
    args = parser.parse_args()
    archs = args.arch or list(ARCHS)
    if args.step == "make":
        sys.path.insert(0, str(ROOT))
        make(args.work, archs)
    elif args.step == "comfyui":
        comfyui(args.work, args.source, archs, args.commit)
    elif args.step == "kohya":
        kohya(args.work, args.source, archs, args.commit)
    else:
        report(args.work)


if __name__ == "__main__":
    main()
