"""Refiners: what turns a raw embedding into a refined one, served with numpy/onnxruntime (no torch).

`BaseRefiner` (base.py) is the interface every store calls (RefinedIndex, Spark, Milvus, the integrations);
the kinds are `Refiner` (onnx.py: an exported ONNX file), `LinearRefiner` (linear.py: an affine map for
baselines and distillation) and `IdentityRefiner` (identity.py: no refinement); registry.py rebuilds any of
them from bytes. `DocumentUpdates` are the learnt moves of stored document vectors a refiner may carry.
"""
from .base import APPLY_TO, BaseRefiner, as_input
from .documents import DocumentMismatchError, DocumentUpdates
from .identity import IdentityRefiner
from .linear import LinearRefiner, distil_linear
from .onnx import METADATA_KEY, Refiner, documents_path
from .registry import KINDS, load_refiner, refiner_from_bytes

__all__ = ["APPLY_TO", "KINDS", "METADATA_KEY", "BaseRefiner", "IdentityRefiner", "LinearRefiner", "Refiner",
           "as_input", "distil_linear", "documents_path", "load_refiner", "refiner_from_bytes",
           "DocumentMismatchError", "DocumentUpdates"]
