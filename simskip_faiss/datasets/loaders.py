"""Loaders of the small built-in sets (scikit-learn's digits, planted synthetic clusters), of the user's own
``.npy`` embeddings with labels and BEIR-style qrels, and :func:`load` by name.

Only numpy is imported at top level; scikit-learn is imported inside :func:`load_digits`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..checks import l2_normalize, load_npy
from ..errors import InputError
from .container import DEFAULT_FRACTIONS, PROTOCOLS, EmbeddingData, _as_vectors, make_splits
from .wordnet import load_wordnet

__all__ = ["load_digits", "make_synthetic", "parse_qrels", "load_user", "load"]

log = logging.getLogger("simskip_faiss.datasets")


def load_digits(seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """scikit-learn's 8x8 digits (1,797 rows, 64-d pixel vectors, L2-normalised rows, labels 0-9,
    no queries): a real labelled set that needs no model."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    if (np.linalg.norm(x, axis=1) == 0).any():
        raise InputError("digits: unexpected all-zero image")
    return EmbeddingData(
        name="digits", corpus=l2_normalize(x), corpus_split=make_splits(len(x), fractions, seed),
        labels=np.asarray(bunch.target, dtype=np.int64), label_names=[str(i) for i in range(10)],
        info={"source": "sklearn.datasets.load_digits", "seed": seed, "fractions": tuple(fractions)})


def make_synthetic(n: int = 2000, d: int = 32, n_classes: int = 10, n_queries: int = 300,
                   seed: int = 0, noise: float = 1.0, spread: float = 1.3,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """Clustered unit vectors with labels, plus queries that are noisy copies of specific corpus
    rows with qrels = [that row]: a planted query->document structure for fast tests.
    ``spread`` is the expected norm of an item's offset from its class centre, ``noise`` the
    expected norm of a query's offset from its document (before renormalisation)."""
    if not (0 < n_queries <= n) or n_classes <= 0 or d <= 0:
        raise InputError("make_synthetic: need 0 < n_queries <= n, n_classes > 0, d > 0")
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_classes, d)))
    labels = rng.integers(0, n_classes, size=n)
    corpus = l2_normalize(centres[labels] + spread / math.sqrt(d) * rng.standard_normal((n, d)))
    targets = rng.choice(n, n_queries, replace=False)
    queries = l2_normalize(corpus[targets] + noise / math.sqrt(d) * rng.standard_normal((n_queries, d)))
    corpus_split = make_splits(n, fractions, seed)
    return EmbeddingData(
        name="synthetic", corpus=corpus, corpus_split=corpus_split, labels=labels.astype(np.int64),
        label_names=[f"class_{i}" for i in range(n_classes)], queries=queries,
        query_split=corpus_split[targets], qrels=[np.array([t], dtype=np.int64) for t in targets],
        info={"source": "make_synthetic", "seed": seed, "noise": noise, "spread": spread,
              "fractions": tuple(fractions)})


# --------------------------------------------------------------------------- user data


def _load_array(x: str | Path | np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """(array, description) from an array or a .npy path (memory-mapped, never unpickled)."""
    if isinstance(x, (str, Path)):
        return load_npy(x, what), f"{what} ({x})"
    return np.asarray(x), what


def _load_vectors(x: str | Path | np.ndarray, what: str) -> tuple[np.ndarray, str]:
    arr, desc = _load_array(x, what)
    x = _as_vectors(arr, desc)
    if isinstance(arr, np.memmap) and np.may_share_memory(x, arr):  # own the data: no read-only file-backed arrays
        x = np.array(x)
    return x, desc


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def parse_qrels(path: str | Path, n_queries: int, n_docs: int) -> list[np.ndarray]:
    """Read BEIR-style qrels ``query_id<TAB>doc_id[<TAB>grade]`` where ids are integer row indices
    into queries / corpus, from UTF-8 text. An optional header is skipped: a first line whose first
    field is not a number at all (a first line such as ``0.5<TAB>3`` is a malformed id, not a header).
    Grade > 0 is relevant (binary); grade <= 0 is dropped. Returns one sorted int64 array per query
    (empty for queries without relevant docs). Errors name the file and line."""
    path = Path(path)
    try:
        return _parse_qrels(path, n_queries, n_docs)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); "
                         f"qrels must be UTF-8 (or ASCII) text") from None


