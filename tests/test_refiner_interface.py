"""The refiner interface: every kind keeps the contract and round-trips through a RefinedIndex bundle."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import simskip_faiss as sf
from helpers import mlp_refiner_bytes
from simskip_faiss import BaseRefiner, BundleError, IdentityRefiner, LinearRefiner, RefinedIndex, Refiner
from simskip_faiss.refiners import refiner_from_bytes


def _linear(d=16, apply_to="both", normalize=True, seed=0):
    rng = np.random.default_rng(seed)
    return LinearRefiner(rng.standard_normal((d, d)).astype(np.float32), rng.standard_normal(d) * 0.1,
                         normalize=normalize, name="test", bias=rng.standard_normal(d) * 0.1, apply_to=apply_to)


@pytest.fixture(scope="module")
def query_only_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "q.onnx"
    path.write_bytes(mlp_refiner_bytes(d=16, hidden=8, seed=1, apply_to="queries"))
    return Refiner.load(path)


@pytest.fixture(params=["onnx", "onnx-queries", "identity", "identity-normalised", "identity-queries",
                        "linear", "linear-queries", "linear-l2"])
def case(request, serving_onnx, query_only_onnx):
    """(refiner, metric) for every refiner kind and its query-only variant."""
    return {"onnx": lambda: (Refiner.load(serving_onnx[0]), "ip"),
            "onnx-queries": lambda: (query_only_onnx, "ip"),
            "identity": lambda: (IdentityRefiner(16), "l2"),
            "identity-normalised": lambda: (IdentityRefiner(16, normalize=True), "ip"),
            "identity-queries": lambda: (IdentityRefiner(16, normalize=True, apply_to="queries"), "ip"),
            "linear": lambda: (_linear(), "ip"),
            "linear-queries": lambda: (_linear(apply_to="queries"), "ip"),
            "linear-l2": lambda: (_linear(normalize=False), "l2")}[request.param]()


def test_every_kind_keeps_the_contract_and_round_trips_through_a_bundle(case, data, tmp_path):
    refiner, metric = case
    x, _ = data
    assert isinstance(refiner, BaseRefiner) and refiner.kind in ("onnx", "identity", "linear")
    assert (refiner.d_in, refiner.d_out) == (16, 16) and refiner.apply_to in ("both", "queries")
    idx = RefinedIndex(refiner, "IDMap,Flat", metric)
    idx.add_with_ids(x, np.arange(len(x)) * 3 + 7)
    idx.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["refiner"]["kind"] == refiner.kind and manifest["refiner"]["apply_to"] == refiner.apply_to
    assert manifest["refiner"]["sha256"] == refiner.sha256
    assert ("refiner" in manifest["files"]) == (refiner.kind != "identity")
    if refiner.kind != "identity":  # the file says what it is: .onnx or .npy
        assert manifest["files"]["refiner"]["file"].endswith(refiner.suffix)
    back = RefinedIndex.load(tmp_path / "b")
    r2 = back.refiner
    assert type(r2) is type(refiner) and r2.info() == refiner.info() and r2.to_bytes() == refiner.to_bytes()
    q = x[:40] * 1.5 + 0.01
    np.testing.assert_array_equal(r2.transform(q), refiner.transform(q))
    for a, b in zip(idx.search(q, 5), back.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    # stored vectors: refined unless the refiner is query-only (then bit-identical raw vectors)
    stored = faiss_stored(back)
    want = x if refiner.apply_to == "queries" else refiner.transform(x)
    np.testing.assert_array_equal(stored, want)


def test_every_kind_answers_the_store_rules_every_store_calls(case, data):
    """The apply_to / stored-dimension / metric rules and the identity record are the refiner's own methods,
    and RefinedIndex, Milvus, Spark and the integrations agree with them."""
    from simskip_faiss.integrations import base as integ
    from simskip_faiss.scale.milvus import PREFIX, refiner_properties

    refiner, metric = case
    x, _ = data
    both = refiner.apply_to == "both"
    assert refiner.refines_documents is both and refiner.stored_dim == (refiner.d_out if both else refiner.d_in)
    np.testing.assert_array_equal(refiner.refine_queries(x[:5]), refiner.transform(x[:5]))
    stored = refiner.refine_documents(x[:5])
    if both:
        np.testing.assert_array_equal(stored, refiner.transform(x[:5]))
    else:
        assert np.shares_memory(stored, x)  # stored raw, not copied
    np.testing.assert_array_equal(RefinedIndex(refiner, "Flat", metric).refine_documents(x[:5]), stored)
    np.testing.assert_array_equal(integ.refine_documents(refiner, x[:5]), stored)
    assert integ.stored_dim(refiner) == refiner.stored_dim
    refiner.check_metric(metric)
    refiner.check_query_only_dim()
    rec = refiner.record()
    assert set(rec) == {"kind", "sha256", "d_in", "d_out", "normalize", "apply_to", "documents"}
    assert rec["sha256"] == (refiner.sha256 or f"identity(d=16, normalize={refiner.normalize})")
    assert rec["documents"] is None and rec["apply_to"] == refiner.apply_to
    assert integ.refiner_record(refiner) == {k: rec[k] for k in integ.RECORD_KEYS}
    props = refiner_properties(refiner, metric)
    assert props[PREFIX + "refiner_sha256"] == rec["sha256"] and props[PREFIX + "apply_to"] == rec["apply_to"]
    info = refiner.info()
    assert info["sha256"] == refiner.sha256 and "documents" not in info and info["metadata"] is refiner.metadata


def test_store_rules_refuse_what_no_store_can_hold():
    """Inner product over unnormalised refined vectors; a query-only refiner that changes the dimension (a query
    map from another model) stores its documents raw at d_out, and the stores that cannot hold it refuse it."""
    with pytest.raises(ValueError, match="inner-product collection needs a refiner that L2-normalises"):
        _linear(normalize=False).check_metric("ip", "collection")
    _linear(normalize=False).check_metric("l2")
    _linear(normalize=False, apply_to="queries").check_metric("ip")  # stored raw: nothing to renormalise
    IdentityRefiner(8).check_metric("ip")
    rng = np.random.default_rng(0)
    narrow = LinearRefiner(rng.standard_normal((4, 8)), np.zeros(8), apply_to="queries")
    assert (narrow.stored_dim, narrow.document_dim) == (4, 4)
    both = LinearRefiner(rng.standard_normal((4, 8)), np.zeros(8))
    assert (both.stored_dim, both.document_dim) == (4, 8)
    with pytest.raises(ValueError, match="query-only refiner must keep the dimension in Spark.*8→4"):
        narrow.check_query_only_dim("Spark")


def faiss_stored(idx: RefinedIndex) -> np.ndarray:
    import faiss

    inner = faiss.downcast_index(faiss.downcast_index(idx.index).index)
    return inner.reconstruct_n(0, inner.ntotal)


def test_linear_refiner_bytes_are_plain_npy_and_exact():
    lin = _linear(apply_to="queries")
    lin.metadata["fit_r2"] = 0.5
    data = lin.to_bytes()
    assert data == lin.to_bytes() and lin.sha256 == __import__("hashlib").sha256(data).hexdigest()
    back = LinearRefiner.from_bytes(data)
    for a in ("A", "mean", "bias"):
        np.testing.assert_array_equal(getattr(back, a), getattr(lin, a))
    assert back.metadata == lin.metadata and back.apply_to == "queries" and back.name == "test"
    with pytest.raises(ValueError, match="not a linear refiner"):
        LinearRefiner.from_bytes(data[:-3])
    with pytest.raises(ValueError, match="not a linear refiner"):
        LinearRefiner.from_bytes(data + b"x")
    with pytest.raises(ValueError, match="to_faiss.*query-only"):
        lin.to_faiss("Flat", "ip")


def test_refiner_from_bytes_cross_checks_the_record(serving_onnx):
    r = Refiner.load(serving_onnx[0])
    lin = _linear()
    assert refiner_from_bytes("onnx", r.to_bytes(), r.info()).sha256 == r.sha256
    assert refiner_from_bytes("identity", None, {"d_in": 8}).d_in == 8 == refiner_from_bytes("identity", None, {"d": 8}).d_out
    with pytest.raises(ValueError, match="unknown refiner kind 'pickle'"):
        refiner_from_bytes("pickle", b"")
    with pytest.raises(ValueError, match="identity refiner has no bytes"):
        refiner_from_bytes("identity", r.to_bytes(), {"d_in": 16})
    with pytest.raises(ValueError, match="sha256"):
        refiner_from_bytes("linear", lin.to_bytes(), dict(lin.info(), sha256="0" * 64))
    with pytest.raises(ValueError, match="apply_to"):
        refiner_from_bytes("onnx", r.to_bytes(), dict(r.info(), apply_to="queries"))
    with pytest.raises(ValueError, match="not a linear refiner"):
        refiner_from_bytes("linear", r.to_bytes(), {})


def test_edited_kind_in_a_bundle_is_refused(serving_onnx, data, tmp_path):
    """Editing refiner.kind to 'identity' must not silently drop the trained refiner."""
    x, _ = data
    idx = RefinedIndex(Refiner.load(serving_onnx[0]), "Flat", "ip")
    idx.add(x[:20])
    idx.save(tmp_path / "b")
    mpath = tmp_path / "b" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["refiner"]["kind"] = "identity"
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="refiner.kind. says .identity"):
        RefinedIndex.load(tmp_path / "b")


def test_public_names_and_no_import_cycle():
    assert sf.LinearRefiner is LinearRefiner and sf.BaseRefiner is BaseRefiner
    assert not hasattr(Refiner, "apply")  # the unchecked path is `apply_unchecked`, not the obvious name
    pkg = Path(sf.__file__).parent

    # the whole graph of the package's imports of its own modules, lazy ones (inside functions) included
    modules = {".".join(p.relative_to(pkg).with_suffix("").parts).removesuffix(".__init__"): p
               for p in pkg.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
        deps = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                parent = here[: len(here) - (n.level - 1)]
                for target in ([n.module] if n.module else [a.name for a in n.names]):
                    full = ".".join(p for p in [*parent, *target.split(".")] if p)
                    if full in modules and full != name:
                        deps.add(full)
        graph[name] = deps
    assert graph["refiners.registry"] and "training.loop" in graph["training.guard"]  # the walk sees imports
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d == "":  # the package itself (`from . import __version__`): its lazy names are not a cycle
                continue
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "index" not in graph["refiner"] and "refiner" not in graph["faiss_utils"]


@pytest.mark.parametrize("old, new", [("guard", "training.guard"),
                                      ("export", "training.export"), ("spark", "scale.spark"),
                                      ("milvus", "scale.milvus"), ("documents", "refiners.documents")])
def test_moved_modules_keep_their_old_path_for_one_release(old, new):
    """Old import paths name the moved module itself (one module, so patches apply) and warn once."""
    import importlib
    import sys

    if new == "training.guard":
        pytest.importorskip("torch")  # the guard trains (training.loop)
    sys.modules.pop(f"simskip_faiss.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"simskip_faiss.{old} moved to simskip_faiss.{new}"):
        moved = importlib.import_module(f"simskip_faiss.{old}")
    assert moved is importlib.import_module(f"simskip_faiss.{new}")


def test_the_refiner_module_keeps_its_names_for_one_release():
    """`simskip_faiss.refiner` became a package; its old names still import from it, with a warning."""
    import importlib
    import sys

    import simskip_faiss.refiners.onnx as onnx

    sys.modules.pop("simskip_faiss.refiner", None)
    with pytest.warns(DeprecationWarning, match="simskip_faiss.refiner moved to simskip_faiss.refiners"):
        old = importlib.import_module("simskip_faiss.refiner")
    assert old.Refiner is onnx.Refiner and old.MAX_NORM == importlib.import_module("simskip_faiss.refiners.base").MAX_NORM
