"""`RefinedIndex`: any FAISS index behind a refiner, with FAISS's own method names.

Every vector that is added and every query is refined before FAISS sees it (a query-only refiner
leaves stored vectors raw). A Python/ONNX transform cannot live inside faiss.IndexPreTransform
(DESIGN.md §3), so the wrapper holds both and persists them together as a bundle. (A linear
refiner can: `LinearRefiner.to_faiss` builds one native faiss.IndexPreTransform instead.)
"""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .checks import as_ids, as_matrix, check_finite, check_k, check_matrix
from .faiss_utils import METRIC_NAMES, METRICS, build_index, metric_code, release_rows, reserve  # noqa: F401
from .persistence import BundleError, read_manifest, save_bundle, verified_path
from .refiner import Refiner, as_input, refiner_from_bytes

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
        return self.refiner.apply_unchecked(as_input(x, self.d, "queries"))

    def refine_documents(self, x) -> np.ndarray:
        """Documents go through the refiner unless it is query-only (then they are stored raw)."""
        x = as_matrix(x, self.d, "x")
        return self.refiner.apply_unchecked(x) if self.refiner.apply_to == "both" else x

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
                "refiner": r.info()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle atomically; the previous bundle in `directory` survives a crash mid-save."""
        save_bundle(directory, self.index, self.refiner.to_bytes(), self.manifest())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = 1, mmap: bool = False) -> "RefinedIndex":
        """Open a bundle, verifying hashes, sizes and dimensions; raises BundleError naming the fault."""
        directory = Path(directory)
        m = read_manifest(directory)
        rinfo = m.get("refiner") or {}
        if not isinstance(rinfo, dict):
            raise BundleError(f"bundle {directory}: the manifest's 'refiner' field is not an object")
        kind = rinfo.get("kind", "onnx")
        data = None
        if kind != "identity" or "refiner" in m["files"]:
            if "refiner" not in m["files"]:
                raise BundleError(f"bundle {directory}: manifest names no refiner file")
            data = verified_path(directory, m["files"]["refiner"], "refiner").read_bytes()
        try:
            refiner = refiner_from_bytes(kind, data, {"d_in": m["d"], **rinfo}, threads=threads,
                                         source=f"bundle {directory}: refiner")
        except ValueError as e:
            raise BundleError(str(e)) from None
        ipath = verified_path(directory, m["files"]["index"], "index")
        try:
            index = faiss.read_index(str(ipath), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError as e:
            raise BundleError(f"bundle {directory}: FAISS cannot read {ipath.name}: "
                              f"{str(e).strip().splitlines()[-1]}") from None
        for what, want, got in (("input dimension", m["d"], refiner.d_in), ("refiner output dimension", m["d_out"], refiner.d_out),
                                ("index dimension", m["d_out"], index.d), ("ntotal", m["ntotal"], index.ntotal)):
            if want != got:
                raise BundleError(f"bundle {directory}: {what} is {got} but the manifest says {want}")
        self = cls(refiner, index, metric=m["metric"])
        self.factory = m.get("factory")
        return self

