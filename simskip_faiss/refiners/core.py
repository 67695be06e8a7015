"""Run a refiner at serving time: no torch on this path.

A refiner maps float32 (n, d_in) embeddings to (n, d_out). Every kind keeps the `BaseRefiner`
contract (dimensions, `apply_to`, `normalize`, metadata, sha256, a validated `transform`, and
bytes for a bundle): `Refiner` runs an exported ONNX file with onnxruntime, `IdentityRefiner` is
the no-op baseline (optionally L2-normalising), `LinearRefiner` is an affine map (centring,
whitening, all-but-the-top, a distilled refiner). `refiner_from_bytes` rebuilds any of them.

Accepted input (checks.py states the vector contract): finite float32 rows. Refined output is
checked on every path (`transform`, RefinedIndex search and add): rows that come out non-finite,
or not unit-length from a normalising refiner, raise ValueError naming the rows. Vectors stored
through a normalising refiner must have an L2 norm of 0 or within NORM_RANGE = [1e-18, 1e18]:
an ONNX graph normalises in float32, where the squared norm of larger rows overflows (norm 1e20
comes out as 3e-19) and of smaller ones underflows. (Identity and linear refiners sum norms in
float64 and normalise any finite row; the rule is the same for every kind.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..scale.arrow import BadRowsError, as_id_list
from ..checks import as_matrix, l2_normalize
from .documents import DocumentUpdates
from .npyfile import pack, unpack
from ..faiss_utils import build_index
from ..errors import InputError

METADATA_KEY = "simskip"
KINDS = ("onnx", "identity", "linear")
APPLY_TO = ("both", "queries")
NORM_RANGE = (1e-18, 1e18)  # input row norms a normalising refiner computes correctly in float32
# why a row outside NORM_RANGE is refused before it is written (RefinedIndex, Milvus)
NORM_RANGE_REASON = (f"outside [{NORM_RANGE[0]:g}, {NORM_RANGE[1]:g}], the range a normalising refiner "
                     "computes in float32")
MAX_NORM = float(np.sqrt(np.finfo(np.float32).max))  # ~1.8e19: a float32 squared norm (a FAISS distance) overflows past it
UNIT_TOLERANCE = 1e-2  # |‖y‖² − 1| allowed in a normalising refiner's output (fp16/int8 graphs included)


DEFAULT_BATCH = 1024  # rows per onnxruntime run: the fastest sub-batch for large inputs in bench/speed.py
FAST_ROWS = 64  # inputs up to this many rows skip the general validation when already in shape
MIN_PARALLEL_ROWS = 256  # rows per worker below which splitting a call across threads does not pay


# -- ONNX files that would read other files --------------------------------------------------------------
# Field numbers of onnx.proto that can hold a TensorProto, walked without the onnx package (serving has none).
_MESSAGES = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message; value is bytes for length-delimited fields."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = out = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated or malformed protobuf")
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated or malformed protobuf")
            yield field, wire, buf[i:i + size]
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def external_tensors(model: bytes) -> bool:
    """True if an ONNX model keeps any tensor in external data (data_location EXTERNAL or external_data
    entries): onnxruntime would read those files from the loading process's working directory."""
    stack = [("model", memoryview(model))]  # slices of a memoryview: the walk copies no tensor bytes
    while stack:
        kind, buf = stack.pop()
        for field, wire, value in _fields(buf):
            if kind == "tensor":
                if (field == 14 and wire == 0 and value == 1) or field == 13:
                    return True
                continue
            sub = _MESSAGES[kind].get(field)
            if sub and wire == 2:
                stack.append((sub, value))
    return False


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


def _check_apply_to(apply_to: str) -> str:
    if apply_to not in APPLY_TO:
        raise InputError(f"apply_to must be 'both' or 'queries', got {apply_to!r}")
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

    def info(self) -> dict:
        """What a bundle manifest records about the refiner (and its document updates, when it has them)."""
        out = {"kind": self.kind, "d_in": self.d_in, "d_out": self.d_out, "normalize": self.normalize,
               "apply_to": self.apply_to, "sha256": self.sha256, "metadata": self.metadata}
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


class IdentityRefiner(BaseRefiner):
    """The raw vectors, unchanged (or only L2-normalised): the baseline every refiner is judged against."""

    kind = "identity"
    sha256 = None

    def __init__(self, d: int, normalize: bool = False, apply_to: str = "both"):
        if int(d) <= 0:
            raise InputError(f"dimension must be positive, got {d}")
        self.d_in = self.d_out = int(d)
        self.normalize = bool(normalize)
        self.apply_to = _check_apply_to(apply_to)
        self.metadata: dict = {"kind": "identity", "d_in": self.d_in, "d_out": self.d_out,
                               "normalize": self.normalize}

    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if self.normalize else x

    def to_bytes(self) -> None:
        return None

    def __repr__(self) -> str:
        return (f"IdentityRefiner(d={self.d_in}, normalize={self.normalize}"
                + (f", apply_to={self.apply_to!r}" if self.apply_to != "both" else "") + ")")


