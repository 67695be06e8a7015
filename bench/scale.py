"""Scale bench: refine + index throughput on Spark at local[1] vs local[2], and a projection to 100M / 1B vectors.

Measures, on synthetic unit vectors of MiniLM's width (d=384) and a refiner twice the default
width (one residual block, hidden 1024; docs/design.md):
  - single-process, 1 thread: onnxruntime refine rate, FAISS add rate per core for several IVF
    quantizers, k-means training rate, bytes per vector of each index type;
  - Spark (`simskip_faiss.scale.spark`): refine-only (noop sink) and the distributed build
    (refine + add shards + merge + save) at each --masters entry, after a warm-up job.
Writes bench/results/scale.json and bench/results/scale.md (measurements + projection).

    python bench/scale.py                                  # n=200000, local[1] and local[2] (~6 min on 2 cores)
    python bench/scale.py --n 50000 --masters local[2]     # quicker
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
# idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread waiting for its
# descheduled sibling burns CPU-seconds that measure the load, not the method (quantizer comparison)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from simskip_faiss import RefinedIndex, Refiner  # noqa: E402
from simskip_faiss.scale import spark as S  # noqa: E402

ID_BYTES = 8  # int64 id per vector in an IVF inverted list


def make_refiner(path: Path, d: int, hidden: int) -> Refiner:
    """A SimSkip refiner of the measured size with random (non-zero) residual weights."""
    import torch

    from simskip_faiss.training.export import export
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


def write_parquet(x: np.ndarray, directory: Path, files: int, binary: bool = False) -> None:
    """The vectors as parquet files: list<float> (what users have), or fixed-width float32 bytes (variant b)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    for f, rows in enumerate(np.array_split(np.arange(len(x)), files)):
        if binary:
            col = pa.array([v.tobytes() for v in x[rows]], pa.binary())
        else:
            col = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), x.shape[1])
        pq.write_table(pa.table({"id": pa.array(rows, pa.int64()), "vector": col}), directory / f"part-{f:03d}.parquet")


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system, with reaped children) of this process and all its descendants: the
    driver, Spark's JVM and its Python workers, but not the other programs sharing the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parent[int(d.name)] = int(f[1])
        cpu[int(d.name)] = sum(int(v) for v in f[11:15]) / tick  # utime stime cutime cstime
    root = os.getpid() if root is None else root
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [c for c, pp in parent.items() if pp == pid]
    return total


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process tree) of fn(): Spark's JVM and Python workers both count."""
    c, t = tree_cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t, tree_cpu_seconds() - c


def rate(fn, n: int, repeat: int = 1) -> float:
    """Items per CPU-second of this process of fn() over n items (best of `repeat`; 1 thread: per core)."""
    best = math.inf
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
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
        t = time.process_time()
        index.train(y[:train_n])
        out["train"][factory] = {"seconds": time.process_time() - t, "n": train_n}
        out["add_per_core"][factory] = rate(lambda: index.add(y), n)
        path = tmp / "probe.faiss"
        faiss.write_index(index, str(path))
        out["bytes_per_vector"][factory] = path.stat().st_size / index.ntotal
    nlist = 1024
    tr = out["train"]["IVF1024,Flat"]
    # k-means cost model: seconds per (training vector x centroid x dimension x iteration), 10 iterations in FAISS IVF
    out["kmeans_seconds_per_unit"] = tr["seconds"] / (tr["n"] * nlist * d * 10)
    return out


