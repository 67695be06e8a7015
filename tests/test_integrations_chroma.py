"""Chroma: RefinedEmbeddingFunction in a PersistentClient; the config travels with the collection and is checked."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("chromadb")
from helpers import (DOCS, K, QUERIES, expected_ids, fake_embed, in_new_process)  # noqa: E402,F401
from helpers_chroma import FakeEF  # noqa: E402
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError  # noqa: E402

HNSW = {"space": "ip", "ef_construction": 400, "ef_search": 400}  # ef >= n: the graph search is exhaustive here


def build(client, name: str, refiner):
    from simskip_faiss.integrations.chroma import RefinedEmbeddingFunction

    coll = client.create_collection(name, embedding_function=RefinedEmbeddingFunction(FakeEF(), refiner),
                                    configuration={"hnsw": HNSW})
    coll.add(ids=[str(i) for i in range(len(DOCS))], documents=DOCS)
    return coll


def search(coll) -> list[list[int]]:
    res = coll.query(query_texts=QUERIES, n_results=K)
    return [[int(i) for i in row] for row in res["ids"]]


def reload_and_search(path: str, name: str, helper: bool = True) -> list[list[int]]:
    """Runs in a new process: reopen the collection from its stored config alone."""
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    client = chromadb.PersistentClient(path=path)
    return search(sc.get_collection(client, name) if helper else client.get_collection(name))


def reload_all(cases: list[dict]) -> list:
    return [reload_and_search(**c) for c in cases]


def test_flow_matches_refined_index_and_reloads_in_new_process(refiner_files, tmp_path):
    import chromadb

    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    wants = {}
    for mode in ("both", "queries"):
        want = expected_ids(refiner_files[mode])
        coll = build(client, mode, refiner_files[mode])
        assert search(coll) == want
        stored = np.asarray(coll.get(ids=["0", "1"], include=["embeddings"])["embeddings"], dtype=np.float32)
        assert np.allclose(stored, fake_embed(DOCS[:2])) == (mode == "queries")  # query-only: documents raw
        cfg = coll.configuration_json["embedding_function"]
        assert cfg["name"] == "simskip_faiss_refined" and cfg["config"]["apply_to"] == mode
        wants[mode] = want
    assert wants["both"] != wants["queries"]
    del client
    # and plain Chroma (no helper) rebuilds the same function from the stored config
    cases = [{"path": str(tmp_path / "db"), "name": m} for m in wants]
    cases.append({"path": str(tmp_path / "db"), "name": "queries", "helper": False})
    assert in_new_process("test_integrations_chroma", "reload_all", cases=cases) == [*wants.values(), wants["queries"]]


def test_reopen_refuses_a_different_refiner_and_keeps_its_own_copy(refiner_files, tmp_path):
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    refiner = tmp_path / "refiner.onnx"
    shutil.copy(refiner_files["queries"], refiner)
    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    coll = build(client, "docs", refiner)
    folder = sc.record_folder(coll)
    assert folder == tmp_path / "db" / "simskip" / str(coll.id) and (folder / "simskip_refiner.json").is_file()
    assert len(list(folder.glob("simskip_refiner-*.onnx"))) == 1  # the refiner travels with the collection
    client.create_collection("plain", embedding_function=FakeEF()).add(ids=["0"], documents=["x"])
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        sc.get_collection(client, "docs", sc.RefinedEmbeddingFunction(FakeEF(), refiner_files["other"]))
    with pytest.raises(MissingRefinerError, match="records no simskip refiner"):
        sc.get_collection(client, "plain")
    want = expected_ids(refiner_files["queries"])
    assert search(sc.get_collection(client, "docs")) == want
    shutil.copy(refiner_files["other"], refiner)  # the user's refiner file replaced, then gone: the copy is used
    assert search(sc.get_collection(client, "docs")) == want
    refiner.unlink()
    assert search(chromadb.PersistentClient(path=str(tmp_path / "db")).get_collection("docs")) == want
    for p in folder.glob("simskip_refiner-*.onnx"):  # the collection's own copy gone too: refused
        p.unlink()
    with pytest.raises(MissingRefinerError, match="missing and none was given"):
        sc.get_collection(client, "docs")


def test_a_collection_without_a_record_gets_one_when_first_opened(refiner_files, tmp_path):
    """A collection made before the record existed: its config's refiner file is recorded and copied on open."""
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    coll = build(client, "docs", refiner_files["both"])
    shutil.rmtree(sc.record_folder(coll))
    sc._cache.clear()
    assert search(client.get_collection("docs")) == expected_ids(refiner_files["both"])
    assert (sc.record_folder(coll) / "simskip_refiner.json").is_file()


# -- the matrix: every way to open or change a persisted collection, in a new process -------------------
def _cell(run) -> dict:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = {"ids": run()}
        except Exception as e:  # noqa: BLE001  (the cell's outcome is what is tested)
            out = {"error": type(e).__name__, "message": str(e)}
    out["warned"] = any(issubclass(w.category, RuntimeWarning) and "using the recorded refiner" in str(w.message)
                        for w in caught)
    return out