class Refiner(BaseRefiner):
    """An exported ONNX refiner run by onnxruntime in bounded-size batches.

    `threads` (default 1; None = every core) is how many cores one call may use. The onnxruntime
    session itself is single-threaded; a large input is split into sub-batches that the calling
    thread and `threads - 1` pool workers take in turn (onnxruntime releases the GIL). Measured on
    2 cores: alone, 1.8x one thread's rate at batch 1024 (numpy's matmul roofline); in bench/speed.py
    section 1, above onnxruntime's own intra-op pool at batch >= 4096 and below it at 1024. A single
    vector is not slowed by a pool's wake-up. `batch_size` bounds the rows of one onnxruntime run.
    """

    kind = "onnx"
    suffix = ".onnx"

    def __init__(self, model: bytes, threads: int | None = 1, batch_size: int = DEFAULT_BATCH,
                 source: str = "<bytes>", documents: DocumentUpdates | None = None):
        import onnxruntime as ort

        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.model_bytes = bytes(model)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.batch_size = int(batch_size)
        self.threads = int(threads) if threads is not None else (os.cpu_count() or 1)
        if self.threads <= 0:
            raise InputError(f"threads must be positive (or None for every core), got {threads}")
        self.source = source
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()  # per-thread buffers of the single-vector path (see _run)
        try:
            external = external_tensors(self.model_bytes)
        except ValueError as e:
            raise InputError(f"{source} is not a valid ONNX model: {e}") from None
        if external:
            raise InputError(f"{source} keeps weights in external data files: onnxruntime would read them from "
                             "the working directory, outside any hash check; a refiner must be one self-contained "
                             "file (export with external_data=False)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # parallelism is across sub-batches (see the class docstring)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(self.model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(f"{source} is not a valid ONNX model: {str(e).splitlines()[0][:200]}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise InputError(f"{source}: a refiner has one input (n, d) and one output, "
                             f"got {len(inputs)} inputs and {len(outputs)} outputs")
        self._in, self._out = inputs[0].name, outputs[0].name
        if inputs[0].type != "tensor(float)":
            raise InputError(f"{source}: refiner input must be float32, model declares {inputs[0].type}")
        raw_meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            self.metadata: dict = json.loads(raw_meta) if raw_meta else {}
        except json.JSONDecodeError:
            raise InputError(f"{source}: the '{METADATA_KEY}' metadata is not valid JSON") from None
        d_in, d_out = inputs[0].shape[-1], outputs[0].shape[-1]
        self.d_in = int(self.metadata.get("d_in", d_in if isinstance(d_in, int) else 0))
        self.d_out = int(self.metadata.get("d_out", d_out if isinstance(d_out, int) else 0))
        if self.d_in <= 0 or self.d_out <= 0 or len(inputs[0].shape) != 2:
            raise InputError(f"{source}: cannot tell the refiner's dimensions: input shape "
                             f"{inputs[0].shape}, output shape {outputs[0].shape}")
        self.normalize = bool(self.metadata.get("normalize", False))
        self.precision = str(self.metadata.get("precision", "fp32"))
        self.apply_to = self.metadata.get("apply_to", "both")
        if self.apply_to not in ("both", "queries"):
            raise InputError(f"{source}: apply_to must be 'both' or 'queries', got {self.apply_to!r}")
        declared = self.metadata.get("documents")
        if documents is not None:
            if isinstance(declared, dict) and declared.get("sha256") != documents.sha256:
                raise InputError(f"{source}: the document updates given are not the ones this refiner declares "
                                 f"(sha256 {documents.sha256[:16]}…, the file says "
                                 f"{(declared or {}).get('sha256', 'none')!s:.16})")
            self.with_documents(documents)
        elif isinstance(declared, dict):
            self.documents_missing = f"{declared.get('n', '?')} documents in {declared.get('file', 'a file beside it')}"

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = 1, batch_size: int = DEFAULT_BATCH) -> "Refiner":
        """Load an ONNX refiner file, and its document updates from the file beside it that its metadata
        names (hash-checked); missing, empty and non-ONNX files raise with the path named."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"refiner file not found: {p}")
        data = p.read_bytes()
        if not data:
            raise InputError(f"{p} is empty, not an ONNX model")
        out = cls(data, threads=threads, batch_size=batch_size, source=str(p))
        declared = out.metadata.get("documents")
        if isinstance(declared, dict):
            out.with_documents(read_documents(p, declared))
        return out

    def __getstate__(self) -> dict:
        """Pickle as bytes and settings (the onnxruntime session, pool and locks are rebuilt on load), so a
        refiner crosses process boundaries: multiprocessing, Ray, Spark closures, multi-worker ingestion."""
        return {"model": self.model_bytes, "threads": self.threads, "batch_size": self.batch_size,
                "source": self.source, "documents": None if self.documents is None else self.documents.to_bytes(),
                "documents_missing": self.documents_missing}

    def __setstate__(self, state: dict) -> None:
        docs = state["documents"]
        self.__init__(state["model"], threads=state["threads"], batch_size=state["batch_size"], source=state["source"],
                      documents=None if docs is None else DocumentUpdates.from_bytes(docs))
        if docs is None:
            self.documents_missing = state["documents_missing"]

    @classmethod
    def load_metadata(cls, path: str | os.PathLike) -> dict:
        """The "simskip" metadata of an ONNX refiner file, without loading its document updates."""
        return cls(Path(path).read_bytes(), source=str(path)).metadata

    def to_bytes(self) -> bytes:
        return self.model_bytes

    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        workers = min(self.threads, n // MIN_PARALLEL_ROWS)
        if workers <= 1 and n <= self.batch_size:
            return self._run(x)
        step = min(self.batch_size, -(-n // max(workers, 1)))
        out = np.empty((n, self.d_out), dtype=np.float32)
        starts = iter(range(0, n, step))
        taking = threading.Lock()

        def drain() -> None:  # run sub-batches until none is left; after a failure, none is
            while True:
                with taking:
                    s = next(starts, None)
                if s is None:
                    return
                try:
                    out[s:s + step] = self._run(x[s:s + step])
                except BaseException:
                    with taking:
                        for _ in starts:
                            pass
                    raise

        # the calling thread is one of the `workers` runners: no hand-off for it, and never more
        # runners than cores (measured in bench/speed.py section 1)
        helpers = [self._executor().submit(drain) for _ in range(workers - 1)]
        try:
            drain()
        finally:  # wait for every helper, whatever happened here
            errors = [e for e in (f.exception() for f in helpers) if e is not None]
        if errors:
            raise errors[0]
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:  # a single vector: this thread's IO binding to preallocated buffers
            try:
                binding, x1, y1 = self._local.one
            except AttributeError:
                binding, x1, y1 = self._local.one = self._bind_one()
            x1[...] = x
            self._session.run_with_iobinding(binding)
            return y1.copy()  # the buffer is reused by this thread's next call
        return self._session.run([self._out], {self._in: x})[0]

    def _bind_one(self) -> tuple:
        """An IO binding of one (1, d_in) input and one (1, d_out) output buffer.

        Measured in bench/speed.py: a few microseconds less per single vector than `session.run`,
        which converts the input and allocates the output on every call. Per thread: a binding's
        buffers must not be shared by concurrent calls.
        """
        x1, y1 = np.zeros((1, self.d_in), np.float32), np.empty((1, self.d_out), np.float32)
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._in, x1)
        binding.bind_output(self._out, "cpu", 0, np.float32, list(y1.shape), y1.ctypes.data)
        return binding, x1, y1

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(self.threads - 1, 1), thread_name_prefix="simskip-refine")
            return self._pool

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        a = self.metadata.get("alpha")
        return (f"Refiner({self.source}, d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize}, "
                f"apply_to={self.apply_to}" + (f", alpha={a}" if a is not None else "")
                + (f", precision={self.precision}" if self.precision != "fp32" else "") + ")")


DOCUMENTS_PREFIX = "simskip-documents-"


def documents_path(refiner_path: str | os.PathLike, sha256: str) -> Path:
    """Where an exported refiner's document updates live: beside it, named by their content only, so a
    refiner file copied or renamed next to them still finds them."""
    return Path(refiner_path).with_name(f"{DOCUMENTS_PREFIX}{sha256[:16]}.bin")


def read_documents(refiner_path: Path, declared: dict) -> DocumentUpdates:
    """The document updates a refiner file declares (metadata "documents": file, sha256), hash-checked."""
    from ..persistence import plain_name

    name, sha = declared.get("file"), declared.get("sha256")
    if not plain_name(name) or not isinstance(sha, str):
        raise InputError(f"{refiner_path}: its document-updates record must name a file beside it and a sha256, "
                         f"got {name!r}")
    p = refiner_path.with_name(name)
    if p.is_symlink() or not p.is_file():
        raise FileNotFoundError(f"{refiner_path} carries document updates in {p}, which is missing: copy it with "
                                "the refiner (or retrain)")
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise InputError(f"{p} has been modified or belongs to another refiner (its sha256 differs from the one "
                         f"{refiner_path.name} records)")
    return DocumentUpdates.from_bytes(data, source=str(p))


def load_refiner(path: str | os.PathLike | None, d: int | None = None, threads: int | None = 1,
                 normalize: bool = False):
    """A `Refiner` from an ONNX path, or an `IdentityRefiner(d)` when path is None or 'identity'."""
    if path is None or str(path) == "identity":
        if d is None:
            raise InputError("an identity refiner needs the dimension d")
        return IdentityRefiner(d, normalize=normalize)
    return Refiner.load(path, threads=threads)


class LinearRefiner(BaseRefiner):
    """y = normalize?((x - mean) @ A.T + bias): centring, whitening, all-but-the-top, or a distilled linear refiner.

    Linear maps need no ONNX: `to_faiss` puts them inside a native faiss.IndexPreTransform, so
    the whole refined index is one FAISS file with no Python on its search path. `apply_to`
    "queries" maps queries only (stored vectors stay raw; then `to_faiss` does not apply).

    Bytes (`to_bytes`, what a bundle stores): four .npy arrays back to back — a JSON header
    (uint8), A, mean, bias (empty when none) — read with allow_pickle=False. Chosen over a FAISS
    VectorTransform file because that folds the mean into the bias (results change in the last
    bit) and cannot carry the name and metadata; over ONNX because serving needs no `onnx` package.
    """

    kind = "linear"
    suffix = ".npy"
    FORMAT = "simskip-linear-refiner"

    def __init__(self, A: np.ndarray, mean: np.ndarray, normalize: bool = True, name: str = "linear",
                 bias: np.ndarray | None = None, apply_to: str = "both", metadata: dict | None = None):
        self.A = np.ascontiguousarray(A, dtype=np.float32)
        self.mean = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        if self.A.ndim != 2 or self.A.shape[1] != self.mean.shape[0] or self.A.size == 0:
            raise InputError(f"A must be (d_out, d_in) with d_in = len(mean); got {self.A.shape} and {self.mean.shape}")
        self.d_out, self.d_in = self.A.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
        if self.bias is not None and self.bias.shape != (self.d_out,):
            raise InputError(f"bias must have d_out = {self.d_out} entries, got shape {self.bias.shape}")
        for what, arr in (("A", self.A), ("mean", self.mean), ("bias", self.bias)):
            if arr is not None and not np.isfinite(arr).all():
                raise InputError(f"LinearRefiner {what} holds NaN or Inf")
        self.normalize = bool(normalize)
        self.apply_to = _check_apply_to(apply_to)
        self.name = name
        self.metadata = {"kind": "linear", "name": name, "d_in": self.d_in, "d_out": self.d_out,
                         "normalize": self.normalize, "apply_to": self.apply_to, **(metadata or {})}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        y = (x - self.mean) @ self.A.T
        if self.bias is not None:
            y += self.bias
        return l2_normalize(y) if self.normalize else y

    def to_bytes(self) -> bytes:
        header = {"format": self.FORMAT, "version": 1, "name": self.name, "normalize": self.normalize,
                  "apply_to": self.apply_to, "metadata": self.metadata}
        return pack(header, (self.A, self.mean, np.empty(0, np.float32) if self.bias is None else self.bias))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "LinearRefiner":
        """Read `to_bytes()` output; anything else raises InputError naming `source`."""
        header, (A, mean, bias) = unpack(data, 3, cls.FORMAT, "linear refiner", source)
        meta = {k: v for k, v in dict(header.get("metadata") or {}).items()
                if k not in ("kind", "name", "d_in", "d_out", "normalize", "apply_to")}
        return cls(A, mean, normalize=bool(header.get("normalize")), name=str(header.get("name", "linear")),
                   bias=bias if bias.size else None, apply_to=header.get("apply_to", "both"), metadata=meta)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with y = normalize?(A x + b): the form faiss.LinearTransform applies."""
        b = -(self.A.astype(np.float64) @ self.mean.astype(np.float64))
        if self.bias is not None:
            b += self.bias
        return self.A, b.astype(np.float32)

    def faiss_transforms(self) -> list:
        """The refiner as FAISS VectorTransforms: a LinearTransform, then L2 normalisation if it normalises."""
        import faiss

        A, b = self.affine()
        lt = faiss.LinearTransform(self.d_in, self.d_out, True)
        faiss.copy_array_to_vector(A.ravel(), lt.A)
        faiss.copy_array_to_vector(b, lt.b)
        lt.is_trained = True
        return [lt] + ([faiss.NormalizationTransform(self.d_out, 2.0)] if self.normalize else [])

    def to_faiss(self, index="Flat", metric="ip"):
        """An empty faiss.IndexPreTransform that applies this refiner before `index`.

        index: a factory string ("Flat", "HNSW32", "IVF1024,Flat") or an empty faiss.Index of
        dimension d_out. Train/add/search it with raw vectors, persist it with faiss.write_index:
        the refiner travels inside the FAISS file.
        """
        import faiss

        if self.apply_to != "both":
            raise InputError("to_faiss applies the map to stored vectors too; this LinearRefiner is query-only")
        inner = build_index(index, self.d_out, metric, self)
        if inner.ntotal:
            raise InputError(f"to_faiss needs an empty index, this one holds {inner.ntotal} vectors")
        *first, last = self.faiss_transforms()
        pre = faiss.IndexPreTransform(last, inner)
        for t in reversed(first):
            pre.prepend_transform(t)
        return pre

    @classmethod
    def centring(cls, x: np.ndarray, normalize: bool = True) -> "LinearRefiner":
        """Subtract the corpus mean (and renormalise): the free baseline SimSkip must beat."""
        x = as_matrix(x)
        return cls(np.eye(x.shape[1], dtype=np.float32), x.mean(0), normalize, "centred")

    @classmethod
    def whitening(cls, x: np.ndarray, normalize: bool = True, eps: float = 1e-5) -> "LinearRefiner":
        """PCA whitening: decorrelate and equalise the variance of every principal direction."""
        x = as_matrix(x)
        mean, (evals, evecs) = x.mean(0), np.linalg.eigh(np.cov(x - x.mean(0), rowvar=False))
        scale = 1.0 / np.sqrt(np.maximum(evals, 0) + eps * max(evals.max(), 1e-12))
        return cls((evecs * scale).T, mean, normalize, "whitened")

    @classmethod
    def all_but_the_top(cls, x: np.ndarray, n_components: int | None = None, normalize: bool = True) -> "LinearRefiner":
        """Mu & Viswanath (ICLR 2018): remove the mean and the top principal directions (default d/100)."""
        x = as_matrix(x)
        d = x.shape[1]
        D = n_components if n_components is not None else max(1, round(d / 100))
        _, evecs = np.linalg.eigh(np.cov(x - x.mean(0), rowvar=False))
        top = evecs[:, ::-1][:, :D]
        return cls(np.eye(d, dtype=np.float32) - top @ top.T, x.mean(0), normalize, f"all-but-the-top({D})")

    def __repr__(self) -> str:
        return (f"LinearRefiner({self.name}, d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize}"
                + (f", apply_to={self.apply_to!r}" if self.apply_to != "both" else "") + ")")


