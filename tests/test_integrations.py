"""Framework integrations: shared helpers (refiners, a fake embedding model, a reload in a new process) and
the framework-free parts (the record, the apply_to rule, the core import staying framework-free).

The per-framework flows live in tests/test_integrations_<framework>.py and import these helpers.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import simskip_faiss as sf
from simskip_faiss.integrations import base
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
D = 16
DOCS = [f"document number {i}" for i in range(120)]
QUERIES = [f"q: document number {i}" for i in range(0, 120, 7)]
K = 5


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
def mlp_refiner_bytes(d: int = D, hidden: int = 24, seed: int = 0, apply_to: str = "both",
                      normalize: bool = True) -> bytes:
    """refined = normalize(x + W2 gelu(W1 x + b1) + b2): the exported SimSkip graph, random weights."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {"W1": rng.standard_normal((d, hidden)) / np.sqrt(d), "b1": 0.1 * rng.standard_normal(hidden),
              "W2": 1.5 * rng.standard_normal((hidden, d)) / np.sqrt(hidden), "b2": 0.1 * rng.standard_normal(d)}
    inits = [numpy_helper.from_array(np.asarray(a, dtype=np.float32), n) for n, a in arrays.items()]
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
    helper.set_model_props(model, {"simskip": json.dumps({"d_in": d, "d_out": d, "normalize": normalize,
                                                          "apply_to": apply_to, "alpha": 1.0})})
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="session")
def refiner_files(tmp_path_factory):
    """ONNX refiner files: 'both' and 'queries' (the two modes under test) and 'other' (another seed)."""
    d = tmp_path_factory.mktemp("refiners")
    files = {"both": mlp_refiner_bytes(seed=0), "queries": mlp_refiner_bytes(seed=1, apply_to="queries"),
             "other": mlp_refiner_bytes(seed=2)}
    for name, data in files.items():
        (d / f"{name}.onnx").write_bytes(data)
    return {name: d / f"{name}.onnx" for name in files}


def expected_ids(refiner_path, docs=DOCS, queries=QUERIES, k=K) -> list[list[int]]:
    """What `RefinedIndex` (exact inner product) returns for the fake vectors, one query at a time."""
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


