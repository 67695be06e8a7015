"""Framework integrations, the framework-free parts: the record, the apply_to rule, the core import staying
framework-free, pickling. The shared helpers are in tests/helpers.py; the flows in test_integrations_<framework>.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import simskip_faiss as sf
from simskip_faiss.integrations import base
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError

from helpers import D, DOCS, ROOT, fake_embed, mlp_refiner_bytes  # noqa: E402


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
