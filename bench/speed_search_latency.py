"""Section 3 of bench/speed.py: single-query RefinedIndex.search vs raw FAISS (Flat, HNSW32, IVF256,Flat).

At equal 10-recall@10, with FAISS's distance computations counted at both knobs.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import faiss

from simskip_faiss import RefinedIndex, Refiner

from speed_common import D, exact_top10, recall_at_10
from speed_timing import blocks, per_block, set_threads


# queries per turn: Flat streams the whole index (WordNet 20k x 384: 30 MB, beyond L2) on every query (no cache to keep
# warm), so its contenders alternate query by query; HNSW/IVF run 100 queries per turn (~20 ms)
BLOCK = {"Flat": 1, "HNSW32": 100, "IVF": 100}
FACTORIES = {"Flat": ("Flat", None), "HNSW32": ("HNSW32", ("efSearch", 64)), "IVF": ("IVF256,Flat", ("nprobe", 16))}
KNOB_GRID = {"efSearch": tuple(range(8, 257, 4)), "nprobe": tuple(range(1, 257))}


def _tune(index, knob) -> None:
    if knob:
        faiss.ParameterSpace().set_index_parameter(index, *knob)


def _ndis(index, queries: np.ndarray, knob) -> tuple[np.ndarray, float]:
    """(top-10 ids, distance computations per query) at `knob`; FAISS's own counters (HNSW, IVF), else ntotal."""
    _tune(index, knob)
    stats = {"efSearch": faiss.cvar.hnsw_stats, "nprobe": faiss.cvar.indexIVF_stats}.get(knob[0]) if knob else None
    if stats is not None:
        stats.reset()
    I = index.search(queries, 10)[1]
    return I, (stats.ndis / len(queries) if stats is not None else float(index.ntotal))


def search_latency(refiner_file: Path, corpus: np.ndarray, queries: np.ndarray, n_queries: dict[str, int],
                   build_threads: int, rounds: int) -> dict[str, dict]:
    """Single-query latency of raw FAISS (raw vectors) and of RefinedIndex.search, at equal recall.

    The refiner's own data (the corpus it was trained on and its queries). Raw FAISS runs at the
    factory's knob (efSearch 64 / nprobe 16); the refined index at the smallest knob whose 10-recall@10
    against exact search in its own space reaches raw's against exact search in the raw space, with
    FAISS's distance counters (`ndis`) reported at both knobs: an index whose lists or graph are
    harder to search in the refined space shows it there, not as wrapper overhead.
    by_hand = refiner.transform then FAISS search of the refined index: the work RefinedIndex.search
    must do, so overhead = RefinedIndex.search - by_hand. The refine alone and FAISS alone on the
    refined index are timed too, in their own loops (`blocks`: interleaved turns).
    """
    out = {}
    ref = Refiner.load(refiner_file, threads=1)
    rq_all = ref.transform(queries)
    gt_raw, gt_ref = exact_top10(corpus, queries), exact_top10(ref.transform(corpus), rq_all)
    for name, (factory, knob) in FACTORIES.items():
        set_threads(build_threads)
        t0 = time.perf_counter()
        raw = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        raw.train(corpus)
        raw.add(corpus)
        ri = RefinedIndex(ref, factory, "ip")
        ri.train(corpus)
        ri.add(corpus)
        build = time.perf_counter() - t0
        set_threads(1)
        inner = ri.index
        I, raw_ndis = _ndis(raw, queries, knob)
        target = recall_at_10(gt_raw, I)
        I, ndis_same = _ndis(inner, rq_all, knob)
        same_recall = recall_at_10(gt_ref, I)
        matched = knob
        if knob:
            v = next((v for v in KNOB_GRID[knob[0]] if recall_at_10(gt_ref, _ndis(inner, rq_all, (knob[0], v))[0]) >= target),
                     KNOB_GRID[knob[0]][-1])
            matched = (knob[0], v)
        I, ndis = _ndis(inner, rq_all, matched)
        _tune(raw, knob)
        n = n_queries[name]
        q = [queries[i:i + 1] for i in range(n)]
        rq = [rq_all[i:i + 1] for i in range(n)]
        t = blocks({"raw_faiss": lambda i: raw.search(q[i], 10),
                    "by_hand": lambda i: inner.search(ref.transform(q[i]), 10),
                    "refined_index": lambda i: ri.search(q[i], 10),
                    "refine_only": lambda i: ref.transform(q[i]),
                    "refined_faiss_only": lambda i: inner.search(rq[i], 10)}, n, rounds, BLOCK[name])
        med = {k: float(np.median(v) * 1e6) for k, v in t.items()}
        out[name] = {"factory": factory, "param": knob, "matched_param": matched, "n_queries": n, "rounds": rounds,
                     "build_s": build, "raw_recall10": target, "recall10_same_param": same_recall,
                     "recall10": recall_at_10(gt_ref, I), "raw_ndis": raw_ndis, "ndis_same_param": ndis_same, "ndis": ndis,
                     "median_us": med, "overhead_us": 1e6 * per_block(t["refined_index"], t["by_hand"], BLOCK[name], lambda x, y: x - y),
                     "overhead_us_of_medians": med["refined_index"] - med["by_hand"],
                     "interference_us": med["by_hand"] - med["refine_only"] - med["refined_faiss_only"],
                     "refined_vs_raw": med["refined_index"] / med["raw_faiss"],
                     "extra_over_raw_minus_refine_us": 1e6 * per_block(t["refined_index"], t["raw_faiss"], BLOCK[name], lambda x, y: x - y)
                     - med["refine_only"]}
        print(f"  {name}: {matched} recall {out[name]['recall10']:.4f} (raw {target:.4f}), ndis {ndis:.0f} (raw {raw_ndis:.0f}); "
              + ", ".join(f"{k} {v:.1f} us" for k, v in med.items())
              + f"; overhead {out[name]['overhead_us']:.1f} us; extra {out[name]['extra_over_raw_minus_refine_us']:.1f} us", flush=True)
    return out
