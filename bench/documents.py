"""Document updates: what applying them costs at build, and what they take in memory.

Synthetic unit vectors (d = 384, MiniLM's width) with updates on a share of the documents (WordNet's
shared-corpus split updates about 15% of them); the same corpus is added to the same index type with and
without updates, alternately, best of `--repeats` (the machine is shared: ratios measured in one run).
Memory: the bytes of the updates of `--memory-rows` documents against the bytes of their vectors.
Writes bench/results/documents.md.

    python bench/documents.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import faiss  # noqa: E402

from simskip_faiss import IdentityRefiner, RefinedIndex  # noqa: E402
from simskip_faiss.refiners.documents import DocumentUpdates, sketch  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def updates(x: np.ndarray, share: float, rng) -> DocumentUpdates:
    rows = np.sort(rng.choice(len(x), int(share * len(x)), replace=False))
    delta = 0.1 * rng.standard_normal((len(rows), x.shape[1])).astype(np.float32)
    return DocumentUpdates(rows, delta, sketch(x[rows]), {})


def build_seconds(x: np.ndarray, factory: str, upd: DocumentUpdates, repeats: int) -> tuple[float, float]:
    """Best add() seconds without and with `upd`, the two alternating so that drift hits both alike."""
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for with_updates in (False, True):
            index = RefinedIndex(IdentityRefiner(x.shape[1], normalize=True).with_documents(upd if with_updates else None),
                                 factory)
            t = time.perf_counter()
            index.add(x)
            best[with_updates] = min(best[with_updates], time.perf_counter() - t)
    return best[False], best[True]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--share", type=float, default=0.15, help="share of the documents with an update")
    ap.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"])
    ap.add_argument("--hnsw-rows", type=int, default=50_000, help="rows for graph indexes (slow to build)")
    ap.add_argument("--memory-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((args.rows, 384)))
    lines = [f"Command: `python bench/documents.py {' '.join(sys.argv[1:])}` — {platform.machine()}, {os.cpu_count()} "
             f"cores shared, {args.threads} FAISS thread(s), faiss {faiss.__version__}.", "",
             f"Build: the same corpus added with and without document updates on {args.share:.0%} of its rows "
             f"(best of {args.repeats}, alternating).", "",
             "| index | rows | without updates s | with updates s | ratio |", "|---|---|---|---|---|"]
    for factory in args.factories:
        xs = x[: args.hnsw_rows] if "HNSW" in factory else x
        upd = updates(xs, args.share, rng)
        plain, moved = build_seconds(xs, factory, upd, args.repeats)
        lines.append(f"| {factory} | {len(xs):,} | {plain:.3f} | {moved:.3f} | {moved / plain:.3f} |")
        print(lines[-1], flush=True)
    del x
    m = args.memory_rows
    upd = DocumentUpdates(np.arange(m, dtype=np.int64), np.zeros((m, 384), np.float32),
                          np.zeros((m, 9), np.float32), {})
    held = upd.ids.nbytes + upd.delta.nbytes + upd.sketches.nbytes
    vectors = m * 384 * 4
    lines += ["", f"Memory: updates of {m:,} documents (384-d) hold {held / 2**20:.0f} MiB against {vectors / 2**20:.0f} MiB "
              f"for their vectors: {held / vectors:.3f}× (ids int64, offsets and 9-entry sketches float32)."]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "documents.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
