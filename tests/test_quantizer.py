"""Coarse quantizer training: which k-means is chosen, and the cheap ones (two-level, mini-batch) giving a usable IVF index."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from simskip_faiss.scale.quantizer import check_method, minibatch_kmeans, train_ivf


def ivf(nlist: int, d: int = 16, codes: str = "Flat") -> faiss.Index:
    return faiss.index_factory(d, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)


def test_method_checked_before_any_work():
    pre = faiss.index_factory(16, "PCA8,IVF64,Flat")
    with pytest.raises(ValueError, match="without pre-transforms"):
        train_ivf(pre, np.ones((100, 16), np.float32), "two-level")
    with pytest.raises(ValueError, match="must be one of"):
        check_method(ivf(64), "hnsw")
    check_method(pre, "flat")
    assert not pre.is_trained


def mse(index: faiss.Index, x: np.ndarray) -> float:
    """Mean squared distance of each vector to its nearest centroid (the k-means objective)."""
    q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    c = q.reconstruct_n(0, q.ntotal)
    d, _ = faiss.knn(x, c, 1)
    return float(d.mean())


@pytest.mark.parametrize("method", ["two-level", "mini-batch"])
@pytest.mark.parametrize("codes", ["Flat", "PQ4x4"])
def test_cheap_kmeans_trains_an_index_as_good_as_flat(codes, method):
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 16)).astype(np.float32)[rng.integers(0, 40, 6000)]
    x += 0.5 * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat, two = ivf(64, codes=codes), ivf(64, codes=codes)
    assert train_ivf(flat, x, "flat") == "flat" and train_ivf(two, x, method) == method
    assert two.is_trained and faiss.extract_index_ivf(two).quantizer.ntotal == 64
    assert mse(two, x) <= 1.1 * mse(flat, x)  # close to flat k-means' objective
    found = {}
    for name, index in (("flat", flat), ("two", two)):  # the codes (PQ) were trained too: both take vectors
        index.add(x)
        index.nprobe = 4
        found[name] = (index.search(x, 1)[1][:, 0] == np.arange(len(x))).mean()  # every row: PQ self-recall is noisy
    assert found["two"] >= found["flat"] - 0.05 and found["two"] > (0.9 if codes == "Flat" else 0.2)
    with pytest.raises(ValueError, match="need at least one per list"):
        train_ivf(ivf(64), x[:10], method)


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_two_level_centroids_follow_the_metric_as_flat_training_does(metric):
    """An inner-product IVF trains spherical k-means (FAISS sets cp.spherical): unit-norm centroids; L2 does not."""
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    norms = {}
    for method in ("flat", "two-level", "mini-batch"):
        index = faiss.index_factory(16, "IVF64,Flat", metric)
        train_ivf(index, x, method)
        q = faiss.extract_index_ivf(index).quantizer
        norms[method] = np.linalg.norm(q.reconstruct_n(0, q.ntotal), axis=1)
    unit = metric == faiss.METRIC_INNER_PRODUCT
    for method, n in norms.items():
        assert np.allclose(n, 1.0, atol=1e-4) == unit, (method, n.min(), n.max())


@pytest.mark.parametrize("spherical", [False, True])
def test_minibatch_kmeans_step_is_the_running_mean_computed_by_hand(spherical):
    """decay 1, one batch of every row: each centroid = (its start + the rows assigned to it) / (1 + count),
    assignment by brute force in numpy (inner product when spherical, else L2); the direction when spherical."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k, seed = 12, 3
    got = minibatch_kmeans(x, k, passes=1, per_centroid=500 // k + 1, decay=1.0, spherical=spherical, seed=seed,
                           min_steps=1)
    start = x[np.random.default_rng(seed).choice(len(x), k, replace=False)].astype(np.float64)
    xd = x.astype(np.float64)
    a = (xd @ start.T).argmax(1) if spherical else ((xd[:, None] - start[None]) ** 2).sum(-1).argmin(1)
    sums = start + np.stack([xd[a == j].sum(0) for j in range(k)])
    want = (sums / np.linalg.norm(sums, axis=1, keepdims=True) if spherical
            else sums / (1 + np.bincount(a, minlength=k))[:, None])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_minibatch_kmeans_refuses_bad_settings():
    x = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        minibatch_kmeans(x, 11)
    with pytest.raises(ValueError, match="0 < decay <= 1"):
        minibatch_kmeans(x, 2, decay=0.0)
