"""`RefinedIndex`: any FAISS index behind a refiner, with FAISS's own method names.

Every vector that is added and every query is refined before FAISS sees it (a query-only refiner
leaves stored vectors raw). A Python/ONNX transform cannot live inside faiss.IndexPreTransform
(docs/design.md), so the wrapper holds both and persists them together as a bundle. (A linear
refiner can: `LinearRefiner.to_faiss` builds one native faiss.IndexPreTransform instead.)
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .checks import as_ids, as_matrix, check_finite, check_k, check_matrix
from .persistence import BundleError, load_bundle, save_bundle
from .refiner import IdentityRefiner, Refiner, as_input

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METRIC_NAMES = {v: k for k, v in METRICS.items()}


def metric_code(metric) -> int:
    """'ip' / 'l2' / a faiss.METRIC_* constant -> the FAISS constant."""
    if isinstance(metric, str):
        if metric.lower() not in METRICS:
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        return METRICS[metric.lower()]
    if metric not in METRIC_NAMES:
        raise ValueError(f"unsupported FAISS metric {metric!r}; use inner product or L2")
    return int(metric)


def release_rows(x: np.ndarray, start: int, stop: int) -> None:
    """Unmap rows [start, stop) of a memory-mapped array from this process (madvise MADV_DONTNEED).

    Pages read through a memmap count in the process's resident set until unmapped, so streaming
    a 1.5 GB .npy would otherwise add its whole size to the peak memory of an ingest. The data
    stay in the kernel's page cache. Only 'r' and 'r+' maps (file-backed, shared): dropping a
    copy-on-write ('c') map's pages would discard its writes. Anything else is left alone.
    """
    mm = getattr(x, "_mmap", None)
    if (mm is None or getattr(x, "mode", None) not in ("r", "r+") or not hasattr(mmap, "MADV_DONTNEED")
            or not x.flags.c_contiguous or stop <= start):
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        row = x.strides[0]
        lo = x.ctypes.data - base + start * row
        hi = min(x.ctypes.data - base + stop * row, len(mm))
        lo -= lo % mmap.PAGESIZE
        if hi > lo >= 0:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError, TypeError, BufferError):
        pass  # an optimisation only


def reserve(index: faiss.Index, n: int) -> None:
    """Grow a flat index's code storage once, to hold `n` more vectors, before they are streamed in.

    Adding chunk by chunk grows FAISS's std::vector by doubling; near the end of a large ingest the
    old and the new buffer are both resident (up to ~2x the index). Resizing up then back down
    keeps the capacity (the standard guarantees it), so later adds never reallocate. Only flat
    codes (Flat, SQ, PQ, ...) own one such buffer; other indexes are left alone.
    """
    idx = faiss.downcast_index(index)
    while isinstance(idx, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        idx = faiss.downcast_index(idx.index)
    if not isinstance(idx, faiss.IndexFlatCodes) or not idx.codes.is_owned:
        return
    have, need = idx.ntotal * idx.code_size, (idx.ntotal + int(n)) * idx.code_size
    if idx.codes.size() == have and need > have:
        idx.codes.resize(need)
        idx.codes.resize(have)


def build_index(index, d: int, metric, refiner) -> faiss.Index:
    """A FAISS index of dimension `d` for vectors refined by `refiner`: built from a factory string or checked.

    Refuses a metric mismatch, a dimension mismatch, and an inner-product index behind a refiner
    that does not L2-normalise (docs/design.md: recall collapses without renormalisation).
    """
    metric = metric_code(metric)
    if isinstance(index, str):
        try:
            index = faiss.index_factory(d, index, metric)
        except RuntimeError as e:
            raise ValueError(f"FAISS could not build {index!r}: {str(e).strip().splitlines()[-1]}") from None
    else:
        if not isinstance(index, faiss.Index):
            raise TypeError(f"index must be a faiss.Index or a factory string, got {type(index).__name__}")
        if index.metric_type != metric:
            raise ValueError(f"the index uses metric {METRIC_NAMES.get(index.metric_type, index.metric_type)!r} "
                             f"but metric={METRIC_NAMES[metric]!r} was given")
    if index.d != d:
        raise ValueError(f"refiner outputs {d}-d vectors but the index has dimension {index.d}")
    if (metric == faiss.METRIC_INNER_PRODUCT and refiner.apply_to == "both"
            and not refiner.is_identity and not refiner.normalize):
        raise ValueError("an inner-product index needs a refiner that L2-normalises its output; "
                         "this refiner does not (use metric='l2' or export with normalize=True)")
    return index


class RefinedIndex:
    """A FAISS index that searches in the refined space.

    refiner: a `Refiner`, an `IdentityRefiner`, or a path to an ONNX refiner.
    index: a FAISS index whose dimension is the refiner's output, or a factory string ("HNSW32", "IVF256,Flat").
    metric: "ip" (inner product; cosine with a normalising refiner) or "l2".
    """

    def __init__(self, refiner, index="Flat", metric="ip", chunk_size: int = 16384, progress: bool = False):
        if isinstance(refiner, (str, os.PathLike)):
            refiner = Refiner.load(refiner)
        self.refiner = refiner
        self.metric = metric_code(metric)
        self.chunk_size = int(chunk_size)
        self.progress = progress
        self.factory: str | None = index if isinstance(index, str) else None
        self.index = build_index(index, refiner.d_out, metric, refiner)

    # -- FAISS-style properties -------------------------------------------------------------
    @property
    def d(self) -> int:
        """The raw input dimension (what callers pass to add and search)."""
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
        return self.refiner.apply(as_input(x, self.d, "queries"))

    def refine_documents(self, x) -> np.ndarray:
        """Documents go through the refiner unless it is query-only (then they are stored raw)."""
        x = as_matrix(x, self.d, "x")
        return self.refiner.apply(x) if self.refiner.apply_to == "both" else x

    def _chunks(self, x, desc: str):
        """(start, refined rows) in chunks of `chunk_size`; a memmap's pages are unmapped once refined."""
        n = x.shape[0]
        bar = tqdm(total=n, desc=desc, unit="vec", disable=not self.progress or n <= self.chunk_size)
        for s in range(0, n, self.chunk_size):
            e = min(s + self.chunk_size, n)
            block = np.asarray(x[s:e])
            refined = self.refine_documents(block)
            if not np.may_share_memory(refined, block):
                release_rows(x, s, e)  # before FAISS copies the chunk: one less chunk resident at the peak
            yield s, refined
            del refined, block  # or they stay alive while the next chunk is refined
            release_rows(x, s, e)
            bar.update(e - s)
        bar.close()

    def _check_stream(self, x, name: str = "x") -> np.ndarray:
        """Validate a whole input before anything is stored (all or nothing); large inputs stay uncopied.

        A large array is scanned in chunks, and a memmap's pages are released as the scan passes.
        """
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] > self.chunk_size:
            check_matrix(x[:1], self.d, name)  # dtype and shape
            check_finite(x, name, self.chunk_size, after_chunk=lambda s, e: release_rows(x, s, e))
            return x
        return as_matrix(x, self.d, name)

    # -- FAISS API ------------------------------------------------------------------------------
    def train(self, x) -> None:
        """Train the FAISS index (IVF, PQ, ...) on refined vectors; a no-op for indexes that need none."""
        x = self.refine_documents(x)
        if not self.index.is_trained:
            self.index.train(x)

    def _ready(self):
        if not self.index.is_trained:
            raise RuntimeError("the index must be trained before adding vectors: call train(x) first")

    def add(self, x) -> None:
        """Refine and add vectors; a memmap (np.load(..., mmap_mode="r")) is streamed in chunks of `chunk_size`.

        Memory stays bounded: the memmap's pages are released chunk by chunk and a flat index's
        storage is grown once to its final size (see `reserve`), so the peak resident set is about
        the final index plus two chunks.
        """
        x = self._check_stream(x)
        self._ready()
        if x.shape[0] > self.chunk_size:
            reserve(self.index, x.shape[0])
        for _, chunk in self._chunks(x, "add"):
            self.index.add(chunk)
            del chunk  # the loop variable would keep it alive while the next chunk is refined

    def add_with_ids(self, x, ids) -> None:
        x = self._check_stream(x)
        ids = as_ids(ids, x.shape[0])
        self._ready()
        if x.shape[0] > self.chunk_size:
            reserve(self.index, x.shape[0])
        for s, chunk in self._chunks(x, "add"):
            try:
                self.index.add_with_ids(chunk, ids[s:s + len(chunk)])
            except RuntimeError as e:
                raise ValueError(f"this FAISS index does not take ids ({type(self.index).__name__}); "
                                 f"build it as 'IDMap,<factory>': {str(e).strip().splitlines()[-1]}") from None
            del chunk

    def search(self, x, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Refine queries, search; returns (D, I) of shape (n, k) as FAISS does."""
        k = check_k(k, self.ntotal)
        return self.index.search(self.refine_queries(x), k, params=params)

    def range_search(self, x, radius: float, params=None):
        """Refine queries and range-search; returns (lims, D, I) as FAISS does."""
        return self.index.range_search(self.refine_queries(x), float(radius), params=params)

    def remove_ids(self, ids) -> int:
        """Remove vectors by id; returns how many were removed."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        try:
            return self.index.remove_ids(as_ids(ids, len(ids)))
        except RuntimeError as e:
            raise ValueError(f"{type(self.index).__name__} cannot remove ids: {str(e).strip().splitlines()[-1]}") from None

    def reset(self) -> None:
        self.index.reset()

    def reconstruct_n(self, i0: int = 0, n: int | None = None) -> np.ndarray:
        """The stored (refined) vectors, where the FAISS index can reconstruct them."""
        return self.index.reconstruct_n(i0, self.ntotal - i0 if n is None else n)

    def __repr__(self) -> str:
        return (f"RefinedIndex({self.refiner!r}, {self.factory or type(self.index).__name__}, "
                f"metric={self.metric_name!r}, ntotal={self.ntotal})")

    # -- persistence ----------------------------------------------------------------------------
    def manifest(self) -> dict:
        r = self.refiner
        return {"package_version": __version__, "d": r.d_in, "d_out": r.d_out, "metric": self.metric_name,
                "factory": self.factory, "ntotal": int(self.ntotal), "index_type": type(self.index).__name__,
                "refiner": {"kind": "identity" if r.is_identity else "onnx", "normalize": r.normalize,
                            "apply_to": r.apply_to, "sha256": r.sha256, "metadata": r.metadata}}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle atomically: the previous bundle survives a crash mid-save, saves into one
        directory are serialised (the last wins), and a concurrent `load` sees the old or the new bundle."""
        save_bundle(directory, self.index, None if self.refiner.is_identity else self.refiner.model_bytes,
                    self.manifest())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = 1, mmap: bool = False) -> "RefinedIndex":
        """Open a bundle: one whole saved generation even while another process saves into it.

        Every file's size and sha256 are verified and every manifest field is checked against the
        files actually loaded; any fault raises BundleError naming the file and the field.
        """
        directory = Path(directory)
        m, index, data = load_bundle(directory, mmap=mmap)
        rinfo, files = m["refiner"], m["files"]
        rfile = f"the refiner file {files['refiner']['file']}" if "refiner" in files else "the identity refiner"
        ifile = f"the index file {files['index']['file']}"
        refiner = _refiner_from_bytes(rinfo["kind"], data, {**rinfo, "d": m["d"]}, threads,
                                      source=str(directory / files.get("refiner", {}).get("file", "")))
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
        try:
            self = cls(refiner, index, metric=m["metric"])
        except ValueError as e:
            raise BundleError(f"bundle {directory}: {e}") from None
        self.factory = m.get("factory")
        return self


def _refiner_from_bytes(kind: str, data: bytes | None, info: dict, threads: int | None, source: str):
    """A bundle's refiner from its verified bytes (today's classes; one call to replace by a refiner factory)."""
    if kind == "identity":
        return IdentityRefiner(info["d"], normalize=info["normalize"])
    if kind != "onnx":
        raise BundleError(f"{source}: refiner kind {kind!r} cannot be loaded by simskip_faiss {__version__}")
    try:
        return Refiner(data, threads=threads, source=source)
    except ValueError as e:
        raise BundleError(str(e)) from None
