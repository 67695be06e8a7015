"""Section 5 of bench/speed.py: quality parity of every speed option (10-recall@10 vs the fp32 refiner, labels)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from speed_common import recall_at_10, top10
from speed_timing import set_threads


def label_precision(I: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> float:
    """precision@10 of same-label neighbours for corpus rows used as queries (the row itself dropped)."""
    hits = []
    for r, nb in zip(rows, I):
        nb = nb[nb != r][:10]
        hits.append(float((labels[nb] == labels[r]).mean()))
    return float(np.mean(hits))


def quality(refiners: dict[str, Callable], own: dict[str, str], corpus: np.ndarray, queries: np.ndarray,
            label_rows=None, labels=None) -> dict:
    """10-recall@10 of each refiner vs the default fp32 refiner and vs its own fp32 model (`own`: name ->
    reference name; a precision option's parity), queries against the whole corpus; label precision@10."""
    set_threads(2)
    tops = {k: top10(f, corpus, queries)[:, :10] for k, f in refiners.items()}
    out = {}
    for k, f in refiners.items():
        row = {"recall10_vs_fp32": recall_at_10(tops["fp32"], tops[k])}
        if k in own:
            row["recall10_vs_own_fp32"] = recall_at_10(tops[own[k]], tops[k])
        if label_rows is not None:
            row["labels_precision@10"] = label_precision(top10(f, corpus, corpus[label_rows]), label_rows, labels)
        out[k] = row
    return out