def open_without_the_package(path: str, name: str) -> dict:
    """Runs in a new process that never imports simskip_faiss.integrations.chroma."""
    import sys

    import chromadb

    cell = _cell(lambda: search(chromadb.PersistentClient(path=path).get_collection(name)))
    assert "simskip_faiss.integrations.chroma" not in sys.modules
    return cell


def open_cells(path: str, name: str, refiner: str, other: str) -> dict:
    """Runs in a new process: each way to open (or change) the collection; ids searched, or the error raised."""
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    client = chromadb.PersistentClient(path=path)
    ef = sc.RefinedEmbeddingFunction

    def modify():
        client.get_collection(name).modify(configuration={"embedding_function": ef(FakeEF(), other)})
        return search(client.get_collection(name))

    cells = {
        "package get_collection": lambda: search(sc.get_collection(client, name)),
        "package get_collection, its refiner": lambda: search(sc.get_collection(client, name, ef(FakeEF(), refiner))),
        "package get_collection, other refiner": lambda: search(sc.get_collection(client, name, ef(FakeEF(), other))),
        "chroma get_collection": lambda: search(client.get_collection(name)),
        "chroma get_collection, its refiner": lambda: search(client.get_collection(name,
                                                                                 embedding_function=ef(FakeEF(), refiner))),
        "chroma get_collection, other refiner": lambda: search(client.get_collection(name,
                                                                                   embedding_function=ef(FakeEF(), other))),
        "chroma get_collection, base function": lambda: search(client.get_collection(name, embedding_function=FakeEF())),
        "modify to other refiner": modify,
        "modify to the base function": lambda: client.get_collection(name).modify(
            configuration={"embedding_function": FakeEF()}),
        "after those modifies: chroma get_collection": lambda: search(chromadb.PersistentClient(path=path)
                                                                      .get_collection(name)),
        "after those modifies: package get_collection": lambda: search(sc.get_collection(client, name)),
    }
    return {label: _cell(run) for label, run in cells.items()}


def mismatched_ids(stored_by, queried_by) -> list[list[int]]:
    """Ids of a silent mismatched search: documents stored by one refiner (None: raw), queries by another."""
    import simskip_faiss as sf

    docs = fake_embed(DOCS)
    if stored_by is not None:
        docs = sf.Refiner.load(stored_by).refine_documents(docs)
    q = fake_embed(QUERIES)
    if queried_by is not None:
        q = sf.Refiner.load(queried_by).refine_queries(q)
    index = sf.RefinedIndex(sf.IdentityRefiner(docs.shape[1]), "Flat", metric="ip")
    index.add(docs)
    return [index.search(q[i:i + 1], K)[1][0].tolist() for i in range(len(QUERIES))]


@pytest.mark.parametrize("mode", ["both", "queries"])
def test_every_way_to_open_a_moved_collection_refines_or_refuses(mode, refiner_files, tmp_path):
    """Built with a refiner file that is then gone, the persist folder moved, a collection whose Chroma
    configuration was changed to another refiner behind the package's back (what `modify` did before its
    check ran first): every cell in a new process is RefinedIndex's ids or a one-line error, never a raw or
    mismatched search."""
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    refiner = tmp_path / "mine.onnx"
    shutil.copy(refiner_files[mode], refiner)
    want = expected_ids(refiner_files[mode])
    for wrong in (mismatched_ids(refiner, None), mismatched_ids(refiner, refiner_files["other"]),
                  mismatched_ids(None, None)):
        assert wrong != want  # a silent raw or mismatched search would fail the == below
    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    build(client, "intact", refiner)
    changed = build(client, "changed", refiner)
    with pytest.raises(RefinerMismatchError, match="cannot change its refiner.*nothing was changed"):
        changed.modify(configuration={"embedding_function": sc.RefinedEmbeddingFunction(FakeEF(), refiner_files["other"])})
    assert client.get_collection("changed").configuration_json["embedding_function"]["config"]["sha256"] == \
        sc.RefinedEmbeddingFunction(FakeEF(), refiner).refiner.sha256  # Chroma stored nothing
    # Chroma's own update call, with no collection method on the stack: the configuration is changed
    changed._client._modify(id=changed.id, new_configuration={"embedding_function": sc.RefinedEmbeddingFunction(
        FakeEF(), refiner_files["other"])}, tenant=changed.tenant, database=changed.database)
    del client, changed
    refiner.unlink()
    moved = tmp_path / "elsewhere" / "db"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "db"), str(moved))

    refines = {"package get_collection", "package get_collection, its refiner", "chroma get_collection",
               "chroma get_collection, its refiner", "after those modifies: chroma get_collection",
               "after those modifies: package get_collection"}
    for name in ("intact", "changed"):
        cells = in_new_process("test_integrations_chroma", "open_cells", path=str(moved), name=name,
                               refiner=str(refiner_files[mode]), other=str(refiner_files["other"]))
        for label, got in cells.items():
            if label in refines and not (name == "changed" and label == "package get_collection"):
                assert got.get("ids") == want, (name, label, got)
            else:
                assert got.get("error") in ("RefinerMismatchError", "MissingRefinerError", "ValueError"), (name, label, got)
                assert "\n" not in got["message"], (name, label, got)
        assert cells["chroma get_collection"]["warned"] == (name == "changed")
        assert "different refiners are not comparable" in cells["chroma get_collection, other refiner"]["message"]
        assert "different refiners are not comparable" in cells["package get_collection, other refiner"]["message"]
        assert "conflict" in cells["chroma get_collection, base function"]["message"]
        assert "nothing was changed" in cells["modify to other refiner"]["message"]
        assert "the change Chroma had stored was undone" in cells["modify to the base function"]["message"]
    assert "but its vectors were made by" in cells["package get_collection"]["message"]  # "changed"
    without = in_new_process("test_integrations_chroma", "open_without_the_package", path=str(moved), name="intact")
    assert without.get("error") == "ValueError" and "simskip_faiss_refined not found" in without["message"], without