# -- the framework-free parts -------------------------------------------------------------------------
def test_core_import_loads_no_framework():
    """`import simskip_faiss` (and the integrations package) must not import torch or any framework."""
    code = ("import sys, simskip_faiss, simskip_faiss.integrations, numpy as np\n"
            "r = simskip_faiss.IdentityRefiner(4, normalize=True)\n"
            "i = simskip_faiss.RefinedIndex(r, 'Flat'); i.add(np.eye(4, dtype='float32')); i.search(np.eye(4, dtype='float32'), 1)\n"
            "bad = [m for m in ('torch', 'langchain_core', 'llama_index', 'chromadb', 'sentence_transformers', 'onnx')"
            " if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"


def test_apply_to_rule(refiner_files):
    both, queries = sf.Refiner.load(refiner_files["both"]), sf.Refiner.load(refiner_files["queries"])
    x = fake_embed(DOCS[:5])
    np.testing.assert_array_equal(base.refine_documents(both, x.tolist()), both.transform(x))
    np.testing.assert_array_equal(base.refine_documents(queries, x.tolist()), x)  # stored raw
    np.testing.assert_array_equal(base.refine_queries(queries, x), queries.transform(x))
    assert not np.allclose(queries.transform(x), x)
    with pytest.raises(ValueError, match="returns 8-d document embeddings, but the refiner takes 16-d"):
        base.refine_documents(both, np.ones((2, 8)))
    with pytest.raises(ValueError, match="NaN|finite"):
        base.refine_queries(both, np.full((1, D), np.nan))


def test_query_only_refiner_must_keep_dimension():
    lin = sf.LinearRefiner(np.ones((4, D), np.float32), np.zeros(D, np.float32), apply_to="queries")
    with pytest.raises(ValueError, match="query-only refiner must keep the dimension"):
        base.resolve_refiner(lin)


def test_resolve_refiner_from_path_bundle_and_index(refiner_files, tmp_path):
    index = sf.RefinedIndex(refiner_files["queries"], "Flat")
    index.add(fake_embed(DOCS[:10]))
    index.save(tmp_path / "bundle")
    sha = sf.Refiner.load(refiner_files["queries"]).sha256
    for source in (refiner_files["queries"], str(tmp_path / "bundle"), index):
        r = base.resolve_refiner(source)
        assert r.sha256 == sha and r.apply_to == "queries"
    with pytest.raises(TypeError, match="expected a refiner"):
        base.resolve_refiner(42)


def test_sidecar_round_trip_and_refusals(refiner_files, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(MissingRefinerError, match="has no refiner record"):
        base.checked_refiner(store)
    base.write_sidecar(store, sf.Refiner.load(refiner_files["both"]))
    assert base.checked_refiner(store).sha256 == sf.Refiner.load(refiner_files["both"]).sha256  # the stored copy
    assert base.checked_refiner(store, refiner_files["both"]).apply_to == "both"
    with pytest.raises(RefinerMismatchError, match="holds vectors made by onnx refiner"):
        base.checked_refiner(store, refiner_files["other"])
    with pytest.raises(RefinerMismatchError, match="apply_to=queries"):
        base.checked_refiner(store, refiner_files["queries"])
    with pytest.raises(RefinerMismatchError, match="identity"):
        base.checked_refiner(store, sf.IdentityRefiner(D, normalize=True))
    for p in store.glob("simskip_refiner-*.onnx"):
        p.unlink()
    with pytest.raises(MissingRefinerError, match="is missing and none was given"):
        base.checked_refiner(store)
    # a linear refiner travels as its own bytes (.npy arrays) and comes back equal
    lin = sf.LinearRefiner.centring(fake_embed(DOCS))
    (tmp_path / "lin").mkdir()
    base.write_sidecar(tmp_path / "lin", lin)
    back = base.checked_refiner(tmp_path / "lin")
    assert back.kind == "linear" and back.sha256 == lin.sha256
    np.testing.assert_array_equal(back.transform(fake_embed(DOCS[:5])), lin.transform(fake_embed(DOCS[:5])))
    assert base.checked_refiner(tmp_path / "lin", lin) is lin
    record = json.loads((tmp_path / "lin" / base.SIDECAR).read_text())
    del record["file"]  # a record whose refiner is not stored: the refiner must be given back
    (tmp_path / "lin" / base.SIDECAR).write_text(json.dumps(record))
    with pytest.raises(MissingRefinerError, match="not stored with it"):
        base.checked_refiner(tmp_path / "lin")
    sidecar = tmp_path / "lin" / base.SIDECAR
    record = json.loads(sidecar.read_text())
    for bad, message in (("{not json", "corrupt"), ("[1, 2]", "not a refiner record"),
                         (json.dumps({**record, "format_version": 99}), "found version 99")):
        sidecar.write_text(bad)
        with pytest.raises(RefinerMismatchError, match=message):
            base.checked_refiner(tmp_path / "lin", lin)


def test_refiners_and_wrappers_pickle_and_deep_copy_with_equal_results():
    """Refiner held an onnxruntime session and a lock (pickling raised); the LlamaIndex wrapper pickled without
    its refiner (AttributeError '_refiner' in multi-worker ingestion). Now every kind and wrapper round-trips."""
    import copy
    import pickle

    from simskip_faiss.training.nudge import make_updates

    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    onnx_ref = sf.Refiner(mlp_refiner_bytes(D))
    moved = make_updates(x, onnx_ref.transform(x), np.array([1]), onnx_ref.transform(x[[2]]), {})
    kinds = [onnx_ref, sf.Refiner(mlp_refiner_bytes(D)).with_documents(moved),
             sf.LinearRefiner.centring(x), sf.IdentityRefiner(D, normalize=True)]
    for r in kinds:
        for back in (pickle.loads(pickle.dumps(r)), copy.deepcopy(r)):
            assert back.sha256 == r.sha256 and np.array_equal(back.transform(x), r.transform(x)), r
            assert (back.documents is None) == (r.documents is None)
            if r.documents is not None:
                np.testing.assert_array_equal(back.update_documents(x, r.transform(x), np.arange(5)),
                                              r.update_documents(x, r.transform(x), np.arange(5)))
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from simskip_faiss.integrations.langchain import RefinedEmbeddings

    lc = RefinedEmbeddings(DeterministicFakeEmbedding(size=D), onnx_ref)
    assert pickle.loads(pickle.dumps(lc)).embed_query("a query") == lc.embed_query("a query")
    pytest.importorskip("llama_index.core")
    from llama_index.core.embeddings import MockEmbedding

    from simskip_faiss.integrations.llama_index import RefinedEmbedding

    li = RefinedEmbedding(MockEmbedding(embed_dim=D), onnx_ref)
    back = pickle.loads(pickle.dumps(li))
    assert back.refiner.sha256 == onnx_ref.sha256 and back.get_query_embedding("q") == li.get_query_embedding("q")


def test_a_record_swapped_in_from_another_store_or_edited_is_refused(refiner_files, tmp_path):
    """A sidecar copied from another store of the same dimension, or edited to the identity, reopened silently.
    The record now carries a digest of the store's own files and a binding of its refiner fields."""
    a, b = tmp_path / "a", tmp_path / "b"
    for store, text in ((a, b"store a"), (b, b"store b")):
        store.mkdir()
        (store / "index.faiss").write_bytes(text)
        base.write_sidecar(store, sf.Refiner.load(refiner_files["both"] if store == a else refiner_files["other"]))
    assert base.checked_refiner(a).sha256 == sf.Refiner.load(refiner_files["both"]).sha256
    for f in b.iterdir():  # b's record and refiner copy, put into a
        if f.name != "index.faiss":
            (a / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RefinerMismatchError, match="does not describe the store beside it"):
        base.checked_refiner(a)
    base.write_sidecar(a, sf.Refiner.load(refiner_files["both"]))
    record = json.loads((a / base.SIDECAR).read_text())
    (a / base.SIDECAR).write_text(json.dumps(dict(record, kind="identity", sha256=None)))
    with pytest.raises(RefinerMismatchError, match="was edited"):
        base.checked_refiner(a)
    (a / base.SIDECAR).write_text(json.dumps(record))
    (a / "index.faiss").write_bytes(b"changed without its record")
    with pytest.raises(RefinerMismatchError, match="store's files changed"):
        base.checked_refiner(a)
