"""Section 2 of bench/speed.py: single-vector refine latency (Refiner.transform on one vector, 1 thread)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simskip_faiss import Refiner

from speed_common import D
from speed_timing import blocks, set_threads


def single_vector(files: dict[str, Path], n: int = 2000, rounds: int = 5) -> dict[str, dict]:
    """Median/p90 microseconds of Refiner.transform on one vector, 1 onnxruntime thread (`blocks`)."""
    set_threads(1)
    refs = {k: Refiner.load(f, threads=1) for k, f in files.items()}
    xs = np.random.default_rng(1).standard_normal((n, D)).astype(np.float32)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    q = [xs[i:i + 1] for i in range(n)]
    t = blocks({k: (lambda i, r=r: r.transform(q[i])) for k, r in refs.items()}, n, rounds, 200)
    return {k: {"median_us": float(np.median(v) * 1e6), "p90_us": float(np.percentile(v, 90) * 1e6)} for k, v in t.items()}
