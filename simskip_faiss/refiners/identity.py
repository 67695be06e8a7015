"""`IdentityRefiner`: no refinement (optionally L2-normalising), the baseline every refiner is judged against."""
from __future__ import annotations

import numpy as np

from ..checks import l2_normalize
from ..errors import InputError
from .base import BaseRefiner, check_apply_to


class IdentityRefiner(BaseRefiner):
    """The raw vectors, unchanged (or only L2-normalised): the baseline every refiner is judged against."""

    kind = "identity"
    sha256 = None

    def __init__(self, d: int, normalize: bool = False, apply_to: str = "both"):
        if int(d) <= 0:
            raise InputError(f"dimension must be positive, got {d}")
        self.d_in = self.d_out = int(d)
        self.normalize = bool(normalize)
        self.apply_to = check_apply_to(apply_to)
        self.metadata: dict = {"kind": "identity", "d_in": self.d_in, "d_out": self.d_out,
                               "normalize": self.normalize}

    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if self.normalize else x

    def to_bytes(self) -> None:
        return None

    def __repr__(self) -> str:
        return (f"IdentityRefiner(d={self.d_in}, normalize={self.normalize}"
                + (f", apply_to={self.apply_to!r}" if self.apply_to != "both" else "") + ")")
