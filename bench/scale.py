"""Scale bench: refine + index throughput on Spark at local[1] vs local[2], and a projection to 100M / 1B vectors.

Measures, on synthetic unit vectors of MiniLM's width (d=384) and a refiner twice the default
width (one residual block, hidden 1024; docs/design.md):
  - single-process, 1 thread: onnxruntime refine rate, FAISS add rate per core for several IVF
    quantizers, k-means training rate, bytes per vector of each index type;
  - Spark (`simskip_faiss.spark`): refine-only (noop sink) and the distributed build
    (refine + add shards + merge + save) at each --masters entry, after a warm-up job.
Writes bench/results/scale.json and bench/results/scale.md (measurements + projection).

    python bench/scale.py                                  # n=200000, local[1] and local[2] (~6 min on 2 cores)
    python bench/scale.py --n 50000 --masters local[2]     # quicker
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from simskip_faiss import RefinedIndex, Refiner  # noqa: E402
from simskip_faiss import spark as S  # noqa: E402

ID_BYTES = 8  # int64 id per vector in an IVF inverted list


def make_refiner(path: Path, d: int, hidden: int) -> Refiner:
    """A SimSkip refiner of the measured size with random (non-zero) residual weights."""
    import torch

    from simskip_faiss.export import export
    from simskip_faiss.training import SimSkip

    torch.manual_seed(0)
    m = SimSkip(d, hidden=hidden)
    torch.nn.init.normal_(m.f[-1].weight, std=0.02)
    export(m, path)
    return Refiner.load(path, threads=1)


def make_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 256 random centres (IVF has structure to find, like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, d)).astype(np.float32)
    x = centres[rng.integers(0, 256, n)] + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_parquet(x: np.ndarray, directory: Path, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    for f, rows in enumerate(np.array_split(np.arange(len(x)), files)):
        col = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), x.shape[1])
        pq.write_table(pa.table({"id": pa.array(rows, pa.int64()), "vector": col}), directory / f"part-{f:03d}.parquet")


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (user + nice + system + irq), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # minus idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, machine CPU seconds) of fn(): Spark's JVM and Python workers both count."""
    c, t = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c


