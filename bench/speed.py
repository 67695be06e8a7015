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

One module per part, beside this entry point: speed_timing.py (thread counts, interleaved and
block-wise timing, the environment), speed_common.py (shared constants, data, models, exact
neighbours), one module per section (speed_throughput, speed_single_vector, speed_search_latency,
speed_native_linear, speed_quality, speed_ingest, speed_where_time_goes, speed_concurrent_callers,
speed_defaults_frontier) and speed_report.py (targets, markdown).

    python bench/speed.py                 # full run (writes 1.5 GB under --tmp, then deletes it)
    python bench/speed.py --quick         # small sizes, a smoke test of the script
    python bench/speed.py --sections 7,8 --update   # re-run some sections, keep the others' results
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

# speed_timing first: it loads faiss, onnxruntime, torch and threadpoolctl in the order this script always has
from speed_timing import environment, set_threads  # noqa: E402
from simskip_faiss import Refiner  # noqa: E402
from simskip_faiss.refiners import distil_linear  # noqa: E402
from simskip_faiss.training.export import export  # noqa: E402

from speed_common import D, HIDDEN, OTHER_WIDTHS, OWN, TARGETS, clustered, export_all, load_data, trained_model  # noqa: E402
from speed_throughput import throughput  # noqa: E402
from speed_single_vector import single_vector  # noqa: E402
from speed_search_latency import search_latency  # noqa: E402
from speed_native_linear import native_linear  # noqa: E402
from speed_quality import quality  # noqa: E402
from speed_ingest import ingest, make_ingest_file  # noqa: E402
from speed_where_time_goes import where_time_goes  # noqa: E402
from speed_concurrent_callers import concurrent_callers  # noqa: E402
from speed_defaults_frontier import choose_default, defaults_frontier  # noqa: E402
from speed_report import markdown, targets  # noqa: E402


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
