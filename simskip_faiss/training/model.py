"""The SimSkip network: refined = normalize?(x + alpha * f(x)), f a small residual MLP.

`combine` is the one place that formula is written: the network's forward pass, the guard's cheap
alpha sweep (x and f(x) computed once, every alpha combined from them) and the serving graph that
export traces (alpha folded into f, the normalisation as one node) all call it.

`MapSkip` is the cross-space form (training/mapping.py: a map between two encoders' spaces, d_out may
differ from d_in): refined = normalize?(P x + alpha * f(.)), P a learned projection started from a
closed-form map, f reading P x or x itself.
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
    precision; training and the guard use F.normalize itself. fx None: no residual, normalize?(x)
    (a purely linear cross-space map, `MapSkip` without f).
    """
    y = x if fx is None else x + fx if alpha is None else x + alpha * fx
    if not normalize:
        return y
    if fused_norm:
        d = y.shape[-1]
        return F.rms_norm(y, (d,), weight=torch.full((d,), d ** -0.5), eps=1e-24 / d)
    return F.normalize(y, dim=-1, eps=1e-12)


def residual_mlp(d_in: int, d_out: int, hidden: int, depth: int, activation: str) -> nn.Sequential:
    """f: `depth` hidden layers of width `hidden`, then a linear layer to d_out initialised at zero, so that
    x + alpha * f(x) (or P x + alpha * f(.)) starts as the identity (or as P)."""
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    last = nn.Linear(width, d_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class SimSkip(nn.Module):
    """refined = normalize?(x + alpha * f(x)); f's last layer is zero-initialised so the untrained net is the identity."""

    def __init__(self, d: int, hidden: int = TrainConfig.hidden, depth: int = 1, activation: str = "gelu",
                 normalize: bool = True, apply_to: str = "both"):
        super().__init__()
        self.apply_to = apply_to  # "queries": trained to refine queries only (documents stay raw)
        self.f = residual_mlp(d, d, hidden, depth, activation)
        self.normalize = normalize
        self.register_buffer("alpha", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(x, self.f(x), self.alpha, self.normalize)


RESIDUAL_INPUTS = ("projected", "source")


class MapSkip(nn.Module):
    """refined = normalize?(P x + alpha * f(z)), z = P x ("projected") or x ("source"): a cross-space SimSkip.

    P is an affine (d_out, d_in) projection, usually started from a closed-form map (ridge, Procrustes:
    `init_projection`); f's last layer is zero-initialised, so the untrained net is exactly that map.
    hidden=0: no f, the map is P alone (how a closed-form winner is exported). `freeze_projection` keeps P
    fixed while f learns on top of it.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int = TrainConfig.hidden, depth: int = 1,
                 activation: str = "gelu", normalize: bool = True, residual_input: str = "source",
                 apply_to: str = "both"):
        super().__init__()
        if residual_input not in RESIDUAL_INPUTS:
            raise ValueError(f"residual_input must be one of {RESIDUAL_INPUTS}, got {residual_input!r}")
        self.d_in, self.d_out, self.apply_to = int(d_in), int(d_out), apply_to
        self.residual_input, self.normalize = residual_input, normalize
        self.proj = nn.Linear(d_in, d_out)
        self.f: nn.Sequential | None = (residual_mlp(d_out if residual_input == "projected" else d_in, d_out, hidden,
                                                     depth, activation) if hidden else None)
        self.register_buffer("alpha", torch.tensor(1.0))

    def init_projection(self, A, bias) -> "MapSkip":
        """Set P x = A x + bias (A (d_out, d_in), bias (d_out,), numpy or torch); returns self."""
        with torch.no_grad():
            self.proj.weight.copy_(torch.as_tensor(A, dtype=torch.float32))
            self.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return self

    def freeze_projection(self, frozen: bool = True) -> "MapSkip":
        for p in self.proj.parameters():
            p.requires_grad_(not frozen)
        return self

    def residual(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
        if self.f is None:
            return None
        return self.f(p if self.residual_input == "projected" else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj(x)
        return combine(p, self.residual(x, p), self.alpha, self.normalize)

    def servable(self) -> nn.Module:
        """The same function for serving: alpha folded into f's last layer, the normalisation as one node."""
        import copy

        lean = copy.deepcopy(self).eval()
        with torch.no_grad():
            if lean.f is not None:
                lean.f[-1].weight.mul_(lean.alpha)
                lean.f[-1].bias.mul_(lean.alpha)

        class Lean(nn.Module):
            def __init__(self, m: MapSkip):
                super().__init__()
                self.m = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                p = self.m.proj(x)
                return combine(p, self.m.residual(x, p), None, self.m.normalize, fused_norm=True)

        return Lean(lean).eval()
