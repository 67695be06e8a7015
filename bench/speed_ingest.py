"""Section 6 of bench/speed.py: streamed ingest of 1M x 384 from a .npy, raw add vs RefinedIndex.add.

Each path runs in its own subprocess: throughput and peak RSS (VmHWM) against the index's size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from speed_common import D, clustered


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