def test_needs_a_refiner_file(refiner_files):
    import simskip_faiss as sf
    from simskip_faiss.integrations.chroma import RefinedEmbeddingFunction

    with pytest.raises(TypeError, match="records its refiner by file"):
        RefinedEmbeddingFunction(FakeEF(), sf.Refiner(refiner_files["both"].read_bytes()))
    ef = RefinedEmbeddingFunction(FakeEF(), sf.IdentityRefiner(16, normalize=True))
    assert RefinedEmbeddingFunction.build_from_config(ef.get_config()).refiner.is_identity


def test_bundle_with_a_linear_refiner_is_recorded_by_directory(tmp_path):
    import chromadb

    import simskip_faiss as sf
    import simskip_faiss.integrations.chroma as sc

    lin = sf.LinearRefiner.centring(fake_embed(DOCS))
    index = sf.RefinedIndex(lin, "Flat")
    index.add(fake_embed(DOCS))
    index.save(tmp_path / "bundle")
    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    coll = client.create_collection("lin", embedding_function=sc.RefinedEmbeddingFunction(FakeEF(), tmp_path / "bundle"),
                                    configuration={"hnsw": HNSW})
    coll.add(ids=[str(i) for i in range(len(DOCS))], documents=DOCS)
    reopened = sc.get_collection(client, "lin")
    assert search(reopened) == [index.search(fake_embed([q]), K)[1][0].tolist() for q in QUERIES]


def open_kinds(path: str, names: list[str], other: str) -> dict:
    """Runs in a new process: each collection opened by Chroma alone, by the package, and with another refiner."""
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    client = chromadb.PersistentClient(path=path)
    out = {}
    for name in names:
        out[name] = {
            "chroma": _cell(lambda: search(client.get_collection(name))),
            "package": _cell(lambda: search(sc.get_collection(client, name))),
            "other": _cell(lambda: search(client.get_collection(
                name, embedding_function=sc.RefinedEmbeddingFunction(FakeEF(), other)))),
        }
    return out


def test_linear_bundle_and_identity_collections_travel_too(refiner_files, tmp_path):
    """Other refiner kinds: a linear refiner from a bundle directory (deleted afterwards) and an identity;
    the persist folder moved; in a new process each opens to RefinedIndex's ids or refuses another refiner."""
    import chromadb

    import simskip_faiss as sf
    import simskip_faiss.integrations.chroma as sc

    lin = sf.LinearRefiner.centring(fake_embed(DOCS))
    bundle = sf.RefinedIndex(lin, "Flat")
    bundle.add(fake_embed(DOCS))
    bundle.save(tmp_path / "bundle")
    ident = sf.IdentityRefiner(16, normalize=True)
    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    wants = {}
    for name, refiner, index in (("lin", tmp_path / "bundle", bundle), ("ident", ident, sf.RefinedIndex(ident, "Flat"))):
        coll = client.create_collection(name, embedding_function=sc.RefinedEmbeddingFunction(FakeEF(), refiner),
                                        configuration={"hnsw": HNSW})
        coll.add(ids=[str(i) for i in range(len(DOCS))], documents=DOCS)
        if name == "ident":
            index.add(fake_embed(DOCS))
        wants[name] = [index.search(fake_embed([q]), K)[1][0].tolist() for q in QUERIES]
        assert search(coll) == wants[name]
    assert wants["lin"] != wants["ident"]
    del client, coll
    shutil.rmtree(tmp_path / "bundle")
    shutil.move(str(tmp_path / "db"), str(tmp_path / "moved"))
    got = in_new_process("test_integrations_chroma", "open_kinds", path=str(tmp_path / "moved"),
                         names=list(wants), other=str(refiner_files["other"]))
    for name, cells in got.items():
        assert cells["chroma"]["ids"] == wants[name] and cells["package"]["ids"] == wants[name], (name, cells)
        assert cells["other"].get("error") == "RefinerMismatchError", (name, cells)
        assert "different refiners are not comparable" in cells["other"]["message"]
