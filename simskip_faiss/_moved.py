"""Old import paths of modules that moved into subpackages: each keeps working for one release.

`simskip_faiss/<old>.py` calls `alias(__name__, new)`: the old name becomes the moved module itself (so
`from simskip_faiss.guard import fit` and patching `simskip_faiss.guard.x` act on the one real module) and a
DeprecationWarning names the new path.
"""
from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make module `old` an alias of module `new`, warning once that the path moved."""
    warnings.warn(f"{old} moved to {new}; the old path will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
