"""Training an IVF index's coarse quantizer without flat k-means' nlist-proportional cost.

Flat k-means assigns every training vector to every centroid in each iteration: n·nlist·d
multiply-adds per iteration, so with the usual 64–256 training vectors per list the cost grows as
nlist². Two-level clustering (`faiss.contrib.clustering.two_level_clustering`) first clusters into
√nlist groups, then splits each group into its share of the nlist centroids: about 2·n·√nlist·d
per iteration. bench/scale.py measures both at nlist 4096 on 1M vectors (time and 10-recall@10 at
equal nprobe, bench/results/scale.md); `train_ivf(method="auto")` uses two-level clustering from
`TWO_LEVEL_MIN_NLIST` lists on, where that measurement showed it wins, and flat k-means below.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

TWO_LEVEL_MIN_NLIST = 4096  # measured in bench/scale.py: from here two-level clustering trains much faster
METHODS = ("auto", "flat", "two-level")


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IndexIVF of an index built by a factory without pre-transforms ("IVF4096,PQ16", ...), else None."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def choose(index: faiss.Index, method: str = "auto") -> str:
    """'flat' or 'two-level' for this index: two-level only for a bare IVF with nlist ≥ TWO_LEVEL_MIN_NLIST."""
    if method not in METHODS:
        raise ValueError(f"quantizer training must be one of {METHODS}, got {method!r}")
    ivf = ivf_of(index)
    if method == "flat" or index.is_trained:
        return "flat"
    if ivf is None:
        if method == "two-level":
            raise ValueError(f"two-level quantizer training needs an IVF index without pre-transforms, "
                             f"got {type(faiss.downcast_index(index)).__name__}")
        return "flat"
    if method == "two-level" or ivf.nlist >= TWO_LEVEL_MIN_NLIST:
        return "two-level"
    return "flat"


def train_ivf(index: faiss.Index, x: np.ndarray, method: str = "auto", niter: int = 10, seed: int = 1234) -> str:
    """Train `index` on float32 (n, d) `x`; returns the method used ('flat' or 'two-level').

    two-level: centroids from `two_level_clustering` (√nlist first-level clusters, `niter` iterations
    at the first level, FAISS's Kmeans default at the second) go into the quantizer, then
    `index.train` trains the rest (PQ codebooks, ...) and skips its own k-means because the
    quantizer already holds nlist centroids. flat: `index.train(x)` as FAISS does it.
    """
    how = choose(index, method)
    if index.is_trained:
        return how
    if how == "flat":
        index.train(x)
        return how
    from faiss.contrib.clustering import two_level_clustering

    ivf = ivf_of(index)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < ivf.nlist:
        raise ValueError(f"{x.shape[0]} training vectors for {ivf.nlist} lists: need at least one per list")
    centroids, _ = two_level_clustering(x, int(round(math.sqrt(ivf.nlist))), ivf.nlist,
                                        clustering_niter=niter, seed=seed)
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.train(x)  # quantizer.ntotal == nlist: FAISS keeps these centroids and trains the codes only
    return how
