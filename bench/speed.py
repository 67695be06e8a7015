"""Speed bench: what refinement costs at ingest and at search, as ratios against references timed in the same run.

Sections (each ratio's numerator and denominator are measured in this process, interleaved, so
that the machine's noise hits both alike; medians throughout):
  1. refine throughput at batch 1/16/1024/8192: onnxruntime (fp32, int8) vs torch eager vs a numpy
     matrix-multiply roofline (the two matmuls of the same shapes, i.e. the same FLOPs);
  2. single-vector refine latency of the default model (d=384, TrainConfig's hidden, depth 1) and other widths;
  3. single-query RefinedIndex.search vs raw FAISS (Flat, HNSW32, IVF256,Flat) on WordNet/MiniLM at equal
     10-recall@10, distance computations counted;
  4. the native linear path (LinearRefiner.to_faiss) vs the same pre-transform built by hand;
  5. quality parity of every speed option: 10-recall@10 vs the fp32 refiner on WordNet/MiniLM;
  6. streamed ingest of 1M x 384 from a .npy (in subprocesses): throughput vs raw add, peak RSS;
  7. one query, one thread, HNSW32 on WordNet/MiniLM: where the time goes (checks, refine, FAISS in
     the refined vs the raw space at equal 10-recall@10 with distance computations counted,
     interference, result handling), per refiner precision and width;
  8. 8 concurrent single-query callers through simskip_faiss.batching.MicroBatcher vs batches of 8;
  9. the shipped precision: guarded fit on WordNet/MiniLM, digits and synthetic data at hidden
     512/256/128, fp32 vs int8 on every test and validation metric (config.DEFAULT_PRECISION); the
     default width's quality evidence is bench/robustness.py's (every signal, 3 seeds, 5 data sets).
Thread counts of onnxruntime, FAISS (OpenMP, in every thread), BLAS (threadpoolctl) and torch are
set explicitly. Writes bench/results/speed.json and speed.md.

    python bench/speed.py                 # full run (writes 1.5 GB under --tmp, then deletes it)
    python bench/speed.py --quick         # small sizes, a smoke test of the script
    python bench/speed.py --sections 7,8 --update   # re-run some sections, keep the others' results
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import faiss  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from simskip_faiss import IdentityRefiner, RefinedIndex, Refiner, datasets  # noqa: E402
from simskip_faiss.config import TrainConfig  # noqa: E402
from simskip_faiss.batching import MicroBatcher  # noqa: E402
from simskip_faiss.training.export import PARITY_TOLERANCE, SAMPLE_RECALL, export  # noqa: E402
from simskip_faiss.metrics import knn_recall  # noqa: E402
from simskip_faiss.refiners.core import LinearRefiner, as_input, distil_linear  # noqa: E402
from simskip_faiss.evaluation import build
from simskip_faiss.metrics.scoring import LABEL_METRICS, PAIR_METRICS, score, task_queries  # noqa: E402
from simskip_faiss.training.guard import fit  # noqa: E402
from simskip_faiss.training import SimSkip, train  # noqa: E402

D, HIDDEN = 384, TrainConfig().hidden  # the default model is TrainConfig's; OTHER_WIDTHS are measured beside it
WIDTHS = (512, 256, 128)  # measured side by side in sections 2, 5, 7 and 9
OTHER_WIDTHS = tuple(w for w in WIDTHS if w != HIDDEN)
OWN = {"int8": "fp32", "fp16": "fp32", **{f"hidden {w} int8": f"hidden {w} fp32" for w in OTHER_WIDTHS},
       "distilled linear": "fp32"}
TARGETS = {"roofline_ratio": 0.85, "single_vector_us": 40.0, "search_overhead_us": 10.0,
           "recall_parity": 0.99, "ingest_rss_over_index_mb": 300.0, "native_vs_hand": 0.05,
           "hnsw_refined_vs_raw": 1.2, "shipped_metric_gap": 0.002, "flat_ivf_extra_us": 5.0, "concurrent_vs_batch": 0.7}


# -- timing ------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """FAISS (OpenMP), BLAS (all loaded libraries, via threadpoolctl) and torch get `n` threads."""
    faiss.omp_set_num_threads(n)
    threadpool_limits(limits=n)
    torch.set_num_threads(n)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, sample_s: float = 0.02, settle_s: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, timing them in turn (round robin) `reps` times.

    Each sample times as many back-to-back calls as fill about `sample_s` (calibrated per function
    on its warm-up), so short calls are timed over a loop and slow ones once. `settle_s` of sleep
    before each sample lets the previous function's thread pool stop spinning: OpenBLAS's and
    onnxruntime's busy-waiting workers halve the speed of whatever runs next on 2 cores. After the
    sleep, one untimed call wakes this function's own workers (and the idle core), so the sample
    measures steady-state throughput, not a wake-up.
    """
    inner = {}
    for k, f in fns.items():
        f()
        t = time.perf_counter()
        f()
        inner[k] = max(1, int(sample_s / max(time.perf_counter() - t, 1e-7)))
        for _ in range(min(inner[k], 1000)):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if settle_s:
                time.sleep(settle_s)
                f()
            t = time.perf_counter_ns()
            for _ in range(inner[k]):
                f()
            times[k].append((time.perf_counter_ns() - t) / inner[k] / 1e9)
    return {k: float(np.median(v)) for k, v in times.items()}


def blocks(fns: dict[str, Callable[[int], object]], n: int, rounds: int, block: int | None = None,
           warmup: int = 50) -> dict[str, np.ndarray]:
    """Seconds of every single call f(i), i < n, per function, as (rounds, n) arrays.

    The inputs are cut into blocks of `block`; each function runs a whole block on its own (a serving
    loop's steady state: its weights and data warm in cache), and the functions take turns block by
    block, in a rotating order, so a change in the machine's load hits them alike.
    """
    block = block or n
    out = {k: np.empty((rounds, n)) for k in fns}
    for f in fns.values():
        for i in range(min(warmup, n)):
            f(i)
    items, turn = list(fns.items()), 0
    for r in range(rounds):
        for s in range(0, n, block):
            turn += 1  # rotate who goes first: no function always follows the same one
            for k, f in items[turn % len(items):] + items[:turn % len(items)]:
                row = out[k][r]
                for i in range(s, min(s + block, n)):
                    t = time.perf_counter_ns()
                    f(i)
                    row[i] = (time.perf_counter_ns() - t) / 1e9
    return out


def per_block(a: np.ndarray, b: np.ndarray, block: int, op: Callable[[float, float], float]) -> float:
    """Median over (round, block) of op(median of a's calls, median of b's calls) in that block.

    Compares two functions within each turn of `blocks`, i.e. under the same machine load.
    """
    vals = [op(float(np.median(a[r, s:s + block])), float(np.median(b[r, s:s + block])))
            for r in range(a.shape[0]) for s in range(0, a.shape[1], block)]
    return float(np.median(vals))


