"""Section 1 of bench/speed.py: refine throughput at batch 1/16/1024/8192.

onnxruntime (fp32, int8) vs torch eager vs a numpy matrix-multiply roofline (the two matmuls of the
same shapes, i.e. the same FLOPs), timed interleaved.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from simskip_faiss import Refiner
from simskip_faiss.training import SimSkip

from speed_common import D, HIDDEN
from speed_timing import interleaved, set_threads


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
