"""LlamaIndex: RefinedEmbedding with FaissVectorStore, persist and reload (in a new process) with the refiner checked."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.vector_stores.faiss")

from helpers import (DOCS, K, QUERIES, expected_ids, fake_embed, in_new_process)  # noqa: E402,F401
from helpers_llama import FakeEmbedding  # noqa: E402
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError  # noqa: E402


def build(refiner):
    import faiss
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.faiss import FaissVectorStore

    from simskip_faiss.integrations.llama_index import RefinedEmbedding, stored_dim

    embed = RefinedEmbedding(FakeEmbedding(), refiner)
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(stored_dim(embed.refiner)))
    nodes = [TextNode(text=t, id_=f"n{i}", metadata={"i": i}, excluded_embed_metadata_keys=["i"])
             for i, t in enumerate(DOCS)]
    return VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed)


def search(index) -> list[list[int]]:
    retriever = index.as_retriever(similarity_top_k=K)
    return [[n.node.metadata["i"] for n in retriever.retrieve(q)] for q in QUERIES]


def reload_and_search(path: str, refiner: str | None = None) -> list[list[int]]:
    """Runs in a new process: reopen the persisted index with only the base embed model."""
    from simskip_faiss.integrations.llama_index import load_index

    return search(load_index(path, FakeEmbedding(), refiner=refiner))


def reload_all(paths: list[str]) -> list:
    return [reload_and_search(p) for p in paths]


def test_flow_matches_refined_index_and_reloads_in_new_process(refiner_files, tmp_path):
    from simskip_faiss.integrations.llama_index import persist

    wants = {}
    for mode in ("both", "queries"):
        want = expected_ids(refiner_files[mode])
        index = build(refiner_files[mode])
        assert search(index) == want
        stored = index.vector_store.client.reconstruct_n(0, 3)
        assert np.allclose(stored, fake_embed(DOCS[:3])) == (mode == "queries")  # query-only: documents raw
        persist(index, tmp_path / mode)
        wants[mode] = want
    assert wants["both"] != wants["queries"]
    got = in_new_process("test_integrations_llama_index", "reload_all", paths=[str(tmp_path / m) for m in wants])
    assert got == list(wants.values())


def test_reload_refuses_missing_or_different_refiner(refiner_files, tmp_path):
    from simskip_faiss.integrations.llama_index import load_index, persist

    index = build(refiner_files["queries"])
    persist(index, tmp_path / "p")
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        load_index(tmp_path / "p", FakeEmbedding(), refiner=refiner_files["other"])
    for p in (tmp_path / "p").glob("simskip_refiner-*.onnx"):
        p.unlink()
    with pytest.raises(MissingRefinerError, match="missing and none was given"):
        load_index(tmp_path / "p", FakeEmbedding())
    assert search(load_index(tmp_path / "p", FakeEmbedding(), refiner=refiner_files["queries"])) \
        == expected_ids(refiner_files["queries"])
    index.storage_context.persist(persist_dir=str(tmp_path / "plain"))  # persisted by LlamaIndex alone
    with pytest.raises(MissingRefinerError, match="has no refiner record"):
        load_index(tmp_path / "plain", FakeEmbedding(), refiner=refiner_files["queries"])


def test_persist_needs_refined_embedding(tmp_path):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from simskip_faiss.integrations.llama_index import persist

    index = VectorStoreIndex([TextNode(text="a")], embed_model=FakeEmbedding())
    with pytest.raises(TypeError, match="does not embed with RefinedEmbedding"):
        persist(index, tmp_path / "x")


def test_load_index_names_a_persisted_default_vector_store(refiner_files, tmp_path):
    """A persist dir whose vector store is LlamaIndex's default (JSON), not FAISS: one line saying so, not a C++ error."""
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from simskip_faiss.errors import InputError
    from simskip_faiss.integrations.llama_index import RefinedEmbedding, load_index, persist

    embed = RefinedEmbedding(FakeEmbedding(), refiner_files["queries"])
    index = VectorStoreIndex([TextNode(text=t, id_=f"n{i}") for i, t in enumerate(DOCS)], embed_model=embed)
    persist(index, tmp_path / "simple")
    with pytest.raises(InputError) as e:
        load_index(tmp_path / "simple", FakeEmbedding())
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "Error in" not in msg and ".cpp" not in msg, msg
    assert "default__simskip_vector_store" in msg and "SimpleVectorStore" in msg and "FaissVectorStore" in msg, msg
    assert "vector_store=SimpleVectorStore.from_persist_path(" in msg  # says how to load it anyway
    # and it can be loaded that way
    from llama_index.core.vector_stores import SimpleVectorStore

    again = load_index(tmp_path / "simple", FakeEmbedding(), vector_store=SimpleVectorStore.from_persist_path(
        str(tmp_path / "simple" / "default__simskip_vector_store")))
    assert len(again.as_retriever(similarity_top_k=K).retrieve(QUERIES[0])) == K


