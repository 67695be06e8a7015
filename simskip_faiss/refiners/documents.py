"""Document-side refinement: per-document updates of stored vectors, learned from query -> document pairs.

Users' pairs come from logs over the corpus they serve, so tomorrow's queries often ask for documents
that yesterday's queries found. A map on frozen vectors cannot use that; moving those documents' stored
vectors can (NUDGE, Zeighami et al., ICLR 2025). `DocumentUpdates` holds, for each document id that
training queries found, an offset added to its stored vector (after the refiner's document transform:
the raw vector for a query-only refiner), with the stored norm kept:

    stored'(id) = (stored + delta[id]) * |stored| / |stored + delta[id]|

Documents without an update are stored as before, so a document added later is refined as today.

Each update is bound to the vector it was learned for: a sketch of the raw vector (its norm and its
projections on a few fixed random directions) is kept per id, and a vector whose sketch differs is
refused with an error naming the id (updates made for another corpus, or an id reused for another
document), never silently moved. Updates take (d + 9) float32 and one int64 per document: about the
size of the vectors they move.

Learning them is `nudge.py`'s job; this module is the serving side (numpy only).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from ..errors import InputError
from .npyfile import pack, unpack

FORMAT = "simskip-document-updates"
SKETCH_DIRS = 8            # random directions in the sketch (plus the norm)
SKETCH_TOLERANCE = 1e-3    # a sketch entry may differ by this share of the row's norm (re-encoding jitter)
_SKETCH_SEED = 20240408


def _directions(d: int) -> np.ndarray:
    """(d, SKETCH_DIRS) fixed unit directions: the same for every corpus of dimension d."""
    p = np.random.default_rng([_SKETCH_SEED, d]).standard_normal((d, SKETCH_DIRS))
    return (p / np.linalg.norm(p, axis=0)).astype(np.float32)


def sketch(x: np.ndarray) -> np.ndarray:
    """(n, SKETCH_DIRS + 1) float32: each row's L2 norm and its projections on the fixed directions."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # float32: the tolerance is relative, 1e-3
    return np.hstack([norms, x @ _directions(x.shape[1])])


class DocumentMismatchError(InputError):
    """A vector stored under an id with an update is not the vector the update was learned for."""


@dataclass
class DocumentUpdates:
    """Offsets of stored vectors by document id (sorted, unique int64), each bound to its raw vector's sketch."""

    ids: np.ndarray          # (m,) int64, sorted, unique
    delta: np.ndarray        # (m, d_out) float32, added in the stored space
    sketches: np.ndarray     # (m, SKETCH_DIRS + 1) float32, of the raw (input) vectors
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64).reshape(-1)
        self.delta = np.ascontiguousarray(self.delta, dtype=np.float32)
        self.sketches = np.ascontiguousarray(self.sketches, dtype=np.float32)
        m = len(self.ids)
        if self.delta.ndim != 2 or self.delta.shape[0] != m or self.sketches.shape != (m, SKETCH_DIRS + 1):
            raise InputError(f"document updates: {m} ids need ({m}, d) offsets and ({m}, {SKETCH_DIRS + 1}) sketches, "
                             f"got {self.delta.shape} and {self.sketches.shape}")
        if m and (np.any(np.diff(self.ids) <= 0) or self.ids[0] < 0):
            raise InputError("document updates: ids must be sorted, unique and non-negative")
        if not (np.isfinite(self.delta).all() and np.isfinite(self.sketches).all()):
            raise InputError("document updates hold NaN or Inf")

    @property
    def d(self) -> int:
        return int(self.delta.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `ids` that have an update, their rows in this table)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids) or not len(ids):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        hit = np.flatnonzero(self.ids[pos] == ids)
        return hit, pos[hit]

    def check(self, raw: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`lookup`, after checking that each updated row of `raw` is the vector its update was learned for."""
        hit, rows = self.lookup(ids)
        if hit.size:
            got = sketch(raw[hit])
            want = self.sketches[rows]
            scale = np.maximum(want[:, :1], 1e-12)
            bad = np.flatnonzero((np.abs(got - want) > SKETCH_TOLERANCE * scale + 1e-7).any(axis=1))
            if bad.size:
                i = int(np.asarray(ids)[hit[bad[0]]])
                raise DocumentMismatchError(
                    f"document id {i} (and {bad.size - 1} more) holds another vector than the one its document "
                    f"update was learned for: the refiner's updates were made for another corpus or other ids "
                    f"({self.meta.get('corpus', 'the training corpus')}); add the training corpus under its row "
                    "numbers (or the ids given at training), or retrain on this corpus")
        return hit, rows

    def apply(self, raw: np.ndarray, stored: np.ndarray, ids: np.ndarray, inplace: bool = False) -> np.ndarray:
        """`stored` (the refiner's output for `raw`) with each updated id's offset added, its norm kept.

        `inplace`: change `stored` itself when it is a writable float32 array apart from `raw` (a store's
        fresh refiner output; raw input, which a query-only refiner stores, is always copied)."""
        hit, rows = self.check(raw, ids)
        if not hit.size:
            return stored
        own = (inplace and stored.dtype == np.float32 and stored.flags.writeable
               and not np.shares_memory(stored, raw))
        out = stored if own else np.array(stored, dtype=np.float32, copy=True)
        out[hit] = _move(out[hit], self.delta[rows])
        return out

    def renamed(self, ids_of_rows: np.ndarray, keys: str) -> "DocumentUpdates":
        """The same updates keyed by `ids_of_rows[row]` instead of row (checked unique ids, one per corpus row)."""
        new = np.asarray(ids_of_rows, dtype=np.int64)[self.ids]
        order = np.argsort(new, kind="stable")
        return DocumentUpdates(new[order], self.delta[order], self.sketches[order], {**self.meta, "keys": keys})

    # -- bytes ------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A JSON header then ids, offsets and sketches as .npy arrays (npyfile.py; no pickles)."""
        return pack({"format": FORMAT, "version": 1, "meta": self.meta}, (self.ids, self.delta, self.sketches))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "DocumentUpdates":
        header, (ids, delta, sk) = unpack(data, 3, FORMAT, "document-updates", source)
        if ids.dtype != np.int64 or delta.dtype != np.float32 or sk.dtype != np.float32:
            raise InputError(f"{source}: document updates have dtypes {ids.dtype}/{delta.dtype}/{sk.dtype}, "
                             "expected int64/float32/float32")
        try:
            return cls(ids, delta, sk, dict(header.get("meta") or {}))
        except ValueError as e:
            raise InputError(f"{source}: {e}") from None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def record(self) -> dict:
        """What a refiner's metadata, a manifest or a sidecar says of these updates."""
        return {"sha256": self.sha256, "n": len(self), "d": self.d}


def _move(y: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(y + delta) rescaled to |y| per row."""
    z = y + delta
    scale = np.sqrt(np.einsum("ij,ij->i", y, y) / np.maximum(np.einsum("ij,ij->i", z, z), 1e-30))
    return z * scale[:, None]
