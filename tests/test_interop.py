"""Our shared files as other tools read them.

- kohya sd-scripts (networks/lora.py) builds a LoRA module for every Linear / Conv2d child of a Transformer2DModel,
  ResnetBlock2D, Downsample2D or Upsample2D in the UNet and of a CLIPAttention / CLIPMLP in the text encoder, named
  `lora_unet_` / `lora_te_` + the dotted module path with dots as underscores; it loads weights non-strictly, so a
  key outside that set is dropped without a word.
- ComfyUI (comfy/lora.py) maps `lora_unet_<diffusers UNet module, underscored>` for every UNet weight and, for the
  text encoder, only `lora_te_text_model_encoder_layers_<i>_{self_attn_q/k/v/out_proj, mlp_fc1, mlp_fc2}`; it reads
  `.lora_up.weight`, `.lora_down.weight` and `.alpha` per module and warns about (ignores) every other key.
- A1111 reads an embedding file's `emb_params` (or the single tensor) and names it after the file.
- diffusers itself: the LoRA folder, both embedding layouts (`token=` for A1111's) and the pivotal pair.

The name sets below are built from those published rules applied to the real SD 1.5 / 2.1 module trees (built on
the meta device: only names and shapes are needed), not from our exporter's own code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_finetune.core.layout import RunLayout
from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.models.stable_diffusion import build_pipeline
from ldm_finetune.sharing.lora import to_kohya
from ldm_finetune.training.config import LoraConfig

KOHYA_UNET_BLOCKS = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
KOHYA_TE_BLOCKS = {"CLIPAttention", "CLIPMLP"}
# transformers 4.4x names CLIP's attention class after its kernel; kohya's rule means the attention block
CLIP_ATTENTION_VARIANTS = {"CLIPSdpaAttention", "CLIPFlashAttention2"}
COMFY_TE_MODULES = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                    "mlp_fc2"]


def te_path(name: str) -> str:
    # kohya's and ComfyUI's names follow CLIPTextModel's text_model.* tree (transformers 5 flattened it)
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_modules(unet, text_encoder) -> set[str]:
    names = set()
    for prefix, model, blocks in (("lora_unet", unet, KOHYA_UNET_BLOCKS), ("lora_te", text_encoder, KOHYA_TE_BLOCKS)):
        for name, block in model.named_modules():
            kind = type(block).__name__
            if kind not in blocks and not (prefix == "lora_te" and kind in CLIP_ATTENTION_VARIANTS):
                continue
            for child, module in block.named_modules():
                if type(module).__name__ in ("Linear", "Conv2d"):
                    path = f"{name}.{child}" if prefix == "lora_unet" else te_path(f"{name}.{child}")
                    names.add(f"{prefix}_{path.replace('.', '_')}")
    return names


def comfyui_modules(unet, text_encoder) -> set[str]:
    names = {"lora_unet_" + name.replace(".", "_") for name, module in unet.named_modules()
             if getattr(module, "weight", None) is not None}
    layers = text_encoder.config.num_hidden_layers
    names |= {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(layers) for m in COMFY_TE_MODULES}
    return names


@pytest.mark.parametrize("preset", ["tiny", "sd15", "sd21"])
def test_kohya_export_keys_are_the_ones_kohya_and_comfyui_load(preset):
    if preset == "tiny":
        pipe = build_pipeline("tiny")
        unet, text_encoder = pipe.unet, pipe.text_encoder
    else:
        with torch.device("meta"):  # the full-size module trees, without allocating 1 B parameters
            pipe = build_pipeline(preset)
        unet, text_encoder = pipe.unet, pipe.text_encoder
    kohya, comfy = kohya_modules(unet, text_encoder), comfyui_modules(unet, text_encoder)
    add_lora(unet, text_encoder, LoraConfig(rank=4, alpha=2.0, targets=["attention", "feedforward", "resnet"],
                                            text_encoder=True))
    if preset != "tiny":
        for model in (unet, text_encoder):
            model.to_empty(device="cpu")  # storage for the copy below; values do not matter here
    weights, adapter_metadata = lora_state_dict(unet, text_encoder)
    exported = to_kohya(weights, adapter_metadata)

    modules = {key.split(".")[0] for key in exported}
    assert len(modules) == len([k for k in weights if ".lora_A." in k])  # one kohya module per adapted module
    assert modules <= kohya, sorted(modules - kohya)[:5]
    assert modules <= comfy, sorted(modules - comfy)[:5]
    assert any(m.startswith("lora_te_") for m in modules) and any("resnets" in m for m in modules)
    for module in modules:  # each module: down, up and a scalar alpha, the three keys both tools read
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= exported.keys()
        assert exported[f"{module}.alpha"].item() == 2.0
        assert exported[f"{module}.lora_down.weight"].shape[0] == 4


def test_the_rules_catch_a_module_the_tools_would_drop():
    """The check above can fail: conv_in is outside kohya's target blocks, and a text-encoder embedding is outside
    ComfyUI's six per-layer projections."""
    pipe = build_pipeline("tiny")
    kohya, comfy = kohya_modules(pipe.unet, pipe.text_encoder), comfyui_modules(pipe.unet, pipe.text_encoder)
    assert "lora_unet_conv_in" not in kohya and "lora_unet_conv_in" in comfy
    assert "lora_te_text_model_embeddings_token_embedding" not in comfy
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in kohya & comfy


