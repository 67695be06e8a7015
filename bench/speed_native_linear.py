"""Section 4 of bench/speed.py: the native linear path (LinearRefiner.to_faiss) vs the same pre-transform by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import faiss

from simskip_faiss import RefinedIndex, Refiner
from simskip_faiss.refiners import distil_linear

from speed_common import recall_at_10
from speed_search_latency import BLOCK, _tune  # section 3's queries per turn and knob setter
from speed_timing import blocks, per_block, set_threads


def by_hand(A: np.ndarray, b: np.ndarray, factory: str) -> faiss.IndexPreTransform:
    """LinearTransform + NormalizationTransform + a factory index, written with FAISS calls only."""
    lt = faiss.LinearTransform(A.shape[1], A.shape[0], True)
    faiss.copy_array_to_vector(A.ravel(), lt.A)
    faiss.copy_array_to_vector(b, lt.b)
    lt.is_trained = True
    norm = faiss.NormalizationTransform(A.shape[0], 2.0)
    inner = faiss.index_factory(A.shape[0], factory, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexPreTransform(norm, inner)
    index.prepend_transform(lt)
    return index


def native_linear(refiner_file: Path, base: np.ndarray, queries: np.ndarray, n: int, build_threads: int, rounds: int) -> dict:
    """Distil the MLP refiner into a linear map; time to_faiss vs the same pre-transform by hand vs the numpy path.

    On this machine the first large index built is a few % slower to scan whatever its kind (memory
    placement), so an untimed index is built first, then two copies of each in the order native,
    hand, hand, native, pooled.
    """
    ref = Refiner.load(refiner_file, threads=1)
    lin = distil_linear(ref, base[:20000])
    out = {"fit_r2": lin.metadata["fit_r2"]}
    for factory, knob in (("Flat", None), ("IVF1024,Flat", ("nprobe", 16))):
        set_threads(build_threads)
        idx = {"untimed": by_hand(*lin.affine(), factory),
               "native_a": lin.to_faiss(factory, "ip"), "hand_a": by_hand(*lin.affine(), factory),
               "hand_b": by_hand(*lin.affine(), factory), "native_b": lin.to_faiss(factory, "ip")}
        numpy_path = RefinedIndex(lin, factory, "ip")
        for i in (*idx.values(), numpy_path):
            i.train(base)
            i.add(base)
        idx.pop("untimed")  # kept alive until now, so the timed ones do not reuse its memory
        for i in (*idx.values(), numpy_path.index):
            _tune(i, knob)  # ParameterSpace reaches through IndexPreTransform
        set_threads(1)
        q = [queries[i:i + 1] for i in range(n)]
        In, Ih, Inp = idx["native_a"].search(queries[:n], 10)[1], idx["hand_a"].search(queries[:n], 10)[1], numpy_path.search(queries[:n], 10)[1]
        blk = BLOCK["Flat" if factory == "Flat" else "IVF"]
        t = blocks({**{k: (lambda i, x=x: x.search(q[i], 10)) for k, x in idx.items()},
                    "numpy_path": lambda i: numpy_path.search(q[i], 10)}, n, rounds, blk)
        t = {"native_to_faiss": np.vstack([t["native_a"], t["native_b"]]), "hand_built": np.vstack([t["hand_a"], t["hand_b"]]),
             "numpy_path": t["numpy_path"]}
        med = {k: float(np.median(v) * 1e6) for k, v in t.items()}
        out[factory] = {"median_us": med, "native_vs_hand": per_block(t["native_to_faiss"], t["hand_built"], blk, lambda x, y: x / y) - 1,
                        "native_vs_hand_of_medians": med["native_to_faiss"] / med["hand_built"] - 1,
                        "same_results_as_hand": bool((In == Ih).all()),
                        "recall10_native_vs_numpy_path": recall_at_10(Inp, In)}
        print(f"  native {factory}: " + ", ".join(f"{k} {v:.1f} us" for k, v in med.items())
              + f"; native/hand - 1 = {out[factory]['native_vs_hand']:+.3f}", flush=True)
    return out
