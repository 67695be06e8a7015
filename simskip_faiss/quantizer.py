"""Training an IVF index's coarse quantizer: flat k-means (FAISS's own), or two-level k-means.

Flat k-means assigns every training vector to every centroid in each iteration: n·nlist·d
multiply-adds per iteration, so with the usual 64–256 training vectors per list the cost grows as
nlist². Two-level clustering (`faiss.contrib.clustering.two_level_clustering`) first clusters into
√nlist groups, then splits each group into its share of the nlist centroids: about n·√nlist·d per
iteration. bench/scale.py measured both, and cheaper k-means variants, for IVF4096 on 1M vectors
(bench/results/scale.md): two-level took ~13× fewer CPU-seconds than flat but lost 0.049–0.064
of 10-recall@10 at equal nprobe, because no centroid can cross its first-level cluster's border. None
of the variants that were measured beside it (flat Lloyd steps after two-level, assignment by an
IVF or HNSW index over the centroids, by the centroids nearest each vector's own, FAISS's
SuperKMeans, k-means on a sample) was both ≥ 3× cheaper and within 0.01 of flat's recall. Two-level
is a trade, not a win, so flat k-means stays the default; choose "two-level" when training time is
the bottleneck (nlist in the tens of thousands) and a higher nprobe can buy the recall back.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

METHODS = ("flat", "two-level")


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IndexIVF of an index built by a factory without pre-transforms ("IVF4096,PQ16", ...), else None."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def check_method(index: faiss.Index, method: str) -> None:
    """Fail early on an unknown method, or two-level for an index it cannot train."""
    if method not in METHODS:
        raise ValueError(f"quantizer training must be one of {METHODS}, got {method!r}")
    if method == "two-level" and not index.is_trained and ivf_of(index) is None:
        raise ValueError(f"two-level quantizer training needs an IVF index without pre-transforms, "
                         f"got {type(faiss.downcast_index(index)).__name__}")


def train_ivf(index: faiss.Index, x: np.ndarray, method: str = "flat", niter: int = 10, seed: int = 1234) -> str:
    """Train `index` on float32 (n, d) `x` with `method`; returns it ('given' if already trained).

    two-level: centroids from `two_level_clustering` (√nlist first-level clusters, `niter` iterations
    at the first level, FAISS's Kmeans default at the second) go into the quantizer, then
    `index.train` trains the rest (PQ codebooks, ...) and skips its own k-means because the
    quantizer already holds nlist centroids. flat: `index.train(x)` as FAISS does it.
    """
    check_method(index, method)
    if index.is_trained:
        return "given"
    if method == "flat":
        index.train(x)
        return method
    from faiss.contrib.clustering import two_level_clustering

    ivf = ivf_of(index)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < ivf.nlist:
        raise ValueError(f"{x.shape[0]} training vectors for {ivf.nlist} lists: need at least one per list")
    # spherical for inner product, as FAISS's own IVF training does (IndexIVF sets cp.spherical)
    centroids, _ = two_level_clustering(x, int(round(math.sqrt(ivf.nlist))), ivf.nlist, clustering_niter=niter,
                                        seed=seed, spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT)
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.train(x)  # quantizer.ntotal == nlist: FAISS keeps these centroids and trains the codes only
    return method
