"""`RefinedIndex`: any FAISS index behind a refiner, with FAISS's own method names.

Every vector that is added and every query is refined before FAISS sees it (a query-only refiner
leaves stored vectors raw). A Python/ONNX transform cannot live inside faiss.IndexPreTransform
(DESIGN.md §3), so the wrapper holds both and persists them together as a bundle.
"""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .checks import as_ids, as_matrix, check_k, check_matrix
from .persistence import BundleError, read_manifest, save_bundle, verified_path
from .refiner import IdentityRefiner, Refiner

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


class RefinedIndex:
    """A FAISS index that searches in the refined space.

    refiner: a `Refiner`, an `IdentityRefiner`, or a path to an ONNX refiner.
    index: a FAISS index whose dimension is the refiner's output, or a factory string ("HNSW32", "IVF256,Flat").
    metric: "ip" (inner product; cosine with a normalising refiner) or "l2".
    """

    def __init__(self, refiner, index="Flat", metric="ip", chunk_size: int = 65536, progress: bool = False):
        if isinstance(refiner, (str, os.PathLike)):
            refiner = Refiner.load(refiner)
        self.refiner = refiner
        self.metric = metric_code(metric)
        self.chunk_size = int(chunk_size)
        self.progress = progress
        if isinstance(index, str):
            self.factory: str | None = index
            try:
                index = faiss.index_factory(refiner.d_out, index, self.metric)
            except RuntimeError as e:
                raise ValueError(f"FAISS could not build {index!r}: {str(e).strip().splitlines()[-1]}") from None
        else:
            self.factory = None
            if not isinstance(index, faiss.Index):
                raise TypeError(f"index must be a faiss.Index or a factory string, got {type(index).__name__}")
            if index.metric_type != self.metric:
                raise ValueError(f"the index uses metric {METRIC_NAMES.get(index.metric_type, index.metric_type)!r} "
                                 f"but metric={METRIC_NAMES[self.metric]!r} was given")
        if index.d != refiner.d_out:
            raise ValueError(f"refiner outputs {refiner.d_out}-d vectors but the index has dimension {index.d}")
        if (self.metric == faiss.METRIC_INNER_PRODUCT and refiner.apply_to == "both"
                and not refiner.is_identity and not refiner.normalize):
            raise ValueError("an inner-product index needs a refiner that L2-normalises its output; "
                             "this refiner does not (use metric='l2' or export with normalize=True)")
        self.index = index

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
        return self.refiner.apply(as_matrix(x, self.d, "queries"))

    def refine_documents(self, x) -> np.ndarray:
        """Documents go through the refiner unless it is query-only (then they are stored raw)."""
        x = as_matrix(x, self.d, "x")
        return self.refiner.apply(x) if self.refiner.apply_to == "both" else x

    def _chunks(self, x, desc: str):
        n = x.shape[0]
        bar = tqdm(total=n, desc=desc, unit="vec", disable=not self.progress or n <= self.chunk_size)
        for s in range(0, n, self.chunk_size):
            yield s, self.refine_documents(np.asarray(x[s:s + self.chunk_size]))
            bar.update(min(self.chunk_size, n - s))
        bar.close()

    def _check_stream(self, x, name: str = "x") -> np.ndarray:
        """Validate a whole input before anything is stored (all or nothing); large inputs stay uncopied."""
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] > self.chunk_size:
            return check_matrix(x, self.d, name)
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
        """Refine and add vectors; a memmap (np.load(..., mmap_mode="r")) is streamed in chunks of `chunk_size`."""
        x = self._check_stream(x)
        self._ready()
        for _, chunk in self._chunks(x, "add"):
            self.index.add(chunk)

    def add_with_ids(self, x, ids) -> None:
        x = self._check_stream(x)
        ids = as_ids(ids, x.shape[0])
        self._ready()
        for s, chunk in self._chunks(x, "add"):
            try:
                self.index.add_with_ids(chunk, ids[s:s + len(chunk)])
            except RuntimeError as e:
                raise ValueError(f"this FAISS index does not take ids ({type(self.index).__name__}); "
                                 f"build it as 'IDMap,<factory>': {str(e).strip().splitlines()[-1]}") from None

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
        """Write the bundle atomically; the previous bundle in `directory` survives a crash mid-save."""
        save_bundle(directory, self.index, None if self.refiner.is_identity else self.refiner.model_bytes,
                    self.manifest())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = 1, mmap: bool = False) -> "RefinedIndex":
        """Open a bundle, verifying hashes, sizes and dimensions; raises BundleError naming the fault."""
        directory = Path(directory)
        m = read_manifest(directory)
        rinfo = m.get("refiner") or {}
        if rinfo.get("kind") == "identity":
            refiner = IdentityRefiner(int(m["d"]), normalize=bool(rinfo.get("normalize", False)))
        else:
            if "refiner" not in m["files"]:
                raise BundleError(f"bundle {directory}: manifest names no refiner file")
            rpath = verified_path(directory, m["files"]["refiner"], "refiner")
            refiner = Refiner.load(rpath, threads=threads)
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

