"""LoRA files: diffusers' layout (`pytorch_lora_weights.safetensors`, peft config under `lora_adapter_metadata` so
alpha != rank survives), the kohya layout A1111 / ComfyUI read (`ldm-finetune export`), and the fit check that turns
a LoRA made for another base model into an error instead of a silent no-op."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.sharing.metadata import tensors_sha256

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' loader reads the LoRA config from
COMPONENTS = ("unet", "text_encoder")


def save_lora(folder: Path, weights: dict, adapter_metadata: dict, header: dict[str, str]) -> Path:
    """Write FOLDER/pytorch_lora_weights.safetensors atomically, with the diffusers and training metadata."""

    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(adapter_metadata, sort_keys=True, default=str)}
    metadata.update(header)
    metadata["modelspec.hash_sha256"] = tensors_sha256(weights)
    path = RunLayout(folder).lora
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return path


def lora_file(path: str | Path) -> Path:
    """A LoRA given as a file or as a folder holding pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = RunLayout(path).lora
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found (pass a .safetensors file or a training output folder)")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: only .safetensors LoRA files are read (pickled .bin/.pt files can run code)")
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = lora_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_([AB])\.weight$")


def _alpha_for(component: str, module: str, adapter_metadata: dict, rank: int) -> float:
    """A module's alpha from the saved peft config (alpha_pattern entries win), else alpha = rank (scale 1)."""
    pattern = adapter_metadata.get(f"{component}.alpha_pattern") or {}
    for name, alpha in pattern.items():
        if module == name or module.endswith("." + name):
            return float(alpha)
    return float(adapter_metadata.get(f"{component}.lora_alpha", rank))


def to_kohya(weights: dict[str, torch.Tensor], adapter_metadata: dict) -> dict[str, torch.Tensor]:
    """diffusers/peft keys -> kohya keys, e.g. unet.down_blocks.0.attentions.0.proj_in.lora_A.weight ->
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight, plus one `.alpha` scalar per module."""
    out = {}
    for key, value in weights.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise UserError(f"LoRA key {key!r} is not in the diffusers/peft layout this exporter reads")
        component, module, which = match.groups()
        if component == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module  # kohya names follow CLIPTextModel's historical text_model.* layout
        name = _KOHYA_PREFIX[component] + module.replace(".", "_")
        out[f"{name}.lora_{'down' if which == 'A' else 'up'}.weight"] = value
        if which == "A":
            original = match.group(2)
            out[f"{name}.alpha"] = torch.tensor(_alpha_for(component, original, adapter_metadata, value.shape[0]))
    return out


def kohya_header(metadata: dict[str, str], weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Our training metadata and model-spec keys, plus the ss_* keys kohya's tools write and A1111 reads: A1111
    shows a LoRA only for the base family in ss_base_model_version / ss_v2, and lists the training facts."""
    header = {k: v for k, v in metadata.items() if k.startswith(("ldm_finetune.", "modelspec."))}
    header["ss_network_module"] = "networks.lora"
    ranks = {v.shape[0] for k, v in weights.items() if ".lora_A." in k}
    if len(ranks) == 1:
        header["ss_network_dim"] = str(ranks.pop())
    if "ldm_finetune.tag_frequency" in metadata:
        header["ss_tag_frequency"] = json.dumps({"train": json.loads(metadata["ldm_finetune.tag_frequency"])})
    family = metadata.get("ldm_finetune.base_family")
    if family in ("sd_v1", "sd_v2", "sd_v2_v"):
        header["ss_base_model_version"] = family
        header["ss_v2"] = str(family != "sd_v1")
        header["ss_v_parameterization"] = str(family == "sd_v2_v")
    config = json.loads(metadata.get("ldm_finetune.config", "{}"))
    facts = {
        "ss_network_alpha": config.get("lora", {}).get("alpha"),
        "ss_resolution": f"({config['data']['resolution']}, {config['data']['resolution']})" if "data" in config
        else None,
        "ss_num_train_images": metadata.get("ldm_finetune.num_train_images"),
        "ss_max_train_steps": metadata.get("ldm_finetune.global_step"),
        "ss_learning_rate": config.get("train", {}).get("learning_rate"),
        "ss_seed": config.get("seed"),
        "ss_noise_offset": config.get("noise", {}).get("offset"),
        "ss_sd_model_name": metadata.get("ldm_finetune.base_model"),
        "ss_training_comment": metadata.get("modelspec.description"),
    }
    header.update({k: str(v) for k, v in facts.items() if v is not None})
    return header


_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down)\.weight$")


_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te_|lora_te1_)(.+)\.lora_down\.weight$")


def _module_index(model) -> dict[str, tuple[str, torch.nn.Module]]:
    """Underscored module name -> (dotted name, module), to resolve kohya's flattened names."""
    return {name.replace(".", "_"): (name, module) for name, module in model.named_modules() if name}


def _widths(module) -> tuple[int, int] | None:
    """(input, output) width of a Linear / Conv2d, or None for other modules."""
    base = getattr(module, "base_layer", module)  # a module that already carries a peft adapter
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, torch.nn.Conv2d):
        return base.in_channels, base.out_channels
    return None


