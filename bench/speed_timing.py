"""bench/speed.py's timing helpers: thread counts, interleaved and block-wise timing, the environment record.

Every ratio in the speed bench has its numerator and denominator timed here, in one process, taking
turns, so that the machine's noise hits both alike; medians throughout.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np
import faiss
import onnxruntime as ort
import torch
from threadpoolctl import threadpool_info, threadpool_limits


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
