"""Learn document updates (documents.py) from query -> document pairs, chosen on validation queries.

`contrastive_path`: a few gradient steps of InfoNCE over the whole corpus on the answer documents only
(every other document is a fixed negative), each step normalised per document so a document's move does
not scale with its query count. `mean_path`: each answer document moved toward the normalised mean of
its queries (the closed-form "document nudge" baseline). `choose_updates` walks a path and keeps the
step with the best validation objective among those that leave protected metrics (the queries whose
documents had no training query, the label task) no worse than without updates. `learn` ties them to an
`EmbeddingData` and a refiner's query and document transforms. numpy and FAISS only: no torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import faiss
import numpy as np

from ..config import MAX_VAL_QUERIES
from ..datasets import answer_pairs  # noqa: F401  (also this module's name for it)
from ..refiners.documents import DocumentUpdates, sketch
from ..errors import InputError
from ..metrics.scoring import LABEL_METRICS, PAIR_METRICS, score, seen_queries, task_queries

log = logging.getLogger(__name__)



def _at_norms(Y: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Each row of `Y` rescaled to the norm given for it (a moved document keeps its stored norm)."""
    return (Y * (norms / np.maximum(np.linalg.norm(Y.astype(np.float64), axis=1), 1e-30))[:, None]).astype(np.float32)


def _logsumexp_rows(S: np.ndarray) -> np.ndarray:
    m = S.max(axis=1)
    return m + np.log(np.exp(S - m[:, None]).sum(axis=1))


