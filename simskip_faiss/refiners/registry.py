"""Every refiner kind by name: `KINDS`, `refiner_from_bytes` (bundles, stores, Spark workers) and `load_refiner`."""
from __future__ import annotations

import os

from ..errors import InputError
from .base import BaseRefiner
from .documents import DocumentUpdates
from .identity import IdentityRefiner
from .linear import LinearRefiner
from .onnx import Refiner

KINDS = ("onnx", "identity", "linear")


def load_refiner(path: str | os.PathLike | None, d: int | None = None, threads: int | None = 1,
                 normalize: bool = False):
    """A `Refiner` from an ONNX path, or an `IdentityRefiner(d)` when path is None or 'identity'."""
    if path is None or str(path) == "identity":
        if d is None:
            raise InputError("an identity refiner needs the dimension d")
        return IdentityRefiner(d, normalize=normalize)
    return Refiner.load(path, threads=threads)


def refiner_from_bytes(kind: str, data: bytes | None, info: dict | None = None, threads: int | None = 1,
                       source: str = "<bytes>", documents: bytes | None = None) -> BaseRefiner:
    """Rebuild a refiner from `kind` and `to_bytes()` output, checked against `info` (a manifest's record).

    info: `BaseRefiner.info()` as stored (d_in, or a manifest's d, for the identity; sha256, normalize, apply_to are
    cross-checked when present, so an edited manifest cannot silently swap or drop a refiner).
    Raises ValueError naming `source` and the field that disagrees.
    """
    info = dict(info or {})
    if kind not in KINDS:
        raise InputError(f"{source}: unknown refiner kind {kind!r} (expected one of {', '.join(KINDS)})")
    upd = None if documents is None else DocumentUpdates.from_bytes(documents, source=f"{source} (document updates)")
    if kind == "identity":
        if data is not None:
            raise InputError(f"{source}: an identity refiner has no bytes, but refiner bytes were given")
        d = info.get("d_in", info.get("d", (info.get("metadata") or {}).get("d_in")))  # a manifest's "d" too
        if isinstance(d, bool) or not isinstance(d, int):
            raise InputError(f"{source}: an identity refiner needs an integer d_in, got {d!r}")
        refiner: BaseRefiner = IdentityRefiner(d, normalize=bool(info.get("normalize", False)),
                                               apply_to=info.get("apply_to", "both")).with_documents(upd)
    elif data is None:
        raise InputError(f"{source}: a {kind} refiner needs its bytes, none were given")
    elif kind == "onnx":
        refiner = Refiner(data, threads=threads, source=source, documents=upd)
    else:
        refiner = LinearRefiner.from_bytes(data, source=source).with_documents(upd)
    for key in ("sha256", "normalize", "apply_to", "d_in", "d_out"):
        if key in info and info[key] != getattr(refiner, key):
            raise InputError(f"{source}: the refiner's {key} is {getattr(refiner, key)!r} but the record says {info[key]!r}")
    want = (info.get("documents") or {}).get("sha256")
    got = None if refiner.documents is None else refiner.documents.sha256
    if "documents" in info and want != got:
        raise InputError(f"{source}: the refiner's document updates are {got and got[:16]!r} but the record says "
                         f"{want and want[:16]!r}")
    return refiner
