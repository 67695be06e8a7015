"""Section 8 of bench/speed.py: 8 concurrent single-query callers through MicroBatcher vs batches of 8."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import faiss

from simskip_faiss.batching import MicroBatcher

from speed_timing import set_threads


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
