"""What a refiner learns from besides the corpus itself: labels and query->document pairs (`Supervision`),
checked against the corpus before training (`_check_supervision`), and the pairs held out to score the
default evaluator on (`_held_out_pairs`). Numpy only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..checks import as_matrix, check_matrix, load_npy
from ..config import TrainConfig
from ..datasets import answer_pairs
from ..errors import InputError


@dataclass
class Supervision:
    """Optional training signals besides the corpus itself (all row ids index the corpus)."""

    labels: np.ndarray | None = None        # (n,) int64 per corpus row; < 0 = unlabelled
    queries: np.ndarray | None = None       # (m, d) float32
    pair_query: np.ndarray | None = None    # (p,) query row of each positive pair
    pair_doc: np.ndarray | None = None      # (p,) corpus row of each positive pair

    @classmethod
    def from_qrels(cls, queries: np.ndarray | None, qrels: list[np.ndarray] | None, labels: np.ndarray | None = None,
                   query_ids: np.ndarray | None = None) -> "Supervision":
        """Pairs (query, relevant document) of `query_ids` (default: every query) and the labels as given."""
        if queries is None or qrels is None:
            return cls(labels=labels)
        ids = np.arange(len(qrels)) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
        q, d = answer_pairs(qrels, ids)
        return cls(labels=labels, queries=queries, pair_query=q, pair_doc=d)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((np.asarray(self.labels) >= 0).any())

    @property
    def has_pairs(self) -> bool:
        return self.queries is not None and self.pair_query is not None and len(self.pair_query) > 0


def _check_supervision(cfg: TrainConfig, sup: Supervision, n: int, d: int) -> Supervision:
    if cfg.label_weight > 0:
        labels = np.asarray(sup.labels)
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise InputError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        sup.labels = labels.astype(np.int64)
        classes, counts = np.unique(sup.labels[sup.labels >= 0], return_counts=True)  # any ids: no bincount
        if len(classes) < 2:
            raise InputError(f"labels have {len(classes)} class{'es' if len(classes) != 1 else ''} among the "
                             "training rows; label training needs at least 2 (pass label_weight=0, on the command "
                             "line --label-weight 0, to train without them)")
        if counts.max() < 2:
            raise InputError(f"no label is shared by two training rows ({len(classes)} labels, one row each): label "
                             "training learns from rows of the same label (pass label_weight=0, on the command line "
                             "--label-weight 0, to train without them)")
    if cfg.pair_weight > 0:
        sup.queries = as_matrix(sup.queries, d, "queries")
        sup.pair_query = np.asarray(sup.pair_query, dtype=np.int64)
        sup.pair_doc = np.asarray(sup.pair_doc, dtype=np.int64)
        if len(sup.pair_query) != len(sup.pair_doc):
            raise InputError("pair_query and pair_doc differ in length")
        if len(sup.pair_query) < 2:
            raise InputError(f"need at least 2 query->document pairs for training, got {len(sup.pair_query)}")
        if sup.pair_doc.min() < 0 or sup.pair_doc.max() >= n:
            raise InputError(f"pair documents must be corpus rows in [0, {n})")
        if sup.pair_query.min() < 0 or sup.pair_query.max() >= len(sup.queries):
            raise InputError(f"pair queries must be rows in [0, {len(sup.queries)})")
    return sup


def _held_out_pairs(pair_query: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) pair ids: every pair of a seeded `fraction` of the queries is held out
    (at least one query, and never all of them); with one query, nothing is held out."""
    queries = np.unique(pair_query)
    if len(queries) < 2:
        return np.arange(len(pair_query)), np.zeros(0, np.int64)
    n_val = min(len(queries) - 1, max(1, int(round(fraction * len(queries)))))
    held = np.isin(pair_query, np.random.default_rng(seed).permutation(queries)[:n_val])
    return np.flatnonzero(~held), np.flatnonzero(held)


def _corpus(corpus) -> np.ndarray:
    """Accept an array or a .npy path (memory-mapped: never copied whole into memory)."""
    if isinstance(corpus, (str, os.PathLike)):
        corpus = load_npy(corpus, "corpus")
    corpus = check_matrix(corpus, name="corpus")
    if corpus.shape[0] < 4:
        raise InputError(f"corpus has {corpus.shape[0]} vectors; training needs at least 4")
    return corpus
