"""Fingerprints of the vectors a refiner trained and validated on, so evaluation never scores them unknowingly.

A fingerprint is 8 bytes of BLAKE2b over a row's float32 bytes (16 hex digits): the same vector gives the
same fingerprint in any file and any order. A trained refiner records the fingerprints of its training
and validation queries and label rows (at most MAX_RECORDED, a seeded sample beyond, said in the record);
`evaluation.evaluate` counts the test queries that are among them and reports them.
"""
from __future__ import annotations

import hashlib

import numpy as np

MAX_RECORDED = 100_000  # fingerprints kept in a refiner's metadata (17 bytes each in its JSON)


def fingerprints(x: np.ndarray) -> list[str]:
    """One 16-hex-digit fingerprint per row of `x` (taken as float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in x]


def record(x: np.ndarray, seed: int = 0) -> dict:
    """The record of the vectors `x` a refiner saw: {"n", "fingerprints", "sampled"}."""
    n = len(x)
    rows = np.arange(n) if n <= MAX_RECORDED else np.sort(np.random.default_rng(seed).choice(n, MAX_RECORDED, replace=False))
    return {"n": int(n), "fingerprints": sorted(set(fingerprints(np.asarray(x)[rows]))), "sampled": n > MAX_RECORDED}


def seen(trained_on: dict, x: np.ndarray) -> np.ndarray:
    """Bool per row of `x`: is it among the vectors of the record `trained_on`?"""
    known = set(trained_on.get("fingerprints") or ())
    return np.array([f in known for f in fingerprints(x)], dtype=bool)
