"""Refiners: what turns a raw embedding into a refined one, served with numpy/onnxruntime (no torch).

`BaseRefiner` is the interface every store calls (RefinedIndex, Spark, Milvus, the integrations);
the kinds are `Refiner` (an exported ONNX file), `LinearRefiner` (an affine map: baselines, distillation)
and `IdentityRefiner` (no refinement). `DocumentUpdates` are the learnt moves of stored document vectors
a refiner may carry.
"""
from .core import (APPLY_TO, KINDS, METADATA_KEY, BaseRefiner, IdentityRefiner, LinearRefiner, Refiner,
                   as_input, distil_linear, documents_path, load_refiner, refiner_from_bytes)
from .documents import DocumentMismatchError, DocumentUpdates

__all__ = ["APPLY_TO", "KINDS", "METADATA_KEY", "BaseRefiner", "IdentityRefiner", "LinearRefiner", "Refiner",
           "as_input", "distil_linear", "documents_path", "load_refiner", "refiner_from_bytes",
           "DocumentMismatchError", "DocumentUpdates"]
