"""Scoring a model on the validation split at a grid of alphas (`Guard`): what the guard (`guard.fit`) decides by.

refined(alpha) = normalize(x + alpha * f(x)). Every candidate is scored on every validation metric
there are judgements for (labels: precision@10, mAP@100; pairs: nDCG@10, Recall@10/100, MRR@10),
exact FAISS search over the whole corpus, and judged by the shipping rule in `metrics.scoring`
(feasible: no protected metric below raw by more than `tolerance`; objective: the mean relative gain
over raw). Without labels or pairs, the proxy: agreement with the raw neighbours.

Contract with the training loop (`training.Run`): the loop calls `Guard.evaluator(tag)` —
`(model, step) -> Evaluation` — every `eval_every` steps; the guard keeps its own record keyed by
(tag, step), so calls may come in any order and from several runs (the lr/temperature search).
Each evaluation computes x and f(x) once for the validation queries and the corpus and forms each
alpha's vectors by the model's own combination (`model.combine`): a coarse alpha grid during training,
the full grid on the two best checkpoints at the end. The in-training validations score a seeded subset
of at most `coarse_val_queries` queries per task (they only rank checkpoints); the final sweep scores them all.
"""
from __future__ import annotations

import time
import warnings

import faiss
import numpy as np
import torch

from ..config import TrainConfig
from ..errors import InputError
from ..metrics.ranking import drop_self, knn_recall, paired_bootstrap
from ..metrics.scoring import LABEL_METRICS, PAIR_METRICS, judge, label_relevant, score, ship, task_queries
from .loop import Evaluation
from .model import SimSkip, combine

MIN_VAL = 2  # validation queries (or rows) a task needs to be guarded on
# a validation must raise the objective by this share of the best so far to count as progress:
# label training creeps up for a thousand steps and more (WordNet 20k: best at 1,450-1,600) for a few per cent
MIN_GAIN = 0.02


def coarse_grid(alphas: tuple[float, ...], n: int = 4) -> tuple[float, ...]:
    """Every second positive alpha from the top (1.0, 0.5, 0.2, 0.1 of the default grid), at most n."""
    pos = sorted((a for a in alphas if a > 0), reverse=True)
    return tuple(sorted(pos[::2][:n]))


def _combine(x: np.ndarray, fx: np.ndarray, alpha: float, normalize: bool) -> np.ndarray:
    """normalize?(x + alpha * f(x)) as float32 numpy: the model's `combine` at `alpha`, from x and f(x) computed once
    (so every alpha is scored on exactly the vectors the model gives)."""
    with warnings.catch_warnings():  # a read-only corpus (memory-mapped) is only read: combine is out of place
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        x, fx = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (x, fx))
    return np.ascontiguousarray(combine(x, fx, float(alpha), normalize).numpy())