# -- data and models -----------------------------------------------------------------------------
def clustered(n: int, d: int, seed: int, n_centres: int = 1000, spread: float = 0.5, chunk: int = 100_000,
              out: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors around random centres (written chunk by chunk into `out`, e.g. an open_memmap)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((n_centres, d)).astype(np.float32)
    out = np.empty((n, d), np.float32) if out is None else out
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(0, n_centres, m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def load_data(quick: bool):
    """WordNet definitions/usages encoded by MiniLM (cached), or synthetic clustered data if unavailable."""
    try:
        from simskip_faiss import datasets

        data = datasets.load_wordnet(n_synsets=5000 if quick else 20000, seed=0, progress=False)
        return data, "wordnet-minilm"
    except Exception as e:  # no cache and no network: say so and go on with synthetic data
        print(f"WordNet unavailable ({e}); quality parity uses synthetic clustered data", flush=True)
        return None, "synthetic"


def trained_model(corpus: np.ndarray, hidden: int, epochs: int, threads: int, rows=None) -> tuple[SimSkip, float]:
    """A SimSkip trained without the guard (alpha = 1: the most refinement, the hardest parity case)."""
    cfg = TrainConfig(hidden=hidden, epochs=epochs, threads=threads, progress=False, seed=0)
    t = time.perf_counter()
    res = train(corpus, cfg, train_rows=rows[0], val_rows=rows[1]) if rows else train(corpus, cfg)
    return res.model, time.perf_counter() - t


def export_all(model: SimSkip, out: Path, tag: str) -> dict[str, dict]:
    """fp32, int8 and fp16 exports of one model; returns their metadata by precision."""
    metas = {}
    for p in ("fp32", "int8", "fp16"):
        metas[p] = export(model, out / f"{tag}-{p}.onnx", {"metric": "ip"}, precision=p)
        metas[p]["file_bytes"] = (out / f"{tag}-{p}.onnx").stat().st_size
    return metas


# -- 1. throughput ---------------------------------------------------------------------------------
def throughput(model: SimSkip, files: dict[str, Path], threads: int, batches, reps: dict[int, int]) -> list[dict]:
    """vectors/s of each refiner path vs the numpy roofline (same two matmuls) at each batch size."""
    set_threads(threads)
    rng = np.random.default_rng(0)
    W1 = model.f[0].weight.detach().numpy().copy()
    W2 = model.f[-1].weight.detach().numpy().copy()
    refs = {p: Refiner.load(f, threads=threads) for p, f in files.items()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    pool_session = ort.InferenceSession(str(files["fp32"]), opts, providers=["CPUExecutionProvider"])
    pool_in = pool_session.get_inputs()[0].name
    rows = []
    for b in batches:
        x = rng.standard_normal((b, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        h, y, xt = np.empty((b, HIDDEN), np.float32), np.empty((b, D), np.float32), torch.from_numpy(x)

        def roofline(x=x, h=h, y=y):
            np.matmul(x, W1.T, out=h)
            np.matmul(h, W2.T, out=y)

        fns = {"numpy_roofline": roofline, **{f"ort_{p}": (lambda r=r, x=x: r.transform(x)) for p, r in refs.items()}}

        def eager(xt=xt):
            with torch.no_grad():
                model(xt)
        fns["torch_eager"] = eager
        if threads > 1:  # the alternative the Refiner does not use: onnxruntime's own intra-op pool
            fns["ort_fp32_intra_op_pool"] = lambda x=x: pool_session.run(None, {pool_in: x})
        if b > 4096:  # the Refiner's sub-batch size (default 1024), at the largest batch only
            for sb in sorted({1024, 2048, 4096} - {refs["fp32"].batch_size}):
                r = Refiner.load(files["fp32"], threads=threads, batch_size=sb)
                fns[f"ort_fp32_sub{sb}"] = lambda r=r, x=x: r.transform(x)
        # 2+ threads: every path alone on the cores (0.5 s for OpenBLAS's spinning to stop), over
        # samples of 0.2 s; 20 ms samples after a sleep measured the second core's wake-up instead
        t = (interleaved(fns, min(reps[b], 15), sample_s=0.2, settle_s=0.5) if threads > 1
             else interleaved(fns, reps[b]))
        flops = 2 * b * 2 * D * HIDDEN
        for k, s in t.items():
            rows.append({"threads": threads, "batch": b, "path": k, "us_per_call": s * 1e6, "vectors_per_s": b / s,
                         "gflops": flops / s / 1e9, "vs_roofline": t["numpy_roofline"] / s})
        print(f"  threads={threads} batch={b}: " + ", ".join(f"{k} {b / s:,.0f}/s ({t['numpy_roofline'] / s:.2f}x)"
                                                        for k, s in t.items()), flush=True)
    return rows


# -- 2. single-vector latency -----------------------------------------------------------------------
def single_vector(files: dict[str, Path], n: int = 2000, rounds: int = 5) -> dict[str, dict]:
    """Median/p90 microseconds of Refiner.transform on one vector, 1 onnxruntime thread (`blocks`)."""
    set_threads(1)
    refs = {k: Refiner.load(f, threads=1) for k, f in files.items()}
    xs = np.random.default_rng(1).standard_normal((n, D)).astype(np.float32)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    q = [xs[i:i + 1] for i in range(n)]
    t = blocks({k: (lambda i, r=r: r.transform(q[i])) for k, r in refs.items()}, n, rounds, 200)
    return {k: {"median_us": float(np.median(v) * 1e6), "p90_us": float(np.percentile(v, 90) * 1e6)} for k, v in t.items()}


# -- 3. search latency --------------------------------------------------------------------------------
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


# -- 4. native linear path -----------------------------------------------------------------------------
def by_hand(A: np.ndarray, b: np.ndarray, factory: str) -> faiss.IndexPreTransform:
    """LinearTransform + NormalizationTransform + a factory index, written with FAISS calls only."""
    lt = faiss.LinearTransform(A.shape[1], A.shape[0], True)
    faiss.copy_array_to_vector(A.ravel(), lt.A)
    faiss.copy_array_to_vector(b, lt.b)
    lt.is_trained = True
    norm = faiss.NormalizationTransform(A.shape[0], 2.0)
    inner = faiss.index_factory(A.shape[0], factory, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexPreTransform(norm, inner)
    index.prepend_transform(lt)
    return index


def native_linear(refiner_file: Path, base: np.ndarray, queries: np.ndarray, n: int, build_threads: int, rounds: int) -> dict:
    """Distil the MLP refiner into a linear map; time to_faiss vs the same pre-transform by hand vs the numpy path.

    On this machine the first large index built is a few % slower to scan whatever its kind (memory
    placement), so an untimed index is built first, then two copies of each in the order native,
    hand, hand, native, pooled.
    """
    ref = Refiner.load(refiner_file, threads=1)
    lin = distil_linear(ref, base[:20000])
    out = {"fit_r2": lin.metadata["fit_r2"]}
    for factory, knob in (("Flat", None), ("IVF1024,Flat", ("nprobe", 16))):
        set_threads(build_threads)
        idx = {"untimed": by_hand(*lin.affine(), factory),
               "native_a": lin.to_faiss(factory, "ip"), "hand_a": by_hand(*lin.affine(), factory),
               "hand_b": by_hand(*lin.affine(), factory), "native_b": lin.to_faiss(factory, "ip")}
        numpy_path = RefinedIndex(lin, factory, "ip")
        for i in (*idx.values(), numpy_path):
            i.train(base)
            i.add(base)
        idx.pop("untimed")  # kept alive until now, so the timed ones do not reuse its memory
        for i in (*idx.values(), numpy_path.index):
            _tune(i, knob)  # ParameterSpace reaches through IndexPreTransform
        set_threads(1)
        q = [queries[i:i + 1] for i in range(n)]
        In, Ih, Inp = idx["native_a"].search(queries[:n], 10)[1], idx["hand_a"].search(queries[:n], 10)[1], numpy_path.search(queries[:n], 10)[1]
        blk = BLOCK["Flat" if factory == "Flat" else "IVF"]
        t = blocks({**{k: (lambda i, x=x: x.search(q[i], 10)) for k, x in idx.items()},
                    "numpy_path": lambda i: numpy_path.search(q[i], 10)}, n, rounds, blk)
        t = {"native_to_faiss": np.vstack([t["native_a"], t["native_b"]]), "hand_built": np.vstack([t["hand_a"], t["hand_b"]]),
             "numpy_path": t["numpy_path"]}
        med = {k: float(np.median(v) * 1e6) for k, v in t.items()}
        out[factory] = {"median_us": med, "native_vs_hand": per_block(t["native_to_faiss"], t["hand_built"], blk, lambda x, y: x / y) - 1,
                        "native_vs_hand_of_medians": med["native_to_faiss"] / med["hand_built"] - 1,
                        "same_results_as_hand": bool((In == Ih).all()),
                        "recall10_native_vs_numpy_path": recall_at_10(Inp, In)}
        print(f"  native {factory}: " + ", ".join(f"{k} {v:.1f} us" for k, v in med.items())
              + f"; native/hand - 1 = {out[factory]['native_vs_hand']:+.3f}", flush=True)
    return out


# -- 5. quality parity -------------------------------------------------------------------------------------
def recall_at_10(want: np.ndarray, got: np.ndarray) -> float:
    """FAISS's 10-recall@10 (intersection): |true top-10 ∩ returned top-10| / 10, averaged over queries."""
    return knn_recall(want, got, ks=(10,))["10-recall@10"]


def top10(refine, corpus: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(refine(corpus), dtype=np.float32))
    return index.search(np.ascontiguousarray(refine(queries), dtype=np.float32), 11)[1]


def label_precision(I: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> float:
    """precision@10 of same-label neighbours for corpus rows used as queries (the row itself dropped)."""
    hits = []
    for r, nb in zip(rows, I):
        nb = nb[nb != r][:10]
        hits.append(float((labels[nb] == labels[r]).mean()))
    return float(np.mean(hits))


def quality(refiners: dict[str, Callable], own: dict[str, str], corpus: np.ndarray, queries: np.ndarray,
            label_rows=None, labels=None) -> dict:
    """10-recall@10 of each refiner vs the default fp32 refiner and vs its own fp32 model (`own`: name ->
    reference name; a precision option's parity), queries against the whole corpus; label precision@10."""
    set_threads(2)
    tops = {k: top10(f, corpus, queries)[:, :10] for k, f in refiners.items()}
    out = {}
    for k, f in refiners.items():
        row = {"recall10_vs_fp32": recall_at_10(tops["fp32"], tops[k])}
        if k in own:
            row["recall10_vs_own_fp32"] = recall_at_10(tops[own[k]], tops[k])
        if label_rows is not None:
            row["labels_precision@10"] = label_precision(top10(f, corpus, corpus[label_rows]), label_rows, labels)
        out[k] = row
    return out


# -- 7. single-query HNSW: where the time goes ---------------------------------------------------------------
EF = 64  # the issue's operating point: HNSW32, efSearch 64


def exact_top10(docs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), 10)[1]


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


# -- 8. concurrent single-query callers -------------------------------------------------------------------
def concurrent_callers(index, queries: np.ndarray, callers: int = 8, reps: int = 5,
                       waits_us=(200.0, 1000.0)) -> dict:
    """Queries/s of `callers` threads each searching one query at a time, vs one thread searching batches of `callers`.

    Paths: "batch" (one thread, index.search on `callers` queries per call: the reference),
    "serial" (one thread, one query per call), "threads" (`callers` threads calling index.search
    directly, one query each), "batcher wait=W" (the same threads through a MicroBatcher with
    max_batch = callers, max_wait_us = W) and "batcher max_batch=callers/2 wait=W" (half-size batches:
    one fills while the other is searched, where a full-size batch waits for every caller to come
    back). FAISS (OpenMP, set in every thread) and onnxruntime get
    one thread per calling thread; the paths take turns `reps` times, each over all `queries`.
    Throughput is given per wall-clock second and per CPU-second of the process (time.process_time,
    all threads): on a machine shared with other jobs the scheduler gives a many-threaded path more
    of the cores, which inflates its wall-clock throughput; CPU-seconds do not depend on that share.
    """
    set_threads(1)
    n = len(queries) - len(queries) % callers
    q = [queries[i:i + 1] for i in range(n)]

    def batch():
        for s in range(0, n, callers):
            index.search(queries[s:s + callers], 10)

    def serial():
        for v in q:
            index.search(v, 10)

    def threaded(search):
        def worker(j):
            for i in range(j, n, callers):
                search(q[i], 10)
        with ThreadPoolExecutor(callers, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
            list(pool.map(worker, range(callers)))

    one_thread = lambda: faiss.omp_set_num_threads(1)  # noqa: E731  (OpenMP counts are per thread)
    half = max(1, callers // 2)
    batchers = {**{f"batcher wait={w:g}us": MicroBatcher(index, max_batch=callers, max_wait_us=w, initializer=one_thread)
                   for w in waits_us},
                **{f"batcher max_batch={half} wait={w:g}us": MicroBatcher(index, max_batch=half, max_wait_us=w,
                                                                          initializer=one_thread) for w in waits_us}}
    paths = {"batch": batch, "serial": serial, "threads": lambda: threaded(index.search),
             **{name: (lambda mb=mb: threaded(mb.search)) for name, mb in batchers.items()}}
    try:
        want = index.search(queries[:n], 10)[1]
        got = np.empty_like(want)

        def check(j):
            for i in range(j, n, callers):
                got[i] = batchers[f"batcher wait={waits_us[0]:g}us"].search(q[i], 10)[1][0]
        with ThreadPoolExecutor(callers, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
            list(pool.map(check, range(callers)))
        wall: dict[str, list[float]] = {k: [] for k in paths}
        cpu: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(reps):
            for k, f in paths.items():
                t, c = time.perf_counter(), time.process_time()
                f()
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    finally:
        for mb in batchers.values():
            mb.close()
    out = {"callers": callers, "n_queries": n, "reps": reps, "batcher_results_equal_batch": bool((got == want).all())}
    for name, times in (("wall", wall), ("cpu", cpu)):
        out[f"qps_{name}"] = {k: n / float(np.median(v)) for k, v in times.items()}
        out[f"vs_batch_{name}"] = {k: float(np.median([times["batch"][r] / times[k][r] for r in range(reps)])) for k in paths}
    print("  " + ", ".join(f"{k} {out['qps_wall'][k]:,.0f} q/s ({out['vs_batch_wall'][k]:.2f}x batch; per CPU-second "
                           f"{out['vs_batch_cpu'][k]:.2f}x)" for k in paths)
          + f"; batcher results equal: {out['batcher_results_equal_batch']}", flush=True)
    return out


# -- 9. default precision and width ---------------------------------------------------------------------------
METRIC_TOL = 0.002  # the shipped refiner's metrics may differ from the fp32 refiner's by at most this


def frontier_data(quick: bool) -> dict:
    """The data sets the default is chosen on: WordNet/MiniLM (when cached), scikit-learn digits, synthetic."""
    out = {"digits": datasets.load_digits(seed=0),
           "synthetic": datasets.make_synthetic(n=4000 if quick else 10000, d=128, n_queries=1000 if quick else 2000, seed=0)}
    try:
        out["wordnet-minilm"] = datasets.load_wordnet(n_synsets=5000 if quick else 20000, seed=0, progress=False)
    except Exception as e:  # no cache and no network
        print(f"WordNet unavailable ({e}); the default is chosen on digits and synthetic data only", flush=True)
    return out


def split_metrics(refiner, data, split: str, max_queries: int) -> dict[str, float]:
    """Mean metrics of `refiner` on `data`'s split, exact search: the evaluation's (test) or the guard's (val)."""
    per = score(build(refiner, data), data, task_queries(data, split, max_queries))
    return {f"{t}:{m}": float(pq[m].mean()) for t, pq in per.items() for m in (LABEL_METRICS if t == "labels" else PAIR_METRICS)}


def defaults_frontier(work: Path, threads: int, quick: bool, seeds=(0,), epochs: int | None = None,
                      on_row: Callable[[list], None] | None = None) -> list[dict]:
    """Guarded `fit` (the shipped training) at each width, exported fp32 and int8, scored on test and val.

    Per row: the guard's alpha, 10-recall@10 of int8 vs fp32 (test queries, exact), every test
    metric (EvalConfig's 5,000 queries per task) and every validation metric (the guard's 2,000) of
    both precisions. `epochs` caps training (None: TrainConfig's default). `on_row(rows)` runs
    after each row (e.g. to save partial results).
    """
    rows = []
    for name, data in frontier_data(quick).items():
        raw = IdentityRefiner(data.corpus.shape[1])
        base = {"test": split_metrics(raw, data, "test", 5000), "val": split_metrics(raw, data, "val", 2000)}
        q = data.queries[data.split_queries("test")] if data.queries is not None else data.corpus[data.split_rows("test")]
        for w in WIDTHS:
            for seed in seeds:
                set_threads(threads)
                cap = {"epochs": 2 if quick else epochs} if quick or epochs else {}
                cfg = TrainConfig(hidden=w, threads=threads, progress=False, seed=seed, **cap)
                t = time.perf_counter()
                res = fit(data, cfg)
                row = {"data": name, "hidden": w, "seed": seed, "alpha": res.guard.alpha, "step": res.best_step,
                       "train_s": time.perf_counter() - t, "raw": base, "test": {}, "val": {}}
                files = {p: work / f"{name}-h{w}-s{seed}-{p}.onnx" for p in ("fp32", "int8")}
                refs = {}
                for p, f in files.items():  # int8 exported whatever its error, to measure it; "auto" ships it only if it passes
                    reduced = p != "fp32"  # and its neighbours on a corpus sample, as "auto" checks them (stamped, not enforced)
                    row[f"{p}_meta"] = export(res.model, f, res.metadata(), precision=p, tol=float("inf") if reduced else None,
                                              sample=data.corpus if reduced else None)
                    refs[p] = Refiner.load(f, threads=threads)
                    row["test"][p] = split_metrics(refs[p], data, "test", 5000)
                    row["val"][p] = split_metrics(refs[p], data, "val", 2000)
                set_threads(threads)
                row["int8_sample_recall"] = row["int8_meta"]["sample_recall"]
                row["int8_passes_check"] = (row["int8_meta"]["parity_max_abs_err"] <= PARITY_TOLERANCE["int8"]
                                            and row["int8_sample_recall"] >= SAMPLE_RECALL)  # what export's "auto" requires
                row["recall10_int8_vs_fp32"] = recall_at_10(top10(refs["fp32"].transform, data.corpus, q)[:, :10],
                                                            top10(refs["int8"].transform, data.corpus, q)[:, :10])
                rows.append(row)
                if on_row:
                    on_row(rows)
                print(f"  {name} hidden {w} seed {seed}: alpha {row['alpha']:g}, int8 10-recall@10 {row['recall10_int8_vs_fp32']:.4f}, "
                      + ", ".join(f"{m} {row['test']['fp32'][m]:.4f}/{row['test']['int8'][m]:.4f}" for m in row["test"]["fp32"]), flush=True)
    return rows


def choose_default(rows: list[dict]) -> dict:
    """The precision the measurements support, on every data set at once, and each width's test loss.

    int8 when, for every data set and seed at the default width whose int8 export passes its parity
    and neighbour checks (the others ship fp32: export's "auto"), its 10-recall@10 vs fp32 is >= the parity target
    and no test or validation metric moves by more than METRIC_TOL. The other widths are reported. Per width, the largest test-metric
    loss of its shipped-precision refiner against the fp32 refiner of the default width (mean over
    seeds; a gain is allowed) is reported, not used to choose: with one seed and one signal per data
    set it mostly measures where the guard put alpha. The width is TrainConfig's, chosen on
    bench/robustness.py (every signal, 3 seeds, 5 data sets). One rule, all data sets.
    """
    def worst_gap(a: dict, b: dict) -> float:
        return max(abs(a[k] - b[k]) for k in a)

    def holds(r: dict) -> bool:
        return (r["recall10_int8_vs_fp32"] >= TARGETS["recall_parity"]
                and worst_gap(r["test"]["int8"], r["test"]["fp32"]) <= METRIC_TOL
                and worst_gap(r["val"]["int8"], r["val"]["fp32"]) <= METRIC_TOL)

    shipped = [r for r in rows if r.get("int8_passes_check", True)]
    parity = all(holds(r) for r in shipped if r["hidden"] == HIDDEN)
    precision = "int8" if parity else "fp32"

    def mean_metrics(name: str, w: int, p: str) -> dict:
        sel = [r["test"][p] for r in rows if r["data"] == name and r["hidden"] == w]
        return {k: float(np.mean([m[k] for m in sel])) for k in sel[0]}

    have = {(r["data"], r["hidden"]) for r in rows}
    names = {r["data"] for r in rows}
    loss = {w: max(max(mean_metrics(n, HIDDEN, "fp32")[k] - v for k, v in mean_metrics(n, w, precision).items()) for n in names)
            for w in WIDTHS if all((n, HIDDEN) in have and (n, w) in have for n in names)}  # widths measured everywhere
    return {"precision": precision, "hidden": HIDDEN, "int8_parity_everywhere": parity,
            "int8_parity_fails_other_widths": [f"{r['data']} hidden {r['hidden']} seed {r['seed']}" for r in shipped
                                               if r["hidden"] != HIDDEN and not holds(r)],
            "fp32_fallbacks": [f"{r['data']} hidden {r['hidden']} seed {r['seed']}" for r in rows if not r.get("int8_passes_check", True)],
            "worst_test_loss_vs_default_fp32": {str(w): v for w, v in loss.items()}, "tolerance": METRIC_TOL}


# -- 6. ingest ------------------------------------------------------------------------------------------------
INGEST = textwrap.dedent('''
    import json, sys, time
    import numpy as np, faiss
    from threadpoolctl import threadpool_limits
    mode, path, refiner, threads, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    faiss.omp_set_num_threads(threads); threadpool_limits(threads)

    def status():
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}

    x = np.load(path, mmap_mode="r")
    if mode == "raw":   # plain FAISS: the same memmap added chunk by chunk, nothing else
        index = faiss.IndexFlatIP(x.shape[1])
        base = status()
        t = time.perf_counter()
        for s in range(0, len(x), chunk):
            index.add(np.ascontiguousarray(x[s:s + chunk]))
    else:
        from simskip_faiss import RefinedIndex, Refiner
        ri = RefinedIndex(Refiner.load(refiner, threads=threads), "Flat", "ip", chunk_size=chunk)
        index = ri.index
        base = status()
        t = time.perf_counter()
        ri.add(x)
    seconds = time.perf_counter() - t
    end = status()
    size = [0]
    faiss.write_index(index, faiss.PyCallbackIOWriter(lambda b: size.__setitem__(0, size[0] + len(b)) or len(b)))
    print(json.dumps({"seconds": seconds, "ntotal": index.ntotal, "index_bytes": size[0], "before": base, "after": end}))
''')


def make_ingest_file(path: Path, n: int) -> float:
    t = time.perf_counter()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    clustered(n, D, seed=7, out=out)
    out.flush()
    del out
    with open(path, "rb") as f:  # no writeback of the fresh file may overlap the timed ingests
        os.fsync(f.fileno())
    return time.perf_counter() - t


def ingest(path: Path, refiners: dict[str, Path], threads: int, chunk: int) -> dict:
    """Raw add vs RefinedIndex.add of the same .npy, each in its own subprocess (peak RSS = its VmHWM)."""
    out = {}
    for mode, ref in [("raw", ""), *[(f"refined_{k}", str(v)) for k, v in refiners.items()]]:
        proc = subprocess.run([sys.executable, "-c", INGEST, mode, str(path), ref, str(threads), str(chunk)],
                              capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = r["after"]["VmHWM"]
        r.update(vectors_per_s=r["ntotal"] / r["seconds"], peak_rss_bytes=peak,
                 peak_over_index_mb=(peak - r["index_bytes"]) / 1e6,
                 peak_growth_over_index_mb=(peak - r["before"]["VmRSS"] - r["index_bytes"]) / 1e6)
        out[mode] = r
        print(f"  ingest {mode}: {r['seconds']:.1f} s ({r['vectors_per_s']:,.0f}/s), peak RSS {peak / 1e6:,.0f} MB, "
              f"index {r['index_bytes'] / 1e6:,.0f} MB (peak - index = {r['peak_over_index_mb']:+.0f} MB)", flush=True)
    for k in out:
        out[k]["throughput_vs_raw"] = out[k]["vectors_per_s"] / out["raw"]["vectors_per_s"]
    return out


# -- report --------------------------------------------------------------------------------------------------
def environment(threads: int) -> dict:
    blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "faiss": faiss.__version__,
            "threads": {"throughput (onnxruntime intra-op / FAISS OpenMP / BLAS / torch)": threads,
                        "latency and search (onnxruntime / FAISS / BLAS / torch)": 1,
                        "index builds (FAISS)": threads, "onnxruntime inter-op": 1,
                        "Refiner": "single-threaded onnxruntime session, sub-batches run by the calling thread and `threads` - 1 workers"},
            "blas_pools": blas, "loadavg_start": os.getloadavg()}


def targets(r: dict) -> list[dict]:
    """Each issue target with the measured value and whether it is met (sections not run are left out)."""
    T, rows = TARGETS, []

    def add(target: str, value: float, met: bool) -> None:
        rows.append({"target": target, "value": value, "met": bool(met)})

    shipped = f"default {r.get('shipped_precision', 'fp32')}"
    hb = r.get("hnsw_breakdown")
    if hb and shipped in hb:
        v = hb[shipped]["refined_vs_raw"]
        add(f"HNSW32 (efSearch {EF}) one query, one thread, {shipped} refiner: RefinedIndex.search / raw FAISS <= "
            f"{T['hnsw_refined_vs_raw']} at equal 10-recall@10 (efSearch {hb[shipped]['efSearch']})", round(v, 3), v <= T["hnsw_refined_vs_raw"])
    if r.get("defaults"):
        prec, width = r.get("shipped_precision", "fp32"), r["defaults"]["choice"]["hidden"]
        for row in r["defaults"]["rows"]:
            if row["data"] == "wordnet-minilm" and row["hidden"] == width:
                gap = max(abs(row["test"][prec][k] - row["test"]["fp32"][k]) for k in row["test"]["fp32"])
                add(f"WordNet test metrics of the shipped refiner ({prec}, hidden {width}, seed {row['seed']}) within "
                    f"{T['shipped_metric_gap']} of its fp32 refiner's (largest gap)", round(gap, 4), gap <= T["shipped_metric_gap"])
    for k, sr in r.get("search", {}).items():
        if k in ("Flat", "IVF"):
            m = sr["median_us"]  # (runs before this figure was recorded: from the medians)
            extra = sr.get("extra_over_raw_minus_refine_us", m["refined_index"] - m["raw_faiss"] - m["refine_only"])
            add(f"{sr['factory']} one query: RefinedIndex.search - raw FAISS - refine <= {T['flat_ivf_extra_us']} us",
                round(extra, 1), extra <= T["flat_ivf_extra_us"])
    c = r.get("concurrency")
    if c:
        for clock in ("wall", "cpu"):
            for k, v in c[f"vs_batch_{clock}"].items():
                if k.startswith("batcher"):
                    add(f"{c['callers']} concurrent single-query callers through MicroBatcher ({k.split(' ', 1)[1]}): >= "
                        f"{T['concurrent_vs_batch']} x batch-of-{c['callers']} throughput "
                        f"({'wall clock' if clock == 'wall' else 'per CPU-second'})", round(v, 3), v >= T["concurrent_vs_batch"])
    for th in sorted({x["threads"] for x in r.get("throughput", [])}):
        worst = min(x["vs_roofline"] for x in r["throughput"] if x["threads"] == th and x["batch"] >= 1024 and x["path"] == "ort_fp32")
        add(f"fp32 refine throughput, batch >= 1024, {th} thread(s): >= {T['roofline_ratio']} x numpy roofline", round(worst, 3),
            worst >= T["roofline_ratio"])
    if "single_vector" in r:
        v = r["single_vector"]["default fp32"]["median_us"]
        add(f"single-vector refine, default model fp32: <= {T['single_vector_us']} us median", round(v, 1), v <= T["single_vector_us"])
    for k, sr in r.get("search", {}).items():
        o = sr["overhead_us"]
        add(f"RefinedIndex.search {k} batch 1: <= FAISS + refine + {T['search_overhead_us']} us (median vs the same steps by hand)",
            round(o, 1), o <= T["search_overhead_us"])
    for k, q in r.get("quality", {}).items():
        if "recall10_vs_own_fp32" in q:
            v = q["recall10_vs_own_fp32"]
            add(f"fast option '{k}': 10-recall@10 vs {OWN[k]} refiner >= {T['recall_parity']}", round(v, 4), v >= T["recall_parity"])
    for k, g in r.get("ingest", {}).items():
        if k.startswith("refined"):
            add(f"ingest {k}: peak RSS <= index + {T['ingest_rss_over_index_mb']:.0f} MB", round(g["peak_over_index_mb"], 1),
                g["peak_over_index_mb"] <= T["ingest_rss_over_index_mb"])
    for f, sr in r.get("native", {}).items():
        if isinstance(sr, dict):
            add(f"native linear {f}: latency within {T['native_vs_hand']:.0%} of hand-built", round(sr["native_vs_hand"], 4),
                abs(sr["native_vs_hand"]) <= T["native_vs_hand"])
    return rows


def markdown(r: dict) -> str:
    e = r["environment"]
    L = [f"# Speed bench\n\nLast command: `{r['command']}` — {e['cpu']}, {e['cores']} cores, load average at start "
         f"{e['loadavg_start'][0]:.2f}, at end {r['loadavg_end'][0]:.2f}; {r['seconds']:.0f} s. "
         f"numpy {e['numpy']}, torch {e['torch']}, onnxruntime {e['onnxruntime']}, faiss {e['faiss']}.",
         "", "Threads: " + "; ".join(f"{k}: {v}" for k, v in e["threads"].items()) + ".",
         f"Sections 1–8 measure models trained without the guard (α = 1, the hardest parity case): d={D}, hidden={HIDDEN} "
         f"(and {', '.join(map(str, OTHER_WIDTHS))}), depth 1, {r.get('model', {}).get('epochs')} epochs on {r.get('model', {}).get('data')}. Shipped precision "
         f"(the CLI's default, config.DEFAULT_PRECISION): **{r.get('shipped_precision', 'fp32')}**. Ratios are medians of interleaved runs in one process."]
    if r.get("runs"):
        L += ["", "| section | command | run at | load average start → end |", "|---|---|---|---|"]
        L += [f"| {k} | `{v['command']}` | {v['date']} | {v['loadavg_start'][0]:.1f} → {v['loadavg_end'][0]:.1f} |" for k, v in r["runs"].items()]
        L.append("Sections not listed are from the earlier full run (`python bench/speed.py`: 3 epochs, fp32 refiner in section 3, before the single-query changes).")
    L += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    L += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in r["targets"]]
    hb = r.get("hnsw_breakdown")
    if hb:
        raw = hb["raw"]
        L += ["", f"## 7. One query, one thread, HNSW32 on {hb['data']} ({hb['n_corpus']:,} × {D}): where the time goes "
              f"(median µs of {hb['n_queries']} queries × {hb['rounds']} rounds)", "",
              f"Raw FAISS at efSearch {EF}: {raw['us']:.1f} µs, 10-recall@10 {raw['recall10']:.4f} against exact search in the raw "
              f"space, {raw['ndis']:.0f} distance computations per query (faiss.cvar.hnsw_stats.ndis). Each refined index runs "
              "at the smallest efSearch reaching that recall against exact search in its own space. Stages are timed alone; "
              "interference = (refine then FAISS, back to back) − refine − FAISS: each evicts the other's cache; handling = "
              "RefinedIndex.search − back to back − checks.", "",
              "| refiner | efSearch (recall) | ndis (at 64) | checks | refine | FAISS (× raw) | interference | handling | RefinedIndex.search | × raw |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for k, o in hb.items():
            if isinstance(o, dict) and "us" in o and k != "raw":
                m = o["us"]
                L.append(f"| {k} | {o['efSearch']} ({o['recall10']:.4f}) | {o['ndis']:.0f} ({o['ndis_at_64']:.0f}) | {m['checks']:.1f} | "
                         f"{m['refine']:.1f} | {m['faiss']:.1f} ({o['faiss_vs_raw']:.2f}) | {o['interference_us']:+.1f} | "
                         f"{o['handling_us']:+.1f} | {m['search']:.1f} | **{o['refined_vs_raw']:.3f}** |")
    c = r.get("concurrency")
    if c:
        L += ["", f"## 8. {c['callers']} concurrent single-query callers (HNSW32 as in 7, {c['refiner']} refiner; "
              f"{c['n_queries']} queries per run, median of {c['reps']} interleaved runs; FAISS and onnxruntime 1 thread per calling thread)", "",
              "batch = one thread searching 8 queries per call; serial = one thread, one query per call; threads = 8 threads calling "
              "RefinedIndex.search directly; batcher = the 8 threads through MicroBatcher(max_batch=8, max_wait_us=W), or "
              "max_batch=4 where named (one batch fills while the other is searched).", "",
              "| path | queries/s (wall clock) | × batch-of-8 (per-run median) | queries per CPU-second | × batch-of-8 |", "|---|---|---|---|---|"]
        L += [f"| {k} | {c['qps_wall'][k]:,.0f} | {c['vs_batch_wall'][k]:.2f} | {c['qps_cpu'][k]:,.0f} | {c['vs_batch_cpu'][k]:.2f} |"
              for k in c["qps_wall"]]
        L.append(f"\nBatcher results identical to the batch search: {c['batcher_results_equal_batch']}.")
    dfl = r.get("defaults")
    if dfl:
        ch = dfl["choice"]
        cap = f"at most {dfl['epochs']} epochs" if dfl.get("epochs") else "TrainConfig's epochs"
        cap += " — PARTIAL: the run stopped before every data set and width was measured" if dfl.get("partial") else ""
        L += ["", f"## 9. Default precision and width: guarded `fit` per data set and width ({cap}), "
              "exported fp32 and int8, exact search; test metrics over EvalConfig's test queries, val over the guard's", "",
              f"Choice: **{ch['precision']}** (int8 parity on every data set at the default width, hidden **{ch['hidden']}**: "
              f"{ch['int8_parity_everywhere']}; 10-recall@10 ≥ {TARGETS['recall_parity']}, metric tolerance {ch['tolerance']}; "
              f"other widths failing it: {', '.join(ch.get('int8_parity_fails_other_widths', [])) or 'none'}). Models whose int8 export fails its "
              f"parity check (max abs error vs torch > {PARITY_TOLERANCE['int8']}) or its neighbour check (10-recall@10 vs fp32 "
              f"< {SAMPLE_RECALL} on a corpus sample: 1,000 rows as queries over up to 20,000 others) ship fp32 (export's \"auto\"): "
              f"{', '.join(ch.get('fp32_fallbacks', [])) or 'none'}. For information, the worst test-metric loss "
              f"by width vs the default width's fp32 refiner (one seed, one guarded signal per data set, so mostly where the "
              f"guard put α; the width's evidence is bench/results/robustness.md): "
              + ", ".join(f"{w}: {v:+.4f}" for w, v in ch.get("worst_test_loss_vs_default_fp32", {}).items()) + ".", "",
              "| data | hidden | seed | α | int8 max abs err (ships) | int8 vs fp32 10-recall@10: test queries / corpus sample | largest |int8 − fp32| test / val | test metrics fp32 (raw) |",
              "|---|---|---|---|---|---|---|---|"]
        for x in dfl["rows"]:
            gt = max(abs(x["test"]["int8"][k] - x["test"]["fp32"][k]) for k in x["test"]["fp32"])
            gv = max(abs(x["val"]["int8"][k] - x["val"]["fp32"][k]) for k in x["val"]["fp32"])
            err8 = x.get("int8_meta", {}).get("parity_max_abs_err", float("nan"))
            ships = "int8" if x.get("int8_passes_check", True) else "fp32"
            sample = f" / {x['int8_sample_recall']:.4f}" if "int8_sample_recall" in x else ""
            L.append(f"| {x['data']} | {x['hidden']} | {x['seed']} | {x['alpha']:g} | {err8:.4f} ({ships}) | {x['recall10_int8_vs_fp32']:.4f}{sample} | {gt:.4f} / {gv:.4f} | "
                     + ", ".join(f"{k} {v:.4f} ({x['raw']['test'][k]:.4f})" for k, v in x["test"]["fp32"].items()) + " |")
    if "throughput" in r:
        L += ["", "## 1. Refine throughput (vectors/s; × = time of numpy's two matmuls / time of this path)", "",
              "| threads | batch | path | vectors/s | GFLOP/s | × numpy roofline |", "|---|---|---|---|---|---|"]
        L += [f"| {x['threads']} | {x['batch']} | {x['path']} | {x['vectors_per_s']:,.0f} | {x['gflops']:.1f} | {x['vs_roofline']:.2f} |"
              for x in r["throughput"]]
    if "single_vector" in r:
        L += ["", "## 2. Single-vector refine latency (Refiner.transform, 1 thread, µs)", "", "| refiner | median | p90 | file bytes |", "|---|---|---|---|"]
        L += [f"| {k} | {v['median_us']:.1f} | {v['p90_us']:.1f} | {r['files'].get(k, '')} |" for k, v in r["single_vector"].items()]
    if "search" in r:
        L += ["", f"## 3. Single-query search on {r.get('search_data', 'clustered unit vectors')} ({r['search_n']:,} × {D}), k=10, 1 thread, "
              f"{r.get('search_precision', 'fp32')} refiner (median µs)", "",
              "Raw FAISS at the factory's knob; the refined index at the smallest knob whose 10-recall@10 against exact search in its "
              "own space reaches raw's against exact search in the raw space. ndis: distance computations per query (FAISS's counters; "
              "Flat: ntotal), refined at the raw knob → at its own.", "",
              "Interference = by hand − refine alone − FAISS alone: refining and searching back to back evict each other's "
              "working set from the core's L2 cache (timed alone, each runs warm).", "",
              "| index | knob raw → refined (recall) | ndis raw | ndis refined | raw FAISS | FAISS alone on refined index | refine alone | refine + FAISS by hand | interference | RefinedIndex.search | overhead vs by hand (per-turn median) | RefinedIndex − raw − refine | RefinedIndex / raw FAISS |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, s in r["search"].items():
            m = s["median_us"]
            knob = (f"{s['param'][0]} {s['param'][1]} → {s['matched_param'][1]} ({s['raw_recall10']:.4f} → {s['recall10']:.4f})"
                    if s.get("matched_param") else "exact")
            nd = f"{s['ndis_same_param']:.0f} → {s['ndis']:.0f}" if "ndis" in s else ""
            L.append(f"| {s['factory']} | {knob} | {s.get('raw_ndis', float('nan')):.0f} | {nd} | {m['raw_faiss']:.1f} | {m['refined_faiss_only']:.1f} | {m['refine_only']:.1f} | "
                     f"{m['by_hand']:.1f} | {s.get('interference_us', float('nan')):+.1f} | {m['refined_index']:.1f} | {s['overhead_us']:+.1f} | "
                     f"{s.get('extra_over_raw_minus_refine_us', float('nan')):+.1f} | "
                     f"{s['refined_vs_raw']:.3f} |")
    n = r.get("native", {})
    if n:
        L += ["", f"## 4. Native linear path (MLP refiner distilled to a linear map, fit R² = {n['fit_r2']:.3f}; 1 thread, median µs)", "",
              "| index | to_faiss (native) | hand-built IndexPreTransform | numpy path (RefinedIndex) | native/hand − 1 (per-turn median) | same results as hand | 10-recall@10 vs numpy path |",
              "|---|---|---|---|---|---|---|"]
        for f, s in n.items():
            if isinstance(s, dict):
                m = s["median_us"]
                L.append(f"| {f} | {m['native_to_faiss']:.1f} | {m['hand_built']:.1f} | {m['numpy_path']:.1f} | {s['native_vs_hand']:+.3f} | "
                         f"{s['same_results_as_hand']} | {s['recall10_native_vs_numpy_path']:.4f} |")
    if "quality" in r:
        L += ["", f"## 5. Quality parity on {r['model']['data']} ({r['quality_n']})", "",
              "10-recall@10 = |top-10 ∩ top-10 of the reference| / 10 (FAISS's intersection measure), exact search. "
              "A smaller width is another model, not a precision of the same one: its parity column compares its int8 "
              "to its own fp32, and its task quality is the labels column (raw = no refiner).", "",
              "| refiner | 10-recall@10 vs default fp32 | 10-recall@10 vs own fp32 (parity) | labels precision@10 |", "|---|---|---|---|"]
        L += [f"| {k} | {q['recall10_vs_fp32']:.4f} | {q['recall10_vs_own_fp32']:.4f} | {q.get('labels_precision@10', float('nan')):.4f} |"
              if "recall10_vs_own_fp32" in q else
              f"| {k} | {q['recall10_vs_fp32']:.4f} | — | {q.get('labels_precision@10', float('nan')):.4f} |" for k, q in r["quality"].items()]
    if r.get("ingest"):
        L += ["", f"## 6. Streamed ingest of {r['ingest_n']:,} × {D} from a .npy memmap into Flat (subprocess each; {r['ingest_threads']} threads)", "",
              "| path | seconds | vectors/s | × raw | peak RSS (VmHWM) MB | index MB | peak − index MB | RSS before add MB |",
              "|---|---|---|---|---|---|---|---|"]
        for k, g in r["ingest"].items():
            L.append(f"| {k} | {g['seconds']:.1f} | {g['vectors_per_s']:,.0f} | {g['throughput_vs_raw']:.3f} | {g['peak_rss_bytes'] / 1e6:,.0f} | "
                     f"{g['index_bytes'] / 1e6:,.0f} | {g['peak_over_index_mb']:+.0f} | {g['before']['VmRSS'] / 1e6:.0f} |")
    return "\n".join(L) + "\n"


# -- main ------------------------------------------------------------------------------------------------------
SECTIONS = {1: "throughput", 2: "single_vector", 3: "search", 4: "native", 5: "quality", 6: "ingest",
            7: "hnsw_breakdown", 8: "concurrency", 9: "defaults"}


def shipped_precision() -> str:
    """The precision the CLI exports by default (config.DEFAULT_PRECISION; else `export`'s default)."""
    from simskip_faiss import config

    return getattr(config, "DEFAULT_PRECISION", inspect.signature(export).parameters["precision"].default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for throughput, builds and ingest")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of this script")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the 1M x 384 .npy (1.5 GB) is written, then deleted")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--sections", default="1-9", help="sections to run, e.g. '7,8' or '1-6'; 'none' with --update re-renders the report")
    ap.add_argument("--update", action="store_true", help="keep the other sections' results from the existing speed.json")
    ap.add_argument("--frontier-epochs", type=int, default=None, help="cap on training epochs in section 9 (default: TrainConfig's)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    a = ap.parse_args()
    run = {int(x) for part in a.sections.split(",") if part != "none" for x in
           (range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part else [part])}
    if a.skip_ingest:
        run.discard(6)
    t0 = time.perf_counter()
    n_search, n_ingest = (20_000, 100_000) if a.quick else (100_000, 1_000_000)
    nq = {"Flat": 50, "HNSW32": 300, "IVF": 300} if a.quick else {"Flat": 200, "HNSW32": 2000, "IVF": 2000}
    rounds = 2 if a.quick else 4
    reps = {1: 40, 16: 40, 1024: 40, 8192: 15} if not a.quick else {1: 5, 16: 5, 1024: 5, 8192: 3}
    env = environment(a.threads)
    work = Path(tempfile.mkdtemp(prefix="simskip-speed-", dir=a.tmp))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    r: dict = json.loads((out / "speed.json").read_text()) if a.update and (out / "speed.json").exists() else {}
    r.setdefault("runs", {})
    command = "python bench/speed.py " + " ".join(sys.argv[1:])
    r.update(command=command, environment=env, targets_spec=TARGETS, shipped_precision=shipped_precision())

    def save() -> None:
        (out / "speed.json").write_text(json.dumps(r, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    try:
        set_threads(a.threads)
        data, source = load_data(a.quick) if run - {9} else (None, "")
        files: dict = {}
        corpus = np.ascontiguousarray(data.corpus if data is not None else clustered(20000 if run - {9} else 2, D, seed=3), dtype=np.float32)
        rows = (data.split_rows("train"), data.split_rows("val")) if data is not None else None
        epochs = 1 if a.quick else a.epochs
        if run - {9}:  # sections 1-8 measure models trained here, unguarded (alpha = 1: the hardest parity case)
            print(f"training the default model (hidden {HIDDEN}) and hidden {OTHER_WIDTHS} on {source} ...", flush=True)
            model, train_s = trained_model(corpus, HIDDEN, epochs, a.threads, rows)
            models = {w: trained_model(corpus, w, epochs, a.threads, rows)[0] for w in OTHER_WIDTHS}
            metas = export_all(model, work, "default")
            small_metas = {w: export_all(m, work, f"h{w}") for w, m in models.items()}
            files = {p: work / f"default-{p}.onnx" for p in ("fp32", "int8", "fp16")}
            r["model"] = {"data": source, "epochs": epochs, "train_s": train_s, "metadata": metas,
                          "other_widths_metadata": {str(w): m for w, m in small_metas.items()}}
            r["files"] = ({f"default {p}": metas[p]["file_bytes"] for p in metas}
                          | {f"hidden {w} {p}": m[p]["file_bytes"] for w, m in small_metas.items() for p in m})

        if 1 in run:
            print("1. throughput", flush=True)
            r["throughput"] = throughput(model, {"fp32": files["fp32"], "int8": files["int8"]}, a.threads, (1, 16, 1024, 8192), reps)
            if a.threads != 1:
                r["throughput"] += throughput(model, {"fp32": files["fp32"], "int8": files["int8"]}, 1, (1, 16, 1024, 8192), reps)

        if 2 in run:
            print("2. single-vector latency", flush=True)
            svf = ({f"default {p}": files[p] for p in ("fp32", "int8", "fp16")}
                   | {f"hidden {w} {p}": work / f"h{w}-{p}.onnx" for w in models for p in ("fp32", "int8")})
            r["single_vector"] = single_vector(svf, 500 if a.quick else 2000, 3 if a.quick else 5)
            print("  " + ", ".join(f"{k} {v['median_us']:.1f} us" for k, v in r["single_vector"].items()), flush=True)

        if run & {3, 7, 8}:
            hq = (data.queries if data is not None and data.queries is not None else clustered(2000, D, seed=13))
            hq = np.ascontiguousarray(hq[np.random.default_rng(0).permutation(len(hq))[:300 if a.quick else 2000]])
        if 3 in run:
            print(f"3. search latency on {source} ({len(corpus):,} x {D}, the shipped {shipped_precision()} refiner)", flush=True)
            r["search_n"] = len(corpus)
            r["search_data"] = source
            r["search_precision"] = shipped_precision()
            r["search"] = search_latency(files[shipped_precision()], corpus, hq, nq, a.threads, rounds)
        if 4 in run:
            base = clustered(n_search, D, seed=11)
            queries = clustered(max(nq.values()), D, seed=12)

            print("4. native linear path", flush=True)
            r["native"] = native_linear(files["fp32"], base, queries, nq["IVF"], a.threads, rounds)
            del base

        if 5 in run:
            print("5. quality parity", flush=True)
            fast = {p: Refiner.load(f, threads=a.threads) for p, f in files.items()}
            lin = distil_linear(fast["fp32"], corpus[rows[0]] if rows else corpus)
            refiners = {"fp32": fast["fp32"].transform, "int8": fast["int8"].transform, "fp16": fast["fp16"].transform,
                        **{f"hidden {w} {p}": Refiner.load(work / f"h{w}-{p}.onnx", threads=a.threads).transform
                           for w in models for p in ("fp32", "int8")},
                        "distilled linear": lin.transform, "raw (no refiner)": lambda v: v}
            if data is not None:
                test_q = data.queries[data.split_queries("test")]
                label_rows = data.split_rows("test") if data.labels is not None else None
                r["quality_n"] = f"{len(test_q)} held-out test queries vs {len(corpus):,} corpus rows; labels on {len(label_rows)} test rows"
                r["quality"] = quality(refiners, OWN, corpus, test_q, label_rows, data.labels)
            else:
                r["quality_n"] = "2000 synthetic queries"
                r["quality"] = quality(refiners, OWN, corpus, clustered(2000, D, seed=5))
            for k, q in r["quality"].items():
                print(f"  {k}: " + ", ".join(f"{m} {v:.4f}" for m, v in q.items()), flush=True)

        if 6 in run:
            print(f"6. ingest of {n_ingest:,} x {D}", flush=True)
            npy = work / "ingest.npy"
            r["ingest_file_s"] = make_ingest_file(npy, n_ingest)
            r["ingest_n"], r["ingest_threads"] = n_ingest, a.threads
            r["ingest"] = ingest(npy, {"fp32": files["fp32"], "int8": files["int8"]}, a.threads, 16384)
            npy.unlink()

        if run & {7, 8}:
            chosen = {"default fp32": files["fp32"], "default int8": files["int8"],
                      **{f"hidden {w} int8": work / f"h{w}-int8.onnx" for w in models}}
            print(f"7. single-query HNSW32 on {source} ({len(corpus):,} x {D}): where the time goes", flush=True)
            r["hnsw_breakdown"], hnsw = where_time_goes({k: Refiner.load(f, threads=1) for k, f in chosen.items()}, corpus, hq,
                                                        len(hq), a.threads, 2 if a.quick else 3)
            r["hnsw_breakdown"]["data"] = source
        if 8 in run:
            name = f"default {shipped_precision()}"
            print(f"8. 8 concurrent single-query callers (HNSW32, {name} refiner)", flush=True)
            r["concurrency"] = concurrent_callers(hnsw[name], hq, reps=3 if a.quick else 7)
            r["concurrency"]["refiner"] = name
        if run & {7, 8}:
            del hnsw

        if 9 in run:
            print("9. default precision and width (guarded fit on each data set)", flush=True)
            def partial(rows9: list) -> None:  # a long section: keep what is measured so far
                r["defaults"] = {"rows": rows9, "choice": choose_default(rows9), "epochs": a.frontier_epochs, "partial": True}
                save()

            rows9 = defaults_frontier(work, a.threads, a.quick, epochs=a.frontier_epochs, on_row=partial)
            r["defaults"] = {"rows": rows9, "choice": choose_default(rows9), "epochs": a.frontier_epochs}
            print(f"  choice: {r['defaults']['choice']}", flush=True)
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    r["loadavg_end"] = os.getloadavg()
    r["seconds"] = time.perf_counter() - t0
    for n in run:
        r["runs"][SECTIONS[n]] = {"command": command, "loadavg_start": env["loadavg_start"], "loadavg_end": r["loadavg_end"],
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    save()  # the measurements are kept even if the report below fails
    r["targets"] = targets(r)
    save()
    (out / "speed.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
