"""Does refinement help? Retrieval quality and ANN fidelity, refined vs raw vs free baselines.

Two axes, never conflated (docs/evaluation.md):
1. retrieval quality on held-out queries (labels: precision@10, mAP@100; pairs: nDCG@10,
   Recall@10/100, MRR@10), every method searched through the same `RefinedIndex` path as
   production, with a paired-bootstrap interval on the change against raw;
2. ANN fidelity in each refined space: 1-recall@1, 1-recall@10, 10-recall@10 and queries/s over a
   sweep of efSearch / nprobe, ground truth = exact search over the refined vectors.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm.auto import tqdm

from .baselines import lda_candidates, ridge_candidates
from ..datasets.core import EmbeddingData, answer_pairs
from ..faiss_utils import metric_code
from ..index import RefinedIndex
from ..metrics.ranking import knn_recall, paired_bootstrap
from ..persistence import atomic_write_bytes
from ..refiners.core import IdentityRefiner, LinearRefiner
from ..metrics.scoring import (LABEL_METRICS, PAIR_METRICS, judge, label_relevant, score, seen_queries,  # noqa: F401
                               ship, task_queries)
from ..errors import InputError

log = logging.getLogger(__name__)

HEADLINE = {"labels": "map@100", "pairs": "ndcg@10", "seen": "ndcg@10", "unseen": "ndcg@10"}
# the pair queries split by whether their documents have training queries (the shared-corpus protocol):
# "seen" documents may carry document updates; "unseen" ones show what a map alone does
GROUP_METRICS = ("ndcg@10",)
BASELINES = ("raw", "centred", "whitened", "abtt", "ridge", "lda", "ridge+mean", "ridge+nudge")
# the ridge query map plus document updates of the answer documents (nudge.py): "mean" moves each toward
# its training queries' mean, "nudge" takes contrastive steps; the step chosen on val, as the refiner's is
DOCUMENT_BASELINES = {"ridge+mean": "mean", "ridge+nudge": "contrastive"}
# supervised baseline -> (task, metric) its hyperparameters maximise on val, ("task:metric", ...) kept >= raw there
SUPERVISED_BASELINES = {"ridge": ("pairs", "ndcg@10", ()), "lda": ("labels", "map@100", ("pairs:ndcg@10",))}


@dataclass
class EvalConfig:
    """How to evaluate. `factory` is the index quality is measured through (exact by default, so
    that ANN error does not blur quality); `ann_factory` is the one whose recall/speed is swept."""

    factory: str = "Flat"
    metric: str = "ip"
    split: str = "test"
    baselines: tuple[str, ...] = BASELINES  # ridge / lda only where the data has pairs / labels
    abtt_components: int | None = None       # None: d/100 (Mu & Viswanath)
    max_queries: int | None = 5000           # per task, seeded subsample of the split's queries
    ann_factory: str | None = "HNSW32"       # None skips the ANN axis
    ann_sweep: tuple[int, ...] | None = None  # efSearch / nprobe values; None picks by index type
    ann_methods: tuple[str, ...] | None = None  # None: raw + every refiner under test
    threads: int = 2                         # FAISS OpenMP threads while evaluating (restored after)
    max_val_queries: int = 2000              # per task, to choose the supervised baselines' lam / shrinkage
    bootstrap: int = 1000
    seed: int = 0
    progress: bool = True


@dataclass
class EvalReport:
    """Long-format results: one row per (method, task, metric), plus the ANN sweep."""

    quality: list[dict] = field(default_factory=list)
    ann: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def value(self, method: str, task: str, metric: str) -> float:
        for r in self.quality:
            if (r["method"], r["task"], r["metric"]) == (method, task, metric):
                return r["value"]
        raise KeyError(f"no result for {method}/{task}/{metric}")

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.quality))

    def table(self) -> str:
        """A plain-text table: methods as rows, task metrics as columns, Δ vs raw on headline metrics."""
        if not self.quality:
            return "(no labels or qrels: retrieval quality not measured)\n\n" + _ann_table(self.ann)
        cols = list(dict.fromkeys((r["task"], r["metric"]) for r in self.quality))
        head = ["method"] + [f"{t}:{m}" for t, m in cols]
        rows = []
        for meth in self.methods():
            cells = [meth]
            for t, m in cols:
                r = next((r for r in self.quality if (r["method"], r["task"], r["metric"]) == (meth, t, m)), None)
                if r is None:
                    cells.append("")
                elif meth != "raw" and HEADLINE.get(t) == m:
                    cells.append(f"{r['value']:.4f} ({r['delta']:+.4f}{'*' if r['significant'] else ''})")
                else:
                    cells.append(f"{r['value']:.4f}")
            rows.append(cells)
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        lines.append("(Δ vs raw in brackets on headline metrics; * = 95% paired-bootstrap interval excludes 0)")
        for name, tasks in self.info.get("not_held_out", {}).items():
            lines.append(f"WARNING: {name} trained or validated on " + ", ".join(
                f"{v['trained_or_validated_on']} of the {v['scored']} {t} queries scored" for t, v in tasks.items())
                + ": those figures are not held out")
        if self.ann:
            lines += ["", _ann_table(self.ann)]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        cols = list(dict.fromkeys((r["task"], r["metric"]) for r in self.quality))
        out = ["| method | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for meth in self.methods():
            cells = []
            for t, m in cols:
                r = next((r for r in self.quality if (r["method"], r["task"], r["metric"]) == (meth, t, m)), None)
                cells.append("" if r is None else f"{r['value']:.4f}" + (f" ({r['delta']:+.4f})" if meth != "raw" else ""))
            out.append(f"| {meth} | " + " | ".join(cells) + " |")
        if self.ann:
            out += ["", "ANN fidelity in each method's own space (ground truth: exact search there):", "",
                    "| method | index | param | 1-recall@1 | 1-recall@10 | 10-recall@10 | queries/s |", "|---" * 7 + "|"]
            for a in self.ann:
                out.append(f"| {a['method']} | {a['factory']} | {a['param']}={a['value']} | {a['1-recall@1']:.4f} | "
                           f"{a['1-recall@10']:.4f} | {a['10-recall@10']:.4f} | {a['qps']:.0f} |")
        return "\n".join(out)

    def to_json(self) -> str:
        return json.dumps({"quality": self.quality, "ann": self.ann, "info": self.info}, indent=2, default=_jsonable)

    def write(self, directory: str | os.PathLike, plots: bool = True) -> Path:
        """report.json, report.md and (if matplotlib is installed) quality.png and ann.png."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "report.json", self.to_json().encode())
        atomic_write_bytes(d / "report.md", (_md_header(self.info) + self.to_markdown() + "\n").encode())
        if plots:
            try:
                from .plots import plot_ann, plot_quality
            except ImportError:
                log.warning("matplotlib is not installed: no PNG plots (pip install 'simskip-faiss[data]')")
            else:
                plot_quality(self, d / "quality.png")
                if self.ann:
                    plot_ann(self, d / "ann.png")
        return d


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _md_header(info: dict) -> str:
    lines = ["# simskip-faiss evaluation", ""]
    for k in ("data", "split", "factory", "metric", "queries", "machine", "command", "shipped", "seconds"):
        if k in info:
            lines.append(f"- **{k}**: {info[k]}")
    for name, meta in info.get("baselines", {}).items():
        lines.append(f"- **{name}** baseline: {meta.get('name')}, fitted on the train split, chosen on {meta.get('chosen_on')}"
                     + (", queries only (documents raw)" if meta.get("apply_to") == "queries" else ""))
    for name, tasks in info.get("not_held_out", {}).items():
        lines.append(f"- **WARNING**: {name} trained or validated on " + ", ".join(
            f"{v['trained_or_validated_on']} of the {v['scored']} {t} queries scored" for t, v in tasks.items())
            + ": those figures are not held out")
    return "\n".join(lines) + "\n\n"


