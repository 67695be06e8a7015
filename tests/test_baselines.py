"""Supervised free baselines: the ridge map against numpy's own solution, the LDA map on clustered data, both in reports."""
from __future__ import annotations

import numpy as np
import pytest

from simskip_faiss.evaluation.baselines import lda_candidates, lda_map, ridge_candidates, ridge_query_map, ridge_solutions
from simskip_faiss.datasets import EmbeddingData, make_splits, make_synthetic
from simskip_faiss.evaluation import EvalConfig, evaluate
from simskip_faiss.index import RefinedIndex

FAST = dict(progress=False, bootstrap=200, threads=2, ann_factory=None)


def _pairs(n=400, d=12, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, d))
    M = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    return Q, Q @ M + 0.1 * rng.standard_normal((n, d))


def test_ridge_matches_numpy_and_its_limits():
    Q, D = _pairs()
    d = Q.shape[1]
    for lam in (0.5, 7.0, 300.0):
        want = np.linalg.solve(Q.T @ Q + lam * np.eye(d), Q.T @ D + lam * np.eye(d))
        np.testing.assert_allclose(ridge_solutions(Q, D, [lam])[0], want, rtol=1e-8, atol=1e-10)
    big, zero = ridge_solutions(Q, D, [1e12, 0.0])
    np.testing.assert_allclose(big, np.eye(d), atol=1e-8)  # lam -> inf: the identity
    np.testing.assert_allclose(zero, np.linalg.lstsq(Q, D, rcond=None)[0], atol=1e-8)  # lam -> 0: least squares


def test_ridge_refiner_is_query_only_and_renormalised():
    Q, D = _pairs()
    r = ridge_query_map(Q.astype(np.float32), D.astype(np.float32), 3.0)
    W = np.linalg.solve(Q.T @ Q + 3.0 * np.eye(12), Q.T @ D + 3.0 * np.eye(12))
    x = Q[:5].astype(np.float32)
    want = x @ W
    np.testing.assert_allclose(r.transform(x), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    assert r.apply_to == "queries" and r.metadata["apply_to"] == "queries"
    docs = D[:7].astype(np.float32)
    np.testing.assert_array_equal(RefinedIndex(r, "Flat", "l2").refine_documents(docs), docs)  # documents stay raw
    cands = ridge_candidates(Q.astype(np.float32), D.astype(np.float32))
    assert cands[0].metadata["lam"] == float("inf") and np.array_equal(cands[0].A, np.eye(12, dtype=np.float32))
    lams = [c.metadata["lam"] for c in cands]
    assert lams == sorted(lams, reverse=True)  # most regularised first: ties on validation go to it


def _anisotropic(n=1500, d=16, n_classes=5, seed=0):
    """Class centres differ in 3 dimensions; the other 13 carry large label-free noise."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_classes, d))
    centres[:, :3] = rng.standard_normal((n_classes, 3))
    y = rng.integers(0, n_classes, n)
    x = centres[y] + np.concatenate([0.3 * rng.standard_normal((n, 3)), 1.2 * rng.standard_normal((n, d - 3))], 1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def _map_at_k(x, y, rows, k=50):
    """Label mAP@k of `rows` as queries over all of x by brute force (self excluded), relevant = same label."""
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    hits = y[top] == y[rows][:, None]
    prec = np.cumsum(hits, 1) / np.arange(1, k + 1)
    n_rel = np.minimum(np.bincount(y)[y[rows]] - 1, k)
    return float(((prec * hits).sum(1) / n_rel).mean())


def test_lda_improves_label_retrieval_and_stays_full_rank():
    x, y = _anisotropic()
    train, test = np.arange(1000), np.arange(1000, 1500)
    lda = lda_map(x[train], y[train], shrinkage=0.1, weight=1.0)
    raw_map = _map_at_k(x, y, test)
    lda_map_ = _map_at_k(lda.transform(x), y, test)
    assert lda_map_ > raw_map + 0.1, (raw_map, lda_map_)
    assert lda.d_out == 16 + 4 and np.linalg.matrix_rank(lda.A) == 16  # identity part kept: full rank
    centred = lda_map(x[train], y[train], 0.1, 0.0).transform(x)
    want = x - x[train].mean(0)
    np.testing.assert_allclose(centred, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    cands = lda_candidates(x[train], y[train])
    assert cands[0].metadata["weight"] == 0 and all(c.metadata["weight"] > 0 for c in cands[1:])
    with pytest.raises(ValueError, match="at least 2 classes"):
        lda_map(x[:10], np.zeros(10), 0.1, 1.0)


def test_baselines_appear_in_the_report_with_independent_values():
    """ridge's test nDCG@10, recomputed here from the chosen lam with numpy alone (single relevant document)."""
    data = make_synthetic(n=1200, d=16, n_queries=600, seed=3, noise=1.5)
    rep = evaluate(data, None, EvalConfig(**FAST))
    assert {"ridge", "lda"} <= set(rep.methods())
    meta = rep.info["baselines"]["ridge"]
    assert meta["apply_to"] == "queries" and meta["chosen_on"] == "val pairs:ndcg@10"
    best = max(meta["val_scores"], key=lambda n: meta["val_scores"][n]["pairs:ndcg@10"])
    assert meta["name"] == best
    train = data.split_queries("train")
    Q, D = data.queries[train].astype(np.float64), data.corpus[[data.qrels[q][0] for q in train]].astype(np.float64)
    lam = meta["lam"]
    W = np.eye(16) if lam == float("inf") else np.linalg.solve(Q.T @ Q + lam * np.eye(16), Q.T @ D + lam * np.eye(16))
    test = data.split_queries("test")
    mapped = data.queries[test] @ W
    mapped /= np.linalg.norm(mapped, axis=1, keepdims=True)
    sims = mapped @ data.corpus.T
    target = np.array([data.qrels[q][0] for q in test])
    rank = (sims > sims[np.arange(len(test)), target][:, None]).sum(1)  # 0-based rank of the relevant document
    want = np.where(rank < 10, 1 / np.log2(rank + 2), 0).mean()
    assert rep.value("ridge", "pairs", "ndcg@10") == pytest.approx(want, abs=1e-4)
    lda = rep.info["baselines"]["lda"]
    if lda["val_raw"]:  # the chosen candidate kept pairs nDCG@10 >= raw on val
        assert lda["val_scores"][lda["name"]]["pairs:ndcg@10"] >= lda["val_raw"]["pairs:ndcg@10"]


def test_supervised_baselines_need_their_supervision():
    x, y = _anisotropic(n=600)
    split = make_splits(len(x), seed=0)
    only_corpus = evaluate(EmbeddingData("c", x, split), None, EvalConfig(**{**FAST, "ann_factory": "Flat"}))
    assert only_corpus.info["baselines"] == {}
    labelled = evaluate(EmbeddingData("l", x, split, labels=y), None, EvalConfig(**FAST))
    assert "lda" in labelled.methods() and "ridge" not in labelled.methods()
    assert labelled.value("lda", "labels", "map@100") > labelled.value("raw", "labels", "map@100")
    assert labelled.info["baselines"]["lda"]["chosen_on"] == "val labels:map@100"
