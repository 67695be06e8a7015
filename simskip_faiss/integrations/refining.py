"""The refiner behind a framework integration: resolved from what the caller gives, and applied to the
embeddings a framework's model returns by the refiner's own store rules (`BaseRefiner.refine_documents`,
`refine_queries`, `stored_dim`): queries always refined, documents only when apply_to is "both"."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..checks import as_matrix
from ..refiners.base import BaseRefiner
from ..refiners.onnx import Refiner
from ..errors import InputError, InputTypeError


def resolve_refiner(refiner, threads: int | None = 1):
    """A refiner object from a refiner, a `RefinedIndex` (its refiner), an ONNX path or a bundle directory."""
    if hasattr(refiner, "refiner") and hasattr(refiner, "index"):  # a RefinedIndex
        refiner = refiner.refiner
    if isinstance(refiner, (str, os.PathLike)):
        p = Path(refiner)
        refiner = bundle_refiner(p, threads) if p.is_dir() else Refiner.load(p, threads=threads)
    if not isinstance(refiner, BaseRefiner):
        raise InputTypeError(f"expected a refiner (Refiner, LinearRefiner, IdentityRefiner), a RefinedIndex, "
                        f"an ONNX path or a bundle directory; got {type(refiner).__name__}")
    refiner.refuse_migration_map("the framework integrations")
    refiner.check_query_only_dim("the framework integrations")
    return refiner


def bundle_refiner(directory: Path, threads: int | None = 1):
    """The refiner of a saved bundle, verified as `RefinedIndex.load` verifies it (the index memory-mapped)."""
    from ..index import RefinedIndex

    return RefinedIndex.load(directory, threads=threads, mmap=True).refiner


def _matrix(vectors, d: int, what: str) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"the embedding model returned {what} of shape {x.shape}, expected (n, {d})")
    if x.shape[1] != d:
        raise InputError(f"the embedding model returns {x.shape[1]}-d {what}, but the refiner takes {d}-d vectors")
    return as_matrix(x, d, what)


def refine_documents(refiner, vectors) -> np.ndarray:
    """Document vectors as stored: refined when the refiner applies to both, raw (checked) when query-only.

    A refiner with document updates (keyed by document id) is refused: a framework's embedding call
    does not pass ids, so the updates would be silently skipped."""
    refiner.refuse_documents("a framework's embedding function (it sees texts, not document ids)")
    return refiner.refine_documents(_matrix(vectors, refiner.d_in, "document embeddings"))


def refine_queries(refiner, vectors) -> np.ndarray:
    """Query vectors are always refined."""
    return refiner.refine_queries(_matrix(vectors, refiner.d_in, "query embeddings"))


def stored_dim(refiner) -> int:
    """Dimension of the stored (document) vectors (`BaseRefiner.stored_dim`)."""
    return refiner.stored_dim
