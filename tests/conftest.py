"""Shared fixtures: small real (digits) and synthetic data, and one tiny exported refiner per session."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def clustered(n=600, d=16, n_classes=6, seed=0, spread=0.35):
    """Unit vectors around random class centres, with labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="session")
def data():
    return clustered()


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), load_digits().target.astype(np.int64)


@pytest.fixture(scope="session")
def trained(data):
    """A refiner trained for a few epochs on the clustered data (non-identity weights).

    Needs the train extra: tests using it (or `onnx_path`) skip where torch or onnx is not installed.
    """
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from simskip_faiss.training import TrainConfig, train

    x, _ = data
    cfg = TrainConfig(hidden=32, epochs=3, batch_size=128, seed=0, threads=1, progress=False, patience=5, eval_every=5)
    return train(x, cfg)


@pytest.fixture(scope="session")
def onnx_path(trained, tmp_path_factory):
    from simskip_faiss.training.export import export

    path = tmp_path_factory.mktemp("refiner") / "refiner.onnx"
    meta = export(trained.model, path, {"metric": "ip"})
    return path, meta
