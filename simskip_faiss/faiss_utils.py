"""FAISS helpers shared by `RefinedIndex` (index.py), `LinearRefiner.to_faiss` (refiners/linear.py) and Milvus.

Metric names, index construction and checks, streamed-ingest memory helpers. Kept apart from
index.py so that the refiners (refiners/linear.py) can build FAISS indexes without importing the index module.
"""
from __future__ import annotations

import math
import mmap

import faiss
import numpy as np
from .errors import InputError, InputTypeError, faiss_reason

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METRIC_NAMES = {v: k for k, v in METRICS.items()}


def metric_code(metric) -> int:
    """'ip' / 'l2' / a faiss.METRIC_* constant -> the FAISS constant."""
    if isinstance(metric, str):
        if metric.lower() not in METRICS:
            raise InputError(f"metric must be 'ip' or 'l2', got {metric!r}")
        return METRICS[metric.lower()]
    if metric not in METRIC_NAMES:
        raise InputError(f"unsupported FAISS metric {metric!r}; use inner product or L2")
    return int(metric)


def release_rows(x: np.ndarray, start: int, stop: int) -> None:
    """Unmap rows [start, stop) of a memory-mapped array from this process (madvise MADV_DONTNEED).

    Pages read through a memmap count in the process's resident set until unmapped, so streaming
    a 1.5 GB .npy would otherwise add its whole size to the peak memory of an ingest. The data
    stay in the kernel's page cache. Only 'r' and 'r+' maps (file-backed, shared): dropping a
    copy-on-write ('c') map's pages would discard its writes. Anything else is left alone.
    """
    mm = getattr(x, "_mmap", None)
    if (mm is None or getattr(x, "mode", None) not in ("r", "r+") or not hasattr(mmap, "MADV_DONTNEED")
            or not x.flags.c_contiguous or stop <= start):
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        row = x.strides[0]
        lo = x.ctypes.data - base + start * row
        hi = min(x.ctypes.data - base + stop * row, len(mm))
        lo -= lo % mmap.PAGESIZE
        if hi > lo >= 0:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError, TypeError, BufferError):
        pass  # an optimisation only


