"""The embedding container every stage reads (`EmbeddingData`), its train/val/test splits and the two
query protocols, and the (query, document) answer pairs its qrels hold.

Splits are made per *item* (a WordNet synset, a corpus row) so that nothing used to train a refiner is a
test query: a query inherits the split of the item it belongs to (docs/evaluation.md), unless the
shared-corpus protocol splits the queries on their own (:func:`shared_corpus`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..checks import as_matrix
from ..errors import InputError

__all__ = ["SPLITS", "DEFAULT_FRACTIONS", "PROTOCOLS", "EmbeddingData", "shared_corpus", "answer_pairs",
           "answered_rows", "make_splits"]

SPLITS = ("train", "val", "test")  # split codes 0, 1, 2
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
# How queries get their split: "disjoint" inherits the split of their document, "shared" draws its own.
PROTOCOLS = ("disjoint", "shared")


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _as_vectors(x: Any, field_name: str) -> np.ndarray:
    """Return ``x`` as a finite, non-empty, C-contiguous float32 (rows, dim) array, or raise ValueError."""
    try:
        return as_matrix(x, name=field_name)
    except TypeError as e:  # the datasets report every bad field as a ValueError
        raise InputError(str(e)) from None


def _as_split(s: Any, n: int, field_name: str) -> np.ndarray:
    s = np.asarray(s)
    if s.shape != (n,):
        raise InputError(f"{field_name}: expected shape ({n},), got {s.shape}")
    if s.dtype.kind not in "iu" or (n and (s.min() < 0 or s.max() > 2)):
        raise InputError(f"{field_name}: values must be integer split codes 0/1/2 (train/val/test)")
    return s.astype(np.int8)


@dataclass
class EmbeddingData:
    """A corpus to index plus the supervision that evaluates (and may train) a refiner."""

    name: str
    corpus: np.ndarray                     # (n, d) float32, C-contiguous: the indexed documents
    corpus_split: np.ndarray               # (n,) int8 in {0,1,2}: train/val/test
    labels: np.ndarray | None = None       # (n,) int64 label per corpus row (an index into label_names), or None
    label_names: list[str] | None = None
    queries: np.ndarray | None = None      # (m, d) float32
    query_split: np.ndarray | None = None  # (m,) int8
    qrels: list[np.ndarray] | None = None  # len m; sorted int64 relevant corpus row ids (binary)
    corpus_text: list[str] | None = None   # optional, for inspection
    query_text: list[str] | None = None
    info: dict = field(default_factory=dict)  # provenance: source, model, subset, seed, cache key...

    def __post_init__(self) -> None:
        """Validate and normalise dtypes, so every consumer can rely on the documented shapes."""
        if not isinstance(self.name, str) or not self.name:
            raise InputError("name: must be a non-empty string")
        self.corpus = _as_vectors(self.corpus, "corpus")
        n, d = self.corpus.shape
        self.corpus_split = _as_split(self.corpus_split, n, "corpus_split")
        if self.labels is not None:
            lab = np.asarray(self.labels)
            if lab.shape != (n,):
                raise InputError(f"labels: expected shape ({n},) (one per corpus row), got {lab.shape}")
            if lab.dtype.kind not in "iu":
                raise InputError(f"labels: expected integers, got dtype {lab.dtype}")
            if n and lab.min() < 0:
                raise InputError("labels: must be non-negative")
            self.labels = lab.astype(np.int64)
            if self.label_names is None and n and self.labels.max() >= n:
                # sparse ids (product ids ~1e12, say): counted per label (np.bincount) they would need
                # memory for every id up to the largest; re-indexed to 0..L-1, their values kept as names
                uniq, inv = np.unique(self.labels, return_inverse=True)
                self.labels, self.label_names = inv.reshape(-1).astype(np.int64), [str(int(u)) for u in uniq]
            if self.label_names is not None and n and self.labels.max() >= len(self.label_names):
                raise InputError(f"label_names: {len(self.label_names)} names but labels go up to "
                                 f"{int(self.labels.max())}")
        elif self.label_names is not None:
            raise InputError("label_names: given without labels")
        if self.queries is None:
            for f in ("query_split", "qrels", "query_text"):
                if getattr(self, f) is not None:
                    raise InputError(f"{f}: given without queries")
        else:
            self.queries = _as_vectors(self.queries, "queries")
            m, dq = self.queries.shape
            if dq != d:
                raise InputError(f"queries: dimension {dq} differs from corpus dimension {d}")
            if self.query_split is None:
                raise InputError("query_split: required when queries are given")
            self.query_split = _as_split(self.query_split, m, "query_split")
            if self.qrels is not None:
                if len(self.qrels) != m:
                    raise InputError(f"qrels: expected {m} entries (one per query), got {len(self.qrels)}")
                clean = []
                for i, r in enumerate(self.qrels):
                    r = np.asarray(r)
                    if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
                        raise InputError(f"qrels[{i}]: expected a 1-D integer array, got {r.dtype} {r.shape}")
                    r = np.unique(r.astype(np.int64))
                    if r.size and (r[0] < 0 or r[-1] >= n):
                        raise InputError(f"qrels[{i}]: corpus row ids must be in [0, {n}), got {r.tolist()}")
                    clean.append(r)
                self.qrels = clean
            if self.query_text is not None and len(self.query_text) != m:
                raise InputError(f"query_text: expected {m} texts, got {len(self.query_text)}")
        if self.corpus_text is not None and len(self.corpus_text) != n:
            raise InputError(f"corpus_text: expected {n} texts, got {len(self.corpus_text)}")

    def split_rows(self, split: str) -> np.ndarray:
        """Corpus row ids (int64) of ``split`` ("train", "val" or "test")."""
        return np.flatnonzero(self.corpus_split == _split_code(split)).astype(np.int64)

    def split_queries(self, split: str) -> np.ndarray:
        """Query ids (int64) of ``split``; empty when the data set has no queries."""
        code = _split_code(split)
        if self.query_split is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.query_split == code).astype(np.int64)

    def summary(self) -> str:
        """One line: name, n, d, number of labels, corpus rows and queries per split."""
        n, d = self.corpus.shape
        rows = "/".join(str(int(np.sum(self.corpus_split == c))) for c in range(3))
        labels = "none" if self.labels is None else str(
            len(self.label_names) if self.label_names is not None else len(np.unique(self.labels)))
        if self.queries is None:
            q = "queries=none"
        else:
            q = "queries train/val/test=" + "/".join(
                str(int(np.sum(self.query_split == c))) for c in range(3))
            q += " (qrels)" if self.qrels is not None else " (no qrels)"
        return f"{self.name}: n={n} d={d} labels={labels} corpus train/val/test={rows} {q}"


def shared_corpus(data: EmbeddingData, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """`data` with its queries split at random over the shared corpus (BEIR's and the adapter papers'
    protocol: a test query's document may have training queries), instead of inheriting their
    documents' split. Corpus rows keep their split (the label task's). The queries' split is a seeded
    draw of its own, so the same `seed` gives the same split for every consumer."""
    if data.queries is None:
        raise InputError(f"{data.name}: the shared-corpus protocol splits queries, and this data set has none")
    qs = make_splits(len(data.queries), fractions, seed + 1)
    return replace(data, query_split=qs, info={**data.info, "protocol": "shared", "query_split_seed": seed + 1})


def answer_pairs(qrels: list[np.ndarray], qids) -> tuple[np.ndarray, np.ndarray]:
    """(query id, document row) int64 arrays: one pair for every relevant document of the queries `qids`."""
    q = [np.full(len(qrels[i]), i, np.int64) for i in qids]
    d = [np.asarray(qrels[i], np.int64) for i in qids]
    if not q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(q), np.concatenate(d)


def answered_rows(data: EmbeddingData, split: str = "train") -> np.ndarray:
    """Bool per corpus row: does a query of `split` have it among its relevant documents?"""
    out = np.zeros(len(data.corpus), bool)
    if data.qrels is not None:
        out[answer_pairs(data.qrels, data.split_queries(split))[1]] = True
    return out


def make_splits(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> np.ndarray:
    """Seeded random train/val/test codes (int8 0/1/2) for ``n`` items; sizes round cumulatively."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or not math.isclose(f.sum(), 1.0, abs_tol=1e-6):
        raise InputError(f"fractions: need three non-negative numbers summing to 1, got {fractions}")
    if n < 0:
        raise InputError(f"n: must be >= 0, got {n}")
    bounds = np.round(np.cumsum(f) * n).astype(np.int64)
    bounds[-1] = n
    codes = np.zeros(n, dtype=np.int8)
    codes[bounds[0]:bounds[1]] = 1
    codes[bounds[1]:] = 2
    return codes[np.random.default_rng(seed).permutation(n)]