def contrastive_path(stored: np.ndarray, Q: np.ndarray, pair_doc: np.ndarray, steps: int = 24,
                     step_size: float = 0.1, temperature: float = 0.05,
                     chunk: int = 4096) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (step, answer documents, their moved stored vectors) for steps 1..`steps`.

    Q: (p, d) refined query vectors, one per pair; pair_doc: (p,) the pair's document row in `stored`.
    Loss: mean over pairs of -log softmax over every stored document (temperature `temperature`);
    only the answer documents move. The other documents' part of each softmax's normaliser is
    computed once. Each step moves answer document u by `step_size` * |y_u| along its negative
    gradient's direction (a per-document normalised step), then restores its norm.
    """
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    docs, inv = np.unique(pair_doc, return_inverse=True)
    others = np.ones(len(stored), bool)
    others[docs] = False
    inv_t = np.float32(1.0 / temperature)
    # log of the fixed part of each pair's softmax normaliser: the documents that do not move
    fixed = np.full(len(Q), -np.inf)
    rest = np.flatnonzero(others)
    for s in range(0, len(rest), 65536):
        block = np.ascontiguousarray(stored[rest[s:s + 65536]], dtype=np.float32)
        for a in range(0, len(Q), chunk):
            fixed[a:a + chunk] = np.logaddexp(fixed[a:a + chunk], _logsumexp_rows((Q[a:a + chunk] @ block.T) * inv_t))
    Y = np.array(stored[docs], dtype=np.float32)
    norms = np.linalg.norm(Y.astype(np.float64), axis=1)
    counts = np.bincount(inv, minlength=len(docs)).astype(np.float32)
    pull = np.zeros_like(Y)
    np.add.at(pull, inv, Q)
    for t in range(1, steps + 1):
        grad = -pull.copy()  # d/dy_u of sum over pairs of -log p: sum_i p_iu q_i - sum_{i: pos=u} q_i (times 1/T)
        for a in range(0, len(Q), chunk):
            S = (Q[a:a + chunk] @ Y.T) * inv_t
            lse = np.logaddexp(fixed[a:a + chunk], _logsumexp_rows(S))
            P = np.exp(S - lse[:, None]).astype(np.float32)
            grad += P.T @ Q[a:a + chunk]
        grad /= counts[:, None]
        gnorm = np.linalg.norm(grad, axis=1, keepdims=True)
        Y = Y - np.float32(step_size) * norms[:, None].astype(np.float32) * grad / np.maximum(gnorm, 1e-12)
        Y = _at_norms(Y, norms)
        yield t, docs, Y


def mean_path(stored: np.ndarray, Q: np.ndarray, pair_doc: np.ndarray,
              steps: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """Yield (step, answer documents, moved vectors): each answer document plus `step` * |y| times the
    normalised mean of its queries, norm restored (the closed-form "document nudge" baseline)."""
    docs, inv = np.unique(pair_doc, return_inverse=True)
    Y0 = np.array(stored[docs], dtype=np.float32)
    norms = np.linalg.norm(Y0.astype(np.float64), axis=1)
    mean = np.zeros_like(Y0)
    np.add.at(mean, inv, np.asarray(Q, np.float32))
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    for g in steps:
        Y = Y0 + np.float32(g) * norms[:, None].astype(np.float32) * mean
        yield g, docs, _at_norms(Y, norms)


def make_updates(raw: np.ndarray, stored: np.ndarray, docs: np.ndarray, moved: np.ndarray, meta: dict) -> DocumentUpdates:
    """The `DocumentUpdates` that turn `stored[docs]` into `moved`, bound to `raw[docs]`."""
    y = np.asarray(stored[docs], dtype=np.float32)
    return DocumentUpdates(docs.astype(np.int64), moved - y, sketch(np.asarray(raw[docs])), meta)


@dataclass
class UpdateChoice:
    """What `choose_updates` saw and chose (stored in the refiner's metadata and printed)."""

    method: str
    step: float
    objective: float
    reason: str
    candidates: list[dict] = field(default_factory=list)
    base: dict = field(default_factory=dict)   # validation metrics without updates
    seconds: float = 0.0                       # learning and choosing, in all

    def summary(self) -> str:
        keys = list(self.base)
        if not self.candidates:
            return f"document updates ({self.method}): {self.reason}"
        lines = [f"document updates ({self.method}): step {self.step:g}: {self.reason}",
                 "  step   " + "  ".join(f"{k:>22}" for k in keys) + "  objective",
                 "  none   " + "  ".join(f"{self.base[k]:22.4f}" for k in keys)]
        for c in self.candidates:
            lines.append(f"  {c['step']:<5g}  " + "  ".join(f"{c['metrics'][k]:22.4f}" for k in keys)
                         + f"  {c['objective']:+.4f}{'' if c['feasible'] else ' (drops)'}"
                         + (" <" if c["step"] == self.step else ""))
        return "\n".join(lines)


def choose_updates(path: Iterator[tuple[float, np.ndarray, np.ndarray]], evaluate: Callable[[np.ndarray, np.ndarray], dict],
                   base: dict, floor: dict, objective: list[str], tolerance: float = 0.0,
                   method: str = "contrastive", patience: int = 3) -> tuple[float, np.ndarray | None, np.ndarray | None, UpdateChoice]:
    """Walk `path`, score each step with `evaluate(docs, moved) -> {metric: value}` and keep the best.

    Feasible: every metric of `floor` at or above it minus `tolerance`.
    Objective: the mean relative gain over `base` of the `objective` metrics. Stops after `patience` steps without a
    better objective. Returns (step, docs, moved, choice); step 0 and None when no feasible step gains.
    """
    best = (0.0, None, None)
    best_obj, since, cands = 0.0, 0, []
    for step, docs, moved in path:
        m = evaluate(docs, moved)
        feasible = all(m[k] >= v - tolerance for k, v in floor.items())
        obj = float(np.mean([(m[k] - base[k]) / max(base[k], 1e-9) for k in objective]))
        cands.append({"step": float(step), "metrics": m, "feasible": feasible, "objective": obj})
        if feasible and obj > best_obj:
            best, best_obj, since = (float(step), docs, moved), obj, 0
        else:
            since += 1
            if since >= patience:
                break
    reason = (f"the best validation objective {best_obj:+.4f} with no protected metric dropping" if best[1] is not None
              else "no step beat the refiner without updates on validation: no document updates")
    return best[0], best[1], best[2], UpdateChoice(method, best[0], best_obj, reason, cands, base)


METHODS = ("contrastive", "mean")


def learn(data, query_fn: Callable[[np.ndarray], np.ndarray], doc_fn: Callable[[np.ndarray], np.ndarray],
          method: str = "contrastive", tolerance: float = 0.0, metric: str = "ip", max_val_queries: int | None = MAX_VAL_QUERIES,
          seed: int = 0, labels: bool = True) -> tuple[DocumentUpdates | None, UpdateChoice | None]:
    """Document updates for `data`'s corpus from its train-split pairs, the step chosen on its val split.

    query_fn / doc_fn: the refiner's query and document transforms (numpy in, numpy out). Validation
    scores every val query and label row through exact search over the stored vectors with the updates
    applied. Protected, so that no one is made worse to help another: every metric of the val queries
    whose documents had no training query, and the label metrics, may not fall below the lower of raw
    and the refiner without updates (beyond `tolerance`); the objective is the mean relative gain of
    the pair metrics over all val queries. `labels=False` leaves the label task out (the ridge baseline's
    rule: it is chosen on pairs alone). Returns (None, None) without train
    pairs or val queries; (None, choice) when no step gains.
    """
    t0 = time.perf_counter()

    if method not in METHODS:
        raise InputError(f"document update method must be one of {METHODS}, got {method!r}")
    if data.queries is None or data.qrels is None:
        return None, None
    pair_q, pair_doc = answer_pairs(data.qrels, data.split_queries("train"))
    tasks = task_queries(data, "val", max_val_queries, seed)
    if not len(pair_q) or len(tasks.get("pairs", ())) < 2:
        return None, None
    corpus = np.asarray(data.corpus, dtype=np.float32)
    stored = np.ascontiguousarray(doc_fn(corpus), dtype=np.float32)
    Q = np.ascontiguousarray(query_fn(data.queries[pair_q]), dtype=np.float32)
    vq = tasks["pairs"]
    unseen = ~seen_queries(data, vq)
    if unseen.all():  # e.g. documents split disjointly: no validation query could gain, every one could lose
        return None, UpdateChoice(method, 0.0, 0.0, f"none of the {len(vq)} validation queries has a document with "
                                  "training queries: nothing to gain on validation, no document updates")
    vectors = {"pairs": np.ascontiguousarray(query_fn(data.queries[vq]), dtype=np.float32)}
    if labels and "labels" in tasks and len(tasks["labels"]):
        vectors["labels"] = np.ascontiguousarray(query_fn(corpus[tasks["labels"]]), dtype=np.float32)
    tasks = {t: r for t, r in tasks.items() if t in vectors}
    flat = faiss.IndexFlatIP if metric == "ip" else faiss.IndexFlatL2

    def evaluate(docs, moved, Y=stored, vectors=vectors) -> dict:
        if docs is not None:
            Y = Y.copy()
            Y[docs] = moved
        index = flat(Y.shape[1])
        index.add(Y)
        per = score(index, data, tasks, vectors=vectors)
        out = {f"pairs:{m}": float(per["pairs"][m].mean()) for m in PAIR_METRICS}
        if unseen.sum() >= 2:
            out.update({f"unseen:{m}": float(per["pairs"][m][unseen].mean()) for m in PAIR_METRICS})
        if "labels" in per:
            out.update({f"labels:{m}": float(per["labels"][m].mean()) for m in LABEL_METRICS})
        return out

    base = evaluate(None, None)
    raw = evaluate(None, None, corpus, {"pairs": data.queries[vq], **({"labels": corpus[tasks["labels"]]}
                                                                      if "labels" in tasks else {})})
    floor = {k: min(base[k], raw[k]) for k in base if not k.startswith("pairs:")}
    objective = [k for k in base if k.startswith("pairs:")]
    path = contrastive_path(stored, Q, pair_doc) if method == "contrastive" else mean_path(stored, Q, pair_doc)
    step, docs, moved, choice = choose_updates(path, evaluate, base, floor, objective, tolerance, method)
    choice.seconds = round(time.perf_counter() - t0, 1)
    choice.reason += (f" ({len(np.unique(pair_doc))} answer documents of {len(pair_q)} train pairs; "
                      f"{int((~unseen).sum())} of {len(vq)} val queries have one; {choice.seconds:g} s)")
    if docs is None:
        return None, choice
    meta = {"method": method, "step": step, "n_corpus": len(corpus), "n_pairs": int(len(pair_q)),
            "corpus": data.info.get("corpus_file", data.name)}
    return make_updates(corpus, stored, docs, moved, meta), choice