def reserve(index: faiss.Index, n: int) -> None:
    """Grow a flat index's code storage once, to hold `n` more vectors, before they are streamed in.

    Adding chunk by chunk grows FAISS's std::vector by doubling; near the end of a large ingest the
    old and the new buffer are both resident (up to ~2x the index). Resizing up then back down
    keeps the capacity (the standard guarantees it), so later adds never reallocate. Only flat
    codes (Flat, SQ, PQ, ...) own one such buffer; other indexes are left alone.
    """
    idx = faiss.downcast_index(index)
    while isinstance(idx, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        idx = faiss.downcast_index(idx.index)
    if not isinstance(idx, faiss.IndexFlatCodes) or not idx.codes.is_owned:
        return
    have, need = idx.ntotal * idx.code_size, (idx.ntotal + int(n)) * idx.code_size
    if idx.codes.size() == have and need > have:
        idx.codes.resize(need)
        idx.codes.resize(have)


def build_index(index, d: int, metric, refiner) -> faiss.Index:
    """A FAISS index of dimension `d` for vectors refined by `refiner`: built from a factory string or checked.

    Refuses a metric mismatch, a dimension mismatch, and an inner-product index behind a refiner
    that does not L2-normalise (`BaseRefiner.check_metric`).
    """
    metric = metric_code(metric)
    if isinstance(index, str):
        try:
            index = faiss.index_factory(d, index, metric)
        except RuntimeError as e:
            raise InputError(f"FAISS could not build {index!r}: {faiss_reason(e)}") from None
    else:
        if not isinstance(index, faiss.Index):
            raise InputTypeError(f"index must be a faiss.Index or a factory string, got {type(index).__name__}")
        if index.metric_type != metric:
            raise InputError(f"the index uses metric {METRIC_NAMES.get(index.metric_type, index.metric_type)!r} "
                             f"but metric={METRIC_NAMES[metric]!r} was given")
    if index.d != d:
        raise InputError(f"refiner outputs {d}-d vectors but the index has dimension {index.d}")
    refiner.check_metric(METRIC_NAMES[metric], "index")
    return index


# -- search parameters ------------------------------------------------------------------------------
PARAM_BOUNDS = {"efSearch": (1, 1 << 20), "nprobe": (1, 1 << 20), "max_codes": (1, 1 << 50),
                "quantizer_efSearch": (1, 1 << 20)}  # positive integers; the caps stop absurd allocations


def check_param(name: str, value) -> int:
    """A search parameter's value as an int, refused unless it is an integer within PARAM_BOUNDS[name]."""
    if name not in PARAM_BOUNDS:
        raise InputError(f"unknown search parameter {name!r}; supported: {', '.join(PARAM_BOUNDS)}")
    lo, hi = PARAM_BOUNDS[name]
    v = value
    if isinstance(v, str):
        try:
            v = float(v) if any(c in v.lower() for c in ".ean") else int(v)
        except ValueError:
            raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(v)


def parse_params(items) -> dict[str, int]:
    """['efSearch=64', 'nprobe=8'] (the CLI's --param) -> {'efSearch': 64, 'nprobe': 8}, validated."""
    out = {}
    for item in items or ():
        name, eq, value = str(item).partition("=")
        if not eq or not name.strip():
            raise InputError(f"a search parameter is name=value, got {item!r}")
        out[name.strip()] = check_param(name.strip(), value.strip())
    return out


def search_parameters(index: faiss.Index, **values) -> faiss.SearchParameters | None:
    """Per-call faiss.SearchParameters for `index` (efSearch, nprobe, ...), validated; None when no values.

    Parameters the caller does not set keep the index's own values (a fresh SearchParametersHNSW
    would otherwise reset efSearch to 16). Per-call parameters leave the shared index untouched,
    so threads may search one index with different settings. IDMap and pre-transform wrappers are
    seen through.
    """
    if not values:
        return None
    values = {k: check_param(k, v) for k, v in values.items()}
    params, used = _params_for(index, values)
    unused = sorted(set(values) - used)
    if unused:
        raise InputError(f"{type(faiss.downcast_index(index)).__name__} has no search parameter "
                         f"{', '.join(unused)} (it takes: {', '.join(sorted(used)) or 'none of ' + ', '.join(PARAM_BOUNDS)})")
    return params


def _params_for(index: faiss.Index, values: dict) -> tuple[faiss.SearchParameters | None, set]:
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):  # (IDMap2 too) passes the parameters on to the wrapped index
        return _params_for(idx.index, values)
    if isinstance(idx, faiss.IndexPreTransform):
        inner, used = _params_for(idx.index, values)
        p = faiss.SearchParametersPreTransform()
        p.index_params, p.referenced = inner, inner  # keep the Python object alive with its parent
        return p, used
    if isinstance(idx, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = values.get("efSearch", idx.hnsw.efSearch)
        return p, {"efSearch"}
    if isinstance(idx, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe, p.max_codes = values.get("nprobe", idx.nprobe), values.get("max_codes", idx.max_codes)
        used = {"nprobe", "max_codes"}
        q = faiss.downcast_index(idx.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = values.get("quantizer_efSearch", q.hnsw.efSearch)
            p.quantizer_params, p.referenced = qp, qp
            used.add("quantizer_efSearch")
        return p, used
    return None, set()


def check_search_params(params) -> None:
    """Refuse a caller's faiss.SearchParameters whose efSearch/nprobe/... is out of PARAM_BOUNDS."""
    if not isinstance(params, faiss.SearchParameters):
        raise InputTypeError(f"params must be a faiss.SearchParameters or a dict of name -> value, got {type(params).__name__}")
    for name in PARAM_BOUNDS:
        if name != "max_codes" and hasattr(params, name):  # max_codes 0 is FAISS's "no limit"
            check_param(name, getattr(params, name))
    for child in ("index_params", "quantizer_params", "referenced"):
        sub = getattr(params, child, None)
        if isinstance(sub, faiss.SearchParameters) and sub is not params and type(sub) is not faiss.SearchParameters:
            check_search_params(sub)


# -- reconstruction ---------------------------------------------------------------------------------
def reconstruct_n(index: faiss.Index, i0: int, n: int) -> np.ndarray:
    """Stored vectors i0 .. i0+n-1 (storage order), or ValueError; never FAISS's process abort.

    FAISS's default reconstruct_n calls reconstruct inside an OpenMP loop, so an index that cannot
    reconstruct (IDMap, whose keys are ids, not positions; NSG; an out-of-range row of HNSW)
    terminates the process. Here IDMap wrappers are seen through (their inner index stores the
    rows in order), the range is checked, and other indexes are probed with one sequential
    reconstruct before the batch call.
    """
    idx = faiss.downcast_index(index)
    while isinstance(idx, faiss.IndexIDMap):
        idx = faiss.downcast_index(idx.index)
    for what, v in (("i0", i0), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"reconstruct_n: {what} must be a non-negative integer, got {v!r}")
    if i0 + n > idx.ntotal:
        raise InputError(f"reconstruct_n: rows {i0}..{i0 + n - 1} are beyond the {idx.ntotal} stored vectors")
    if n == 0:
        return np.empty((0, idx.d), dtype=np.float32)
    try:
        if not isinstance(idx, (faiss.IndexFlatCodes, faiss.IndexIVF)):  # their own reconstruct_n throws cleanly
            idx.reconstruct(int(i0))
        return idx.reconstruct_n(int(i0), int(n))
    except RuntimeError as e:
        raise InputError(f"{type(idx).__name__} cannot reconstruct stored vectors: "
                         f"{str(e).strip().splitlines()[-1].split(': ', 1)[-1]}") from None
