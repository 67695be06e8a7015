"""Helpers shared by the test modules (import them from here, never from another test module).

- `clustered`: small synthetic data (unit vectors around class centres, with labels).
- `mlp_refiner_bytes`: an ONNX refiner built without torch (the exported SimSkip graph with random
  weights and the metadata `export` writes), so serving tests run where only the serving deps are installed.
- `fake_embed`, DOCS, QUERIES, K, `expected_ids`, `in_new_process`: the framework integrations' fake
  embedding model, texts and reload in a new interpreter.

The tests directory is on sys.path (pytest's rootdir-relative import of tests/conftest.py), so
`from helpers import ...` works in every test module and in `in_new_process`'s child.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
D = 16
DOCS = [f"document number {i}" for i in range(120)]
QUERIES = [f"q: document number {i}" for i in range(0, 120, 7)]
K = 5


# -- data ----------------------------------------------------------------------------------------------
def clustered(n=600, d=16, n_classes=6, seed=0, spread=0.35):
    """Unit vectors around random class centres, with labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def unit(x) -> np.ndarray:
    """Rows L2-normalised, float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def two_encoders(n=600, d_src=24, d_tgt=16, noise=0.02, seed=0):
    """Two deterministic fake encoders of the same n texts (for maps between models, training/mapping.py):
    latent topics seen through different widths; target = normalize(tanh(source @ R)) + noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d_src))
    src = unit(centres[rng.integers(0, 12, n)] + 0.6 * rng.standard_normal((n, d_src)))
    R = rng.standard_normal((d_src, d_tgt)) / np.sqrt(d_src)
    tgt = unit(unit(np.tanh(2 * src @ R)) + noise * rng.standard_normal((n, d_tgt)))
    return src, tgt


# -- a deterministic fake embedding model ------------------------------------------------------------
def fake_embed(texts) -> np.ndarray:
    """Unit vectors seeded by each text's sha256; 'q: <doc>' is near <doc>, so queries have neighbours."""
    out = np.empty((len(texts), D), dtype=np.float32)
    for row, text in enumerate(texts):
        base_text = text[3:] if text.startswith("q: ") else text
        v = np.random.default_rng(int(hashlib.sha256(base_text.encode()).hexdigest()[:15], 16)).standard_normal(D)
        if base_text != text:
            v = v / np.linalg.norm(v) + 0.8 * np.random.default_rng(len(text)).standard_normal(D) / np.sqrt(D)
        out[row] = v / np.linalg.norm(v)
    return out


# -- refiners without torch: an ONNX MLP refiner built with the onnx helper API ---------------------
def _mlp_weights(d: int, hidden: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"W1": rng.standard_normal((d, hidden)) / np.sqrt(d), "b1": 0.1 * rng.standard_normal(hidden),
              "W2": 1.5 * rng.standard_normal((hidden, d)) / np.sqrt(hidden), "b2": 0.1 * rng.standard_normal(d)}
    return {n: np.asarray(a, dtype=np.float32) for n, a in arrays.items()}


def mlp_reference(x: np.ndarray, d: int = D, hidden: int = 24, seed: int = 0, normalize: bool = True) -> np.ndarray:
    """What `mlp_refiner_bytes(d, hidden, seed, normalize=normalize)` computes, in numpy (float64, exact GELU)."""
    w = {n: a.astype(np.float64) for n, a in _mlp_weights(d, hidden, seed).items()}
    x = np.asarray(x, dtype=np.float64)
    h = x @ w["W1"] + w["b1"]
    g = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    y = x + g @ w["W2"] + w["b2"]
    if normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


def mlp_refiner_bytes(d: int = D, hidden: int = 24, seed: int = 0, apply_to: str = "both",
                      normalize: bool = True, metadata: dict | None = None) -> bytes:
    """refined = normalize(x + W2 gelu(W1 x + b1) + b2): the exported SimSkip graph, random weights, no torch.

    The file carries what `simskip_faiss.training.export.export` writes (format, version, d_in, d_out,
    normalize, alpha, apply_to, precision "fp32", parity_max_abs_err: here measured against
    `mlp_reference`, the numpy form of the graph; `metadata` merged as export merges its own), with the
    same input/output names, producer and sorted JSON, so serving code cannot tell it from an exported
    fp32 refiner except by its weights. Needs the onnx package (not torch).
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    import simskip_faiss
    from simskip_faiss.refiners import METADATA_KEY, Refiner

    inits = [numpy_helper.from_array(a, n) for n, a in _mlp_weights(d, hidden, seed).items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axes"),
              numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]), helper.make_node("Gelu", ["h"], ["g"]),
             helper.make_node("Gemm", ["g", "W2", "b2"], ["f"]),
             helper.make_node("Add", ["x", "f"], ["y" if normalize else "refined"])]
    if normalize:
        nodes += [helper.make_node("ReduceL2", ["y", "axes"], ["n"], keepdims=1),
                  helper.make_node("Clip", ["n", "eps"], ["nc"]), helper.make_node("Div", ["y", "nc"], ["refined"])]
    graph = helper.make_graph(nodes, "simskip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("refined", TensorProto.FLOAT, ["n", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.producer_name, model.producer_version = "simskip_faiss", simskip_faiss.__version__
    meta = {"format": "simskip-refiner/1", "version": simskip_faiss.__version__, "d_in": d, "d_out": d,
            "normalize": bool(normalize), "alpha": 1.0, "apply_to": apply_to}
    meta.update(metadata or {})
    meta["precision"] = "fp32"

    def stamped(m: dict) -> bytes:
        del model.metadata_props[:]
        helper.set_model_props(model, {METADATA_KEY: json.dumps(m, sort_keys=True)})
        onnx.checker.check_model(model, full_check=True)
        return model.SerializeToString()

    # parity as export measures it (random unit vectors in batches of 1, 7 and 1000), against the numpy form
    rt, rng, worst = Refiner(stamped(meta), threads=1), np.random.default_rng(0), 0.0
    for n in (1, 7, 1000):
        x = rng.standard_normal((n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        worst = max(worst, float(np.abs(rt.transform(x) - mlp_reference(x, d, hidden, seed, normalize)).max()))
    assert worst <= 1e-5, f"the torch-free refiner graph differs from its numpy form by {worst:.3g}"
    meta["parity_max_abs_err"] = worst
    return stamped(meta)


# -- the integrations' reference results and a reload in a new process --------------------------------
def expected_ids(refiner_path, docs=DOCS, queries=QUERIES, k=K) -> list[list[int]]:
    """What `RefinedIndex` (exact inner product) returns for the fake vectors, one query at a time."""
    import simskip_faiss as sf

    index = sf.RefinedIndex(sf.Refiner.load(refiner_path), "Flat", metric="ip")
    index.add(fake_embed(docs))
    return [index.search(fake_embed([q]), k)[1][0].tolist() for q in queries]


def in_new_process(module: str, function: str, **kwargs):
    """Run tests/<module>.py's `function(**kwargs)` in a fresh interpreter; its JSON result."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import importlib; "
            "m = importlib.import_module(sys.argv[2]); "
            "print('RESULT ' + json.dumps(getattr(m, sys.argv[3])(**json.loads(sys.argv[4]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS), module, function, json.dumps(kwargs, default=str)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