# --- embeddings and the pivotal pair, loaded by plain diffusers ----------------------------------------------------

TOKEN = "<dry-slice>"
PROMPT = f"A {TOKEN} of a carbon composite material"


def render(pipe, prompt=PROMPT):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


@pytest.fixture(scope="module")
def pivotal_run(tiny_model_dir, prep_dataset, tmp_path_factory):
    from tests.test_recipes import TI_CONCEPT, train

    out = tmp_path_factory.mktemp("pivotal") / "run"
    assert train("pivotal_tuning.yaml", tiny_model_dir, prep_dataset / "train", out, **{
        "data.concepts": TI_CONCEPT, "pivotal.ti_steps": 2, "train.max_steps": 4, "train.learning_rate": 0.05}) == 0
    return out


@pytest.mark.slow
def test_embeddings_in_both_layouts_give_the_same_images_in_diffusers(tiny_model_dir, pivotal_run):
    from diffusers import StableDiffusionPipeline

    ours = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ours.load_textual_inversion(str(pivotal_run / "embeddings" / "dry-slice.safetensors"))
    a1111 = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    a1111_file = pivotal_run / "a1111" / "dry-slice.safetensors"
    assert list(load_file(a1111_file)) == ["emb_params"]  # A1111's key; the file name is the prompt word
    width = ours.text_encoder.get_input_embeddings().weight.shape[1]
    assert load_file(a1111_file)["emb_params"].shape[-1] == width
    a1111.load_textual_inversion(str(a1111_file), token=TOKEN)
    np.testing.assert_array_equal(render(ours), render(a1111))


@pytest.mark.slow
def test_the_pivotal_pair_in_plain_diffusers_matches_our_generate(tiny_model_dir, pivotal_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ldm_finetune.generation.generate import GenerateSettings, generate

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_textual_inversion(str(pivotal_run / "embeddings" / "dry-slice.safetensors"))
    plain_ti = render(pipe)
    pipe.load_lora_weights(pivotal_run, weight_name="pytorch_lora_weights.safetensors")
    plain = render(pipe, PROMPT)
    assert np.abs(plain - plain_ti).max() > 1e-3  # the LoRA half of the pair matters
    settings = GenerateSettings(prompts=[PROMPT], n=1, steps=2, height=32, width=32, loras=[(str(pivotal_run), 1.0)])
    (path,) = generate(str(tiny_model_dir), settings, tmp_path / "gen")
    ours = np.asarray(Image.open(path)).astype(np.float32) / 255
    assert np.abs(ours - plain[0]).max() <= 1 / 255 + 1e-6  # the same image, up to the PNG's 8 bits

    with safe_open(str(RunLayout(pivotal_run).client_lora), framework="pt") as f:
        keys = set(f.keys())
    bundled = {k for k in keys if k.startswith("bundle_emb.")}
    assert bundled == {"bundle_emb.dry-slice.string_to_param.*"}  # A1111's one-file form
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys - bundled)
