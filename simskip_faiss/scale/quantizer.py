"""Training an IVF index's coarse quantizer: mini-batch k-means (the default), FAISS's flat k-means, or two-level.

Flat k-means assigns every training vector to every centroid in each of its 10 iterations:
n·nlist·d multiply-adds per iteration, so with the usual 64–256 training vectors per list the cost
grows as nlist². bench/scale.py measured cheaper trainings for IVF4096 on 1M vectors
(bench/results/scale.md; target: ≥ 3× fewer CPU-seconds with 10-recall@10 within 0.01 at equal
nprobe):

- mini-batch (`minibatch_kmeans`, the default of `build_index` / `spark-build`): exact assignment of
  small fresh batches (10 vectors per list), each centroid a decaying sum of what was assigned to it,
  2 passes over the data instead of flat's 10, with recall at or above flat's (centroids move after
  every batch, not once per pass): it meets the target (numbers in scale.md). With few vectors per
  list it takes more passes (at least 48 batches, at most flat's 10 passes): on WordNet 20k and
  synthetic 100k-300k sets with 78-293 vectors per list it stayed within 0.0015 of flat's recall;
- two-level (`faiss.contrib.clustering.two_level_clustering`: √nlist groups, then each split into
  its share of the lists): ~13× fewer CPU-seconds but 0.05–0.06 lower recall, because no centroid
  can cross its group's border — the cheapest, when a higher nprobe can buy the recall back;
- flat: FAISS's own `index.train`.
None of the other variants measured (flat Lloyd steps after two-level, assignment by an IVF or HNSW
index over the centroids, by the centroids nearest each vector's own, FAISS's SuperKMeans, k-means on
a fixed sample) met the target.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
from ..errors import InputError

METHODS = ("flat", "two-level", "mini-batch")


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IndexIVF of an index built by a factory without pre-transforms ("IVF4096,PQ16", ...), else None."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def check_method(index: faiss.Index, method: str) -> None:
    """Fail early on an unknown method, or a cheap k-means (two-level, mini-batch) for an index it cannot train."""
    if method not in METHODS:
        raise InputError(f"quantizer training must be one of {METHODS}, got {method!r}")
    if method != "flat" and not index.is_trained and ivf_of(index) is None:
        raise InputError(f"{method} quantizer training needs an IVF index without pre-transforms, "
                         f"got {type(faiss.downcast_index(index)).__name__}")


def train_ivf(index: faiss.Index, x: np.ndarray, method: str = "flat", niter: int = 10, seed: int = 1234) -> str:
    """Train `index` on float32 (n, d) `x` with `method`; returns it ('given' if already trained).

    mini-batch: centroids from `minibatch_kmeans`; two-level: from `two_level_clustering` (√nlist
    first-level clusters, `niter` iterations at the first level, FAISS's Kmeans default at the
    second). Either way (spherical for inner product) they go into the quantizer, then `index.train`
    trains the rest (PQ codebooks, ...) and skips its own k-means because the quantizer already
    holds nlist centroids. flat: `index.train(x)` as FAISS does it.
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
        raise InputError(f"{x.shape[0]} training vectors for {ivf.nlist} lists: need at least one per list")
    # spherical for inner product, as FAISS's own IVF training does (IndexIVF sets cp.spherical)
    spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    if method == "mini-batch":
        centroids = minibatch_kmeans(x, ivf.nlist, spherical=spherical, seed=seed)
    else:
        centroids, _ = two_level_clustering(x, int(round(math.sqrt(ivf.nlist))), ivf.nlist, clustering_niter=niter,
                                            seed=seed, spherical=spherical)
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.train(x)  # quantizer.ntotal == nlist: FAISS keeps these centroids and trains the codes only
    return method


def minibatch_kmeans(x: np.ndarray, k: int, passes: float = 2.0, per_centroid: int = 10, decay: float = 0.8,
                     spherical: bool = False, seed: int = 1234, min_steps: int = 48,
                     max_passes: float = 10) -> np.ndarray:
    """k centroids of float32 (n, d) `x` by mini-batch k-means with forgetting; returns (k, d) float32.

    Each step assigns a fresh random batch of `per_centroid`·k vectors to the nearest centroid (exact,
    `faiss.IndexFlatIP`/`L2`), then every centroid becomes the mean (the direction, if `spherical`) of
    a decaying sum of the vectors ever assigned to it: old sums and counts are multiplied by `decay`
    each step, so assignments made against early, poor centroids fade out instead of anchoring the
    result (with decay 1, plain running means, it stalls). `passes`·n vectors are assigned in all, so
    it costs `passes` flat Lloyd iterations; centroids move after every small batch rather than once
    per pass, which is why fewer passes reach flat k-means' objective (bench/results/scale.md). At
    least `min_steps` batches run (at most `max_passes` passes, flat k-means' 10 iterations): with few
    vectors per list, a couple of passes are too few steps (100k vectors, 1,024 lists: 24 steps lost
    0.01-0.02 of recall against flat; 48 steps gained 0.004-0.011), and there flat is cheap anyway.
    A centroid no batch reaches keeps its starting vector (one of `x`'s rows, drawn without replacement).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 0 < k <= n:
        raise InputError(f"k-means needs 1 <= k <= n, got k={k} for n={n} vectors")
    if not (0 < decay <= 1 and passes > 0 and per_centroid > 0 and min_steps > 0 and max_passes > 0):
        raise InputError(f"need 0 < decay <= 1 and positive passes, per_centroid, min_steps and max_passes, got "
                         f"{decay}, {passes}, {per_centroid}, {min_steps}, {max_passes}")
    rng = np.random.default_rng(seed)
    size = min(n, per_centroid * k)
    centroids = x[rng.choice(n, k, replace=False)]
    sums, counts = centroids.astype(np.float64), np.ones(k)
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    per_pass = n / size  # batches in one pass over x
    steps = max(1, min(max(min_steps, round(passes * per_pass)), round(max_passes * per_pass)))
    for _ in range(steps):
        batch = x[np.sort(rng.choice(n, size, replace=False))]
        index.reset()
        index.add(centroids)
        assign = index.search(batch, 1)[1][:, 0]
        c = np.bincount(assign, minlength=k)
        used = c > 0
        sums *= decay
        counts *= decay
        sums[used] += np.add.reduceat(batch[np.argsort(assign, kind="stable")].astype(np.float64),
                                      (np.cumsum(c) - c)[used], axis=0)
        counts += c
        means = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-30) if spherical
                 else sums / counts[:, None])
        centroids = np.ascontiguousarray(means, dtype=np.float32)
    return centroids
