"""Scoring retrieval: which queries a split holds, each query's metrics from a FAISS-style search, and
the rule that decides what ships from those metrics.

The one place the label and pair tasks are scored, for the evaluation report, the guard, the main job's
choice and the document step (nudge.py): `task_queries` (query ids per task), `score` (per-query metrics
of a search), `label_relevant` (how many rows a label query can find), `seen_queries` (pair queries
whose documents have training queries). And the one shipping rule, for the guard (which alpha and
checkpoint, or the identity) and `evaluation.choose_refiner` (which refiner): `judge` (feasible, and
the objective), `ship` (which candidate), `within_noise` (a gain its interval cannot tell from 0).
Numpy and the metrics module only.
"""
from __future__ import annotations

import numpy as np

from ..datasets import EmbeddingData, answered_rows
from .ranking import drop_self, per_query_metrics

LABEL_METRICS = ("precision@10", "map@100")
PAIR_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def task_queries(data: EmbeddingData, split: str, max_queries: int | None, seed: int = 0) -> dict:
    """Query ids per task for a split (seeded subsample when capped)."""
    rng = np.random.default_rng(seed)
    out = {}
    if data.labels is not None:
        rows = data.split_rows(split)
        out["labels"] = np.sort(rng.choice(rows, max_queries, replace=False)) if max_queries and len(rows) > max_queries else rows
    if data.queries is not None and data.qrels is not None:
        q = data.split_queries(split)
        out["pairs"] = np.sort(rng.choice(q, max_queries, replace=False)) if max_queries and len(q) > max_queries else q
    return out


def seen_queries(data: EmbeddingData, qids: np.ndarray | None) -> np.ndarray | None:
    """Per query of `qids`: does one of its relevant documents have a training query? (None without pairs.)"""
    if qids is None or data.qrels is None:
        return None
    answered = answered_rows(data, "train")
    return np.array([bool(answered[data.qrels[i]].any()) for i in qids], dtype=bool)


def label_relevant(labels: np.ndarray, rows: np.ndarray, db_rows: np.ndarray | None = None) -> np.ndarray:
    """Per label query (corpus `rows`): how many other rows carry its label, among `db_rows` (default
    all; a query's own row must be among them). 0 for an unlabelled row: such a query is not scored."""
    held = labels if db_rows is None else labels[db_rows]
    counts = np.bincount(held[held >= 0], minlength=int(labels.max()) + 1)
    ql = labels[rows]
    return np.where(ql >= 0, counts[np.maximum(ql, 0)] - 1, 0)


def score(index, data: EmbeddingData, queries: dict, k: int = 100, vectors: dict | None = None,
          db_rows: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-query metrics for each task, searching `index` (anything with FAISS's `search`).

    Query vectors come from `data` (a RefinedIndex refines them) unless `vectors` gives them per
    task, already transformed. Label queries are corpus rows: each one's own row is dropped.
    `db_rows`: the corpus rows `index` holds, when not all (ids are still corpus rows); a label
    query's relevant rows are counted among them.
    """
    out, vectors = {}, vectors or {}
    k = min(k, index.ntotal - 1)
    if "labels" in queries:
        rows = queries["labels"]
        _, I = index.search(vectors.get("labels", np.asarray(data.corpus[rows])), k + 1)
        I = drop_self(I, rows, k)
        out["labels"] = per_query_metrics(I, query_labels=data.labels[rows], db_labels=data.labels,
                                          n_relevant=label_relevant(data.labels, rows, db_rows), ks=(10, 100))
    if "pairs" in queries:
        qids = queries["pairs"]
        _, I = index.search(vectors.get("pairs", data.queries[qids]), k)
        out["pairs"] = per_query_metrics(I, [data.qrels[i] for i in qids], ks=(10, 100))
    return out


def judge(metrics: dict[str, float], raw: dict[str, float], tolerance: float,
          protected=None) -> tuple[bool, float]:
    """(feasible, objective) of a candidate's mean validation `metrics` against `raw`'s.

    Feasible: no `protected` metric (default: every one) below raw by more than `tolerance`. Objective:
    the mean relative change over raw of every metric, (m - raw) / raw, so that metrics on different
    scales count alike.
    """
    feasible = all(metrics[k] >= raw[k] - tolerance for k in (metrics if protected is None else protected))
    return feasible, float(np.mean([(metrics[k] - raw[k]) / max(raw[k], 1e-9) for k in metrics]))


def ship(candidates: list[dict], identity: bool) -> int | None:
    """Index of the candidate that ships: the best "objective" among the "feasible" ones, the first on ties.

    identity=True (the guard, whose alternative is the raw vectors): None, i.e. ship the identity, when no
    candidate is feasible or the best one does not gain (objective <= 0). identity=False (choosing among
    refiners that each passed their own guard: one of them ships): when none is feasible, the best of all.
    """
    feasible = [i for i, c in enumerate(candidates) if c["feasible"]]
    if identity:
        best = max(feasible, key=lambda i: candidates[i]["objective"], default=None)
        return None if best is None or candidates[best]["objective"] <= 0 else best
    return max(feasible or range(len(candidates)), key=lambda i: candidates[i]["objective"])


def within_noise(interval: dict) -> bool:
    """True for a gain's paired-bootstrap record (the guard's `Guard.interval`: the objective's interval,
    and `gains`, the metrics whose interval lies above 0) where neither the objective's nor any metric's
    interval lies above 0: validation cannot tell the gain from noise. False for {} (nothing measured)."""
    return bool(interval) and interval["ci_low"] <= 0 and not interval["gains"]
