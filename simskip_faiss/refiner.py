"""Deprecated: the refiner module became the `simskip_faiss.refiners` package (base, identity, onnx, linear,
registry); its names keep importing from here for one release."""
import warnings

from .refiners.base import (APPLY_TO, FAST_ROWS, MAX_NORM, NORM_RANGE, NORM_RANGE_REASON, UNIT_TOLERANCE,  # noqa: F401
                            BaseRefiner, as_input)
from .refiners.identity import IdentityRefiner  # noqa: F401
from .refiners.linear import LinearRefiner, distil_linear  # noqa: F401
from .refiners.onnx import (DEFAULT_BATCH, DOCUMENTS_PREFIX, METADATA_KEY, MIN_PARALLEL_ROWS, Refiner,  # noqa: F401
                            documents_path, external_tensors, read_documents)
from .refiners.registry import KINDS, load_refiner, refiner_from_bytes  # noqa: F401

warnings.warn("simskip_faiss.refiner moved to simskip_faiss.refiners; the old path will be removed in the next "
              "release", DeprecationWarning, stacklevel=2)
