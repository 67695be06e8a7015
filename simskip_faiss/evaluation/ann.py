"""ANN fidelity in a refined space: recall of an approximate index against exact search there, and
queries/s through `RefinedIndex` (refining included), over a sweep of efSearch / nprobe."""
from __future__ import annotations

import time
from contextlib import contextmanager

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from ..config import INDEX_FACTORY, THREADS
from ..faiss_utils import metric_code
from ..index import RefinedIndex
from ..metrics.ranking import knn_recall


@contextmanager
def faiss_threads(n: int):
    """Run a block with FAISS's OpenMP thread count set to `n`, restoring the caller's setting after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _sweep_param(factory: str) -> tuple[str | None, tuple]:
    f = factory.upper()
    if "HNSW" in f:
        return "efSearch", (16, 32, 64, 128, 256)
    if "IVF" in f:
        return "nprobe", (1, 2, 4, 8, 16, 32, 64)
    return None, (0,)


def ann_sweep(refiner, corpus: np.ndarray, queries: np.ndarray, factory: str = INDEX_FACTORY, metric="ip",
              values=None, threads: int = THREADS, name: str = "refined", k: int = 10, repeats: int = 3) -> list[dict]:
    """Recall against exact search in the refined space, and queries/s through RefinedIndex (refining included)."""
    with faiss_threads(threads):
        return _ann_sweep(refiner, corpus, queries, factory, metric, values, threads, name, k, repeats)


def _ann_sweep(refiner, corpus, queries, factory, metric, values, threads, name, k, repeats) -> list[dict]:
    index = RefinedIndex(refiner, factory, metric)
    if not index.is_trained:
        index.train(corpus)
    index.add(corpus)
    mcode = metric_code(metric)
    docs = refiner.transform(corpus) if refiner.apply_to == "both" else np.ascontiguousarray(corpus, np.float32)
    _, gt = knn_ground_truth(refiner.transform(queries), iter([docs]), k, metric_type=mcode)
    param, default_values = _sweep_param(factory)
    rows = []
    for v in values or default_values:
        if param:
            faiss.ParameterSpace().set_index_parameter(index.index, param, v)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, I = index.search(queries, k)
            best = min(best, time.perf_counter() - t0)
        rows.append({"method": name, "factory": factory, "param": param or "-", "value": v,
                     **knn_recall(gt, I, ks=(1, 10)), "qps": len(queries) / best, "threads": threads})
    return rows


def _ann_table(ann: list[dict]) -> str:
    head = f"{'method':<16} {'index':<10} {'param':<14} {'1-R@1':>7} {'1-R@10':>7} {'10-R@10':>8} {'q/s':>9}"
    lines = [head, "-" * len(head)]
    for a in ann:
        lines.append(f"{a['method']:<16} {a['factory']:<10} {a['param'] + '=' + str(a['value']):<14} "
                     f"{a['1-recall@1']:7.4f} {a['1-recall@10']:7.4f} {a['10-recall@10']:8.4f} {a['qps']:9.0f}")
    return "\n".join(lines)