def distil_linear(refiner, sample, ridge: float = 1e-3, name: str = "distilled") -> LinearRefiner:
    """The least-squares affine map x -> refiner(x) on `sample`, as a `LinearRefiner`.

    It keeps the refiner's normalisation, so it can replace it inside a native FAISS index
    (`LinearRefiner.to_faiss`). `ridge` regularises relative to the mean input variance; use a
    sample of several times d_in vectors. The fit's R^2 (share of the refined vectors' variance
    explained) is stamped in the metadata as `fit_r2`: how linear the refiner is on this data.
    """
    x = as_matrix(sample, refiner.d_in, "sample")
    if x.shape[0] < 2:
        raise InputError("distil_linear needs at least 2 sample vectors")
    y = np.asarray(refiner.transform(x), dtype=np.float64)
    x = x.astype(np.float64)
    mu, ybar = x.mean(0), y.mean(0)
    xc, yc = x - mu, y - ybar
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += ridge * max(np.trace(gram) / len(gram), 1e-12)
    W = np.linalg.solve(gram, xc.T @ yc)  # (d_in, d_out)
    resid = yc - xc @ W
    r2 = 1.0 - float((resid ** 2).sum() / max((yc ** 2).sum(), 1e-30))
    return LinearRefiner(W.T, mu, normalize=refiner.normalize, name=name, bias=ybar, apply_to=refiner.apply_to,
                         metadata={"distilled_from": refiner.sha256, "fit_r2": r2, "n_sample": int(x.shape[0])})


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