def _parse_qrels(path: Path, n_queries: int, n_docs: int) -> list[np.ndarray]:
    rel: list[set[int]] = [set() for _ in range(n_queries)]
    n_pairs = 0
    seen_data = False
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if not seen_data and not _is_number(fields[0]):
                seen_data = True  # header: only the first non-empty line may be one
                continue
            seen_data = True
            if len(fields) not in (2, 3):
                raise InputError(f"{where}: expected 2 or 3 tab-separated fields "
                                 f"(query_id, doc_id[, grade]), got {len(fields)}")
            ids = []
            for name, tok, hi in (("query id", fields[0], n_queries), ("doc id", fields[1], n_docs)):
                try:
                    v = int(tok)
                except ValueError:
                    raise InputError(f"{where}: {name} {tok!r} is not an integer row index") from None
                if not 0 <= v < hi:
                    raise InputError(f"{where}: {name} {v} out of range [0, {hi})")
                ids.append(v)
            grade = 1.0
            if len(fields) == 3:
                try:
                    grade = float(fields[2])
                except ValueError:
                    raise InputError(f"{where}: grade {fields[2]!r} is not a number") from None
                if not math.isfinite(grade):
                    raise InputError(f"{where}: grade {fields[2]!r} is not finite")
            if grade > 0:
                rel[ids[0]].add(ids[1])
                n_pairs += 1
    if n_pairs == 0:
        raise InputError(f"{path}: no relevant (query, doc) pairs (empty file or all grades <= 0)")
    return [np.array(sorted(r), dtype=np.int64) for r in rel]


def load_user(corpus: str | Path | np.ndarray, queries: str | Path | np.ndarray | None = None,
              labels: str | Path | np.ndarray | None = None, qrels: str | Path | None = None,
              seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
              name: str = "user", protocol: str = "shared") -> EmbeddingData:
    """The user's own embeddings (.npy paths or arrays) with optional labels (integer or string
    array, one per corpus row; re-indexed to 0..L-1, their values kept as `label_names`) and qrels
    (TSV, see :func:`parse_qrels`). Corpus rows get seeded splits. Queries: `protocol` "shared"
    (default: logged pairs over the corpus a user serves) splits them at random, seeded, so validation
    queries are drawn from the queries and include some whose documents have training queries and
    some whose documents have none; "disjoint" gives a query with qrels the split of its first
    relevant document (no test document was ever a training answer)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    x, desc = _load_vectors(corpus, "corpus")
    n, d = x.shape
    info: dict[str, Any] = {"source": "user", "seed": seed, "fractions": tuple(fractions)}
    if isinstance(corpus, (str, Path)):
        info["corpus_file"] = str(corpus)
    lab = names = None
    if labels is not None:
        arr, ldesc = _load_array(labels, "labels")
        if arr.ndim != 1 or len(arr) != n:
            raise InputError(f"{ldesc}: expected shape ({n},) (one label per corpus row), got {arr.shape}")
        if arr.dtype.kind in "US":
            uniq, lab = np.unique(np.asarray(arr), return_inverse=True)
            names = [str(u) for u in uniq]
        elif arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0)):
            arr = np.asarray(arr)
            if (arr.dtype.kind == "f" and not (np.abs(arr) < 2.0 ** 63).all()) or \
                    (arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max):
                raise InputError(f"{ldesc}: labels hold values beyond int64 (largest {arr.max():.6g})")
            if arr.min() < 0:
                raise InputError(f"{ldesc}: labels must be non-negative integers")
            # any integer ids (sparse ones too, e.g. product ids ~1e12): labels 0..L-1, the ids as their names
            uniq, lab = np.unique(arr.astype(np.int64), return_inverse=True)
            lab, names = lab.reshape(-1), [str(int(u)) for u in uniq]
        else:
            raise InputError(f"{ldesc}: expected integer or string labels, got dtype {arr.dtype}")
    corpus_split = make_splits(n, fractions, seed)
    q = q_split = rels = None
    if queries is not None:
        q, qdesc = _load_vectors(queries, "queries")
        if q.shape[1] != d:
            raise InputError(f"{qdesc}: dimension {q.shape[1]} differs from corpus dimension {d}")
        q_split = make_splits(len(q), fractions, seed + 1)
        if qrels is not None:
            rels = parse_qrels(qrels, len(q), n)
            empty = [i for i, r in enumerate(rels) if r.size == 0]
            if protocol == "disjoint":
                for i, r in enumerate(rels):
                    if r.size:
                        q_split[i] = corpus_split[r[0]]
            info.update(qrels_file=str(qrels), queries_without_qrels=len(empty), protocol=protocol)
            if empty:
                log.warning("%d of %d queries have no relevant documents in %s", len(empty), len(q), qrels)
    elif qrels is not None:
        raise InputError("qrels: given without queries")
    data = EmbeddingData(name=name, corpus=x, corpus_split=corpus_split, labels=lab, label_names=names,
                         queries=q, query_split=q_split, qrels=rels, info=info)
    log.info("%s", data.summary())
    return data


def load(name: str, **kw: Any) -> EmbeddingData:
    """Load a named data set: "wordnet", "digits" or "synthetic" (keyword arguments pass through)."""
    loaders = {"wordnet": load_wordnet, "digits": load_digits, "synthetic": make_synthetic}
    if name not in loaders:
        raise InputError(f"unknown data set {name!r}; choose from {sorted(loaders)} "
                         f"(or use load_user for your own embeddings)")
    return loaders[name](**kw)
