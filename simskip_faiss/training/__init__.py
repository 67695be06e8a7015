"""Training: the SimSkip network (`model`), its losses (`losses`), the labels and pairs it learns from
(`supervision`) and the training loop (`loop`); the guard that ships a refiner only when it measurably
helps (`guard.fit`, scoring candidates with `validation.Guard`), the document updates learnt from pairs
(`nudge`, numpy only), and the ONNX export verified against torch (`export`, reduced precisions in `precision`).

The names below load their module (and so torch) on first use, so the numpy-only `nudge` imports without torch.
"""
from __future__ import annotations

import importlib

from ..config import TrainConfig

_LAZY = {**dict.fromkeys(("ACTIVATIONS", "SimSkip", "combine"), ".model"),
         **dict.fromkeys(("WEIGHTS", "info_nce", "nt_xent", "similarity_kl", "stay_put", "supcon"), ".losses"),
         **dict.fromkeys(("Supervision",), ".supervision"),
         **dict.fromkeys(("Evaluation", "Evaluator", "HeldOutLoss", "Run", "TrainResult", "batch_size", "torch_threads",
                          "train"), ".loop")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", *_LAZY]
