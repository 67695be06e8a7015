"""The names of the former single refiner module, re-exported from the modules they moved to.

Kept for the import path `simskip_faiss.refiners.core` (and the deprecated `simskip_faiss.refiner`,
which aliases it): base.py (the interface), identity.py, onnx.py, linear.py, registry.py. New code
imports from `simskip_faiss.refiners` or the module itself.
"""
from .base import (APPLY_TO, FAST_ROWS, MAX_NORM, NORM_RANGE, NORM_RANGE_REASON, UNIT_TOLERANCE,  # noqa: F401
                   BaseRefiner, as_input)
from .identity import IdentityRefiner  # noqa: F401
from .linear import LinearRefiner, distil_linear  # noqa: F401
from .onnx import (DEFAULT_BATCH, DOCUMENTS_PREFIX, METADATA_KEY, MIN_PARALLEL_ROWS, Refiner,  # noqa: F401
                   documents_path, external_tensors, read_documents)
from .registry import KINDS, load_refiner, refiner_from_bytes  # noqa: F401
