"""Shared fixtures: small real (digits) and synthetic data; a torch-free refiner for serving tests and one
tiny trained, exported refiner for the tests about training and export. Shared helpers live in helpers.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import clustered, mlp_refiner_bytes  # noqa: F401  (clustered: also imported from conftest)

os.environ.setdefault("OMP_NUM_THREADS", "2")


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


@pytest.fixture(scope="session")
def serving_onnx(data, tmp_path_factory):
    """(path, metadata) of an fp32 ONNX refiner at the clustered data's dimension, built without torch.

    The exported SimSkip graph with random, non-identity weights (refined != raw) and the metadata
    export writes (`helpers.mlp_refiner_bytes`): for every test of serving (index, bundles, batching,
    the build/search/info commands) that does not need a trained refiner's training record. Needs
    onnx and onnxruntime, not torch.
    """
    from simskip_faiss import Refiner

    x, _ = data
    path = tmp_path_factory.mktemp("serving-refiner") / "refiner.onnx"
    path.write_bytes(mlp_refiner_bytes(d=x.shape[1], hidden=32, seed=0, metadata={"metric": "ip"}))
    refiner = Refiner.load(path)
    assert not np.allclose(refiner.transform(x[:50]), x[:50], atol=1e-3), "the serving refiner must move vectors"
    return path, refiner.metadata


@pytest.fixture(scope="session")
def refiner_files(tmp_path_factory):
    """ONNX refiner files: 'both' and 'queries' (the two modes under test) and 'other' (another seed)."""
    d = tmp_path_factory.mktemp("refiners")
    files = {"both": mlp_refiner_bytes(seed=0), "queries": mlp_refiner_bytes(seed=1, apply_to="queries"),
             "other": mlp_refiner_bytes(seed=2)}
    for name, data in files.items():
        (d / f"{name}.onnx").write_bytes(data)
    return {name: d / f"{name}.onnx" for name in files}
