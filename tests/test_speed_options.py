"""Speed options that must not change what is learned: the same seed gives the same loss curve with them on."""

from __future__ import annotations

import json

import pytest
import torch

from ldm_finetune.core.layout import RunLayout
from tests.conftest import lora_overrides
from tests.test_faults import run_train


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in RunLayout(out).metrics.read_text().splitlines()]


@pytest.mark.slow
def test_channels_last_trains_the_same_curve(tiny_model_dir, small_train_dir, tmp_path):
    curves = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, out, **{
            "model.channels_last": flag, "train.max_steps": 5, "data.cache_latents": "none"})) == 0
        curves.append(losses(out))
    assert len(curves[0]) == 5
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-6)


def test_the_fused_adamw_a_gpu_gets_makes_the_same_update():
    """make_optimizer fuses AdamW when every parameter is an fp32 CUDA tensor; the fused kernel computes the same
    update as the per-parameter loop (checked with torch's CPU implementation of the fused kernel)."""
    torch.manual_seed(0)
    params = [torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    start = [p.detach().clone() for p in params]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    plain = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    fused = torch.optim.AdamW(copies, lr=1e-2, weight_decay=1e-2, fused=True)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for group, opt in ((params, plain), (copies, fused)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(params, start))  # the steps did move the weights