def test_load_index_documents_that_delete_ref_doc_is_not_supported():
    from simskip_faiss.integrations.llama_index import load_index

    assert "delete_ref_doc" in load_index.__doc__ and "NotImplementedError" in load_index.__doc__


def test_ingestion_with_two_workers_gives_the_vectors_of_one(refiner_files):
    """Multi-worker ingestion pickles the transformations into spawned processes; the refiner travels with them."""
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.schema import TextNode

    from simskip_faiss.integrations.llama_index import RefinedEmbedding

    embed = RefinedEmbedding(FakeEmbedding(), refiner_files["both"])

    def run(workers: int) -> np.ndarray:
        nodes = [TextNode(text=t, id_=f"n{i}") for i, t in enumerate(DOCS[:40])]
        out = IngestionPipeline(transformations=[embed], disable_cache=True).run(nodes=nodes, num_workers=workers)
        return np.array([n.embedding for n in sorted(out, key=lambda n: int(n.id_[1:]))], dtype=np.float32)

    one, two = run(1), run(2)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_allclose(one, embed.refiner.transform(fake_embed(DOCS[:40])), atol=1e-6)  # refined, not raw


def test_to_dict_records_the_refiner_and_from_dict_checks_it(refiner_files):
    """to_dict() had no trace of the refiner: an IngestionPipeline cache keyed two refiners alike (one's vectors
    served for the other), and from_dict failed with a bare TypeError."""
    from llama_index.core.ingestion.pipeline import get_transformation_hash
    from llama_index.core.schema import TextNode

    from simskip_faiss.errors import InputError
    from simskip_faiss.integrations.llama_index import RefinedEmbedding

    a, b = RefinedEmbedding(FakeEmbedding(), refiner_files["both"]), RefinedEmbedding(FakeEmbedding(), refiner_files["other"])
    nodes = [TextNode(text="a document")]
    assert get_transformation_hash(nodes, a) != get_transformation_hash(nodes, b)
    data = a.to_dict()
    assert data["refiner_record"]["sha256"] == a.refiner.sha256
    back = RefinedEmbedding.from_dict(data, base=FakeEmbedding(), refiner=refiner_files["both"])
    assert back.get_query_embedding("q") == a.get_query_embedding("q") and back.to_dict() == data
    with pytest.raises(InputError) as e:
        RefinedEmbedding.from_dict(data)
    assert len(str(e.value).splitlines()) == 1 and "refiner=" in str(e.value)
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        RefinedEmbedding.from_dict(data, base=FakeEmbedding(), refiner=refiner_files["other"])


def test_query_only_refiner_refuses_the_embeddings_cache(refiner_files):
    """LlamaIndex's embeddings_cache keys queries and texts by the text alone: with a query-only refiner a text
    embedded as a document (raw) and then asked as a query came back raw."""
    from llama_index.core.storage.kvstore import SimpleKVStore

    from simskip_faiss.errors import InputError
    from simskip_faiss.integrations.llama_index import RefinedEmbedding

    with pytest.raises(InputError, match="cannot use embeddings_cache"):
        RefinedEmbedding(FakeEmbedding(), refiner_files["queries"], embeddings_cache=SimpleKVStore())
    embed = RefinedEmbedding(FakeEmbedding(), refiner_files["queries"])
    embed.embeddings_cache = SimpleKVStore()  # set afterwards
    with pytest.raises(InputError, match="cannot use embeddings_cache"):
        embed.get_text_embedding(DOCS[0])
    both = RefinedEmbedding(FakeEmbedding(), refiner_files["both"], embeddings_cache=SimpleKVStore())
    assert both.get_query_embedding(DOCS[0]) == both.get_text_embedding(DOCS[0])  # both sides refined alike


def test_persist_over_an_earlier_release_dir_leaves_no_store_under_the_default_name(refiner_files, tmp_path):
    """Persisting again into a dir an earlier release wrote must not leave its default__vector_store.json behind
    (LlamaIndex's own loader would open those old vectors with raw queries)."""
    from simskip_faiss.integrations.base import write_sidecar
    from simskip_faiss.integrations.llama_index import VECTOR_STORE_FNAME, load_index, persist

    index = build(refiner_files["both"])
    index.storage_context.persist(persist_dir=str(tmp_path / "p"))  # the earlier layout
    write_sidecar(tmp_path / "p", index._embed_model.refiner, folder=True)
    assert (tmp_path / "p" / "default__vector_store.json").is_file()
    persist(index, tmp_path / "p")
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert "default__vector_store.json" not in names and f"default__{VECTOR_STORE_FNAME}" in names, names
    assert search(load_index(tmp_path / "p", FakeEmbedding())) == expected_ids(refiner_files["both"])
