"""bench/speed.py's shared constants, data, models and exact-neighbour helpers (used by several sections)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import faiss

from simskip_faiss.config import TrainConfig
from simskip_faiss.metrics import knn_recall
from simskip_faiss.training import SimSkip, train
from simskip_faiss.training.export import export


D, HIDDEN = 384, TrainConfig().hidden  # the default model is TrainConfig's; OTHER_WIDTHS are measured beside it
WIDTHS = (512, 256, 128)  # measured side by side in sections 2, 5, 7 and 9
OTHER_WIDTHS = tuple(w for w in WIDTHS if w != HIDDEN)
OWN = {"int8": "fp32", "fp16": "fp32", **{f"hidden {w} int8": f"hidden {w} fp32" for w in OTHER_WIDTHS},
       "distilled linear": "fp32"}
TARGETS = {"roofline_ratio": 0.85, "single_vector_us": 40.0, "search_overhead_us": 10.0,
           "recall_parity": 0.99, "ingest_rss_over_index_mb": 300.0, "native_vs_hand": 0.05,
           "hnsw_refined_vs_raw": 1.2, "shipped_metric_gap": 0.002, "flat_ivf_extra_us": 5.0, "concurrent_vs_batch": 0.7}


# -- data and models -----------------------------------------------------------------------------
def clustered(n: int, d: int, seed: int, n_centres: int = 1000, spread: float = 0.5, chunk: int = 100_000,
              out: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors around random centres (written chunk by chunk into `out`, e.g. an open_memmap)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((n_centres, d)).astype(np.float32)
    out = np.empty((n, d), np.float32) if out is None else out
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(0, n_centres, m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def load_data(quick: bool):
    """WordNet definitions/usages encoded by MiniLM (cached), or synthetic clustered data if unavailable."""
    try:
        from simskip_faiss import datasets

        data = datasets.load_wordnet(n_synsets=5000 if quick else 20000, seed=0, progress=False)
        return data, "wordnet-minilm"
    except Exception as e:  # no cache and no network: say so and go on with synthetic data
        print(f"WordNet unavailable ({e}); quality parity uses synthetic clustered data", flush=True)
        return None, "synthetic"


def trained_model(corpus: np.ndarray, hidden: int, epochs: int, threads: int, rows=None) -> tuple[SimSkip, float]:
    """A SimSkip trained without the guard (alpha = 1: the most refinement, the hardest parity case)."""
    cfg = TrainConfig(hidden=hidden, epochs=epochs, threads=threads, progress=False, seed=0)
    t = time.perf_counter()
    res = train(corpus, cfg, train_rows=rows[0], val_rows=rows[1]) if rows else train(corpus, cfg)
    return res.model, time.perf_counter() - t


def export_all(model: SimSkip, out: Path, tag: str) -> dict[str, dict]:
    """fp32, int8 and fp16 exports of one model; returns their metadata by precision."""
    metas = {}
    for p in ("fp32", "int8", "fp16"):
        metas[p] = export(model, out / f"{tag}-{p}.onnx", {"metric": "ip"}, precision=p)
        metas[p]["file_bytes"] = (out / f"{tag}-{p}.onnx").stat().st_size
    return metas


# -- exact neighbours and 10-recall@10 (sections 3, 4, 5, 7, 9) ------------------------------------------
def recall_at_10(want: np.ndarray, got: np.ndarray) -> float:
    """FAISS's 10-recall@10 (intersection): |true top-10 ∩ returned top-10| / 10, averaged over queries."""
    return knn_recall(want, got, ks=(10,))["10-recall@10"]


def top10(refine, corpus: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(refine(corpus), dtype=np.float32))
    return index.search(np.ascontiguousarray(refine(queries), dtype=np.float32), 11)[1]


def exact_top10(docs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), 10)[1]
