"""Coarse quantizer training: which k-means is chosen, and two-level k-means giving a usable IVF index."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from simskip_faiss.quantizer import check_method, train_ivf


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


@pytest.mark.parametrize("codes", ["Flat", "PQ4x4"])
def test_two_level_trains_an_index_as_good_as_flat(codes):
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 16)).astype(np.float32)[rng.integers(0, 40, 6000)]
    x += 0.5 * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat, two = ivf(64, codes=codes), ivf(64, codes=codes)
    assert train_ivf(flat, x, "flat") == "flat" and train_ivf(two, x, "two-level") == "two-level"
    assert two.is_trained and faiss.extract_index_ivf(two).quantizer.ntotal == 64
    assert mse(two, x) <= 1.1 * mse(flat, x)  # close to flat k-means' objective
    found = {}
    for name, index in (("flat", flat), ("two", two)):  # the codes (PQ) were trained too: both take vectors
        index.add(x)
        index.nprobe = 4
        found[name] = (index.search(x, 1)[1][:, 0] == np.arange(len(x))).mean()  # every row: PQ self-recall is noisy
    assert found["two"] >= found["flat"] - 0.05 and found["two"] > (0.9 if codes == "Flat" else 0.2)
    with pytest.raises(ValueError, match="need at least one per list"):
        train_ivf(ivf(64), x[:10], "two-level")


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_two_level_centroids_follow_the_metric_as_flat_training_does(metric):
    """An inner-product IVF trains spherical k-means (FAISS sets cp.spherical): unit-norm centroids; L2 does not."""
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    norms = {}
    for method in ("flat", "two-level"):
        index = faiss.index_factory(16, "IVF64,Flat", metric)
        train_ivf(index, x, method)
        q = faiss.extract_index_ivf(index).quantizer
        norms[method] = np.linalg.norm(q.reconstruct_n(0, q.ntotal), axis=1)
    unit = metric == faiss.METRIC_INNER_PRODUCT
    for method, n in norms.items():
        assert np.allclose(n, 1.0, atol=1e-4) == unit, (method, n.min(), n.max())
