"""LangChain: RefinedEmbeddings with the FAISS store (langchain-community) and InMemoryVectorStore.

Flow per refiner mode: build store → search → save_local → reload in a new process → search; the ids
must equal `RefinedIndex`'s on the same vectors. Reloading with a missing or different refiner raises.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_community")
from helpers import (DOCS, K, QUERIES, expected_ids, fake_embed, in_new_process)  # noqa: E402,F401
from helpers_langchain import FakeEmbeddings  # noqa: E402
from simskip_faiss import IdentityRefiner  # noqa: E402
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError  # noqa: E402


def build(kind: str, refiner):
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from langchain_core.vectorstores import InMemoryVectorStore

    from simskip_faiss.integrations.langchain import RefinedEmbeddings

    emb = RefinedEmbeddings(FakeEmbeddings(), refiner)
    metadatas = [{"i": i} for i in range(len(DOCS))]
    if kind == "faiss":
        return FAISS.from_texts(DOCS, emb, metadatas=metadatas, distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    return InMemoryVectorStore.from_texts(DOCS, emb, metadatas=metadatas)


def search(store) -> list[list[int]]:
    return [[d.metadata["i"] for d in store.similarity_search(q, k=K)] for q in QUERIES]


def reload_and_search(kind: str, path: str, refiner: str | None = None) -> list[list[int]]:
    """Runs in a new process: reopen the saved store with only the base model (and optionally a refiner)."""
    from langchain_community.vectorstores import FAISS
    from langchain_core.vectorstores import InMemoryVectorStore

    from simskip_faiss.integrations.langchain import load_local

    if kind == "faiss":
        store = load_local(FAISS, path, FakeEmbeddings(), refiner=refiner, allow_dangerous_deserialization=True)
    else:
        store = load_local(InMemoryVectorStore, path, FakeEmbeddings(), refiner=refiner)
    return search(store)


def reload_all(cases: list[dict]) -> list:
    return [reload_and_search(**c) for c in cases]


@pytest.mark.parametrize("kind", ["faiss", "memory"])
def test_flow_matches_refined_index_and_reloads_in_new_process(kind, refiner_files, tmp_path):
    from simskip_faiss.integrations.langchain import save_local

    path = tmp_path / ("store" if kind == "faiss" else "store.json")
    results = {}
    for mode in ("both", "queries"):
        want = expected_ids(refiner_files[mode])
        store = build(kind, refiner_files[mode])
        assert search(store) == want
        stored = np.asarray(store.embeddings.embed_documents(DOCS[:3]))
        raw = fake_embed(DOCS[:3])
        assert np.allclose(stored, raw) == (mode == "queries")  # query-only leaves documents raw
        mmr = store.max_marginal_relevance_search(QUERIES[0], k=3, fetch_k=10)  # reads the stored vectors back
        assert len(mmr) == 3 and mmr[0].metadata["i"] == want[0][0]
        save_local(store, path / mode if kind == "faiss" else path.with_name(f"{mode}.json"))
        results[mode] = want
    assert results["both"] != results["queries"]  # the two refiners are really different
    targets = [str(path / mode if kind == "faiss" else path.with_name(f"{mode}.json")) for mode in results]
    got = in_new_process("test_integrations_langchain", "reload_all", cases=[{"kind": kind, "path": t} for t in targets])
    assert got == list(results.values())


def test_reload_refuses_missing_or_different_refiner(refiner_files, tmp_path):
    from langchain_community.vectorstores import FAISS
    from langchain_core.vectorstores import InMemoryVectorStore

    from simskip_faiss.integrations.langchain import RefinedEmbeddings, load_local, save_local

    store = build("faiss", refiner_files["both"])
    save_local(store, tmp_path / "s")
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        load_local(FAISS, tmp_path / "s", FakeEmbeddings(), refiner=refiner_files["other"],
                   allow_dangerous_deserialization=True)
    with pytest.raises(RefinerMismatchError, match="apply_to=queries"):
        load_local(FAISS, tmp_path / "s", RefinedEmbeddings(FakeEmbeddings(), refiner_files["queries"]),
                   allow_dangerous_deserialization=True)
    for p in (tmp_path / "s").glob("simskip_refiner-*.onnx"):
        p.unlink()
    with pytest.raises(MissingRefinerError, match="missing and none was given"):
        load_local(FAISS, tmp_path / "s", FakeEmbeddings(), allow_dangerous_deserialization=True)
    # given the right refiner explicitly, it opens again
    assert search(load_local(FAISS, tmp_path / "s", FakeEmbeddings(), refiner=refiner_files["both"],
                             allow_dangerous_deserialization=True)) == expected_ids(refiner_files["both"])
    # saved by LangChain alone (no record): refused, not searched raw
    build("memory", refiner_files["queries"]).dump(str(tmp_path / "plain.json"))
    with pytest.raises(MissingRefinerError, match="has no refiner record"):
        load_local(InMemoryVectorStore, tmp_path / "plain.json", FakeEmbeddings(), refiner=refiner_files["queries"])


def test_save_needs_refined_embeddings(tmp_path):
    from langchain_core.vectorstores import InMemoryVectorStore

    from simskip_faiss.integrations.langchain import RefinedEmbeddings, save_local

    with pytest.raises(TypeError, match="does not embed with RefinedEmbeddings"):
        save_local(InMemoryVectorStore.from_texts(DOCS[:3], FakeEmbeddings()), tmp_path / "x.json")
    with pytest.raises(TypeError, match="already refined"):
        RefinedEmbeddings(RefinedEmbeddings(FakeEmbeddings(), IdentityRefiner(16)), IdentityRefiner(16))


def test_async_embeddings_follow_the_rule(refiner_files):
    import asyncio

    import simskip_faiss as sf
    from simskip_faiss.integrations.langchain import RefinedEmbeddings

    emb = RefinedEmbeddings(FakeEmbeddings(), refiner_files["queries"])
    r = sf.Refiner.load(refiner_files["queries"])
    docs = asyncio.run(emb.aembed_documents(DOCS[:4]))
    q = asyncio.run(emb.aembed_query(QUERIES[0]))
    np.testing.assert_array_equal(np.asarray(docs, np.float32), fake_embed(DOCS[:4]))
    np.testing.assert_allclose(q, r.transform(fake_embed(QUERIES[:1]))[0], rtol=0, atol=1e-6)


def test_resave_replaces_the_record_and_a_failed_save_leaves_none(refiner_files, tmp_path, monkeypatch):
    from langchain_community.vectorstores import FAISS
    from langchain_core.vectorstores import InMemoryVectorStore

    from simskip_faiss.integrations.langchain import load_local, save_local

    for kind, path in (("faiss", tmp_path / "s"), ("memory", tmp_path / "s.json")):
        cls = FAISS if kind == "faiss" else InMemoryVectorStore
        kw = {"allow_dangerous_deserialization": True} if kind == "faiss" else {}
        save_local(build(kind, refiner_files["both"]), path)
        save_local(build(kind, refiner_files["queries"]), path)  # same place, another refiner
        assert search(load_local(cls, path, FakeEmbeddings(), **kw)) == expected_ids(refiner_files["queries"])
        where = path if kind == "faiss" else tmp_path
        assert len(list(where.glob("simskip_refiner-*.onnx" if kind == "faiss" else "s.json.simskip_refiner-*.onnx"))) == 1
        with monkeypatch.context() as m:  # the framework's save fails part-way
            m.setattr(cls, "save_local" if kind == "faiss" else "dump", lambda *a, **k: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                save_local(build(kind, refiner_files["both"]), path)
        with pytest.raises(MissingRefinerError, match="has no refiner record"):
            load_local(cls, path, FakeEmbeddings(), refiner=refiner_files["queries"], **kw)


class ScaledEmbeddings(FakeEmbeddings):
    """Unnormalised base vectors: document i has norm 1 + i (queries keep norm 1)."""

    def embed_documents(self, texts):
        return (fake_embed(texts) * (1 + np.arange(len(texts)))[:, None]).tolist()


def test_store_ranking_unlike_the_refiners_metric_is_flagged(refiner_files, tmp_path):
    """FAISS.from_texts ranks by L2 by default; a query-only refiner over unnormalised documents was guarded
    for inner product, where the ranking differs: save_local and load_local say so and name the fix."""
    import warnings

    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy

    from simskip_faiss.integrations.langchain import (RankingMismatchWarning, RefinedEmbeddings, load_local,
                                                      save_local)

    def store(refiner, base=None, **kw):
        return FAISS.from_texts(DOCS, RefinedEmbeddings(base or ScaledEmbeddings(), refiner),
                                metadatas=[{"i": i} for i in range(len(DOCS))], **kw)

    with pytest.warns(RankingMismatchWarning, match="distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT") as w:
        l2 = store(refiner_files["queries"])  # warned while building, at the user's call
    assert w[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankingMismatchWarning)
        ip = store(refiner_files["queries"], distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    assert search(l2) != search(ip)  # the ranking really differs
    with pytest.warns(RankingMismatchWarning, match="distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT") as w:
        save_local(l2, tmp_path / "l2")
    assert "'ip'" in str(w[0].message) and "queries only" in str(w[0].message)
    with pytest.warns(RankingMismatchWarning):
        load_local(FAISS, tmp_path / "l2", ScaledEmbeddings(), allow_dangerous_deserialization=True)
    with pytest.warns(RankingMismatchWarning, match="normalize_L2"):  # cosine rescales the raw documents
        cos = store(refiner_files["queries"], normalize_L2=True)
    with pytest.warns(RankingMismatchWarning, match="normalize_L2"):
        save_local(cos, tmp_path / "cos")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankingMismatchWarning)
        save_local(ip, tmp_path / "ip")  # the refiner's metric
        load_local(FAISS, tmp_path / "ip", ScaledEmbeddings(), allow_dangerous_deserialization=True)
        save_local(store(refiner_files["both"]), tmp_path / "both")  # normalised on both sides: L2 ranks as IP
        save_local(store(refiner_files["queries"], base=FakeEmbeddings()), tmp_path / "unit")  # unit documents


def open_cells(path: str, refiner: str, other: str) -> dict:
    """Runs in a new process: every way to open a FAISS folder `save_local` wrote, each cell either the ids a
    search returns or the error it raised ({"error": type, "message": ...})."""
    from langchain_community.vectorstores import FAISS

    from simskip_faiss.integrations.langchain import INDEX_NAME, RefinedEmbeddings, load_local

    ok = {"allow_dangerous_deserialization": True}
    cells = {
        "package load_local, base": lambda: load_local(FAISS, path, FakeEmbeddings(), **ok),
        "package load_local, RefinedEmbeddings": lambda: load_local(FAISS, path,
                                                                    RefinedEmbeddings(FakeEmbeddings(), refiner), **ok),
        "package load_local, other refiner": lambda: load_local(FAISS, path, FakeEmbeddings(), refiner=other, **ok),
        "FAISS.load_local, base": lambda: FAISS.load_local(path, FakeEmbeddings(), **ok),
        "FAISS.load_local, base, index_name": lambda: FAISS.load_local(path, FakeEmbeddings(), index_name=INDEX_NAME,
                                                                       **ok),
        "FAISS.load_local, RefinedEmbeddings, index_name": lambda: FAISS.load_local(
            path, RefinedEmbeddings(FakeEmbeddings(), refiner), index_name=INDEX_NAME, **ok),
        "FAISS.load_local, other RefinedEmbeddings, index_name": lambda: FAISS.load_local(
            path, RefinedEmbeddings(FakeEmbeddings(), other), index_name=INDEX_NAME, **ok),
    }
    out = {}
    for name, open_store in cells.items():
        try:
            out[name] = {"ids": search(open_store())}
        except Exception as e:  # noqa: BLE001  (the cell's outcome is what is tested)
            out[name] = {"error": type(e).__name__, "message": str(e)}
    return out


def raw_ids(mode_refiner=None) -> list[list[int]]:
    """What a silent raw search returns: the store's vectors (raw base documents for a query-only refiner,
    refined for "both") searched with unrefined queries."""
    import simskip_faiss as sf

    index = sf.RefinedIndex(sf.IdentityRefiner(16), "Flat", metric="ip")
    docs = fake_embed(DOCS)
    if mode_refiner is not None:
        docs = sf.Refiner.load(mode_refiner).refine_documents(docs)
    index.add(docs)
    return [index.search(fake_embed([q]), K)[1][0].tolist() for q in QUERIES]


def test_every_way_to_open_a_saved_faiss_folder_refines_or_refuses(refiner_files, tmp_path):
    """The matrix, in a new process: package load_local, FAISS.load_local under the default name, under the
    package's index name with the raw base embeddings, with RefinedEmbeddings (the saved refiner or another).
    Each cell is the ids RefinedIndex returns or a one-line RefinerMismatchError; none is a raw search."""
    from simskip_faiss.integrations.langchain import save_local

    for mode in ("both", "queries"):
        want = expected_ids(refiner_files[mode])
        assert raw_ids(refiner_files[mode]) != want  # a silent raw search would be caught by the == below
        save_local(build("faiss", refiner_files[mode]), tmp_path / mode)
        cells = in_new_process("test_integrations_langchain", "open_cells", path=str(tmp_path / mode),
                               refiner=str(refiner_files[mode]), other=str(refiner_files["other"]))
        refines = {"package load_local, base", "package load_local, RefinedEmbeddings",
                   "FAISS.load_local, RefinedEmbeddings, index_name"}
        for name, got in cells.items():
            if name in refines:
                assert got == {"ids": want}, (mode, name, got)
            else:
                assert got.get("error") in ("RefinerMismatchError", "MissingRefinerError"), (mode, name, got)
                assert "\n" not in got["message"], (mode, name, got)
        assert "load_local(FAISS, folder" in cells["FAISS.load_local, base"]["message"]
        assert "unrefined queries" in cells["FAISS.load_local, base, index_name"]["message"]
        assert "load_local(FAISS, folder" in cells["FAISS.load_local, base, index_name"]["message"]
        assert "not comparable" in cells["FAISS.load_local, other RefinedEmbeddings, index_name"]["message"]
        assert "not comparable" in cells["package load_local, other refiner"]["message"]


def test_the_guards_do_not_change_the_store_or_block_its_other_uses(refiner_files, tmp_path):
    """The docstore is swapped only while saving; a loaded store pickles, copies and re-saves; a folder saved
    before (index.faiss / index.pkl with a record) still opens through the package."""
    import copy
    import pickle

    from langchain_community.docstore.in_memory import InMemoryDocstore
    from langchain_community.vectorstores import FAISS

    from simskip_faiss.integrations import langchain as sl
    from simskip_faiss.integrations.base import write_sidecar

    store = build("faiss", refiner_files["queries"])
    sl.save_local(store, tmp_path / "s")
    assert type(store.docstore) is InMemoryDocstore
    back = sl.load_local(FAISS, tmp_path / "s", FakeEmbeddings(), allow_dangerous_deserialization=True)
    assert search(back) == search(store)
    assert pickle.loads(pickle.dumps(back.docstore))._dict.keys() == back.docstore._dict.keys()
    copy.deepcopy(back.docstore)
    sl.save_local(back, tmp_path / "again")
    assert search(sl.load_local(FAISS, tmp_path / "again", FakeEmbeddings(),
                                allow_dangerous_deserialization=True)) == search(store)
    old = tmp_path / "old"  # a folder saved by the previous version: index.faiss / index.pkl
    store.save_local(str(old))
    write_sidecar(old, store.embeddings.refiner)
    assert search(sl.load_local(FAISS, old, FakeEmbeddings(), allow_dangerous_deserialization=True)) == search(store)


def open_memory_cells(path: str, refiner: str, other: str) -> dict:
    """Runs in a new process: the ways to open a file save_local dumped (InMemoryVectorStore)."""
    from langchain_core.vectorstores import InMemoryVectorStore

    from simskip_faiss.integrations.langchain import RefinedEmbeddings, load_local

    cells = {
        "package load_local, base": lambda: load_local(InMemoryVectorStore, path, FakeEmbeddings()),
        "package load_local, other refiner": lambda: load_local(InMemoryVectorStore, path, FakeEmbeddings(),
                                                                refiner=other),
        "InMemoryVectorStore.load, base": lambda: InMemoryVectorStore.load(path, FakeEmbeddings()),
        "InMemoryVectorStore.load, RefinedEmbeddings": lambda: InMemoryVectorStore.load(
            path, RefinedEmbeddings(FakeEmbeddings(), refiner)),
    }
    out = {}
    for name, open_store in cells.items():
        try:
            out[name] = {"ids": search(open_store())}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": type(e).__name__, "message": str(e)}
    return out


def test_every_way_to_open_a_dumped_store_refines_or_refuses(refiner_files, tmp_path):
    """InMemoryVectorStore.load(path, base) opened a dumped store and searched it raw; the file is now an
    envelope LangChain's loader refuses with what to do, and the package's load_local unwraps it."""
    from simskip_faiss.integrations.langchain import save_local

    for mode in ("both", "queries"):
        want = expected_ids(refiner_files[mode])
        assert raw_ids(refiner_files[mode]) != want
        save_local(build("memory", refiner_files[mode]), tmp_path / f"{mode}.json")
        cells = in_new_process("test_integrations_langchain", "open_memory_cells", path=str(tmp_path / f"{mode}.json"),
                               refiner=str(refiner_files[mode]), other=str(refiner_files["other"]))
        assert cells["package load_local, base"] == {"ids": want}, cells
        assert "not comparable" in cells["package load_local, other refiner"]["message"]
        for name in ("InMemoryVectorStore.load, base", "InMemoryVectorStore.load, RefinedEmbeddings"):
            got = cells[name]
            assert got.get("error") == "NotImplementedError", (mode, name, got)
            assert "\n" not in got["message"] and "load_local(InMemoryVectorStore" in got["message"], got
            assert len(got["message"]) < 600 and DOCS[5] not in got["message"], got  # not the store's content
