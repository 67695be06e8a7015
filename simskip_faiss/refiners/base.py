"""The refiner interface every store calls: `BaseRefiner`, the input fast path `as_input`, and the numeric limits.

A refiner maps float32 (n, d_in) embeddings to (n, d_out). Every kind keeps the `BaseRefiner`
contract (dimensions, `apply_to`, `normalize`, metadata, sha256, a validated `transform`, and
bytes for a bundle); the kinds live in onnx.py (`Refiner`), identity.py and linear.py, and
registry.py rebuilds any of them from bytes.

Accepted input (checks.py states the vector contract): finite float32 rows. Refined output is
checked on every path (`transform`, RefinedIndex search and add): rows that come out non-finite,
or not unit-length from a normalising refiner, raise ValueError naming the rows. Vectors stored
through a normalising refiner must have an L2 norm of 0 or within NORM_RANGE = [1e-18, 1e18]:
an ONNX graph normalises in float32, where the squared norm of larger rows overflows (norm 1e20
comes out as 3e-19) and of smaller ones underflows. (Identity and linear refiners sum norms in
float64 and normalise any finite row; the rule is the same for every kind.)
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..checks import as_id_list, as_matrix
from .documents import DocumentUpdates
from ..errors import BadRowsError, InputError

APPLY_TO = ("both", "queries")
NORM_RANGE = (1e-18, 1e18)  # input row norms a normalising refiner computes correctly in float32
# why a row outside NORM_RANGE is refused before it is written (RefinedIndex, Milvus)
NORM_RANGE_REASON = (f"outside [{NORM_RANGE[0]:g}, {NORM_RANGE[1]:g}], the range a normalising refiner "
                     "computes in float32")
MAX_NORM = float(np.sqrt(np.finfo(np.float32).max))  # ~1.8e19: a float32 squared norm (a FAISS distance) overflows past it
UNIT_TOLERANCE = 1e-2  # |‖y‖² − 1| allowed in a normalising refiner's output (fp16/int8 graphs included)
FAST_ROWS = 64  # inputs up to this many rows skip the general validation when already in shape


def as_input(x, d: int, name: str = "x") -> np.ndarray:
    """`as_matrix` with a fast path for small C-contiguous float32 (n, d) arrays of finite values.

    Single queries spend a few microseconds in general validation; this path checks the same
    things for the common case in about half the time and defers everything else to `as_matrix`.
    Finiteness by one dot product: a finite sum of squares means every value is finite (a NaN or
    Inf, or an overflow, sends the row to `as_matrix`'s exact check; numpy then warns of the
    overflow, for norms above 1.8e19 that float32 distances cannot hold anyway). Measured in
    bench/speed.py's setting (HNSW32, one query): np.isfinite(x).all() before the refiner added
    ~10 us to the search that follows it, the dot product ~1-5 us.
    """
    if (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == d
            and 0 < x.shape[0] <= FAST_ROWS and x.flags.c_contiguous):
        v = x.ravel()
        if math.isfinite(v.dot(v)):
            return x
    return as_matrix(x, d, name)


def check_apply_to(apply_to, source: str | None = None) -> str:
    """`apply_to` if it is one of APPLY_TO, else InputError (prefixed with `source`, the file it came from)."""
    if apply_to not in APPLY_TO:
        raise InputError(f"{source + ': ' if source else ''}apply_to must be 'both' or 'queries', got {apply_to!r}")
    return apply_to


def _rows(rows: np.ndarray, offset: int) -> str:
    shown = ", ".join(str(int(r) + offset) for r in rows[:10])
    return f"row{'s' if rows.size > 1 else ''} {shown}{', …' if rows.size > 10 else ''} ({rows.size} in all)"


class BaseRefiner(ABC):
    """The contract every refiner keeps; `RefinedIndex`, bundles, Spark and Milvus rely only on it.

    kind       "onnx" | "identity" | "linear": how `to_bytes` is to be read back (`refiner_from_bytes`).
    d_in/d_out input and output dimensions.
    apply_to   "both" (queries and stored vectors are refined) or "queries" (stored vectors stay raw).
    normalize  whether outputs are L2-normalised (required for inner-product search over refined vectors).
    metadata   a JSON-serialisable dict describing the refiner (training settings, α, provenance).
    sha256     hex digest of `to_bytes()` (None for the identity, which has no bytes).
    transform  the public path: validates its input and its output.

    The store rules live here, once, and every store calls them (RefinedIndex, Spark, Milvus, the
    framework integrations): `refine_queries`, `refine_documents` (the apply_to rule), `stored_dim`,
    `check_metric`, `check_query_only_dim`, `refuse_migration_map` (serving stores), `refuse_document_norms`,
    and `record()`, the refiner's identity that a store keeps beside the vectors it made.
    """

    kind: ClassVar[str]
    suffix: ClassVar[str] = ""  # file name suffix of `to_bytes()` in a bundle
    # per-document offsets of stored vectors by id (documents.py), learned from pairs; None: none
    documents: DocumentUpdates | None = None
    # the record of document updates the refiner's file declares but that were not given (then storing refuses)
    documents_missing: str | None = None
    d_in: int
    d_out: int
    apply_to: str
    normalize: bool
    metadata: dict
    sha256: str | None

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    def transform(self, x) -> np.ndarray:
        """Refine (n, d_in) real numbers into float32 (n, d_out); bad input and bad output raise ValueError."""
        return self.apply_checked(as_input(x, self.d_in))

    __call__ = transform

    def apply_checked(self, x: np.ndarray, offset: int = 0) -> np.ndarray:
        """`apply_unchecked` on validated `x`, its output checked (`check_output`); row numbers from `offset`."""
        return self.check_output(self.apply_unchecked(x), x, offset)

    @abstractmethod
    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        """Internal fast path: `x` must already be C-contiguous finite float32 (n, d_in); output unchecked."""

    @abstractmethod
    def to_bytes(self) -> bytes | None:
        """The refiner as bytes (no pickles) that `refiner_from_bytes(self.kind, ...)` reads back; None for identity."""

    # -- the store rules ----------------------------------------------------------------------------
    @property
    def refines_documents(self) -> bool:
        """Whether stored vectors go through the refiner: apply_to "both"; a query-only refiner stores them raw."""
        return self.apply_to == "both"

    @property
    def stored_dim(self) -> int:
        """Dimension of the stored (document) vectors: always d_out. Documents go through the refiner (d_in ->
        d_out) or, for a query-only refiner, are stored raw: already in the output space, which is the input
        space for a refiner of one model's vectors (d_in == d_out) and the old model's space for a query map
        from a new model (d_in != d_out, `training.mapping`)."""
        return self.d_out

    @property
    def document_dim(self) -> int:
        """Dimension of the documents a store is given: d_in when they go through the refiner, else d_out."""
        return self.d_in if self.refines_documents else self.d_out

    def refine_queries(self, x, name: str = "queries") -> np.ndarray:
        """Queries, validated (`as_input`) and refined, the output checked: queries are always refined."""
        return self.apply_checked(as_input(x, self.d_in, name))

    def refine_documents(self, x: np.ndarray, ids: np.ndarray | None = None, offset: int = 0) -> np.ndarray:
        """Validated rows `x` as a store keeps them: the checked refiner output when documents are refined, `x`
        itself when the refiner is query-only; then the refiner's update of each of `ids` that has one
        (documents.py; none without ids). Row numbers in errors count from `offset`.

        The refiner output is this call's own, so updates change it in place; raw `x` is never changed
        (`DocumentUpdates.apply` copies it first)."""
        y = self.apply_checked(x, offset) if self.refines_documents else x
        return y if ids is None else self.update_documents(x, y, ids, inplace=True)

    def refuse_document_norms(self, x: np.ndarray, ids=None) -> None:
        """`refuse_norm_range` for rows about to be stored: only when documents go through the refiner."""
        if self.refines_documents:
            self.refuse_norm_range(x, ids)

    def check_query_only_dim(self, store: str = "this store") -> None:
        """For stores that take documents at the refiner's input width: refuse a query map (a query-only refiner
        that changes the dimension; RefinedIndex and Milvus serve it, documents at d_out)."""
        if not self.refines_documents and self.d_in != self.d_out:
            raise InputError(f"a query-only refiner must keep the dimension in {store} (queries are searched "
                             f"against raw documents); this one maps {self.d_in}→{self.d_out}, a query map from "
                             "another model: serve it with RefinedIndex or Milvus, which store the documents at "
                             f"{self.d_out}-d")

    @property
    def map_direction(self) -> str | None:
        """The direction of a map between two models' spaces (`training.mapping`): its metadata's "direction"
        ("queries" or "documents") when the metadata kind is "map"; None for any other refiner."""
        meta = self.metadata if isinstance(getattr(self, "metadata", None), dict) else {}
        return meta.get("direction") if meta.get("kind") == "map" else None

    def refuse_migration_map(self, where: str) -> None:
        """Raise when this is a documents map (old stored vectors -> the new model's space): a one-time migration
        pass, not a serving refiner. Every serving path (`where`: RefinedIndex and its bundles, Milvus, the
        framework integrations) calls it; its queries are the new model's own and must be searched raw, but
        a store would refine them too (silently wrong when the widths are equal)."""
        if self.map_direction == "documents":
            raise InputError(f"{where} cannot serve this map: it is a documents map (old stored vectors -> the new "
                             f"model's space, {self.d_in}→{self.d_out}-d), a one-time migration pass; apply it once "
                             "with map_documents, Refiner.transform or simskip-faiss spark-refine, then search the "
                             "new-model queries raw in a plain index (a serving store would map the queries too)")

    def check_metric(self, metric: str, store: str = "index") -> None:
        """Refuse inner product ("ip") over refined vectors a refiner does not L2-normalise (docs/design.md:
        recall collapses without renormalisation). `store` names what is built ("index", "collection")."""
        if metric == "ip" and self.refines_documents and not self.is_identity and not self.normalize:
            raise InputError(f"an inner-product {store} needs a refiner that L2-normalises its output; "
                             "this refiner does not (use metric='l2' or export with normalize=True)")

    def record(self) -> dict:
        """The refiner's identity, what a store records beside the vectors it made and checks on reopening:
        kind, sha256 (of `to_bytes()`; for the identity, which has none, a description of it), d_in, d_out,
        normalize, apply_to, and the sha256 of its document updates (None without)."""
        sha = self.sha256 or f"identity(d={self.d_in}, normalize={bool(self.normalize)})"
        return {"kind": self.kind, "sha256": sha, "d_in": int(self.d_in), "d_out": int(self.d_out),
                "normalize": bool(self.normalize), "apply_to": self.apply_to,
                "documents": None if self.documents is None else self.documents.sha256}

    def info(self) -> dict:
        """What a bundle manifest records about the refiner: `record()` with the raw sha256 (None for the
        identity), the metadata, and the whole record of its document updates when it has them."""
        out = {k: v for k, v in self.record().items() if k != "documents"}
        out.update(sha256=self.sha256, metadata=self.metadata)
        if self.documents is not None:
            out["documents"] = self.documents.record()
        return out

    def with_documents(self, documents: DocumentUpdates | None) -> "BaseRefiner":
        """Attach document updates (or drop them with None); returns self. Their dimension must be d_out."""
        if documents is not None and documents.d != self.d_out:
            raise InputError(f"document updates of dimension {documents.d} do not fit a refiner with d_out {self.d_out}")
        self.documents, self.documents_missing = documents, None
        return self

    def check_documents_loaded(self) -> None:
        """Raise when the refiner's file declares document updates that were not loaded with it."""
        if self.documents_missing:
            raise InputError(f"this refiner carries document updates ({self.documents_missing}) that were not "
                             "loaded with it: load the refiner from its file (with the updates file beside it) "
                             "or from its bundle, or storing documents would silently skip them")

    def refuse_documents(self, where: str) -> None:
        """Raise when this refiner carries document updates that `where` cannot apply (no silent loss)."""
        if self.documents is not None or self.documents_missing:
            n = len(self.documents) if self.documents is not None else self.documents_missing
            raise InputError(f"this refiner carries document updates ({n} documents, keyed by id) that {where} "
                             "cannot apply; build the store with RefinedIndex (add / add_with_ids) or Milvus ingest, "
                             "or drop them (refiner.with_documents(None); on the command line train --documents none)")

    def update_documents(self, raw: np.ndarray, stored: np.ndarray, ids: np.ndarray, inplace: bool = False) -> np.ndarray:
        """The stored vectors of documents `ids`: `stored` (the document transform of `raw`) with each id's
        update added. The one rule every store applies after refining documents (documents.py); a store
        passes `inplace=True` for the refiner output it owns."""
        self.check_documents_loaded()
        if self.documents is None:
            return stored
        return self.documents.apply(raw, stored, ids, inplace)

    def check_output(self, y: np.ndarray, x: np.ndarray, offset: int = 0) -> np.ndarray:
        """Return `y`, refined from `x`, if it has shape (rows of `x`, d_out) and every row is finite (and
        unit-norm, or zero for a zero input row, when normalising); else raise.

        A zero refined row of a non-zero input is refused: a float32 normalisation whose squared norm
        overflows returns zero, not the unit vector it owes. `offset` is added to the row numbers in
        the message (rows of a chunk of a larger input).
        """
        shape = getattr(y, "shape", None)
        if shape != (x.shape[0], self.d_out):
            got = f"an array of shape {shape}" if shape is not None else f"a {type(y).__name__}"
            raise InputError(f"the refiner returned {got} for {x.shape[0]} input rows; expected "
                             f"({x.shape[0]}, {self.d_out}): one refined row of d_out values per input row")
        if self.normalize:
            if y.shape[0] == 1:  # the single query: a dot product and a Python comparison
                v = y.ravel()
                if abs(float(v.dot(v)) - 1.0) <= UNIT_TOLERANCE:  # NaN fails this test too
                    return y
            sq = np.einsum("ij,ij->i", y, y)
            dev = np.abs(sq - 1.0)
            if dev.max(initial=0.0) <= UNIT_TOLERANCE:
                return y
            zero_ok = sq == 0
            if zero_ok.any():
                zero_ok &= ~x.any(axis=1)
            bad = np.flatnonzero(~((dev <= UNIT_TOLERANCE) | zero_ok))
            if bad.size:
                norm = np.sqrt(sq[bad[0]])
                raise InputError(
                    f"refined {_rows(bad, offset)} are not unit vectors (norm {norm:.3g} at the first): "
                    f"a normalising refiner works in float32 and takes rows whose L2 norm lies in "
                    f"[{NORM_RANGE[0]:g}, {NORM_RANGE[1]:g}]")
            return y
        with np.errstate(over="ignore", invalid="ignore"):
            sq = np.einsum("ij,ij->i", y, y)  # float32, as FAISS computes distances: inf past norm ~1.8e19
        if np.isfinite(sq).all():
            return y
        bad = np.flatnonzero(~np.isfinite(y).all(axis=1))
        if bad.size:
            raise InputError(f"refined {_rows(bad, offset)} hold NaN or Inf: the input is beyond the range this "
                             f"refiner computes in float32")
        bad = np.flatnonzero(~np.isfinite(sq))
        raise InputError(f"refined {_rows(bad, offset)} have an L2 norm above {MAX_NORM:.2g}: FAISS computes "
                         "distances in float32, where their squared norm overflows (searches would return -1 or inf)")

    def norm_range_rows(self, x: np.ndarray) -> np.ndarray:
        """Rows of (validated) `x` a normalising refiner cannot normalise in float32 (empty when not normalising)."""
        if not self.normalize:
            return np.empty(0, dtype=np.int64)
        with np.errstate(over="ignore", under="ignore"):
            n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        return np.flatnonzero(((n < NORM_RANGE[0]) & (n > 0)) | (n > NORM_RANGE[1]))

    def refuse_norm_range(self, x: np.ndarray, ids=None) -> None:
        """Raise BadRowsError naming every row of `x` that `norm_range_rows` finds, by its id in `ids`
        (an Arrow array, numpy array or sequence; positions in `x` if None)."""
        bad = self.norm_range_rows(x)
        if bad.size:
            ids = as_id_list(ids)
            raise BadRowsError([(ids[i] if ids is not None else int(i), f"L2 norm {NORM_RANGE_REASON}") for i in bad])
