"""Exponential moving average of weights, shared by every task that exports an average (full fine-tune, pixel
DDPM); the task makes it (Task.make_ema), fit updates it after each optimizer step and checkpoints hold it."""

from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of parameters (fp32 copies), with the usual warm-up of the decay."""

    def __init__(self, params, decay: float, device):
        self.tracked = list(params)  # the live parameters that update() averages
        self.shadow = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in self.tracked]
        self.decay, self.steps = decay, 0

    @classmethod
    def of(cls, model, decay: float, on_cpu: bool) -> "EMA":
        """The average of `model`'s parameters, kept on the CPU or beside them."""
        return cls(model.parameters(), decay, "cpu" if on_cpu else next(model.parameters()).device)

    def current_decay(self) -> float:
        # early steps average over fewer updates, so the average is not dominated by the random-ish start
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, self.tracked):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.device, p.dtype))

    def averaged_copy(self, model):
        """A copy of `model` holding the averaged weights (the model itself is left as it is)."""
        average = copy.deepcopy(model)
        self.copy_to(average.parameters())
        return average

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
