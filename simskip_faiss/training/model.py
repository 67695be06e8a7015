"""The SimSkip network: refined = normalize?(x + alpha * f(x)), f a small residual MLP.

`combine` is the one place that formula is written: the network's forward pass, the guard's cheap
alpha sweep (x and f(x) computed once, every alpha combined from them) and the serving graph that
export traces (alpha folded into f, the normalisation as one node) all call it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ACTIVATION_NAMES, TrainConfig

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


def combine(x: torch.Tensor, fx: torch.Tensor, alpha: torch.Tensor | float | None, normalize: bool,
            fused_norm: bool = False) -> torch.Tensor:
    """normalize?(x + alpha * f(x)) from x and f(x).

    alpha None: already folded into `fx` (the serving graph: no multiply node). fused_norm: the
    normalisation as one RMSNormalization node for ONNX (opset 23): y / sqrt(mean(y^2) + eps) * d^-1/2
    = y / sqrt(|y|^2 + d * eps), i.e. y / |y| for any |y| > 1e-12 (F.normalize's eps) to float
    precision; training and the guard use F.normalize itself.
    """
    y = x + fx if alpha is None else x + alpha * fx
    if not normalize:
        return y
    if fused_norm:
        d = y.shape[-1]
        return F.rms_norm(y, (d,), weight=torch.full((d,), d ** -0.5), eps=1e-24 / d)
    return F.normalize(y, dim=-1, eps=1e-12)


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
        return combine(x, self.f(x), self.alpha, self.normalize)
