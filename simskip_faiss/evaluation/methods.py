"""The methods an evaluation compares besides the refiners under test: the free baselines, fitted on the
train split with their hyperparameters chosen on the val split (`baselines`, `choose_on_val`), and
`build`, the production index every method is searched through."""
from __future__ import annotations

import numpy as np

from ..config import EVAL_FACTORY, MAX_VAL_QUERIES
from ..datasets import EmbeddingData, answer_pairs
from ..errors import InputError
from ..index import RefinedIndex
from ..metrics.scoring import score, task_queries
from ..refiners import IdentityRefiner, LinearRefiner
from .baselines import lda_candidates, ridge_candidates

BASELINES = ("raw", "centred", "whitened", "abtt", "ridge", "lda", "ridge+mean", "ridge+nudge")
# the ridge query map plus document updates of the answer documents (nudge.py): "mean" moves each toward
# its training queries' mean, "nudge" takes contrastive steps; the step chosen on val, as the refiner's is
DOCUMENT_BASELINES = {"ridge+mean": "mean", "ridge+nudge": "contrastive"}
# supervised baseline -> (task, metric) its hyperparameters maximise on val, ("task:metric", ...) kept >= raw there
SUPERVISED_BASELINES = {"ridge": ("pairs", "ndcg@10", ()), "lda": ("labels", "map@100", ("pairs:ndcg@10",))}


def baselines(data: EmbeddingData, names=BASELINES, abtt_components: int | None = None,
              max_val_queries: int | None = MAX_VAL_QUERIES, seed: int = 0) -> dict:
    """The free baselines, fitted on the train split only.

    Unsupervised: raw, centred, PCA-whitened, all-but-the-top. Supervised, only where the data has
    the supervision (otherwise left out), hyperparameters chosen on the val split: `ridge` (pairs;
    query-only ridge-to-identity map, lam maximising nDCG@10) and `lda` (labels; centred vectors
    with LDA coordinates appended, shrinkage and weight maximising mAP@100 among those that keep
    pairs nDCG@10 at or above raw). Their metadata records the choice and every candidate's scores.
    `ridge+mean` / `ridge+nudge`: the ridge map plus document updates of the train queries' answer
    documents (nudge.learn), only where validation queries have such documents (shared corpus).
    """
    x_train = data.corpus[data.split_rows("train")]
    d = data.corpus.shape[1]
    made = {"raw": lambda: IdentityRefiner(d), "centred": lambda: LinearRefiner.centring(x_train),
            "whitened": lambda: LinearRefiner.whitening(x_train),
            "abtt": lambda: LinearRefiner.all_but_the_top(x_train, abtt_components),
            "ridge": lambda: _ridge_candidates(data), "lda": lambda: _lda_candidates(data)}
    unknown = set(names) - set(made) - set(DOCUMENT_BASELINES)
    if unknown:
        raise InputError(f"unknown baselines {sorted(unknown)}; choose from {list(BASELINES)}")
    out, ridge = {}, None
    for n in names:
        if n in DOCUMENT_BASELINES:
            ridge = ridge or out.get("ridge") or (baselines(data, ("ridge",), max_val_queries=max_val_queries, seed=seed)
                                                  .get("ridge"))
            if ridge is not None and (nudged := _nudged(ridge, data, DOCUMENT_BASELINES[n], max_val_queries, seed)):
                out[n] = nudged
        elif n not in SUPERVISED_BASELINES:
            out[n] = made[n]()
        elif (candidates := made[n]()):
            task, metric, protect = SUPERVISED_BASELINES[n]
            out[n] = choose_on_val(candidates, data, task, metric, protect, max_val_queries, seed)
    return out


def _nudged(ridge: LinearRefiner, data: EmbeddingData, method: str, max_val_queries, seed: int):
    """A copy of the ridge map with document updates learned against its queries (none when validation chose
    none: then it is the ridge map); None where the data has no validation queries with answered documents."""
    from ..training.nudge import learn

    upd, choice = learn(data, ridge.transform, lambda x: np.ascontiguousarray(x, dtype=np.float32), method=method,
                        max_val_queries=max_val_queries, seed=seed, labels=False)
    if choice is None or (upd is None and not choice.candidates):
        return None
    out = LinearRefiner.from_bytes(ridge.to_bytes()).with_documents(upd)
    out.metadata.update(name=f"{ridge.name} + {method} document updates (step {choice.step:g}, "
                             f"{0 if upd is None else len(upd)} documents)",
                        chosen_on=f"{ridge.metadata.get('chosen_on')}; document step: val pair metrics, with the val "
                                  "queries whose documents have no training query kept at or above raw")
    return out


def _ridge_candidates(data: EmbeddingData) -> list:
    """Query-only ridge maps fitted on the train split's (query, relevant document) pairs; [] without pairs."""
    if data.queries is None or data.qrels is None:
        return []
    qids, docs = answer_pairs(data.qrels, data.split_queries("train"))
    if not len(qids):
        return []
    return ridge_candidates(data.queries[qids], np.asarray(data.corpus[docs]))  # the identity first


def _lda_candidates(data: EmbeddingData) -> list:
    """Centred vectors with LDA coordinates appended, fitted on the train split's labels; [] without 2+ labels there."""
    if data.labels is None:
        return []
    rows = data.split_rows("train")
    if len(np.unique(data.labels[rows])) < 2:
        return []
    return lda_candidates(np.asarray(data.corpus[rows]), data.labels[rows])  # weight 0 (= centring) first


def choose_on_val(candidates: list, data: EmbeddingData, task: str, metric: str, protect=(),
                  max_queries: int | None = MAX_VAL_QUERIES, seed: int = 0):
    """The candidate with the best mean `task` `metric` on the val split (the first on ties), among
    those that keep each `protect` metric ("task:metric") at or above raw's on val.

    Order candidates from most to least regularised: without val queries for `task`, or with no
    candidate feasible, the first is returned. Its metadata records what it was chosen on and every
    candidate's val scores.
    """
    queries = {t: q for t, q in task_queries(data, "val", max_queries, seed).items() if len(q)}
    guarded = [p.split(":", 1) for p in protect if p.split(":", 1)[0] in queries]
    queries = {t: q for t, q in queries.items() if t == task or any(t == g for g, _ in guarded)}
    if task not in queries:
        best = candidates[0]
        best.metadata.update(chosen_on=f"nothing (no val {task} queries): the most regularised candidate")
        return best

    def means(refiner) -> dict:
        s = score(build(refiner, data), data, queries)
        return {f"{t}:{m}": float(s[t][m].mean()) for t, m in [(task, metric), *guarded]}

    raw = means(IdentityRefiner(data.corpus.shape[1])) if guarded else {}
    scores = {c.name: means(c) for c in candidates}
    key = f"{task}:{metric}"
    feasible = [c for c in candidates if all(scores[c.name][f"{t}:{m}"] >= raw[f"{t}:{m}"] for t, m in guarded)]
    best = max(feasible, key=lambda c: scores[c.name][key]) if feasible else candidates[0]  # max: first on ties
    best.metadata.update(chosen_on=f"val {key}" + "".join(f", {t}:{m} >= raw" for t, m in guarded),
                         val_raw=raw, val_scores=scores)
    return best


def build(refiner, data: EmbeddingData, factory: str = EVAL_FACTORY, metric="ip", progress: bool = False) -> RefinedIndex:
    """A `RefinedIndex` of `data`'s whole corpus behind `refiner` (trained on the corpus if the index needs it)."""
    index = RefinedIndex(refiner, factory, metric, progress=progress)
    if not index.is_trained:
        index.train(data.corpus)
    index.add(data.corpus)
    return index
