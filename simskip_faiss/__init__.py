"""simskip_faiss: refine embeddings (SimSkip, refined = x + alpha * f(x)) in front of any FAISS index.

Serving (refiner, index, evaluation) needs numpy, faiss-cpu and onnxruntime only; training and
export import torch lazily, so `import simskip_faiss` never loads it.
"""
__version__ = "0.1.0"

from .refiners import BaseRefiner, IdentityRefiner, LinearRefiner, Refiner, load_refiner, refiner_from_bytes  # noqa: E402
from .index import RefinedIndex  # noqa: E402
from .persistence import BundleError  # noqa: E402
from .refiners import DocumentMismatchError, DocumentUpdates  # noqa: E402

_LAZY = {
    "TrainConfig": ("config", "TrainConfig"),
    "Supervision": ("training.supervision", "Supervision"),
    "train": ("training.loop", "train"),
    "fit": ("training.guard", "fit"),
    "export": ("training.export", "export"),
    "evaluate": ("evaluation.report", "evaluate"),
    "run": ("job", "run"),
    "datasets": ("datasets", None),
}


def __getattr__(name):
    """Import training/export (torch) and evaluation modules only when first used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'simskip_faiss' has no attribute {name!r}")


__all__ = ["__version__", "BaseRefiner", "Refiner", "IdentityRefiner", "LinearRefiner", "load_refiner",
           "refiner_from_bytes", "RefinedIndex", "BundleError", "DocumentUpdates", "DocumentMismatchError", *_LAZY]
