"""Chroma: RefinedEmbeddingFunction in a PersistentClient; the config travels with the collection and is checked."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("chromadb")
from chromadb.api.types import Documents, EmbeddingFunction  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

from test_integrations import (DOCS, K, QUERIES, expected_ids, fake_embed, in_new_process,  # noqa: E402
                               refiner_files)  # noqa: F401  (a fixture)
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError  # noqa: E402

HNSW = {"space": "ip", "ef_construction": 400, "ef_search": 400}  # ef >= n: the graph search is exhaustive here


@register_embedding_function
class FakeEF(EmbeddingFunction[Documents]):
    def __init__(self, dim: int = 16):
        self.dim = dim

    def __call__(self, input):
        return list(fake_embed(input))

    @staticmethod
    def name():
        return "simskip_test_fake"

    def get_config(self):
        return {"dim": self.dim}

    @staticmethod
    def build_from_config(config):
        return FakeEF(**config)


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


def test_reopen_refuses_missing_or_different_refiner(refiner_files, tmp_path):
    import chromadb

    import simskip_faiss.integrations.chroma as sc

    refiner = tmp_path / "refiner.onnx"
    shutil.copy(refiner_files["queries"], refiner)
    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    build(client, "docs", refiner)
    client.create_collection("plain", embedding_function=FakeEF()).add(ids=["0"], documents=["x"])
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        sc.get_collection(client, "docs", sc.RefinedEmbeddingFunction(FakeEF(), refiner_files["other"]))
    with pytest.raises(MissingRefinerError, match="records no simskip refiner"):
        sc.get_collection(client, "plain")
    assert search(sc.get_collection(client, "docs")) == expected_ids(refiner)
    shutil.copy(refiner_files["other"], refiner)  # the refiner file was replaced by another one
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        sc.get_collection(client, "docs")
    with pytest.raises(Exception, match="different refiners are not comparable"):  # plain Chroma: our check runs too
        search(chromadb.PersistentClient(path=str(tmp_path / "db")).get_collection("docs"))
    refiner.unlink()
    with pytest.raises(MissingRefinerError, match="refiner file .* is missing"):
        sc.get_collection(client, "docs")


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
