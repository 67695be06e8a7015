"""Section 7 of bench/speed.py: one query, one thread, HNSW32: where the time goes, stage by stage.

Checks, refine, FAISS in the refined vs the raw space at equal 10-recall@10 (distance computations
counted), interference and result handling, per refiner precision and width.
"""
from __future__ import annotations

import numpy as np
import faiss

from simskip_faiss import RefinedIndex
from simskip_faiss.refiners import as_input

from speed_common import D, exact_top10, recall_at_10
from speed_timing import blocks, per_block, set_threads


EF = 64  # the operating point: HNSW32, efSearch 64


def hnsw_at(index, queries: np.ndarray, ef: int) -> tuple[np.ndarray, float]:
    """(top-10 ids, distance computations per query from faiss.cvar.hnsw_stats) at efSearch `ef`."""
    index.hnsw.efSearch = ef
    stats = faiss.cvar.hnsw_stats
    stats.reset()
    I = index.search(queries, 10)[1]
    return I, stats.ndis / len(queries)


def matched_ef(index, queries: np.ndarray, gt: np.ndarray, target: float, grid=tuple(range(8, 257, 4))) -> int:
    """The smallest efSearch on `grid` whose 10-recall@10 against `gt` (exact search) reaches `target`."""
    return next((ef for ef in grid if recall_at_10(gt, hnsw_at(index, queries, ef)[0]) >= target), grid[-1])


def where_time_goes(refiners: dict, corpus: np.ndarray, queries: np.ndarray, n: int, build_threads: int,
                    rounds: int) -> tuple[dict, dict]:
    """One query, one thread, HNSW32: raw FAISS vs RefinedIndex.search, stage by stage, at equal recall.

    Equal recall: each refined index runs at the smallest efSearch whose 10-recall@10 against exact
    search in its own (refined) space reaches what raw FAISS gets at efSearch 64 against exact search
    in the raw space. Stages, each timed in its own loop (`blocks`, 100 queries a turn, rotating):
    input checks (`as_input`), refine (the refiner without checks), FAISS on pre-refined queries,
    refine then FAISS back to back, and RefinedIndex.search. Back to back costs more than the sum of
    the stages alone: each evicts the other's cache lines ("interference"). Returns (results, the
    refined indexes by name, for section 8).
    """
    set_threads(build_threads)
    raw = faiss.index_factory(D, "HNSW32", faiss.METRIC_INNER_PRODUCT)
    raw.add(corpus)
    set_threads(1)
    I, ndis = hnsw_at(raw, queries, EF)
    target = recall_at_10(exact_top10(corpus, queries), I)
    out: dict = {"n_corpus": len(corpus), "n_queries": n, "rounds": rounds,
                 "raw": {"efSearch": EF, "recall10": target, "ndis": ndis}}
    q = [queries[i:i + 1] for i in range(n)]
    fns = {"raw": lambda i: raw.search(q[i], 10)}
    indexes = {}
    for name, ref in refiners.items():
        set_threads(build_threads)
        ri = indexes[name] = RefinedIndex(ref, "HNSW32", "ip")
        ri.add(corpus)
        set_threads(1)
        rq_all = ref.transform(queries)
        gt = exact_top10(ref.transform(corpus), rq_all)
        I64, ndis64 = hnsw_at(ri.index, rq_all, EF)
        ef = matched_ef(ri.index, rq_all, gt, target)
        I, ndis = hnsw_at(ri.index, rq_all, ef)
        out[name] = {"recall10_at_64": recall_at_10(gt, I64), "ndis_at_64": ndis64, "efSearch": ef,
                     "recall10": recall_at_10(gt, I), "ndis": ndis}
        rq = [rq_all[i:i + 1] for i in range(n)]
        fns |= {f"{name}|checks": lambda i: as_input(q[i], D),
                f"{name}|refine": lambda i, r=ref: r.apply_unchecked(q[i]),
                f"{name}|faiss": lambda i, x=ri.index, rq=rq: x.search(rq[i], 10),
                f"{name}|refine+faiss": lambda i, r=ref, x=ri.index: x.search(r.apply_unchecked(q[i]), 10),
                f"{name}|search": lambda i, ri=ri: ri.search(q[i], 10)}
    t = blocks(fns, n, rounds, 100)
    med = {k: float(np.median(v) * 1e6) for k, v in t.items()}
    out["raw"]["us"] = med["raw"]
    for name in refiners:
        m = {stage: med[f"{name}|{stage}"] for stage in ("checks", "refine", "faiss", "refine+faiss", "search")}
        out[name].update(us=m, interference_us=m["refine+faiss"] - m["refine"] - m["faiss"],
                         handling_us=m["search"] - m["refine+faiss"] - m["checks"],
                         refined_vs_raw=per_block(t[f"{name}|search"], t["raw"], 100, lambda a, b: a / b),
                         faiss_vs_raw=per_block(t[f"{name}|faiss"], t["raw"], 100, lambda a, b: a / b))
        o = out[name]
        print(f"  {name}: efSearch {o['efSearch']} (recall {o['recall10']:.4f} vs raw {target:.4f}), ndis {o['ndis']:.0f} vs raw "
              f"{out['raw']['ndis']:.0f}; " + ", ".join(f"{k} {v:.1f}" for k, v in m.items())
              + f" us; raw {med['raw']:.1f} us; refined/raw {o['refined_vs_raw']:.3f}", flush=True)
    return out, indexes
