"""Evaluation metrics (defined in docs/metrics.md): retrieval quality and ANN fidelity, numpy only.

Two axes, never conflated:

* **Retrieval quality** of a ranking ``I`` (FAISS ``search`` ids, ``-1`` = no result) against
  qrels (nDCG@k, Recall@k, MRR@k; BEIR / pytrec_eval definitions, binary gain) or against labels
  (precision@k, mAP@k).  :func:`per_query_metrics` returns per-query arrays (for
  :func:`paired_bootstrap` and standard deviations); the ``retrieval_metrics_*`` functions average
  them.
* **ANN fidelity** (:func:`knn_recall`) in FAISS's vocabulary: ``1-recall@R`` and ``R-recall@R``.

Ranking conventions, shared by every metric here:

* The ranking is the row order of ``I`` as returned (ties in distance are not re-broken).
* ``-1`` is never relevant; a row narrower than a cutoff ``k`` counts as padded with ``-1``.
* An id repeated within a row counts only at its first position (as a set-based evaluator would).
* Queries without any relevant item are skipped, as trec_eval does; ``n_queries`` says how many
  were evaluated and ``query_index`` (per-query output) which rows they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ..errors import InputError

__all__ = [
    "retrieval_metrics_qrels",
    "retrieval_metrics_labels",
    "per_query_metrics",
    "knn_recall",
    "paired_bootstrap",
    "drop_self",
]

QRELS_FAMILIES = ("ndcg", "recall", "mrr")
LABEL_FAMILIES = ("precision", "map")


def _as_ids(I: np.ndarray) -> np.ndarray:
    I = np.asarray(I)
    if I.ndim != 2:
        raise InputError(f"I must be 2-d (queries, k), got shape {I.shape}")
    return I.astype(np.int64, copy=False)


def _pad(I: np.ndarray, k: int) -> np.ndarray:
    """Pad ``I`` with -1 columns up to width ``k`` (FAISS's "no result")."""
    if I.shape[1] >= k:
        return I
    return np.hstack([I, np.full((I.shape[0], k - I.shape[1]), -1, dtype=I.dtype)])


def _first_occurrence(I: np.ndarray) -> np.ndarray:
    """Bool mask: entry is a real result (not -1) and its id did not occur earlier in the row."""
    order = np.argsort(I, axis=1, kind="stable")  # equal ids keep their row order
    s = np.take_along_axis(I, order, axis=1)
    dup_sorted = np.zeros(I.shape, dtype=bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return (I >= 0) & ~dup


def _row_isin(I: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Bool mask ``M[q, j] = I[q, j] ∈ {ids[t] : rows[t] == q}``, vectorised over all queries.

    Each (row, id) pair becomes one int64 key ``row * base + id``; membership is a sort plus
    ``searchsorted`` (``np.isin`` is several times slower at millions of keys). Ids are compacted
    with ``np.unique`` only if the keys could overflow. -1 and repeats within a row never match.
    """
    keep = ids >= 0
    rows, ids = rows[keep], ids[keep]
    valid = _first_occurrence(I)
    qrow = np.broadcast_to(np.arange(I.shape[0], dtype=np.int64)[:, None], I.shape)[valid]
    res = I[valid]
    base = int(max(ids.max(initial=0), res.max(initial=0))) + 1
    if I.shape[0] * base >= 2**62:
        _, inv = np.unique(np.concatenate([ids, res]), return_inverse=True)
        ids, res, base = inv[: len(ids)], inv[len(ids):], len(inv) + 1
    rel_keys = np.sort(rows * base + ids)
    res_keys = qrow * base + res
    out = np.zeros(I.shape, dtype=bool)
    if len(rel_keys):
        pos = np.minimum(np.searchsorted(rel_keys, res_keys), len(rel_keys) - 1)
        out[valid] = rel_keys[pos] == res_keys
    return out


def _ranked_metrics(
    R: np.ndarray, n_rel: np.ndarray, ks: Sequence[int], families: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-query metrics from a binary relevance matrix ``R`` (queries, ≥max(ks)) and |rel|.

    All rows must have ``n_rel > 0``. Definitions (docs/metrics.md, binary gain):
    precision@k = hits/k, recall@k = hits/|rel|, MRR@k = 1/first hit rank (0 if none),
    nDCG@k = Σ_hits 1/log2(i+1) / Σ_{i≤min(k,|rel|)} 1/log2(i+1),
    mAP@k = Σ_hits precision@i / min(k, |rel|).
    """
    K = max(ks)
    R = R[:, :K]
    ranks = np.arange(1, K + 1)
    disc = 1.0 / np.log2(ranks + 1)
    ideal = np.cumsum(disc)
    hits_cum = np.cumsum(R, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        Rk = R[:, :k]
        hits = hits_cum[:, k - 1]
        n_ideal = np.minimum(k, n_rel)
        for f in families:
            if f == "precision":
                v = hits / k
            elif f == "recall":
                v = hits / n_rel
            elif f == "mrr":
                v = np.where(hits > 0, 1.0 / (np.argmax(Rk, axis=1) + 1), 0.0)
            elif f == "ndcg":
                v = (Rk @ disc[:k]) / ideal[n_ideal - 1]
            elif f == "map":
                v = (Rk * hits_cum[:, :k] / ranks[:k]).sum(axis=1) / n_ideal
            else:
                raise InputError(f"unknown metric family {f!r}")
            out[f"{f}@{k}"] = v.astype(np.float64)
    return out


def per_query_metrics(
    I: np.ndarray,
    qrels: Sequence[np.ndarray] | None = None,
    *,
    query_labels: np.ndarray | None = None,
    db_labels: np.ndarray | None = None,
    n_relevant: np.ndarray | None = None,
    ks: Sequence[int] = (10, 100),
) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics, for paired comparisons and spread (the means call this).

    Give exactly one kind of judgement:

    * ``qrels`` (one array of relevant ids per row of ``I``): keys ``ndcg@k``, ``recall@k``,
      ``mrr@k`` for each k in ``ks``. |rel| = number of distinct relevant ids (-1 ignored).
    * ``query_labels`` + ``db_labels`` (a result is relevant if its label equals the query's):
      keys ``precision@k``, ``map@k``. |rel| = ``n_relevant`` if given, else the number of
      database items carrying the query's label. When queries come from the database, search
      k+1, apply :func:`drop_self` and pass ``n_relevant = count - 1``.

    Every key holds an array over the *evaluated* queries only (|rel| > 0, trec_eval's rule);
    ``query_index`` gives their row numbers in ``I`` and ``n_relevant`` their |rel|, so two
    systems evaluated on the same judgements yield aligned arrays.
    """
    I = _as_ids(I)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise InputError(f"ks must be positive cutoffs, got {ks}")
    m = I.shape[0]
    I = _pad(I, max(ks))[:, : max(ks)]
    if (qrels is None) == (query_labels is None):
        raise InputError("pass either qrels or query_labels/db_labels")
    if qrels is not None:
        if len(qrels) != m:
            raise InputError(f"{len(qrels)} qrels for {m} queries")
        qr = [np.asarray(q, dtype=np.int64).ravel() for q in qrels]
        rows = np.repeat(np.arange(m, dtype=np.int64), [len(q) for q in qr])
        ids = np.concatenate(qr) if qr else np.zeros(0, np.int64)
        keep = ids >= 0
        rows, ids = rows[keep], ids[keep]
        R = _row_isin(I, rows, ids)
        order = np.lexsort((ids, rows))  # |rel| = distinct (row, id) pairs per row
        r, d = rows[order], ids[order]
        new = np.ones(len(r), dtype=bool)
        new[1:] = (r[1:] != r[:-1]) | (d[1:] != d[:-1])
        n_rel = np.bincount(r[new], minlength=m)
        families = QRELS_FAMILIES
    else:
        if db_labels is None:
            raise InputError("query_labels needs db_labels")
        ql, dl = np.asarray(query_labels), np.asarray(db_labels)
        if ql.shape != (m,):
            raise InputError(f"query_labels shape {ql.shape}, expected ({m},)")
        R = _first_occurrence(I) & (dl[np.clip(I, 0, None)] == ql[:, None])
        if n_relevant is None:
            uniq, counts = np.unique(dl, return_counts=True)
            pos = np.minimum(np.searchsorted(uniq, ql), len(uniq) - 1)
            n_rel = np.where(uniq[pos] == ql, counts[pos], 0)
        else:
            n_rel = np.asarray(n_relevant, dtype=np.int64)
            if n_rel.shape != (m,):
                raise InputError(f"n_relevant shape {n_rel.shape}, expected ({m},)")
        families = LABEL_FAMILIES
    n_rel = np.asarray(n_rel, dtype=np.int64)
    if np.any(R.sum(axis=1) > n_rel):
        raise InputError(
            "more relevant results than n_relevant for some query "
            "(query itself in the results? use drop_self, or fix n_relevant)"
        )
    ev = np.flatnonzero(n_rel > 0)
    out = _ranked_metrics(R[ev], n_rel[ev], ks, families)
    out["query_index"] = ev
    out["n_relevant"] = n_rel[ev]
    return out


def _means(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    ev = per_query["query_index"]
    out = {
        k: (float(v.mean()) if len(ev) else float("nan"))
        for k, v in per_query.items()
        if k not in ("query_index", "n_relevant")
    }
    out["n_queries"] = int(len(ev))
    return out


def retrieval_metrics_qrels(
    I: np.ndarray, qrels: Sequence[np.ndarray], ks: Sequence[int] = (10, 100)
) -> dict[str, float]:
    """Mean nDCG@k, Recall@k and MRR@k over queries with ≥1 relevant id (pytrec_eval/BEIR, binary).

    ``I``: (m, k) int ranked ids per query, -1 = no result (as FAISS returns); ``qrels[i]``:
    relevant ids of query i. With the default ``ks=(10, 100)`` the keys include
    ``'ndcg@10', 'recall@10', 'recall@100', 'mrr@10'`` (plus ``ndcg@100``, ``mrr@100``).
    Queries with no relevant id are skipped (trec_eval's rule); ``'n_queries'`` is the number
    averaged over. MRR@k equals trec_eval ``recip_rank`` on the run truncated to k.
    """
    return _means(per_query_metrics(I, qrels, ks=ks))


def retrieval_metrics_labels(
    I: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ks: Sequence[int] = (10, 100),
    n_relevant: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean precision@k and mAP@k for the label task (relevant = same label as the query).

    mAP@k = Σ_{i≤k, r_i∈rel} precision@i / min(k, |rel|), with |rel| = ``n_relevant`` (default:
    number of ``db_labels`` equal to the query's label). Note: trec_eval's ``map_cut_k`` divides
    by |rel| instead. Default keys: ``'precision@10', 'precision@100', 'map@10', 'map@100'``,
    and ``'n_queries'`` (queries with |rel| > 0). If queries are database items, search k+1,
    :func:`drop_self` and pass ``n_relevant`` = label count - 1.
    """
    return _means(
        per_query_metrics(
            I, query_labels=query_labels, db_labels=db_labels, n_relevant=n_relevant, ks=ks
        )
    )


def knn_recall(
    I_true: np.ndarray, I_pred: np.ndarray, ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """ANN fidelity against exact search, in FAISS's vocabulary (docs/metrics.md).

    For each R in ``ks``:

    * ``'1-recall@R'``: fraction of queries whose true nearest neighbour ``I_true[:, 0]`` is in
      the top R of ``I_pred`` (FAISS benchmarks' ``(I[:, :R] == gt[:, :1]).sum() / nq``).
    * ``'R-recall@R'`` (R > 1; for R = 1 it equals 1-recall@1): intersection measure
      |true top-R ∩ returned top-R| / R, averaged over queries. Equals
      ``faiss.contrib.evaluation.knn_intersection_measure(I_true[:, :R], I_pred[:, :R])`` when
      there is no -1 padding; here -1 never matches (that function counts -1 == -1 as a hit)
      and the computation is vectorised rather than a per-query Python loop.

    Defaults give ``'1-recall@1', '1-recall@10', '10-recall@10'``. Ties in exact distances at
    the R-th position can make an exact index score below 1 on R-recall@R.
    """
    I_true, I_pred = _as_ids(I_true), _as_ids(I_pred)
    if I_true.shape[0] != I_pred.shape[0]:
        raise InputError("I_true and I_pred have different numbers of queries")
    ks = tuple(int(k) for k in ks)
    K = max(ks)
    if I_true.shape[1] < K:
        raise InputError(f"I_true has {I_true.shape[1]} columns, need {K} for R-recall@{K}")
    m = I_true.shape[0]
    P = _pad(I_pred, K)[:, :K]
    nn = I_true[:, :1]
    first_hit = (P == nn) & (nn >= 0)
    rows = np.broadcast_to(np.arange(m, dtype=np.int64)[:, None], (m, K))
    out: dict[str, float] = {}
    for R in ks:
        out[f"1-recall@{R}"] = float(first_hit[:, :R].any(axis=1).mean()) if m else float("nan")
    for R in ks:
        if R > 1:
            hit = _row_isin(P[:, :R], rows[:, :R].ravel(), I_true[:, :R].ravel())
            out[f"{R}-recall@{R}"] = float(hit.sum() / (m * R)) if m else float("nan")
    return out


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, float]:
    """Paired bootstrap over queries of the mean difference ``b - a`` (is a change within noise?).

    ``a``, ``b``: per-query scores of two systems on the same queries (e.g. ``ndcg@10`` from
    :func:`per_query_metrics`). Resamples queries with replacement ``n`` times (seeded).
    Returns ``mean_a``, ``mean_b``, ``diff`` (mean b - a), ``ci_low``/``ci_high`` (percentile
    interval at level ``ci``), ``p_value`` (two-sided, bootstrap sign proportion),
    ``significant`` (interval excludes 0), ``n_queries``, and ``better``/``worse``: the queries
    whose score rose/fell (a recall change of -0.02 on 50 queries is one query lost, not a trend).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise InputError(f"need two non-empty arrays of equal length, got {a.shape}, {b.shape}")
    d = b - a
    m = d.size
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // m)  # bounds memory at ~32 MB of indices per chunk
    boot = np.concatenate(
        [d[rng.integers(0, m, (min(chunk, n - s), m))].mean(axis=1) for s in range(0, n, chunk)]
    )
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    p = min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float(d.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": p,
        "significant": bool(lo > 0 or hi < 0),
        "n_queries": int(m),
        "better": int((d > 0).sum()),
        "worse": int((d < 0).sum()),
    }


def drop_self(I: np.ndarray, self_ids: np.ndarray, k: int | None = None) -> np.ndarray:
    """Remove each query's own id from its result row, shift left and pad with -1.

    For the label task with queries drawn from the database: search k+1, then
    ``drop_self(I, query_db_ids, k)``. Without ``k`` the width is kept (last column -1 where
    self was found); with ``k`` the rows are cut to k columns, so every row has k candidates
    whether or not the (approximate) search returned the query itself.
    """
    I = _as_ids(I)
    s = np.asarray(self_ids, dtype=np.int64).ravel()
    if s.shape != (I.shape[0],):
        raise InputError(f"self_ids shape {s.shape}, expected ({I.shape[0]},)")
    is_self = I == s[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # non-self first, order kept
    out = np.take_along_axis(I, order, axis=1)
    out[np.take_along_axis(is_self, order, axis=1)] = -1
    return out if k is None else out[:, :k]