def _f(model: SimSkip, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    """f(x) (the residual branch, before alpha), in batches."""
    out = np.empty_like(x, dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(x), batch):
            out[s:s + batch] = model.f(torch.from_numpy(np.ascontiguousarray(x[s:s + batch], dtype=np.float32))).numpy()
    return out


class Guard:
    """Scores a model on the validation split at a grid of alphas, with exact FAISS search."""

    def __init__(self, data, cfg: TrainConfig):
        self.data, self.cfg = data, cfg
        tasks = task_queries(data, "val", cfg.max_val_queries, cfg.seed)
        if "labels" in tasks:  # a row whose label no other row carries has nothing to find: not scored (trec_eval's rule)
            tasks["labels"] = tasks["labels"][label_relevant(data.labels, tasks["labels"]) > 0]
        self.queries = {t: q for t, q in tasks.items() if len(q) >= MIN_VAL}
        if cfg.guard_tasks:
            unknown = set(cfg.guard_tasks) - set(self.queries)
            if unknown:
                raise InputError(f"guard_tasks {sorted(unknown)} have no validation data (available: {sorted(self.queries)})")
            self.queries = {t: v for t, v in self.queries.items() if t in cfg.guard_tasks}
        if cfg.label_weight and "labels" not in self.queries and not cfg.guard_tasks:
            raise InputError(f"label training needs at least {MIN_VAL} validation rows that share their label with "
                             f"another row, to guard against (the validation split has {len(data.split_rows('val'))} "
                             f"rows, {len(tasks.get('labels', ()))} of them such)")
        if cfg.pair_weight and "pairs" not in self.queries and not cfg.guard_tasks:
            raise InputError(f"pair training needs at least {MIN_VAL} validation queries with qrels to guard against "
                             f"(the validation split has {len(data.split_queries('val'))} queries)")
        self.proxy = not self.queries
        if self.proxy:  # unsupervised and nothing to validate on: raw-neighbour agreement proxy
            rows = data.split_rows("val")[: cfg.max_val_queries]
            if len(rows) < MIN_VAL or data.corpus.shape[0] < 12:
                raise InputError(f"the corpus ({data.corpus.shape[0]} rows, {len(rows)} in validation) is too small "
                                 f"for the guard's validation split: give at least {MIN_VAL} validation rows and "
                                 "12 rows in all, or pass guard=False (on the command line --no-guard)")
            self.queries = {"agreement": rows}
        self.agreement_k = min(cfg.agreement_k, data.corpus.shape[0] - 2)
        self.corpus = np.ascontiguousarray(data.corpus, dtype=np.float32)
        self.qx = {t: np.ascontiguousarray(self.corpus[r] if t != "pairs" else data.queries[r], dtype=np.float32)
                   for t, r in self.queries.items()}
        self._raw_nn = None
        # raw per-query metrics, kept for Guard.interval (the proxy has none: it measures closeness to raw)
        self._raw_per_query = None if self.proxy else self._per_query(self._flat(self.corpus), self.qx, self.queries)
        self.raw = (self._metrics(self.corpus, self.qx) if self.proxy
                    else {k: float(v.mean()) for k, v in self._raw_per_query.items()})
        # the validations during training only rank checkpoints: a seeded subset of the queries does
        # that at a fraction of the search (the cost of a guarded fit on large corpora); the final
        # alpha sweep on the two best checkpoints scores every validation query
        rng = np.random.default_rng(cfg.seed + 1)
        self.coarse = {t: np.sort(rng.choice(len(r), cfg.coarse_val_queries, replace=False))
                       for t, r in self.queries.items() if len(r) > cfg.coarse_val_queries and not self.proxy}
        self.sample = self._corpus_sample(cfg) if not self.proxy and len(self.corpus) > cfg.coarse_corpus_rows else None
        self.coarse_corpus = self.corpus if self.sample is None else self.corpus[self.sample]
        self.raw_coarse = (self._metrics(self.coarse_corpus, self._subset(self.qx, True), self._subset(self.queries, True),
                                         coarse=True) if self.coarse or self.sample is not None else self.raw)
        self.protected = list(cfg.guard_metrics or self.raw)
        unknown = set(self.protected) - set(self.raw)
        if unknown:
            raise InputError(f"guard_metrics {sorted(unknown)} are not measured on validation (measured: {sorted(self.raw)})")
        which = "validation metric" if self.protected == list(self.raw) else "of " + ", ".join(self.protected)
        self.criterion = (f"{self.agreement_k}-NN agreement with raw on validation rows >= {cfg.min_agreement:g}; "
                          "the largest alpha that holds it" if self.proxy
                          else f"no {which} below raw by more than {cfg.tolerance:g}; maximise mean relative gain"
                          + (f"; the gain's or some metric's {cfg.confidence:.0%} interval above 0"
                             if cfg.confidence and cfg.guard else ""))
        self.record: dict[tuple[str, int], Evaluation] = {}
        self.seconds = 0.0

    def _subset(self, per_task: dict, coarse: bool) -> dict:
        """`per_task` (query rows or vectors by task) cut to the coarse subset when `coarse`."""
        return {t: v[self.coarse[t]] if coarse and t in self.coarse else v for t, v in per_task.items()}

    def _corpus_sample(self, cfg: TrainConfig) -> np.ndarray:
        """The corpus rows the in-training validations search on a large corpus: every row a coarse
        query needs (its own row for a label query, the relevant documents of a pair query), then
        seeded random rows up to `coarse_corpus_rows`."""
        rows = self._subset(self.queries, True)
        need = [rows["labels"]] if "labels" in rows else []
        if "pairs" in rows:
            need += [self.data.qrels[i] for i in rows["pairs"]]
        need = np.unique(np.concatenate(need)).astype(np.int64)
        rest = np.setdiff1d(np.arange(len(self.corpus)), need, assume_unique=True)
        extra = np.random.default_rng(cfg.seed + 2).choice(rest, max(0, min(len(rest), cfg.coarse_corpus_rows - len(need))),
                                                           replace=False)
        return np.sort(np.concatenate([need, extra]))

    def _flat(self, docs: np.ndarray, ids: np.ndarray | None = None) -> faiss.Index:
        """An exact index of `docs` in the refiner's metric: what every validation search runs on.
        `ids`: the corpus rows `docs` are, when not all of them in order (searches report these)."""
        index = (faiss.IndexFlatIP if self.cfg.metric == "ip" else faiss.IndexFlatL2)(docs.shape[1])
        if ids is None:
            index.add(docs)
            return index
        index = faiss.IndexIDMap(index)
        index.add_with_ids(docs, ids)
        return index

    def _metrics(self, docs: np.ndarray, q: dict[str, np.ndarray], rows: dict | None = None,
                 coarse: bool = False) -> dict[str, float]:
        """Mean validation metrics of query vectors `q` (ids `rows`, default all) searched over `docs`
        (`coarse` on a large corpus: `docs` are the corpus sample's rows, in its order)."""
        rows = self.queries if rows is None else rows
        if coarse and self.sample is not None:  # search the sample, report corpus row ids
            per = self._per_query(self._flat(docs, self.sample), q, rows, self.sample)
            return {k: float(v.mean()) for k, v in per.items()}
        index = self._flat(docs)
        if self.proxy:  # share of each validation row's raw k nearest neighbours still in its refined top k
            k = self.agreement_k
            I = drop_self(index.search(q["agreement"], k + 1)[1], rows["agreement"], k)
            if self._raw_nn is None:  # the first call scores the raw vectors
                self._raw_nn = I
            return {f"agreement@{k}": knn_recall(self._raw_nn, I, ks=(k,))[f"{k}-recall@{k}"]}
        return {k: float(v.mean()) for k, v in self._per_query(index, q, rows).items()}

    def _per_query(self, index, q: dict[str, np.ndarray], rows: dict, db_rows=None) -> dict[str, np.ndarray]:
        """Every validation metric per query ("task:metric" -> one value per query of the task)."""
        per_task = score(index, self.data, rows, vectors=q, db_rows=db_rows)
        return {f"{t}:{m}": pq[m] for t, pq in per_task.items() for m in (LABEL_METRICS if t == "labels" else PAIR_METRICS)}

    def _objective(self, m: dict[str, float], raw: dict[str, float]) -> tuple[bool, float]:
        if self.proxy:
            return m[f"agreement@{self.agreement_k}"] >= self.cfg.min_agreement, 0.0
        return judge(m, raw, self.cfg.tolerance, self.protected)

    def sweep(self, model: SimSkip, alphas, coarse: bool = False) -> list[dict]:
        """Every alpha's validation metrics, feasibility and objective, from one f(x) pass.

        `coarse`: on the coarse subset of the validation queries (the in-training validations).
        """
        t0 = time.perf_counter()
        model.eval()
        qx, rows = self._subset(self.qx, coarse), self._subset(self.queries, coarse)
        raw = self.raw_coarse if coarse else self.raw
        corpus = self.coarse_corpus if coarse else self.corpus
        fq = {t: _f(model, x) for t, x in qx.items()}
        fd = None if model.apply_to == "queries" else _f(model, corpus)
        cands = []
        for a in alphas:
            docs = corpus if fd is None else _combine(corpus, fd, a, model.normalize)
            q = {t: _combine(x, fq[t], a, model.normalize) for t, x in qx.items()}
            m = self._metrics(docs, q, rows, coarse)
            feasible, obj = self._objective(m, raw)
            cands.append({"alpha": float(a), "metrics": m, "feasible": feasible, "objective": obj})
        self.seconds += time.perf_counter() - t0
        return cands

    def interval(self, model: SimSkip, alpha: float, n: int = 1000, ci: float = 0.95) -> dict:
        """The objective of `model` at `alpha` on every validation query, with a paired-bootstrap interval.

        The objective is a mean of per-query terms: query i of task t contributes
        sum over t's metrics of (refined_i - raw_i) / raw mean, times (queries in all) / (N * queries
        of t), N the number of metrics; so `metrics.paired_bootstrap` over the pooled queries gives
        its interval. Queries count as the metrics do: those with a relevant item (a label row whose
        label no other row carries is not scored). Each metric's change gets its own interval too;
        `gains` lists the metrics whose interval lies above 0. When neither the objective's interval
        nor any metric's lies above 0, the validation split cannot tell the gain from noise. (Both
        count: the objective averages relative changes over every metric, so a flat but noisy one,
        e.g. Recall@10 at 0.19, widens its interval past a clear gain in another metric; and a gain
        spread over several metrics on a few dozen queries can clear 0 in the objective only.)
        """
        t0 = time.perf_counter()
        model.eval()
        raw = self._raw_per_query
        docs = self.corpus if model.apply_to == "queries" else _combine(self.corpus, _f(model, self.corpus), alpha,
                                                                         model.normalize)
        got = self._per_query(self._flat(docs), {t: _combine(x, _f(model, x), alpha, model.normalize)
                                                 for t, x in self.qx.items()}, self.queries)
        terms: dict[str, np.ndarray] = {}  # per task, over its evaluated queries (those with a relevant item)
        for key, values in got.items():
            t = key.partition(":")[0]
            terms[t] = terms.get(t, 0.0) + (values - raw[key]) / max(float(raw[key].mean()), 1e-9)
        sizes = {t: len(v) for t, v in terms.items()}
        pooled = np.concatenate([terms[t] * sum(sizes.values()) / (len(got) * sizes[t]) for t in sizes])
        b = paired_bootstrap(np.zeros_like(pooled), pooled, n=n, seed=self.cfg.seed, ci=ci)
        per_metric = {k: paired_bootstrap(raw[k], got[k], n=n, seed=self.cfg.seed, ci=ci) for k in got}
        self.seconds += time.perf_counter() - t0
        return {"objective": b["diff"], "ci_low": b["ci_low"], "ci_high": b["ci_high"], "level": ci, "queries": sizes,
                "metrics": {k: {x: v[x] for x in ("diff", "ci_low", "ci_high")} for k, v in per_metric.items()},
                "gains": [k for k, v in per_metric.items() if v["ci_low"] > 0]}

    def choose(self, cands: list[dict]) -> tuple[float, float]:
        """(objective, alpha) of the best candidate; (0, 0) = the identity when none is feasible and gains.

        The shipping rule is `metrics.scoring.ship` among the alphas > 0 (alpha 0 is the identity itself);
        unguarded, the last alpha (1.0); on the proxy, which measures no quality, the boldest feasible alpha.
        """
        if not self.cfg.guard:
            return cands[-1]["objective"], cands[-1]["alpha"]
        trained = [c for c in cands if c["alpha"] > 0]
        if self.proxy:  # the boldest alpha that keeps the raw neighbourhoods
            best = max((c for c in trained if c["feasible"]), key=lambda c: c["alpha"], default=None)
            return (best["alpha"], best["alpha"]) if best else (0.0, 0.0)
        i = ship(trained, identity=True)
        return (0.0, 0.0) if i is None else (trained[i]["objective"], trained[i]["alpha"])

    def grid(self, final: bool) -> tuple[float, ...]:
        if not self.cfg.guard:
            return (1.0,)  # unguarded: alpha = 1, only the checkpoint is chosen
        return tuple(self.cfg.alphas) if final else coarse_grid(self.cfg.alphas)

    def evaluator(self, tag: str = ""):
        """The training loop's callback: `(model, step) -> Evaluation` on the coarse grid, recorded by (tag, step)."""
        def evaluate(model: SimSkip, step: int) -> Evaluation:
            cands = self.sweep(model, self.grid(final=False), coarse=True)
            obj, alpha = self.choose(cands)
            ev = Evaluation(step, obj, alpha, {"candidates": cands})
            self.record[(tag, step)] = ev
            return ev
        evaluate.min_gain = MIN_GAIN  # read by training.Run: smaller gains do not reset patience
        return evaluate
