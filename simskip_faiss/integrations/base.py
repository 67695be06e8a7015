"""What every framework integration shares, under one import path: the refiner and the apply_to rule
(refining.py), and the refiner record kept beside a store's files (sidecar.py)."""
from __future__ import annotations

from ..errors import RefinerMismatchError
from .refining import _matrix, bundle_refiner, refine_documents, refine_queries, resolve_refiner, stored_dim  # noqa: F401
from .sidecar import (FORMAT, FORMAT_VERSION, RECORD_KEYS, SIDECAR, MissingRefinerError, _binding,  # noqa: F401
                      _copy_name, _copy_prefix, _read_copy, check_record, checked_refiner, describe,
                      identity_from_record, read_sidecar, refiner_record, saving, sidecar_path, store_digest,
                      write_sidecar)

__all__ = ["RefinerMismatchError", "MissingRefinerError", "resolve_refiner", "refiner_record", "check_record",
           "refine_documents", "refine_queries", "stored_dim", "saving", "write_sidecar", "read_sidecar",
           "sidecar_path"]