_UP_OF_DOWN = (("lora_A.weight", "lora_B.weight"), ("lora.down.weight", "lora.up.weight"),
               ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"), ("lora_down.weight", "lora_up.weight"))


def _up_matrix(weights: dict[str, torch.Tensor], down_key: str) -> torch.Tensor | None:
    for down, up in _UP_OF_DOWN:
        if down_key.endswith(down):
            return weights.get(down_key[: -len(down)] + up)
    return None


def lora_modules(weights: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor, torch.Tensor | None]]:
    """(component, module name as written, down matrix, up matrix or None) for every adapted module."""
    found = []
    for key, value in weights.items():
        match = _DIFFUSERS_KEY.match(key)
        if match:
            found.append((match.group(1), match.group(2), value, _up_matrix(weights, key)))
            continue
        match = _KOHYA_KEY.match(key)
        if match:
            component = "unet" if match.group(1) == "lora_unet_" else "text_encoder"
            found.append((component, match.group(2), value, _up_matrix(weights, key)))
    return found


def _damage(down: torch.Tensor, up: torch.Tensor | None) -> str | None:
    """What makes a module's pair of matrices unusable on any model, or None."""
    if up is None:
        return "no up matrix for its down matrix"
    if up.shape[1] != down.shape[0]:
        return f"down matrix rank {down.shape[0]}, up matrix rank {up.shape[1]}"
    return None


def _mismatch(module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """How a sound pair of matrices fails to fit this model's module, or None."""
    widths = _widths(module)
    if widths is None:
        return None
    if widths[0] != down.shape[1]:
        return f"LoRA input {down.shape[1]}, model {widths[0]}"
    if widths[1] != up.shape[0]:
        return f"LoRA output {up.shape[0]}, model {widths[1]}"
    return None


def _find_module(model, name: str, text_encoder: bool, index: dict):
    """The module a LoRA key names, dotted (diffusers) or underscored (kohya, looked up in `index`, the model's
    _module_index). Text-encoder names carry CLIP's historical text_model.* prefix, which transformers 5 dropped from
    CLIPTextModel: try the name with and without."""
    underscored = "." not in name
    prefix = "text_model_" if underscored else "text_model."
    for candidate in ([name, name.removeprefix(prefix)] if text_encoder else [name]):
        if underscored:
            module = index.get(candidate, (None, None))[1]
        else:
            try:
                module = model.get_submodule(candidate)
            except AttributeError:
                module = None
        if module is not None:
            return module
    return None


def check_lora_fits(weights: dict[str, torch.Tensor], pipe, source: str) -> None:
    """Raise UserError unless every module the LoRA adapts exists in `pipe` with the widths its matrices have."""
    modules = lora_modules(weights)
    if not modules:
        raise UserError(f"{source}: no LoRA weights found (expected unet.*.lora_A.weight or lora_unet_* keys)")
    missing, mismatched = [], []
    indexes = {}  # component -> its underscored-name index, built once
    for component, name, down, up in modules:
        damage = _damage(down, up)
        if damage:
            raise UserError(f"{source}: {component}.{name}: {damage}; the file is damaged or in a layout this "
                            "tool does not read: export it again")
        model = getattr(pipe, component, None)
        module = None
        if model is not None:
            index = indexes.setdefault(component, _module_index(model))
            module = _find_module(model, name, component == "text_encoder", index)
        if module is None:
            missing.append(f"{component}.{name}")
        elif problem := _mismatch(module, down, up):
            mismatched.append(f"{component}.{name} ({problem})")
    hint = ("; it was probably trained for another base model (SD 1.x vs 2.x vs SDXL): "
            "use the base model named in its metadata")
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(modules)} LoRA modules do not exist in this model "
                        f"(first: {missing[0]}){hint}")
    if mismatched:
        raise UserError(f"{source}: {len(mismatched)} of {len(modules)} LoRA modules have the wrong shape "
                        f"(first: {mismatched[0]}){hint}")


def write_kohya(lora: Path, out: Path, extra: dict[str, torch.Tensor] | None = None,
                extra_header: dict[str, str] | None = None) -> Path:
    """Write the diffusers-layout LoRA file `lora` again at `out` in the kohya layout, with one explicit `.alpha`
    per module (a client that finds no alpha key takes alpha = rank: twice the strength at alpha = rank / 2) and
    the ss_* header; `extra` tensors (pivotal tuning's bundle_emb.*) ride along."""
    weights, metadata = read_lora(lora)
    if any(k.startswith(tuple(_KOHYA_PREFIX.values())) for k in weights):
        raise UserError(f"{lora}: already in the kohya layout")
    kohya = to_kohya(weights, json.loads(metadata.get(DIFFUSERS_METADATA_KEY, "{}"))) | (extra or {})
    header = kohya_header(metadata, weights) | (extra_header or {})
    header["modelspec.hash_sha256"] = tensors_sha256(kohya)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(kohya, str(tmp), metadata=header)
    return out


def export_kohya(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`ldm-finetune export LORA --format kohya --out FILE`: for runs older than the kohya file every LoRA run now
    writes itself."""

    file = lora_file(source)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the kohya file must end in .safetensors")
    if out.resolve() == file.resolve():
        raise UserError(f"--out {out}: would overwrite the source LoRA; choose another name")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")
    return write_kohya(file, out)
