"""Section 9 of bench/speed.py: the shipped precision, fp32 vs int8 on every test and validation metric.

A guarded fit on WordNet/MiniLM, digits and synthetic data at each width (config.DEFAULT_PRECISION);
the default width's quality evidence is bench/robustness.py's.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from simskip_faiss import IdentityRefiner, Refiner, datasets
from simskip_faiss.config import TrainConfig
from simskip_faiss.evaluation import build
from simskip_faiss.metrics.scoring import LABEL_METRICS, PAIR_METRICS, score, task_queries
from simskip_faiss.training.export import PARITY_TOLERANCE, SAMPLE_RECALL, export
from simskip_faiss.training.guard import fit

from speed_common import HIDDEN, TARGETS, WIDTHS, recall_at_10, top10
from speed_timing import set_threads


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