def _ann_table(ann: list[dict]) -> str:
    head = f"{'method':<16} {'index':<10} {'param':<14} {'1-R@1':>7} {'1-R@10':>7} {'10-R@10':>8} {'q/s':>9}"
    lines = [head, "-" * len(head)]
    for a in ann:
        lines.append(f"{a['method']:<16} {a['factory']:<10} {a['param'] + '=' + str(a['value']):<14} "
                     f"{a['1-recall@1']:7.4f} {a['1-recall@10']:7.4f} {a['10-recall@10']:8.4f} {a['qps']:9.0f}")
    return "\n".join(lines)


@contextmanager
def faiss_threads(n: int):
    """Run a block with FAISS's OpenMP thread count set to `n`, restoring the caller's setting after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def baselines(data: EmbeddingData, names=BASELINES, abtt_components: int | None = None,
              max_val_queries: int | None = 2000, seed: int = 0) -> dict:
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
                  max_queries: int | None = 2000, seed: int = 0):
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


def build(refiner, data: EmbeddingData, factory: str = "Flat", metric="ip", progress: bool = False) -> RefinedIndex:
    """A `RefinedIndex` of `data`'s whole corpus behind `refiner` (trained on the corpus if the index needs it)."""
    index = RefinedIndex(refiner, factory, metric, progress=progress)
    if not index.is_trained:
        index.train(data.corpus)
    index.add(data.corpus)
    return index


