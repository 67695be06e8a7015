"""`RefinedIndex`: any FAISS index behind a refiner, with FAISS's own method names.

Every vector that is added and every query is refined before FAISS sees it (a query-only refiner
leaves stored vectors raw). A Python/ONNX transform cannot live inside faiss.IndexPreTransform
(docs/design.md), so the wrapper holds both and persists them together as a bundle. (A linear
refiner can: `LinearRefiner.to_faiss` builds one native faiss.IndexPreTransform instead.)
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .checks import as_ids, as_matrix, check_k, check_radius, check_shape, nonfinite_rows, to_float32
from .faiss_utils import (METRIC_NAMES, build_index, check_search_params, metric_code,
                          reconstruct_n, release_rows, reserve, search_parameters)
from .persistence import BundleError, check_binding, load_bundle, save_bundle
from .refiners.base import MAX_NORM, NORM_RANGE_REASON
from .refiners.onnx import Refiner
from .refiners.registry import refiner_from_bytes
from .errors import InputError, faiss_reason


SMALL_K = 1 << 16  # k up to this passes without check_k (n * k results stay far below checks.MAX_RESULTS per row)


class RWLock:
    """Many readers or one writer. A waiting writer holds back new readers, so writes are not starved.

    Readers use acquire_read/release_read directly (about a microsecond, measured in
    tests/test_reliability.py); writers use `with lock.writing():`.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire_read(self) -> None:
        m = self._mutex
        m.acquire()  # the uncontended path: the raw lock, not the Condition's Python-level context manager
        if not (self._writer or self._waiting):
            self._readers += 1
            m.release()
            return
        try:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        finally:
            m.release()

    def release_read(self) -> None:
        m = self._mutex
        m.acquire()
        self._readers -= 1
        if not self._readers and self._waiting:
            self._cond.notify_all()
        m.release()

    @contextmanager
    def reading(self):
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def writing(self):
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class RefinedIndex:
    """A FAISS index that searches in the refined space.

    refiner: any `BaseRefiner` (`Refiner`, `IdentityRefiner`, `LinearRefiner`), or a path to an ONNX refiner.
    index: a FAISS index whose dimension is the refiner's output, or a factory string ("HNSW32", "IVF256,Flat").
    metric: "ip" (inner product; cosine with a normalising refiner) or "l2".

    Thread safety: one RefinedIndex may be shared by threads. Searches (search, range_search,
    reconstruct_n, save) run in parallel with each other (FAISS releases the GIL); add,
    add_with_ids, remove_ids, reset and train are exclusive: each runs alone and a search sees
    the index as it was before or after the whole call, never in between. Refinement of a batch
    that fits in one chunk happens before the exclusive part, so searches wait only for FAISS's add.

    Bad input raises before anything is stored (all or nothing): vectors (checks.py's contract),
    ids (`add_with_ids`), refined output (`BaseRefiner.check_output`).
    """

    def __init__(self, refiner, index="Flat", metric="ip", chunk_size: int = 16384, progress: bool = False):
        if isinstance(refiner, (str, os.PathLike)):
            refiner = Refiner.load(refiner)
        refiner.refuse_migration_map("a RefinedIndex (and so a bundle: build, spark-build, search)")
        self.refiner = refiner
        self.metric = metric_code(metric)
        self.chunk_size = int(chunk_size)
        if self.chunk_size <= 0:
            raise InputError(f"chunk_size must be positive, got {chunk_size}")
        self.progress = progress
        self.factory: str | None = index if isinstance(index, str) else None
        self.index = build_index(index, refiner.d_out, metric, refiner)
        self._lock = RWLock()

    # -- FAISS-style properties -------------------------------------------------------------
    @property
    def d(self) -> int:
        """The raw query dimension (what callers pass to search; add takes `refiner.document_dim`: d_in, or
        d_out for a query-only refiner)."""
        return self.refiner.d_in

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.metric]

    # -- refinement ---------------------------------------------------------------------------
    def refine_queries(self, x) -> np.ndarray:
        """Validated queries, refined; refined rows that are not finite (or not unit-norm when normalising) raise."""
        return self.refiner.refine_queries(x)

    def refine_documents(self, x, ids=None) -> np.ndarray:
        """Documents as they are stored: through the refiner unless it is query-only (then raw), plus the
        refiner's update of each of `ids` that has one (documents.py; without ids, none is applied)."""
        x = as_matrix(x, self.refiner.document_dim, "x")
        self._check_norms(x, 0, "x")
        return self.refiner.refine_documents(x, None if ids is None else as_ids(ids, x.shape[0]))

    def _check_norms(self, x: np.ndarray, offset: int, name: str) -> None:
        """Refuse rows a normalising refiner cannot normalise in float32 (see refiners.base.NORM_RANGE); and rows
        stored raw (a query-only refiner) whose float32 squared norm, a FAISS distance, overflows."""
        if not self.refiner.refines_documents:
            with np.errstate(over="ignore"):
                over = np.flatnonzero(~np.isfinite(np.einsum("ij,ij->i", x, x)))
            if over.size:
                raise InputError(f"{name}: {over.size} row(s), first at row {int(over[0]) + offset}, have an L2 norm "
                                 f"above {MAX_NORM:.2g}: FAISS computes distances in float32, where their squared "
                                 "norm overflows (searches would return -1 or inf)")
            return
        bad = self.refiner.norm_range_rows(x)
        if bad.size:
            norm = float(np.linalg.norm(x[bad[0]].astype(np.float64)))
            raise InputError(f"{name}: {bad.size} row(s), first at row {int(bad[0]) + offset}, have L2 norm "
                             f"{norm:.3g}, {NORM_RANGE_REASON}")

    def _chunks(self, x, desc: str):
        """(start, raw rows, refined rows) in chunks of `chunk_size`; a memmap's pages are unmapped once refined."""
        n = x.shape[0]
        bar = tqdm(total=n, desc=desc, unit="vec", disable=not self.progress or n <= self.chunk_size)
        for s in range(0, n, self.chunk_size):
            e = min(s + self.chunk_size, n)
            block = to_float32(np.asarray(x[s:e]))
            refined = self.refiner.refine_documents(block, offset=s)
            if not np.may_share_memory(refined, x):
                release_rows(x, s, e)  # before FAISS copies the chunk: one less chunk resident at the peak
            yield s, block, refined
            del refined, block  # or they stay alive while the next chunk is refined
            release_rows(x, s, e)
            bar.update(e - s)
        bar.close()

    def _check_stream(self, x, name: str = "x") -> np.ndarray:
        """Validate a whole input before anything is stored (all or nothing); large inputs stay uncopied.

        A large array is scanned in chunks (values checked after the cast to float32, as they will
        be stored), and a memmap's pages are released as the scan passes.
        """
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] > self.chunk_size:
            check_shape(x, self.refiner.document_dim, name)
            for s in range(0, x.shape[0], self.chunk_size):
                e = min(s + self.chunk_size, x.shape[0])
                block = to_float32(np.asarray(x[s:e]))
                bad = nonfinite_rows(block)
                if bad.size:
                    raise InputError(f"{name} contains NaN or Inf after conversion to float32 "
                                     f"(first at row {s + int(bad[0])})")
                self._check_norms(block, s, name)
                release_rows(x, s, e)
            return x
        x = as_matrix(x, self.refiner.document_dim, name)
        self._check_norms(x, 0, name)
        return x

    def _search_params(self, params):
        if params is None or isinstance(params, dict):
            return search_parameters(self.index, **(params or {}))
        check_search_params(params)
        return params

    # -- FAISS API ------------------------------------------------------------------------------
    def train(self, x) -> None:
        """Train the FAISS index (IVF, PQ, ...) on refined vectors; a no-op for indexes that need none."""
        x = self.refine_documents(x)
        with self._lock.writing():
            if not self.index.is_trained:
                try:
                    self.index.train(x)
                except RuntimeError as e:  # FAISS refuses the training set (too few points for its clusters, ...)
                    raise InputError(f"FAISS cannot train {self.factory or type(self.index).__name__} on these "
                                     f"{x.shape[0]} vectors: {faiss_reason(e)}") from None

    def _ready(self):
        if not self.index.is_trained:
            raise RuntimeError("the index must be trained before adding vectors: call train(x) first")

    def add(self, x) -> None:
        """Refine and add vectors; a memmap (np.load(..., mmap_mode="r")) is streamed in chunks of `chunk_size`.

        Memory stays bounded: the memmap's pages are released chunk by chunk and a flat index's
        storage is grown once to its final size (see `reserve`), so the peak resident set is about
        the final index plus two chunks.
        """
        self._add(x, None)

    def add_with_ids(self, x, ids) -> None:
        """Refine and add vectors under int64 ids (an 'IDMap,...' index, or one that takes ids, such as IVF).

        ids follow checks.as_ids: no -1 (FAISS's "no result"), no id twice in one call. Ids already
        stored are refused too for IDMap indexes (checked against the id map, O(ntotal)); an IVF
        index that takes ids itself keeps FAISS's behaviour (a second vector under the same id).
        """
        self._add(x, ids)

    def _add(self, x, ids) -> None:
        x = self._check_stream(x)
        if ids is not None:
            ids = as_ids(ids, x.shape[0])
        self._ready()
        big = x.shape[0] > self.chunk_size
        chunks = self._chunks(x, "add") if big else [(0, x, self.refiner.refine_documents(x))]  # small: refined unlocked
        updates = self.refiner.documents is not None or self.refiner.documents_missing
        with self._lock.writing():
            self._ready()
            if ids is not None:
                self._refuse_stored(ids)
            n0 = self.index.ntotal
            try:
                if big:
                    reserve(self.index, x.shape[0])
                for s, raw, chunk in chunks:
                    if updates:  # document updates by id: the ids given, or the positions add() gives
                        cid = ids[s:s + len(chunk)] if ids is not None else np.arange(n0 + s, n0 + s + len(chunk))
                        chunk = self.refiner.update_documents(raw, chunk, cid, inplace=True)
                    if ids is None:
                        self._add_plain(chunk)
                    else:
                        self._add_ids(chunk, ids[s:s + len(chunk)])
                    del chunk, raw  # the loop variables would keep them alive while the next chunk is refined
            except BaseException:
                self._rollback(n0, ids)
                raise

    def _add_plain(self, chunk: np.ndarray) -> None:
        try:
            self.index.add(chunk)
        except RuntimeError as e:  # e.g. an IDMap index, which takes vectors only with ids
            raise InputError(f"{self.factory or type(self.index).__name__} cannot add these vectors: "
                             f"{faiss_reason(e)}" + (" (on the command line, --ids)" if "IDMap" in type(self.index).__name__ else "")
                             ) from None

    def _add_ids(self, chunk: np.ndarray, ids: np.ndarray) -> None:
        try:
            self.index.add_with_ids(chunk, ids)
        except RuntimeError as e:
            raise InputError(f"this FAISS index does not take ids ({type(self.index).__name__}); "
                             f"build it as 'IDMap,<factory>': {faiss_reason(e)}") from None

    def _refuse_stored(self, ids: np.ndarray) -> None:
        idx = faiss.downcast_index(self.index)
        if isinstance(idx, faiss.IndexIDMap) and idx.ntotal:
            clash = ids[np.isin(ids, faiss.vector_to_array(idx.id_map))]
            if clash.size:
                raise InputError(f"{clash.size} id(s) are already stored, e.g. {clash[:5].tolist()}: "
                                 f"remove_ids them first to replace their vectors")

    def _rollback(self, n0: int, ids) -> None:
        """Undo a failed add's stored rows (none of `ids` was stored before it), where FAISS can remove."""
        added = self.index.ntotal - n0
        if added <= 0:
            return
        try:
            self.index.remove_ids(faiss.IDSelectorRange(n0, n0 + added) if ids is None else faiss.IDSelectorBatch(ids))
        except RuntimeError:
            raise RuntimeError(f"adding failed after {added} vectors were stored, and {type(self.index).__name__} "
                               f"cannot remove them: the index keeps them") from None

    def search(self, x, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Refine queries, search; returns (D, I) of shape (n, k) as FAISS does: where fewer than k vectors
        are found (k > ntotal, an empty index, an IVF probe that reaches too few) the rest is padded with
        id -1 and the metric's worst distance (-FLT_MAX for inner product, FLT_MAX for L2).

        params: a faiss.SearchParameters, or a dict such as {"efSearch": 64} / {"nprobe": 8}
        (validated: positive integers within faiss_utils.PARAM_BOUNDS; see `search_parameters`).
        """
        if type(k) is not int or not 0 < k <= SMALL_K:  # the common case skips check_k's calls
            k = check_k(k, getattr(x, "shape", (None,))[0] if getattr(x, "ndim", 0) == 2 else None)
        q = self.refine_queries(x)
        params = self._search_params(params) if params is not None else None
        lock = self._lock
        lock.acquire_read()
        try:
            return self.index.search(q, k, params=params)
        finally:
            lock.release_read()

    def range_search(self, x, radius: float, params=None):
        """Refine queries and range-search; returns (lims, D, I) as FAISS does. radius: finite (>= 0 for L2)."""
        radius = check_radius(radius, self.metric == faiss.METRIC_L2)
        q = self.refine_queries(x)
        params = self._search_params(params) if params is not None else None
        with self._lock.reading():
            return self.index.range_search(q, radius, params=params)

    def remove_ids(self, ids) -> int:
        """Remove vectors by id; returns how many were removed (0 for an empty list)."""
        ids = as_ids(ids, to_store=False)
        if not ids.size:
            return 0
        with self._lock.writing():
            try:
                return self.index.remove_ids(ids)
            except RuntimeError as e:
                raise InputError(f"{type(self.index).__name__} cannot remove ids: "
                                 f"{faiss_reason(e)}") from None

    def reset(self) -> None:
        with self._lock.writing():
            self.index.reset()

    def reconstruct_n(self, i0: int = 0, n: int | None = None) -> np.ndarray:
        """Stored (refined) vectors i0 .. i0+n-1 in storage order; ValueError where FAISS cannot reconstruct."""
        with self._lock.reading():
            return reconstruct_n(self.index, i0, self.index.ntotal - i0 if n is None else n)

    def __repr__(self) -> str:
        return (f"RefinedIndex({self.refiner!r}, {self.factory or type(self.index).__name__}, "
                f"metric={self.metric_name!r}, ntotal={self.ntotal})")

    # -- persistence ----------------------------------------------------------------------------
    def manifest(self) -> dict:
        r = self.refiner
        return {"package_version": __version__, "d": r.d_in, "d_out": r.d_out, "metric": self.metric_name,
                "factory": self.factory, "ntotal": int(self.ntotal), "index_type": type(self.index).__name__,
                "refiner": r.info()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle atomically: the previous bundle survives a crash mid-save, saves into one
        directory are serialised (the last wins), and a concurrent `load` sees the old or the new bundle.

        Saving runs alongside searches and excludes writes, so the bundle is one consistent state.
        """
        with self._lock.reading():
            docs = self.refiner.documents
            save_bundle(directory, self.index, self.refiner.to_bytes(), self.manifest(),
                        refiner_suffix=self.refiner.suffix or ".onnx",
                        documents_bytes=None if docs is None else docs.to_bytes())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = 1, mmap: bool = False) -> "RefinedIndex":
        """Open a bundle: one whole saved generation even while another process saves into it.

        Every file's size and sha256 are verified and every manifest field is checked against the
        files actually loaded; any fault raises BundleError naming the file and the field.
        """
        directory = Path(directory)
        m, index, data, documents = load_bundle(directory, mmap=mmap)
        rinfo, files = m["refiner"], m["files"]
        rfile = f"the refiner file {files['refiner']['file']}" if "refiner" in files else "the identity refiner"
        ifile = f"the index file {files['index']['file']}"
        # identity: built from the record; others: from the verified bytes, cross-checked just below
        info = ({"d_in": m["d"], "normalize": rinfo["normalize"], "apply_to": rinfo["apply_to"]}
                if rinfo["kind"] == "identity" else {})
        if "documents" in rinfo:
            info["documents"] = rinfo["documents"]
        try:
            refiner = refiner_from_bytes(rinfo["kind"], data, info, threads,
                                         source=str(directory / files.get("refiner", {}).get("file", "")),
                                         documents=documents)
        except ValueError as e:
            raise BundleError(str(e)) from None
        show = (lambda v: f"{v[:16]}…" if isinstance(v, str) and len(v) == 64 else repr(v))
        for source, field, want, got in (
                (rfile, "refiner.sha256", rinfo["sha256"], refiner.sha256),
                (rfile, "refiner.normalize", rinfo["normalize"], refiner.normalize),
                (rfile, "refiner.apply_to", rinfo["apply_to"], refiner.apply_to),
                (rfile, "d", m["d"], refiner.d_in),
                (rfile, "d_out", m["d_out"], refiner.d_out),
                (ifile, "d_out", m["d_out"], index.d),
                (ifile, "ntotal", m["ntotal"], index.ntotal),
                (ifile, "metric", m["metric"], METRIC_NAMES.get(index.metric_type, index.metric_type))):
            if want != got:
                raise BundleError(f"bundle {directory}: {source} has {field.rpartition('.')[2]} {show(got)} "
                                  f"but the manifest field '{field}' says {show(want)}")
        check_binding(m, directory)
        try:
            self = cls(refiner, index, metric=m["metric"])
        except ValueError as e:
            raise BundleError(f"bundle {directory}: {e}") from None
        self.factory = m.get("factory")
        return self
