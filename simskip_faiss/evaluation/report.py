"""Does refinement help? Retrieval quality and ANN fidelity, refined vs raw vs free baselines.

Two axes, never conflated (docs/evaluation.md):
1. retrieval quality on held-out queries (labels: precision@10, mAP@100; pairs: nDCG@10,
   Recall@10/100, MRR@10), every method searched through the same `RefinedIndex` path as
   production, with a paired-bootstrap interval on the change against raw;
2. ANN fidelity in each refined space: 1-recall@1, 1-recall@10, 10-recall@10 and queries/s over a
   sweep of efSearch / nprobe, ground truth = exact search over the refined vectors (`ann`).

The methods compared besides the refiners under test (the free baselines) are fitted and chosen in
`methods`; this module runs both axes, writes the report, and chooses the refiner to ship on val.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import EVAL_FACTORY, INDEX_FACTORY, MAX_EVAL_QUERIES, MAX_VAL_QUERIES, THREADS
from ..datasets import EmbeddingData
from ..errors import InputError
from ..faiss_utils import metric_code
from ..metrics.ranking import paired_bootstrap
from ..metrics.scoring import (LABEL_METRICS, PAIR_METRICS, judge, label_relevant, score, seen_queries,  # noqa: F401
                               ship, task_queries)
from ..persistence import atomic_write_bytes
from ..refiners import IdentityRefiner
from .ann import _ann_table, ann_sweep, faiss_threads
from .methods import BASELINES, DOCUMENT_BASELINES, SUPERVISED_BASELINES, baselines, build, choose_on_val  # noqa: F401

log = logging.getLogger(__name__)

HEADLINE = {"labels": "map@100", "pairs": "ndcg@10", "seen": "ndcg@10", "unseen": "ndcg@10"}
# the pair queries split by whether their documents have training queries (the shared-corpus protocol):
# "seen" documents may carry document updates; "unseen" ones show what a map alone does
GROUP_METRICS = ("ndcg@10",)


@dataclass
class EvalConfig:
    """How to evaluate. `factory` is the index quality is measured through (exact by default, so
    that ANN error does not blur quality); `ann_factory` is the one whose recall/speed is swept."""

    factory: str = EVAL_FACTORY
    metric: str = "ip"
    split: str = "test"
    baselines: tuple[str, ...] = BASELINES  # ridge / lda only where the data has pairs / labels
    abtt_components: int | None = None       # None: d/100 (Mu & Viswanath)
    max_queries: int | None = MAX_EVAL_QUERIES           # per task, seeded subsample of the split's queries
    ann_factory: str | None = INDEX_FACTORY       # None skips the ANN axis
    ann_sweep: tuple[int, ...] | None = None  # efSearch / nprobe values; None picks by index type
    ann_methods: tuple[str, ...] | None = None  # None: raw + every refiner under test
    threads: int = THREADS                         # FAISS OpenMP threads while evaluating (restored after)
    max_val_queries: int = MAX_VAL_QUERIES              # per task, to choose the supervised baselines' lam / shrinkage
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
