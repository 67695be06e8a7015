"""Training: the SimSkip network and its losses (`loop`), the guard that ships a refiner only when it
measurably helps (`guard.fit`), the document updates learnt from pairs (`nudge`, numpy only), and the ONNX
export verified against torch (`export`).

The names below load `loop` (and so torch) on first use, so the numpy-only `nudge` imports without torch.
"""
from __future__ import annotations

import importlib

from ..config import TrainConfig

_FROM_LOOP = ("ACTIVATIONS", "WEIGHTS", "Evaluation", "Evaluator", "HeldOutLoss", "Run", "SimSkip", "Supervision",
              "TrainResult", "batch_size", "info_nce", "nt_xent", "similarity_kl", "stay_put", "supcon",
              "torch_threads", "train")


def __getattr__(name: str):
    if name in _FROM_LOOP:
        return getattr(importlib.import_module(".loop", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", *_FROM_LOOP]