def evaluate(data: EmbeddingData, refiners: dict | None = None, config: EvalConfig | None = None) -> EvalReport:
    """Evaluate raw vectors, the free baselines and each refiner in `refiners` (name -> refiner) on `data`."""
    cfg = config or EvalConfig()
    metric_code(cfg.metric)
    with faiss_threads(cfg.threads):
        return _evaluate(data, refiners, cfg)


def _evaluate(data: EmbeddingData, refiners: dict | None, cfg: EvalConfig) -> EvalReport:
    methods = baselines(data, cfg.baselines, cfg.abtt_components, cfg.max_val_queries, cfg.seed)
    clash = set(methods) & set(refiners or {})
    if clash:
        raise InputError(f"refiner names {sorted(clash)} clash with baseline names")
    methods.update(refiners or {})
    if "raw" not in methods:
        methods = {"raw": IdentityRefiner(data.corpus.shape[1]), **methods}
    queries = task_queries(data, cfg.split, cfg.max_queries, cfg.seed)
    if not queries and not cfg.ann_factory:
        raise InputError(f"{data.name} has neither labels nor queries with qrels, and the ANN axis is off: "
                         "nothing to evaluate")
    report = EvalReport(info={"data": data.summary(), "split": cfg.split, "factory": cfg.factory, "metric": cfg.metric,
                              "queries": {t: int(len(q)) for t, q in queries.items()}, "config": asdict(cfg),
                              "baselines": {n: methods[n].metadata for n in (*SUPERVISED_BASELINES, *DOCUMENT_BASELINES)
                                            if n in methods}})
    per_method = {}
    for name, ref in tqdm(methods.items() if queries else (), desc="evaluate", unit="method", disable=not cfg.progress):
        per_method[name] = score(build(ref, data, cfg.factory, cfg.metric), data, queries)
    seen = seen_queries(data, queries.get("pairs"))
    if seen is not None and seen.any() and not seen.all():
        report.info["queries"].update(seen=int(seen.sum()), unseen=int((~seen).sum()))
        for tasks in per_method.values():
            tasks.update({g: {m: tasks["pairs"][m][mask] for m in GROUP_METRICS} for g, mask in
                          (("seen", seen), ("unseen", ~seen))})
    # held-out figures only: a validation-split evaluation (choose_refiner) scores validation queries by design
    report.info["not_held_out"] = _not_held_out(data, queries, refiners or {}) if cfg.split == "test" else {}
    for name, tasks in per_method.items():
        for task, pq in tasks.items():
            for m in (LABEL_METRICS if task == "labels" else PAIR_METRICS if task == "pairs" else GROUP_METRICS):
                row = {"method": name, "task": task, "metric": m, "value": float(pq[m].mean()),
                       "std": float(pq[m].std()), "n": int(len(pq[m]))}
                bs = paired_bootstrap(per_method["raw"][task][m], pq[m], n=cfg.bootstrap, seed=cfg.seed)
                row.update(delta=bs["diff"], ci_low=bs["ci_low"], ci_high=bs["ci_high"],
                           significant=bool(bs["significant"]) and name != "raw", better=bs["better"], worse=bs["worse"])
                report.quality.append(row)
    if cfg.ann_factory:
        ann_names = cfg.ann_methods or ["raw", *(refiners or {})]
        if "pairs" in queries:
            qx = data.queries[queries["pairs"]]
        else:  # no relevance judgements needed: held-out corpus rows serve as queries
            qx = np.asarray(data.corpus[queries.get("labels", data.split_rows(cfg.split)[: cfg.max_queries])])
        for name in ann_names:
            report.ann += ann_sweep(methods[name], data.corpus, qx, cfg.ann_factory, cfg.metric, cfg.ann_sweep,
                                    cfg.threads, name)
    return report