def rate(fn, n: int, repeat: int = 1) -> float:
    """Items per second of fn() over n items (best of `repeat`)."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def single_core(refiner: Refiner, x: np.ndarray, d: int, tmp: Path) -> dict:
    """Per-core rates in one process with 1 thread: refine, train, add; and bytes per stored vector."""
    faiss.omp_set_num_threads(1)
    n = min(len(x), 50_000)
    y = refiner.transform(x[:n])
    out = {"refine_per_core": rate(lambda: refiner.transform(x[:n]), n, 2), "add_per_core": {}, "bytes_per_vector": {},
           "train": {}}
    for factory in ("IVF1024,Flat", "IVF4096,Flat", "IVF4096_HNSW32,Flat"):  # PQ: bytes by formula (training is slow)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        train_n = min(n, 40 * index.nlist if hasattr(index, "nlist") else n)
        t = time.perf_counter()
        index.train(y[:train_n])
        out["train"][factory] = {"seconds": time.perf_counter() - t, "n": train_n}
        out["add_per_core"][factory] = rate(lambda: index.add(y), n)
        path = tmp / "probe.faiss"
        faiss.write_index(index, str(path))
        out["bytes_per_vector"][factory] = path.stat().st_size / index.ntotal
    nlist = 1024
    tr = out["train"]["IVF1024,Flat"]
    # k-means cost model: seconds per (training vector x centroid x dimension x iteration), 10 iterations in FAISS IVF
    out["kmeans_seconds_per_unit"] = tr["seconds"] / (tr["n"] * nlist * d * 10)
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def spark_run(master: str, data: Path, refiner: Refiner, trained: faiss.Index, factory: str, n: int, tmp: Path) -> dict:
    """Refine-only and full distributed build throughput with one Spark master."""
    spark = S.session(master, conf={"spark.sql.files.maxPartitionBytes": "16m", "spark.driver.memory": "4g"})
    try:
        df = spark.read.parquet(str(data))
        parts = df.rdd.getNumPartitions()
        noop = lambda frame: frame.write.format("noop").mode("overwrite").save()  # noqa: E731
        noop(S.refine_dataframe(df.limit(2000), refiner))  # warm the workers
        read_s, read_cpu = timed(lambda: noop(df))
        arrow_s, arrow_cpu = timed(lambda: noop(df.mapInArrow(lambda batches: batches, df.schema)))
        refine_s, refine_cpu = timed(lambda: noop(S.refine_dataframe(df, refiner)))
        out = tmp / f"bundle-{master.replace('[', '').replace(']', '')}"
        trained_copy = faiss.clone_index(trained)
        shards_dir = tmp / f"shards-{out.name}"
        add_s, add_cpu = timed(lambda: S.add_shards(df, refiner, trained_copy, _mkdir(shards_dir)))
        shutil.rmtree(shards_dir, ignore_errors=True)
        res = S.build_index(df, refiner, out, factory=factory, trained_index=faiss.clone_index(trained))
        shutil.rmtree(out, ignore_errors=True)
        return {"master": master, "partitions": parts, "read_rate": n / read_s, "arrow_roundtrip_rate": n / arrow_s,
                "refine_seconds": refine_s, "refine_rate": n / refine_s, "refine_add_rate": n / add_s,
                "cpu_seconds": {"read": read_cpu, "arrow_roundtrip": arrow_cpu, "refine": refine_cpu, "refine_add": add_cpu},
                "cores_busy_refine_add": add_cpu / add_s, "per_core_refine_add": n / add_cpu,
                "build_seconds": res.seconds, "build_rate": n / res.seconds["total"]}
    finally:
        spark.stop()


def projection(m: dict, d: int) -> list[dict]:
    """What N vectors need: core-hours, cores for a 1 h build, training and index memory, from measured rates.

    Per-core rate = vectors / machine CPU-seconds of the Spark refine + add step at the widest master:
    the JVM's share of the work (parquet decoding, array <-> Arrow) is paid for, as on an executor.
    """
    measured = m["spark"][-1]["per_core_refine_add"]
    add = m["single"]["add_per_core"]
    # swap the measured IVF1024 flat-quantizer add cost for the HNSW-quantizer one that large nlist needs
    per_core = 1 / (1 / measured - 1 / add["IVF1024,Flat"] + 1 / add["IVF4096_HNSW32,Flat"])
    rows = []
    for n in (100_000_000, 1_000_000_000):
        nlist = 65536 if n <= 200_000_000 else 262144
        core_s = n / per_core
        train_n = 64 * nlist
        train_core_s = m["single"]["kmeans_seconds_per_unit"] * train_n * nlist * d * 10
        rows.append({
            "n": n, "nlist": nlist, "per_core_rate": per_core, "core_hours": core_s / 3600,
            "cores_for_1h": math.ceil(core_s / 3600),
            "refine_core_hours_in_process": n / m["single"]["refine_per_core"] / 3600,
            "train_vectors": train_n, "train_core_hours_flat_kmeans": train_core_s / 3600,
            "quantizer_mb": nlist * d * 4 / 1e6,
            "ivf_flat_gb": n * (4 * d + ID_BYTES) / 1e9,
            "ivf_pq48_gb": n * (48 + ID_BYTES) / 1e9, "ivf_pq96_gb": n * (96 + ID_BYTES) / 1e9,
            "raw_gb": n * 4 * d / 1e9,
        })
    return rows


def write_report(m: dict, path: Path) -> None:
    """bench/results/scale.md: the measurements, then the projection derived from them."""
    s, d = m["single"], m["d"]
    lines = ["# Scale-out: measured rates and a projection to 100M / 1B vectors", "",
             f"Generated by `{m['command']}` on {m['machine']} ({m['date']}). n = {m['n']:,} synthetic unit "
             f"vectors (parquet, array<float>), d = {d}, refiner = SimSkip hidden {m['hidden']} (onnxruntime, "
             f"1 thread per task), factory of the Spark build = `{m['factory']}`, trained once on the driver "
             "and given to every run (training is reported separately).", "",
             "## Measured here", "", "Single process, 1 thread (per-core rates, no Spark):", "",
             f"- refine (onnxruntime, batch 4096): **{s['refine_per_core']:,.0f} vectors/s/core**", "",
             "| index | add vectors/s/core | train (vectors, s) | bytes/vector on disk |", "|---|---:|---:|---:|"]
    for f, r in s["add_per_core"].items():
        t = s["train"][f]
        lines.append(f"| `{f}` | {r:,.0f} | {t['n']:,}, {t['seconds']:.1f} | {s['bytes_per_vector'][f]:,.0f} |")
    lines += ["", "Spark (`simskip_faiss.spark`, wall-clock after a warm-up job; vectors/s):", "",
              "| master | partitions | read parquet only | + Arrow round trip to Python | refine only | "
              "refine + add shards | cores busy (refine + add) | vectors per CPU-second (refine + add) | "
              "whole build | validate / refine+add / merge / save (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in m["spark"]:
        b = r["build_seconds"]
        lines.append(f"| {r['master']} | {r['partitions']} | {r['read_rate']:,.0f} | {r['arrow_roundtrip_rate']:,.0f} | "
                     f"{r['refine_rate']:,.0f} | {r['refine_add_rate']:,.0f} | {r['cores_busy_refine_add']:.2f} | "
                     f"{r['per_core_refine_add']:,.0f} | {r['build_rate']:,.0f} | "
                     f"{b['validate']:.1f} / {b['refine_add']:.1f} / {b['merge']:.1f} / {b['save']:.1f} |")
    lines += ["", f"Scaling local[1] → local[2] (refine + add shards, wall-clock): **{m['speedup']:.2f}×**. "
              "The machine has 2 cores, and 'cores busy' (machine CPU-seconds / wall seconds, from /proc/stat) "
              "shows why local[2] gains little: at local[1] the JVM (parquet decoding, array ↔ Arrow conversion) "
              "already runs beside the one Python task on the second core, so local[1] is not a one-core "
              "measurement. The projection therefore uses vectors per CPU-second, not wall-clock rates.", "",
              "Where the time goes: Spark's array<float> ↔ Arrow conversion in the JVM, not the refiner. The "
              "identity `mapInArrow` (no refining at all) is already far below the in-process refine rate; "
              "storing vectors as fixed-width float32 `binary` would cut that cost (an ad-hoc check on this machine, outside this bench, moved "
              "an identity round trip from ~27k to ~48k vectors/s at d=384), but is not implemented.", ""]
    p = {r["n"]: r for r in m["projection"]}
    a, b = p[100_000_000], p[1_000_000_000]
    lines += ["## Projection", "",
              "At this scale IVF needs many more lists (nlist ≈ 16·√N → 65,536 for 100M, 262,144 for 1B). A "
              "flat quantizer would then cost nlist·d flops per vector at add time (compare IVF1024 and IVF4096 "
              "above), so the projection assumes an HNSW quantizer (`IVF65536_HNSW32,...`), whose add cost grows "
              "only with log(nlist) (IVF4096_HNSW32 above).", "",
              f"Per-core rate: vectors per machine CPU-second of the Spark refine + add step "
              f"({m['spark'][-1]['master']}: {m['spark'][-1]['per_core_refine_add']:,.0f}), with the measured "
              f"IVF1024 add cost swapped for the HNSW-quantizer one = **{a['per_core_rate']:,.0f} vectors/s/core**. "
              "CPU-seconds include the JVM's share, as on an executor; a cluster core is taken to be as fast as "
              "one here, with one task per core and onnxruntime and FAISS at 1 thread.",
              "", "| | 100M vectors | 1B vectors |", "|---|---:|---:|"]

    def row(label, key, fmt="{:,.0f}"):
        lines.append(f"| {label} | {fmt.format(a[key])} | {fmt.format(b[key])} |")

    row("raw vectors (float32), GB", "raw_gb")
    row("refine + add through Spark, core-hours", "core_hours", "{:,.1f}")
    row("cores for a 1-hour refine + add", "cores_for_1h")
    row("(refine alone in-process, core-hours: the floor without Spark's overhead)",
        "refine_core_hours_in_process", "{:,.1f}")
    row("nlist", "nlist")
    row("training sample (64 per list)", "train_vectors")
    row("k-means on the driver (flat assignment), core-hours", "train_core_hours_flat_kmeans", "{:,.0f}")
    row("trained quantizer broadcast to executors, MB", "quantizer_mb")
    row("IVF-Flat index, GB (4·d + 8 bytes/vector)", "ivf_flat_gb")
    row("IVF-PQ48 index, GB (48 + 8 bytes/vector)", "ivf_pq48_gb")
    row("IVF-PQ96 index, GB (96 + 8 bytes/vector)", "ivf_pq96_gb")
    lines += ["", "What follows:", "",
              f"- **Refine + add is embarrassingly parallel.** 100M vectors need ~{a['cores_for_1h']} cores for a "
              f"one-hour build (≈ {math.ceil(a['cores_for_1h'] / 16)} executor(s) × 16 cores); 1B needs "
              f"~{b['cores_for_1h']} cores (≈ {math.ceil(b['cores_for_1h'] / 16)} × 16), or 10× the hours on the "
              "100M cluster. Each task holds one shard: partition rows × bytes/vector (a 1M-row IVF-Flat shard "
              "is ~1.5 GB, IVF-PQ48 ~56 MB) plus the broadcast quantizer.",
              "- **Training is the serial step.** FAISS k-means with a flat assignment on the driver is "
              f"~{a['train_core_hours_flat_kmeans']:,.0f} core-hours at 100M and "
              f"~{b['train_core_hours_flat_kmeans']:,.0f} at 1B (cost ∝ sample × nlist × d, calibrated on the "
              "IVF1024 training above): hours even on a 32–64-core driver at 1B. Fewer points per list (FAISS "
              "warns below 39), a GPU, or two-level clustering (`faiss.contrib.clustering.two_level_clustering`) "
              "bring it down; the sample itself is drawn by Spark (`build_index(train_size=...)`).",
              f"- **The merge is bounded by driver memory.** `build_index` merges all shards into one index and "
              f"saves one bundle. IVF-Flat at 100M is ~{a['ivf_flat_gb']:,.0f} GB — too much for one searcher; "
              f"IVF-PQ48 is ~{a['ivf_pq48_gb']:,.1f} GB and fits one machine. At 1B, IVF-PQ48 is "
              f"~{b['ivf_pq48_gb']:,.0f} GB: one large driver can still merge it, but serving belongs on several "
              "machines: keep the shards (`shard_dir=..., keep_shards=True`), merge them in groups into one "
              "bundle per searcher (`merge_shards`) and fan queries out (`faiss.IndexShards` semantics: query "
              "all, merge top-k); or `faiss.contrib.ondisk.merge_ondisk` for memory-mapped inverted lists (not "
              "a self-contained bundle, so `build_index` does not write it); or Milvus, whose query nodes shard "
              "the collection (`simskip_faiss.milvus.RefinedCollection` with a cluster URI; the refiner runs in "
              "the ingesting and querying clients).",
              "- **Milvus ingest** is bound by client-side refining (the in-process refine rate per client core) "
              "and server-side indexing: run one `milvus-ingest --upsert` per input file; upsert makes re-runs "
              "idempotent.",
              "", "Not measured here: reading parquet from a network or object store, executor start-up, "
              "shuffles (the build needs none), and Milvus server-side indexing (milvus-lite is one process)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--factory", default="IVF1024,Flat", help="index of the Spark build")
    ap.add_argument("--masters", nargs="+", default=["local[1]", "local[2]"])
    ap.add_argument("--files", type=int, default=16, help="parquet files the input is split into")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--report-only", action="store_true", help="rewrite scale.md from an existing scale.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        m = json.loads((out / "scale.json").read_text())
        m["projection"] = projection(m, m["d"])
        (out / "scale.json").write_text(json.dumps(m, indent=2))
        write_report(m, out / "scale.md")
        return
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        refiner = make_refiner(tmp / "refiner.onnx", args.d, args.hidden)
        x = make_data(args.n, args.d)
        write_parquet(x, tmp / "data", args.files)
        single = single_core(refiner, x, args.d, tmp)
        print(f"single core: refine {single['refine_per_core']:,.0f}/s, add {single['add_per_core']}", flush=True)
        ri = RefinedIndex(refiner, args.factory, "ip")
        ri.train(x[:min(len(x), 64 * 1024)])
        runs = []
        for master in args.masters:
            runs.append(spark_run(master, tmp / "data", refiner, ri.index, args.factory, args.n, tmp))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {r["master"]: r for r in runs}
    speedup = (by["local[2]"]["refine_add_rate"] / by["local[1]"]["refine_add_rate"]
               if {"local[1]", "local[2]"} <= by.keys() else float("nan"))
    m = {"command": " ".join(["python bench/scale.py", *sys.argv[1:]]), "machine": f"{os.cpu_count()} cores, "
         f"{platform.processor() or platform.machine()}", "date": time.strftime("%Y-%m-%d"), "n": args.n, "d": args.d,
         "hidden": args.hidden, "factory": args.factory, "single": single, "spark": runs, "speedup": speedup,
         }
    m["projection"] = projection(m, args.d)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(m, indent=2))
    write_report(m, out / "scale.md")
    print((out / "scale.md").read_text())


if __name__ == "__main__":
    main()
