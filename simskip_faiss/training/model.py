"""The SimSkip network: refined = normalize?(x + alpha * f(x)), f a small residual MLP."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ACTIVATION_NAMES, TrainConfig

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


class SimSkip(nn.Module):
    """refined = normalize?(x + alpha * f(x)); f's last layer is zero-initialised so the untrained net is the identity."""

    def __init__(self, d: int, hidden: int = TrainConfig.hidden, depth: int = 1, activation: str = "gelu",
                 normalize: bool = True, apply_to: str = "both"):
        super().__init__()
        self.apply_to = apply_to  # "queries": trained to refine queries only (documents stay raw)
        layers: list[nn.Module] = []
        width = d
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        last = nn.Linear(width, d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.f = nn.Sequential(*layers, last)
        self.normalize = normalize
        self.register_buffer("alpha", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.alpha * self.f(x)
        return F.normalize(y, dim=-1, eps=1e-12) if self.normalize else y