def _not_held_out(data: EmbeddingData, queries: dict, refiners: dict) -> dict:
    """Per refiner whose file records what it trained on: how many of the scored queries it trained or
    validated on (pair query vectors, label rows), by task; logged as a warning. {} when none."""
    from ..datasets.fingerprint import seen

    out = {}
    for name, ref in refiners.items():
        rec = (getattr(ref, "metadata", None) or {}).get("trained_on")
        if not rec:
            continue
        counts = {}
        if "pairs" in queries:
            counts["pairs"] = int(seen(rec, data.queries[queries["pairs"]]).sum())
        if "labels" in queries:
            counts["labels"] = int(seen(rec, np.asarray(data.corpus[queries["labels"]])).sum())
        if any(counts.values()):
            out[name] = {t: {"scored": int(len(queries[t])), "trained_or_validated_on": c} for t, c in counts.items()}
            log.warning("%s trained or validated on %s of the queries scored here: its figures are not held out "
                        "(give held-out queries, e.g. eval --test-qrels)", name,
                        ", ".join(f"{c} of {len(queries[t])} {t}" for t, c in counts.items() if c))
    return out


def choose_refiner(data: EmbeddingData, refiners: dict, config: EvalConfig | None = None,
                   tolerance: float = 0.0) -> tuple[str, dict]:
    """Which of `refiners` to ship, decided on the VALIDATION split (never test), by the guard's rule.

    Each is scored on every val metric through the production path and judged by `metrics.scoring.judge`
    (feasible = no metric below raw by more than `tolerance`; objective = the mean relative gain over raw);
    `metrics.scoring.ship` picks the best among feasible ones, and, unlike the guard, among all if none is:
    each refiner passed its own guard, so one of them ships, never the identity. Returns
    (name, {name: {"objective", "feasible", "metrics"}, "raw": metrics}).
    """
    cfg = config or EvalConfig()
    if len(refiners) == 1 or not task_queries(data, "val", 1, cfg.seed):
        return next(iter(refiners)), {}
    rep = evaluate(data, refiners, replace(cfg, split="val", baselines=("raw",), ann_factory=None,
                                           max_queries=cfg.max_val_queries, bootstrap=100))
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rep.quality))
    raw = {f"{t}:{m}": rep.value("raw", t, m) for t, m in keys}
    table: dict = {"raw": raw}
    for name in refiners:
        m = {f"{t}:{k}": rep.value(name, t, k) for t, k in keys}
        feasible, objective = judge(m, raw, tolerance)
        table[name] = {"objective": objective, "feasible": feasible, "metrics": m}
    names = list(refiners)
    return names[ship([table[n] for n in names], identity=False)], table


def _sweep_param(factory: str) -> tuple[str | None, tuple]:
    f = factory.upper()
    if "HNSW" in f:
        return "efSearch", (16, 32, 64, 128, 256)
    if "IVF" in f:
        return "nprobe", (1, 2, 4, 8, 16, 32, 64)
    return None, (0,)


def ann_sweep(refiner, corpus: np.ndarray, queries: np.ndarray, factory: str = "HNSW32", metric="ip",
              values=None, threads: int = 2, name: str = "refined", k: int = 10, repeats: int = 3) -> list[dict]:
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