def clustered_data(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around `centres` random centres, noise about as large as the centre (overlapping clusters)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 262_144):  # in blocks: the noise for 1M x d at once would double the peak memory
        e = min(s + 262_144, n)
        x[s:e] = c[rng.integers(0, centres, e - s)] + 0.9 * rng.standard_normal((e - s, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _centroids_into(index: faiss.Index, centroids: np.ndarray) -> None:
    q = faiss.extract_index_ivf(index).quantizer
    q.reset()
    q.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index.is_trained = True


def _lloyd(x: np.ndarray, k: int, niter: int, assign: faiss.Index, init: np.ndarray | None = None) -> np.ndarray:
    """FAISS's spherical k-means (the IVF-IP default) with `assign` as its assignment index, from `init` if given."""
    cp = faiss.ClusteringParameters()
    cp.niter, cp.spherical, cp.max_points_per_centroid = niter, True, 1 << 30
    clus = faiss.Clustering(x.shape[1], k, cp)
    if init is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clus.centroids)
    clus.train(x, assign)
    return faiss.vector_to_array(clus.centroids).reshape(k, x.shape[1])


def _ivf_assign(init: np.ndarray, nprobe: int) -> faiss.Index:
    """An IndexIVFFlat over the k centroids for k-means' assignment step: √k lists from the initial centroids."""
    k, d = init.shape
    km = faiss.Kmeans(d, int(math.sqrt(k)), niter=20, spherical=True, seed=1)
    km.train(init)
    cq = faiss.IndexFlatIP(d)
    cq.add(km.centroids)
    ivf = faiss.IndexIVFFlat(cq, d, km.k, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained, ivf.nprobe = True, nprobe
    return ivf


def _neighbourhood_kmeans(x: np.ndarray, k: int, niter: int, neighbours: int = 32, seed: int = 1234,
                          block: int = 65536) -> np.ndarray:
    """Spherical k-means whose assignments after the first (exact) one compare each vector only with the
    `neighbours` centroids nearest to its current centroid (itself included): n·neighbours·d per iteration."""
    from faiss.contrib.clustering import reassign_centroids

    rs = np.random.RandomState(seed)
    n, d = x.shape
    centroids = x[rs.choice(n, k, replace=False)]
    flat, assign = faiss.IndexFlatIP(d), None
    for _ in range(niter):
        flat.reset()
        flat.add(centroids)
        if assign is None:
            assign = flat.search(x, 1)[1][:, 0]
        else:
            near = flat.search(centroids, neighbours)[1]
            near[:, 0] = np.arange(k)
            for s in range(0, n, block):
                cand = np.ascontiguousarray(near[assign[s:s + block]])
                dist = np.empty(cand.shape, dtype=np.float32)
                flat.compute_distance_subset(len(cand), faiss.swig_ptr(x[s:s + block]), neighbours,
                                             faiss.swig_ptr(dist), faiss.swig_ptr(cand))
                assign[s:s + block] = cand[np.arange(len(cand)), dist.argmax(axis=1)]
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros((k, d), dtype=np.float32)
        used = counts > 0
        sums[used] = np.add.reduceat(x[np.argsort(assign, kind="stable")], (np.cumsum(counts) - counts)[used], axis=0)
        centroids = sums / np.maximum(counts, 1)[:, None].astype(np.float32)
        reassign_centroids(counts, centroids, rs)  # split large clusters into the empty ones, as FAISS does
        centroids = np.ascontiguousarray(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), dtype=np.float32)
    return centroids


def quantizer_candidates(nlist: int, niter: int) -> dict:
    """name -> (description, train(index, x)) of every coarse-quantizer training measured side by side."""
    from simskip_faiss.scale.quantizer import minibatch_kmeans, train_ivf

    def package(method):
        return lambda index, x: train_ivf(index, x, method, niter=niter)

    def two_level_then_flat(steps):  # (c): two-level centroids, then `steps` flat Lloyd iterations over all vectors
        def train(index, x):
            train_ivf(index, x, "two-level", niter=niter)
            q = faiss.extract_index_ivf(index).quantizer
            _centroids_into(index, _lloyd(x, nlist, steps, faiss.IndexFlatIP(x.shape[1]), q.reconstruct_n(0, nlist)))
        return train

    def ivf_assigned(index, x):  # (d): niter iterations, assignment by an IVF over the centroids (nprobe 8 of √nlist)
        init = x[np.random.default_rng(0).choice(len(x), nlist, replace=False)]
        _centroids_into(index, _lloyd(x, nlist, niter, _ivf_assign(init, 8), init))

    def hnsw_assigned(index, x):  # (d'): niter iterations, assignment by HNSW32 (efSearch 16) over the centroids
        h = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        h.hnsw.efSearch = 16
        _centroids_into(index, _lloyd(x, nlist, niter, h))

    def super_kmeans(index, x):  # FAISS 1.15's SuperKMeans (pruned exact assignment), via the IVF's own training
        faiss.extract_index_ivf(index).cp.use_super_kmeans = True
        index.train(x)

    def neighbourhood(index, x):  # (e): exact first assignment, then only the 32 centroids nearest each vector's own
        _centroids_into(index, _neighbourhood_kmeans(x, nlist, niter))

    def flat_sample(index, x):  # reference: flat k-means on 64 vectors per list
        index.train(x[np.random.default_rng(0).choice(len(x), 64 * nlist, replace=False)])

    def flat_seed2(index, x):  # the reference again from another random start: how much recall moves by chance
        faiss.extract_index_ivf(index).cp.seed = 2
        index.train(x)

    def sample_then_flat(index, x):  # (e'): flat k-means on 32 per list, then 2 flat Lloyd iterations over all
        d = x.shape[1]
        warm = _lloyd(x[np.random.default_rng(0).choice(len(x), 32 * nlist, replace=False)], nlist, niter,
                      faiss.IndexFlatIP(d))
        _centroids_into(index, _lloyd(x, nlist, 2, faiss.IndexFlatIP(d), warm))

    def minibatch_passes(passes):  # (f'): quantizer.py's mini-batch k-means at another number of passes
        return lambda index, x: _centroids_into(index, minibatch_kmeans(x, nlist, passes, spherical=True))

    return {
        "flat": ("FAISS k-means, flat assignment (reference)", package("flat")),
        "mini-batch": ("quantizer.py's default: mini-batch k-means, batches of 10 per list, decay 0.8, 2 passes",
                       package("mini-batch")),
        **{f"mini-batch, {p:g} passes": (f"the same over {p:g} passes", minibatch_passes(p)) for p in (3,)},
        "flat, seed 2": ("the same from another random start (the noise floor)", flat_seed2),
        "two-level": ("faiss.contrib two_level_clustering", package("two-level")),
        **{f"two-level+{i} flat": (f"two-level centroids, then {i} flat Lloyd iteration{'s' * (i > 1)}",
                                   two_level_then_flat(i)) for i in (1, 2, 3)},
        "IVF-assigned": (f"assignment by IVF{int(math.sqrt(nlist))} over the centroids, nprobe 8", ivf_assigned),
        "HNSW-assigned": ("assignment by HNSW32 over the centroids, efSearch 16", hnsw_assigned),
        "SuperKMeans": ("FAISS ClusteringParameters.use_super_kmeans", super_kmeans),
        "neighbourhood": ("exact first assignment, then the 32 centroids nearest each vector's own", neighbourhood),
        "32/list, then 2 flat": ("flat k-means on 32 per list, then 2 flat Lloyd iterations over all", sample_then_flat),
        "flat, 64/list": ("flat k-means on a 64-per-list sample (reference)", flat_sample),
    }


QUANTIZER_DEFAULT = ("flat", "mini-batch", "two-level", "two-level+1 flat", "IVF-assigned", "neighbourhood",
                     "32/list, then 2 flat", "flat, 64/list", "flat, seed 2")


def quantizer_bench(n: int, d: int, nlist: int, niter: int, threads: int, methods=QUANTIZER_DEFAULT,
                    nprobes=(8, 32), nq: int = 10_000, report=print) -> dict:
    """Coarse-quantizer trainings side by side for IVF{nlist},Flat (inner product) on n clustered vectors:
    training time (wall and process CPU) and 10-recall@10 against exact search at equal nprobe."""
    from simskip_faiss.metrics import knn_recall

    faiss.omp_set_num_threads(threads)
    x = clustered_data(n + nq, d, centres=4 * nlist, seed=1)
    xq, x = x[:nq].copy(), x[nq:]
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    _, gt = exact.search(xq, 10)
    del exact
    cands = quantizer_candidates(nlist, niter)
    out = {"n": n, "d": d, "nlist": nlist, "niter": niter, "threads": threads, "nq": nq, "methods": {}}
    for method in methods:
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.niter = niter
        c, t = time.process_time(), time.perf_counter()
        cands[method][1](index, x)
        r = {"about": cands[method][0], "train_seconds": time.perf_counter() - t,
             "train_cpu_seconds": time.process_time() - c}
        index.add(x)
        for nprobe in nprobes:
            index.nprobe = nprobe
            _, I = index.search(xq, 10)
            r[f"10-recall@10 nprobe={nprobe}"] = knn_recall(gt, I, ks=(10,))["10-recall@10"]
        out["methods"][method] = r
        report(method, r)
        del index
    if "flat" in out["methods"]:
        f = out["methods"]["flat"]
        for r in out["methods"].values():
            r["cpu_speedup"] = f["train_cpu_seconds"] / r["train_cpu_seconds"]
            r["recall_diff"] = {k: r[k] - f[k] for k in f if k.startswith("10-recall")}
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def in_process_refine_add(refiner: Refiner, trained: faiss.Index, x: np.ndarray, batch: int = 4096) -> float:
    """Vectors per CPU-second of refine + add_with_ids in one process, 1 thread, in the workers' batches."""
    faiss.omp_set_num_threads(1)
    n = min(len(x), 50_000)
    index = faiss.clone_index(trained)

    def run():
        for s in range(0, n, batch):
            e = min(s + batch, n)
            index.add_with_ids(refiner.transform(x[s:e]), np.arange(s, e, dtype=np.int64))
    return rate(run, n)


@dataclasses.dataclass(frozen=True)
class BinaryShardJob:
    """Variant (b): vectors stored as fixed-width float32 `binary`, decoded with np.frombuffer in the worker."""

    job: Any  # the package's _ShardJob (refiner spec, trained template, shard dir)

    def __call__(self, batches):
        import pyarrow as pa
        from pyspark import TaskContext

        faiss.omp_set_num_threads(1)
        d = self.job.spec.d_in

        def as_lists(batches):
            for b in batches:
                col = b.column("vector")
                offsets = np.frombuffer(col.buffers()[1], np.int32, len(col) + 1, col.offset * 4)
                x = np.frombuffer(col.buffers()[2], np.float32, len(col) * d, int(offsets[0]))
                yield pa.RecordBatch.from_arrays([b.column("id"), S.to_arrow_list(x.reshape(-1, d))], ["id", "vector"])
        return self.job.run(as_lists(batches), TaskContext.get().partitionId())


def spark_run(master: str, data: Path, data_binary: Path, refiner: Refiner, trained: faiss.Index, factory: str,
              n: int, tmp: Path) -> dict:
    """Refine + add shards through Spark three ways, and the whole build, with one Spark master.

    (a) DataFrame + mapInArrow over array<float> (the JVM converts every vector to Arrow);
    (b) the same over fixed-width float32 binary (the JVM copies bytes); (c) parquet read by the
    Python workers with pyarrow (`build_index(path)`: the JVM only schedules the tasks).
    """
    spark = S.session(master, conf={"spark.sql.files.maxPartitionBytes": "16m", "spark.driver.memory": "4g"})
    try:
        df, dfb = spark.read.parquet(str(data)), spark.read.parquet(str(data_binary))
        plan = S.parquet_plan(spark, str(data))
        noop = lambda frame: frame.write.format("noop").mode("overwrite").save()  # noqa: E731
        noop(S.refine_dataframe(df.limit(2000), refiner))  # warm the workers
        out: dict = {"master": master, "partitions": df.rdd.getNumPartitions(), "tasks": len(plan.tasks),
                     "variants": {}}

        def shards(name, fn):
            sdir = _mkdir(tmp / f"shards-{name}")
            wall, cpu = timed(lambda: fn(sdir))
            shutil.rmtree(sdir, ignore_errors=True)
            out["variants"][name] = {"wall_seconds": wall, "cpu_seconds": cpu, "rate": n / wall, "per_cpu_second": n / cpu}
            print(master, name, out["variants"][name], flush=True)

        shards("a_arrow_array", lambda d: S.add_shards(df, refiner, trained, d))
        shards("b_arrow_binary", lambda d: dfb.select("id", "vector").mapInArrow(
            BinaryShardJob(S._shard_job(spark, refiner, trained, d, "vector", "id")), S._SHARD_SCHEMA).collect())
        shards("c_parquet_workers", lambda d: S.add_shards_parquet(spark, plan, refiner, trained, d))
        bundle = tmp / f"bundle-{master.replace('[', '').replace(']', '')}"
        wall, cpu = timed(lambda: out.update(build=S.build_index(str(data), refiner, bundle, factory=factory,
                                                                 trained_index=faiss.clone_index(trained),
                                                                 spark=spark).seconds))
        out["build_rate"], out["build_per_cpu_second"] = n / wall, n / cpu
        shutil.rmtree(bundle, ignore_errors=True)
        return out
    finally:
        spark.stop()


WINNER = "c_parquet_workers"


def projection(m: dict, d: int) -> list[dict]:
    """What N vectors need: core-hours, cores for a 1 h build, training and index memory, from measured rates.

    Per-core rate = vectors / CPU-seconds (driver + JVM + Python workers) of the Spark refine + add
    step of the kept path at the widest master: Spark's share of the work is paid for, as on an executor.
    Training: flat k-means CPU-seconds per unit of n·nlist·d·niter, calibrated on the IVF1024 training
    of the single-core section (at this d); two-level per unit of n·√nlist·d, scaled from it by the
    two methods' measured ratio in the quantizer comparison (1M vectors, nlist 4096), when it was run.
    """
    measured = m["spark"][-1]["variants"][WINNER]["per_cpu_second"]
    add = m["single"]["add_per_core"]
    # swap the measured IVF1024 flat-quantizer add cost for the HNSW-quantizer one that large nlist needs
    per_core = 1 / (1 / measured - 1 / add["IVF1024,Flat"] + 1 / add["IVF4096_HNSW32,Flat"])
    flat_unit, two_unit = m["single"]["kmeans_seconds_per_unit"], None
    q = m.get("quantizer")
    if q:  # two-level relative to flat as measured there, applied to the flat calibration at this d
        f, t = q["methods"]["flat"], q["methods"]["two-level"]
        ratio = ((t["train_cpu_seconds"] / (q["n"] * math.sqrt(q["nlist"]) * q["d"]))
                 / (f["train_cpu_seconds"] / (q["n"] * q["nlist"] * q["d"] * q["niter"])))
        two_unit = flat_unit * ratio
    rows = []
    for n in (100_000_000, 1_000_000_000):
        nlist = 65536 if n <= 200_000_000 else 262144
        core_s = n / per_core
        train_n = 64 * nlist
        rows.append({
            "n": n, "nlist": nlist, "per_core_rate": per_core, "core_hours": core_s / 3600,
            "cores_for_1h": math.ceil(core_s / 3600),
            "refine_core_hours_in_process": n / m["single"]["refine_per_core"] / 3600,
            "refine_add_core_hours_in_process": n / m["single"]["refine_add_per_core"] / 3600,
            "train_vectors": train_n, "train_core_hours_flat_kmeans": flat_unit * train_n * nlist * d * 10 / 3600,
            "train_core_hours_two_level": (two_unit * train_n * math.sqrt(nlist) * d / 3600) if two_unit else None,
            "quantizer_mb": nlist * d * 4 / 1e6,
            "ivf_flat_gb": n * (4 * d + ID_BYTES) / 1e9,
            "ivf_pq48_gb": n * (48 + ID_BYTES) / 1e9, "ivf_pq96_gb": n * (96 + ID_BYTES) / 1e9,
            "raw_gb": n * 4 * d / 1e9,
        })
    return rows


def meets_target(r: dict) -> bool:
    """Issue 14's quantizer target: ≥ 3× fewer CPU-seconds than flat k-means, 10-recall@10 within 0.01 of it."""
    return r["cpu_speedup"] >= 3 and all(v >= -0.01 for v in r["recall_diff"].values())


def quantizer_conclusion(q: dict, extra: dict) -> list[str]:
    """What the comparison says: which candidate meets the target, and why each other one does not.
    `extra`: methods of a separate run at the same d (each against that run's own flat k-means)."""
    ms, keys = q["methods"], [k for k in q["methods"]["flat"] if k.startswith("10-recall")]

    def d(name):  # "Δ -0.0643 / -0.0491"
        return "Δ " + " / ".join(f"{ms[name]['recall_diff'][k]:+.3f}" for k in keys)

    def fewer(name):
        return f"{ms[name]['cpu_speedup']:.1f}× fewer CPU-s"

    won = [name for name, r in {**ms, **extra}.items() if name != "flat" and meets_target(r)]
    out = [f"Target (≥ 3× fewer CPU-seconds than flat, 10-recall@10 within 0.01 at equal nprobe) met by: "
           f"**{', '.join(won) if won else 'none'}**."]
    why = []
    if "flat, seed 2" in ms:
        noise = max(abs(v) for v in ms["flat, seed 2"]["recall_diff"].values())
        why.append(f"- The noise floor: flat k-means itself, from another random start, moves recall by "
                   f"{d('flat, seed 2')} (its training took {ms['flat, seed 2']['train_cpu_seconds']:.1f} CPU-s against "
                   f"{ms['flat']['train_cpu_seconds']:.1f}: the run-to-run spread of CPU-seconds here)"
                   + ("; recall differences of 0.01 are therefore not chance." if noise < 0.005 else
                      "; a recall difference of 0.01 is about what chance alone gives here."))
    if "two-level" in ms:
        why.append(f"- two-level: by far the cheapest ({fewer('two-level')}), but {d('two-level')}: a second-level "
                   "centroid cannot cross its first-level cluster's border, so vectors near those borders get "
                   "worse lists.")
    steps = {name: r for name, r in {**ms, **extra}.items() if name.startswith("two-level+")}
    if "two-level+1 flat" in ms and "two-level" in ms:
        step = ms["two-level+1 flat"]["train_cpu_seconds"] - ms["two-level"]["train_cpu_seconds"]
        why.append(f"- two-level + flat Lloyd iterations over all vectors: each costs ~{step:.1f} CPU-s (a tenth of "
                   "flat k-means) and recovers part of the loss: "
                   + "; ".join(f"{name.split('+')[1]}: {r['cpu_speedup']:.1f}× fewer CPU-s, "
                               + " / ".join(f"{v:+.3f}" for v in r["recall_diff"].values())
                               for name, r in sorted(steps.items()))
                   + ". The steps that fit in the 3× budget do not bring recall within 0.01.")
    if "IVF-assigned" in ms:
        why.append(f"- IVF-assigned ({fewer('IVF-assigned')}, {d('IVF-assigned')}): at d = {q['d']} FAISS's flat "
                   "scan is one BLAS matrix product, so scanning 8 of √nlist lists per vector saves little time; and "
                   "in clusters that overlap this much the nearest centroid is often outside the probed lists.")
    if "neighbourhood" in ms:
        why.append(f"- neighbourhood ({fewer('neighbourhood')}, {d('neighbourhood')}): after the first exact "
                   "assignment only the 32 centroids nearest a vector's own are compared — cheap, but with this "
                   "much overlap a vector's nearest centroid is often not among them.")
    for name in ("32/list, then 2 flat", "flat, 64/list"):
        if name in ms:
            why.append(f"- {name} ({fewer(name)}, {d(name)}): k-means on a sample has fewer vectors per centroid; "
                       "subsampling alone does not meet the recall target either.")
    why.append("- Not in the default run: k-means assigned by HNSW32 (efSearch 16) and FAISS's SuperKMeans "
               "(`ClusteringParameters.use_super_kmeans`, pruned exact assignment) were each stopped unfinished in "
               "trial runs at this size after using more CPU-seconds than a third of flat's (SuperKMeans: more "
               "than flat's whole training), so neither can meet the target here (`--candidates HNSW-assigned "
               "SuperKMeans flat` measures them to the end).")
    out += ["", "Why the others lose:", "", *why, ""]
    if "mini-batch" in won:
        out.append("Adopted: mini-batch k-means is the default of `build_index` / `spark-build` (`simskip_faiss.scale.quantizer`); "
                   "flat (`--quantizer flat`) and two-level stay available.")
    if not won:
        out.append("So nothing is adopted: flat k-means stays the default of `build_index` / `spark-build`, and "
                   "two-level k-means stays opt-in (`--quantizer two-level`) as the cheapest trade — for builds "
                   "where training time dominates (tens of thousands of lists) and a higher nprobe can buy the "
                   "recall back.")
    return out


def quantizer_report(q: dict, others: list[dict]) -> list[str]:
    """The "Coarse quantizer training" section of scale.md: every candidate against flat k-means."""
    keys = [k for k in q["methods"]["flat"] if k.startswith("10-recall")]
    lines = ["## Coarse quantizer training", "",
             f"`{q['command']}` ({q.get('machine', 'this machine')}, {q.get('date', '')}): IVF{q['nlist']},Flat "
             f"(inner product) trained on n = {q['n']:,} synthetic clustered unit vectors, d = {q['d']} "
             f"({4 * q['nlist']:,} random centres, noise about as large as the centre), {q['threads']} FAISS "
             f"threads, niter = {q['niter']}; 10-recall@10 of {q['nq']:,} held-out queries against exact search. "
             "CPU-seconds are the process's (all threads), with idle OpenMP threads sleeping rather than spinning "
             "(`OMP_WAIT_POLICY=PASSIVE`), so the other jobs on this shared machine do not inflate them; wall "
             "seconds mostly measure that load. Δ = recall − flat's recall at the same nprobe.", "",
             "| k-means | what | train wall s | train CPU s | × fewer CPU-s than flat | "
             + " | ".join(f"{k.split()[-1]}: recall (Δ)" for k in keys) + " | target met |",
             "|---|---|---:|---:|---:|" + "---:|" * len(keys) + "---|"]
    for name, r in q["methods"].items():
        lines.append(f"| {name} | {r['about']} | {r['train_seconds']:.1f} | {r['train_cpu_seconds']:.1f} | "
                     f"{r['cpu_speedup']:.2f} | "
                     + " | ".join(f"{r[k]:.4f} ({r['recall_diff'][k]:+.4f})" for k in keys)
                     + f" | {'—' if name == 'flat' else '**yes**' if meets_target(r) else 'no'} |")
    extra = {k: v for o in others if o["d"] == q["d"] for k, v in o["methods"].items() if k != "flat"}
    lines += ["", *quantizer_conclusion(q, extra), ""]
    for o in others:  # a confirmation at another d, fewer candidates
        title = o.get("title") or (f"Confirmation at d = {o['d']}" if o["d"] != q["d"] else
                                   "More flat steps after two-level (a separate run, with its own flat reference)")
        argv = shlex.split(o["command"])
        left = [c for c in argv[argv.index("--candidates") + 1:] if c not in o["methods"]] if "--candidates" in argv else []
        lines += [f"{title} (`{o['command']}`" + (f"; stopped before {', '.join(left)} finished, for time"
                                                  if o.get("partial") and left else "")
                  + (f"; {o['note']}" if o.get("note") else "") + "):", "",
                  "| k-means | train CPU s | × fewer CPU-s than flat | " + " | ".join(f"{k.split()[-1]} Δ" for k in keys) + " |",
                  "|---|---:|---:|" + "---:|" * len(keys)]
        for name, r in o["methods"].items():
            lines.append(f"| {name} | {r['train_cpu_seconds']:.1f} | {r['cpu_speedup']:.2f} | "
                         + " | ".join(f"{r['recall_diff'][k]:+.4f}" for k in keys) + " |")
        won = [name for name, r in o["methods"].items() if name != "flat" and meets_target(r)]
        lines += ["", f"Target met here by: **{', '.join(won) if won else 'none'}**.", ""]
    return lines


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
    ra = s["refine_add_per_core"]
    lines += ["", f"- refine + add_with_ids into the build's trained `{m['factory']}` (batches of 4096, as the "
              f"workers do): **{ra:,.0f} vectors per CPU-second** — the in-process reference of the target.", "",
              "Spark refine + add shards, three ways to get the vectors from parquet to the Python workers "
              "(same refiner, same trained index, same data; CPU-seconds of this process tree — driver, JVM "
              "and Python workers — so the other jobs sharing the machine do not count):", "",
              "- (a) DataFrame + `mapInArrow` over `array<float>`: the JVM decodes parquet and converts every "
              "vector to Arrow (`build_index(df)`);",
              "- (b) the same over vectors stored as fixed-width float32 `binary`: the JVM copies bytes, the "
              "worker reads them with `np.frombuffer` (needs the data rewritten as binary; bench-only);",
              "- (c) parquet read by the Python workers with pyarrow, Spark distributing (file, row group) "
              "tasks (`build_index(path)`, `write_refined(path)`, the CLI): the JVM only schedules.", "",
              "| master | tasks (a, b / c) | path | wall s | CPU s | vectors per CPU-second | ÷ in-process |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in m["spark"]:
        for name, v in r["variants"].items():
            lines.append(f"| {r['master']} | {r['partitions']} / {r['tasks']} | {name.replace('_', ' ', 1)} | "
                         f"{v['wall_seconds']:.1f} | {v['cpu_seconds']:.1f} | {v['per_cpu_second']:,.0f} | "
                         f"**{v['per_cpu_second'] / ra:.2f}** |")
    lines += ["", "The whole `build_index(path)` with the trained index given (validate in the workers + the "
              "duplicate-id check in Spark SQL, refine + add, merge, save):", "",
              "| master | seconds: validate / refine+add / merge / save / total | vectors per CPU-second, whole build |",
              "|---|---|---:|"]
    for r in m["spark"]:
        b = r["build"]
        lines.append(f"| {r['master']} | {b['validate']:.1f} / {b['refine_add']:.1f} / {b['merge']:.1f} / "
                     f"{b['save']:.1f} / {b['total']:.1f} | {r['build_per_cpu_second']:,.0f} |")
    best = {r["master"]: r["variants"][WINNER]["per_cpu_second"] / ra for r in m["spark"]}
    lines += ["", f"Kept: (c). It reads the user's `array<float>` parquet as is, and its cost per vector is "
              f"{', '.join(f'{v:.2f}× ({k})' for k, v in best.items())} of the in-process refine + add: what "
              "remains is pyarrow's parquet decoding and Spark's task scheduling. (b) removes most of the JVM's "
              "conversion too, but only for data rewritten as binary, and still pays the JVM's copy; (a) stays "
              "for DataFrames that are not plain parquet files (`build_index(df)`, `refine_dataframe`). "
              "Wall-clock rates are not comparable across rows here: the 2 cores were shared with other jobs. "
              "An earlier version of this bench counted CPU-seconds of the whole machine (/proc/stat) and "
              "reported (a) at ≈ 0.17× of in-process refining; on a shared machine that counts other jobs too, "
              "so the per-process-tree figures above replace it. Outside refine + add, the whole build also "
              "pays the validation pass (a second parquet read in the workers, and Spark SQL grouping the ids "
              "to find duplicates), the merge and the save.", ""]
    if m.get("quantizer"):
        lines += quantizer_report(m["quantizer"], [v for k, v in m.items()
                                                   if k.startswith("quantizer_") and k != "quantizer_partial"])
    p = {r["n"]: r for r in m["projection"]}
    a, b = p[100_000_000], p[1_000_000_000]
    lines += ["## Projection", "",
              "At this scale IVF needs many more lists (nlist ≈ 16·√N → 65,536 for 100M, 262,144 for 1B). A "
              "flat quantizer would then cost nlist·d flops per vector at add time (compare IVF1024 and IVF4096 "
              "above), so the projection assumes an HNSW quantizer (`IVF65536_HNSW32,...`), whose add cost grows "
              "only with log(nlist) (IVF4096_HNSW32 above).", "",
              f"Per-core rate: vectors per CPU-second of the Spark refine + add step, path (c) "
              f"({m['spark'][-1]['master']}: {m['spark'][-1]['variants'][WINNER]['per_cpu_second']:,.0f}), with the measured "
              f"IVF1024 add cost swapped for the HNSW-quantizer one = **{a['per_core_rate']:,.0f} vectors/s/core**. "
              "CPU-seconds include the JVM's share, as on an executor; a cluster core is taken to be as fast as "
              "one here, with one task per core and onnxruntime and FAISS at 1 thread.",
              "", "| | 100M vectors | 1B vectors |", "|---|---:|---:|"]

    def row(label, key, fmt="{:,.0f}"):
        lines.append(f"| {label} | {fmt.format(a[key])} | {fmt.format(b[key])} |")

    row("raw vectors (float32), GB", "raw_gb")
    row("refine + add through Spark, core-hours", "core_hours", "{:,.1f}")
    row("cores for a 1-hour refine + add", "cores_for_1h")
    row("(refine + add in-process, core-hours: the floor without Spark's overhead, IVF1024 add)",
        "refine_add_core_hours_in_process", "{:,.1f}")
    row("nlist", "nlist")
    row("training sample (64 per list)", "train_vectors")
    row("k-means on the driver, flat assignment, core-hours", "train_core_hours_flat_kmeans", "{:,.0f}")
    if a["train_core_hours_two_level"] is not None:
        row("k-means on the driver, two-level (opt-in, lower recall), core-hours",
            "train_core_hours_two_level", "{:,.2f}")
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
              f"~{b['train_core_hours_flat_kmeans']:,.0f} at 1B (cost ∝ sample × nlist × d). "
              + (f"Two-level k-means (cost ∝ sample × √nlist × d, scaled by the ratio measured above) would bring "
                 f"that to ~{a['train_core_hours_two_level']:,.2f} and ~{b['train_core_hours_two_level']:,.2f} "
                 "core-hours, at the recall cost measured above, which grows with d (at nlist 4096; at 65,536+ lists neither the "
                 "cost nor the recall is measured). "
                 if a["train_core_hours_two_level"] is not None else "")
              + "Mini-batch k-means (the default) needs 2 passes over its sample where flat needs 10, hence its "
                "several times fewer CPU-seconds at ~244 vectors per list (1M, nlist 4096, above); on a 64-per-list "
                "sample it runs its minimum of 48 batches (~7.5 passes), close to flat's cost, so these rows keep "
                "flat's figure. "
              + "The sample itself is drawn by the workers while they validate (`build_index(train_size=...)`).",
              f"- **The merge is bounded by driver memory.** `build_index` merges all shards into one index and "
              f"saves one bundle. IVF-Flat at 100M is ~{a['ivf_flat_gb']:,.0f} GB — too much for one searcher; "
              f"IVF-PQ48 is ~{a['ivf_pq48_gb']:,.1f} GB and fits one machine. At 1B, IVF-PQ48 is "
              f"~{b['ivf_pq48_gb']:,.0f} GB: one large driver can still merge it, but serving belongs on several "
              "machines: keep the shards (`shard_dir=..., keep_shards=True`), merge them in groups into one "
              "bundle per searcher (`merge_shards`) and fan queries out (`faiss.IndexShards` semantics: query "
              "all, merge top-k); or `faiss.contrib.ondisk.merge_ondisk` for memory-mapped inverted lists (not "
              "a self-contained bundle, so `build_index` does not write it); or Milvus, whose query nodes shard "
              "the collection (`simskip_faiss.scale.milvus.RefinedCollection` with a cluster URI; the refiner runs in "
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
    ap.add_argument("--quantizer-only", action="store_true",
                    help="run only the quantizer-training comparison and update scale.json / scale.md")
    ap.add_argument("--kmeans-n", type=int, default=1_000_000, help="training vectors of the quantizer comparison")
    ap.add_argument("--kmeans-d", type=int, default=32, help="dimension of the quantizer comparison")
    ap.add_argument("--kmeans-nlist", type=int, default=4096)
    ap.add_argument("--kmeans-niter", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="FAISS threads of the quantizer comparison")
    ap.add_argument("--quantizer-key", help="scale.json key of this comparison (default: 'quantizer' at the default d, "
                                            "else 'quantizer_d<d>'); another key is reported as a separate run")
    ap.add_argument("--title", help="title of this run in scale.md when it is reported as a separate run")
    ap.add_argument("--candidates", nargs="+", default=list(QUANTIZER_DEFAULT),
                    help="quantizer trainings to compare (names in quantizer_candidates; HNSW-assigned and "
                         "SuperKMeans are left out by default: in trial runs each cost more CPU-seconds than "
                         "a third of flat's, SuperKMeans more than flat's)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.quantizer_only:
        path = out / "scale.json"
        out.mkdir(parents=True, exist_ok=True)
        m = json.loads(path.read_text()) if path.exists() else {}
        command = shlex.join(["python", "bench/scale.py", *sys.argv[1:]])

        def report(method, r):  # each result saved as it comes: a long run stopped early keeps what it measured
            print(f"quantizer {method}: {r}", flush=True)
            m.setdefault("quantizer_partial", {"command": command, "methods": {}})["methods"][method] = r
            path.write_text(json.dumps(m, indent=2))

        q = quantizer_bench(args.kmeans_n, args.kmeans_d, args.kmeans_nlist, args.kmeans_niter, args.threads,
                            methods=args.candidates, report=report)
        q["command"], q["date"] = command, time.strftime("%Y-%m-%d")
        q["machine"] = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, shared with other jobs"
        m.pop("quantizer_partial", None)
        # the default d is the comparison of record; another d (a confirmation) is kept beside it
        if args.title:
            q["title"] = args.title
        m[args.quantizer_key or ("quantizer" if args.kmeans_d == ap.get_default("kmeans_d") else f"quantizer_d{args.kmeans_d}")] = q
        path.write_text(json.dumps(m, indent=2))
        if "single" in m:
            m["projection"] = projection(m, m["d"])
            write_report(m, out / "scale.md")
            path.write_text(json.dumps(m, indent=2))
        return
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
        write_parquet(x, tmp / "data-binary", args.files, binary=True)
        single = single_core(refiner, x, args.d, tmp)
        ri = RefinedIndex(refiner, args.factory, "ip")
        ri.train(x[:min(len(x), 64 * 1024)])
        single["refine_add_per_core"] = in_process_refine_add(refiner, ri.index, x)
        print(f"single core: refine {single['refine_per_core']:,.0f}/s, add {single['add_per_core']}, "
              f"refine + add {single['refine_add_per_core']:,.0f}/s", flush=True)
        runs = []
        for master in args.masters:
            runs.append(spark_run(master, tmp / "data", tmp / "data-binary", refiner, ri.index, args.factory, args.n, tmp))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    m = {"command": " ".join(["python bench/scale.py", *sys.argv[1:]]), "machine": f"{os.cpu_count()} cores, "
         f"{platform.processor() or platform.machine()}, shared with other jobs", "date": time.strftime("%Y-%m-%d"),
         "n": args.n, "d": args.d, "hidden": args.hidden, "factory": args.factory, "single": single, "spark": runs}
    if "quantizer" in previous:
        m["quantizer"] = previous["quantizer"]
    m["projection"] = projection(m, args.d)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(m, indent=2))
    write_report(m, out / "scale.md")
    print((out / "scale.md").read_text())


if __name__ == "__main__":
    main()
