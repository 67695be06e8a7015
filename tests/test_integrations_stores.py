"""Train from a store: read a LangChain FAISS store, a Chroma collection and a LlamaIndex index back (vectors
as the framework holds them, the framework's own ids, queries embedded as the store embeds them), the store
untouched; (query, document id) pairs become an EmbeddingData with qrels as rows; the refusals."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import DOCS, QUERIES, ROOT, fake_embed
from simskip_faiss.datasets import load_user
from simskip_faiss.errors import InputError
from simskip_faiss.integrations import stores

SHUFFLE = np.random.default_rng(7).permutation(len(DOCS))[:40]  # store order differs from DOCS order
TEXTS = [DOCS[i] for i in SHUFFLE]


def expected_pairs(ids: list[str], doc_id) -> list[tuple[str, str]]:
    """Each query with the document it was made from ('q: <doc>'), as (text, that document's store id)."""
    return [(q, doc_id(q[3:])) for q in QUERIES if q[3:] in TEXTS]


def check_pairs(corpus, pairs, row_of_text):
    """qrels rows = the rows holding each pair's document (computed from the texts, not from the ids)."""
    data = stores.training_data(corpus.vectors, corpus.ids, pairs, corpus.embed_queries, seed=3)
    assert len(data.queries) == len(pairs) and data.query_text == [q for q, _ in pairs]
    assert [r.tolist() for r in data.qrels] == [[row_of_text[q[3:]]] for q, _ in pairs]
    np.testing.assert_array_equal(data.queries, fake_embed([q for q, _ in pairs]))
    same = load_user(corpus.vectors, queries=data.queries, seed=3)  # the package's own seeded splits
    np.testing.assert_array_equal(data.corpus_split, same.corpus_split)
    np.testing.assert_array_equal(data.query_split, same.query_split)
    return data


# -- LangChain --------------------------------------------------------------------------------------------
def langchain_store(**kw):
    pytest.importorskip("langchain_community")
    from helpers_langchain import FakeEmbeddings
    from langchain_community.vectorstores import FAISS

    ids = [f"doc-{i}" for i in SHUFFLE]
    return FAISS.from_texts(TEXTS, FakeEmbeddings(), ids=ids, **kw)


def test_langchain_store_read_back():
    store = langchain_store()
    before = (store.index.ntotal, dict(store.index_to_docstore_id), store.index.reconstruct_n(0, store.index.ntotal))
    corpus = stores.langchain_corpus(store)
    assert corpus.vectors.dtype == np.float32 and corpus.vectors.shape == (len(TEXTS), 16)
    np.testing.assert_array_equal(corpus.vectors, fake_embed(TEXTS))  # what from_texts stored, in its order
    assert corpus.ids == [f"doc-{i}" for i in SHUFFLE]
    assert (corpus.metric, corpus.cosine) == ("l2", False)  # LangChain's default distance
    for row in (0, 17, 39):  # each id's document in LangChain's docstore is the text of that row
        assert store.docstore.search(corpus.ids[row]).page_content == TEXTS[row]
    after = (store.index.ntotal, dict(store.index_to_docstore_id), store.index.reconstruct_n(0, store.index.ntotal))
    assert before[:2] == after[:2] and np.array_equal(before[2], after[2])
    pairs = expected_pairs(corpus.ids, lambda t: f"doc-{DOCS.index(t)}")
    check_pairs(corpus, pairs, {t: r for r, t in enumerate(TEXTS)})


def test_langchain_refuses_a_refined_store():
    pytest.importorskip("onnx")
    from helpers import mlp_refiner_bytes
    import simskip_faiss as sf
    from simskip_faiss.integrations.langchain import RefinedEmbeddings

    store = langchain_store()
    store.embedding_function = RefinedEmbeddings(store.embedding_function, sf.Refiner(mlp_refiner_bytes()))
    with pytest.raises(InputError, match="already embeds through a refiner"):
        stores.langchain_corpus(store)
    with pytest.raises(TypeError, match="expected LangChain's FAISS vector store"):
        stores.langchain_corpus(object())


def test_langchain_normalize_l2_store_and_ivf_index_are_read_without_change():
    import faiss

    store = langchain_store(normalize_L2=True)
    corpus = stores.langchain_corpus(store)
    x = fake_embed(TEXTS)
    np.testing.assert_allclose(corpus.vectors, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
    assert (corpus.metric, corpus.cosine) == ("ip", True)
    np.testing.assert_array_equal(corpus.embed_queries(QUERIES[:2]), fake_embed(QUERIES[:2]))  # raw: the refiner's input
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 2)
    ivf.train(x)
    ivf.add(x)
    store.index = ivf  # no direct map: read through a clone
    np.testing.assert_array_equal(stores.langchain_corpus(store).vectors, x)
    with pytest.raises(RuntimeError):
        ivf.reconstruct(0)  # the store's own index still has no direct map


# -- Chroma -------------------------------------------------------------------------------------------------
def chroma_collection(tmp_path, space="ip"):
    chromadb = pytest.importorskip("chromadb")
    from helpers_chroma import FakeEF

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    coll = client.create_collection("docs", embedding_function=FakeEF(), configuration={"hnsw": {"space": space}})
    coll.add(ids=[f"c{i}" for i in SHUFFLE], documents=TEXTS)
    return client, coll


def test_chroma_collection_read_back(tmp_path):
    client, coll = chroma_collection(tmp_path)
    before = coll.get(include=["embeddings", "documents"])
    corpus = stores.chroma_corpus(coll, batch=16)  # three pages
    assert corpus.vectors.dtype == np.float32 and corpus.vectors.shape == (len(TEXTS), 16)
    assert sorted(corpus.ids) == sorted(f"c{i}" for i in SHUFFLE) and len(set(corpus.ids)) == len(TEXTS)
    text_of = {f"c{i}": DOCS[i] for i in SHUFFLE}
    np.testing.assert_array_equal(corpus.vectors, fake_embed([text_of[i] for i in corpus.ids]))
    after = coll.get(include=["embeddings", "documents"])
    assert before["ids"] == after["ids"] and before["documents"] == after["documents"]
    np.testing.assert_array_equal(before["embeddings"], after["embeddings"])
    np.testing.assert_array_equal(corpus.embed_queries(QUERIES[:3]), fake_embed(QUERIES[:3]))
    assert (corpus.metric, corpus.cosine) == ("ip", False)
    pairs = expected_pairs(corpus.ids, lambda t: f"c{DOCS.index(t)}")
    check_pairs(corpus, pairs, {text_of[i]: r for r, i in enumerate(corpus.ids)})


def test_chroma_cosine_collection_trains_on_unit_rows(tmp_path):
    chromadb = pytest.importorskip("chromadb")
    client = chromadb.PersistentClient(path=str(tmp_path / "c"))
    coll = client.create_collection("cos", embedding_function=None, configuration={"hnsw": {"space": "cosine"}})
    x = 3 * fake_embed(TEXTS)  # not unit: Chroma keeps them, and compares by cosine
    coll.add(ids=[f"c{i}" for i in SHUFFLE], embeddings=x)
    corpus = stores.chroma_corpus(coll)
    assert (corpus.metric, corpus.cosine) == ("ip", True)
    np.testing.assert_allclose(corpus.vectors, x, rtol=1e-6)  # as held
    data = corpus.training_data([(x[0] / 3 + 0.1, corpus.ids[0])])
    np.testing.assert_allclose(np.linalg.norm(data.corpus, axis=1), 1, atol=1e-6)


def test_chroma_copy_keeps_records_and_refuses_a_refiner_of_documents(tmp_path):
    pytest.importorskip("onnx")
    from helpers import mlp_refiner_bytes
    from simskip_faiss.integrations.chroma import RefinedEmbeddingFunction

    client, coll = chroma_collection(tmp_path)
    coll.update(ids=[f"c{SHUFFLE[0]}"], metadatas=[{"kept": 1}])  # one record with metadata, the rest without
    for mode in ("queries", "both"):
        (tmp_path / f"{mode}.onnx").write_bytes(mlp_refiner_bytes(apply_to=mode))
    both = RefinedEmbeddingFunction(coll._embedding_function, str(tmp_path / "both.onnx"))
    with pytest.raises(InputError, match="query-only refiner"):
        stores.chroma_copy(client, coll, "copy-both", both)
    before = coll.get(include=["embeddings", "documents", "metadatas"])
    ef = RefinedEmbeddingFunction(coll._embedding_function, str(tmp_path / "queries.onnx"))
    copy = stores.chroma_copy(client, coll, "copy", ef, batch=16)
    got = copy.get(ids=before["ids"], include=["embeddings", "documents", "metadatas"])
    assert got["ids"] == before["ids"] and got["documents"] == before["documents"]
    assert got["metadatas"] == before["metadatas"] and {"kept": 1} in got["metadatas"]
    np.testing.assert_array_equal(got["embeddings"], before["embeddings"])  # stored vectors as they are
    assert copy.configuration_json["hnsw"]["space"] == "ip"  # the source's space
    hits = copy.query(query_texts=[QUERIES[0]], n_results=3)  # queries through the refined function
    assert len(hits["ids"][0]) == 3


def test_chroma_refuses_a_refined_collection(tmp_path):
    pytest.importorskip("onnx")
    from helpers import mlp_refiner_bytes
    from simskip_faiss.integrations.chroma import RefinedEmbeddingFunction

    client, coll = chroma_collection(tmp_path)
    (tmp_path / "r.onnx").write_bytes(mlp_refiner_bytes())
    refined = client.create_collection("refined", embedding_function=RefinedEmbeddingFunction(
        coll._embedding_function, str(tmp_path / "r.onnx")))
    refined.add(ids=["a"], documents=["x"])
    with pytest.raises(InputError, match="already embeds through a refiner"):
        stores.chroma_corpus(refined)


# -- LlamaIndex -----------------------------------------------------------------------------------------------
def llama_index(store_kind: str):
    pytest.importorskip("llama_index.vector_stores.faiss")
    import faiss
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.vector_stores.faiss import FaissMapVectorStore, FaissVectorStore

    from helpers_llama import FakeEmbedding as Fake

    # metadata is embedded with the text by default (MetadataMode.EMBED); one document per text
    docs = [Document(text=t, doc_id=f"d{i}", metadata={"source": f"file{i}.txt"}) for i, t in zip(SHUFFLE, TEXTS)]
    kw = {}
    if store_kind == "faiss":
        kw["storage_context"] = StorageContext.from_defaults(vector_store=FaissVectorStore(faiss.IndexFlatIP(16)))
    elif store_kind == "faiss_map":
        kw["storage_context"] = StorageContext.from_defaults(
            vector_store=FaissMapVectorStore(faiss.IndexIDMap2(faiss.IndexFlatIP(16))))
    return VectorStoreIndex.from_documents(docs, embed_model=Fake(), transformations=[SentenceSplitter()], **kw)


@pytest.mark.parametrize("store_kind", ["faiss", "faiss_map", "simple"])
def test_llama_index_read_back(store_kind):
    from llama_index.core.schema import MetadataMode

    index = llama_index(store_kind)
    snapshot = lambda: (dict(index.index_struct.nodes_dict), sorted(index.docstore.docs))  # noqa: E731
    before = snapshot()
    corpus = stores.llama_index_corpus(index)
    assert corpus.vectors.dtype == np.float32 and corpus.vectors.shape == (len(TEXTS), 16)
    nodes = index.docstore.get_nodes(corpus.ids)  # the node ids are the docstore's
    assert [n.get_content() for n in nodes] == TEXTS or sorted(n.get_content() for n in nodes) == sorted(TEXTS)
    # the stored vectors embed the metadata too: fake_embed(text + metadata), not fake_embed(text)
    embedded = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    assert all("file" in e for e in embedded)
    np.testing.assert_allclose(corpus.vectors, fake_embed(embedded), atol=1e-6)
    assert not np.allclose(corpus.vectors, fake_embed([n.get_content() for n in nodes]))
    assert snapshot() == before
    if store_kind != "simple":
        assert index.vector_store.client.ntotal == len(TEXTS)
    assert (corpus.metric, corpus.cosine) == ("ip", store_kind == "simple")  # IndexFlatIP; Simple: cosine
    # queries: the retriever's own path (no metadata on a query)
    np.testing.assert_allclose(corpus.embed_queries(QUERIES[:2]), fake_embed(QUERIES[:2]), atol=1e-6)
    by_doc = stores.llama_index_corpus(index, ids="ref_doc")
    assert by_doc.ids == [n.ref_doc_id for n in nodes]
    assert sorted(by_doc.ids) == sorted(f"d{i}" for i in SHUFFLE)
    pairs = expected_pairs(by_doc.ids, lambda t: f"d{DOCS.index(t)}")
    check_pairs(by_doc, pairs, {n.get_content(): r for r, n in enumerate(nodes)})


def test_llama_index_refusals():
    import faiss

    index = llama_index("faiss")
    index.vector_store.client.add(np.ones((1, 16), np.float32))  # a vector no node of this index owns
    with pytest.raises(InputError, match="1 of 41 stored vectors belong to no node"):
        stores.llama_index_corpus(index)
    with pytest.raises(InputError, match="ids must be 'node' or 'ref_doc'"):
        stores.llama_index_corpus(index, ids="chunk")
    assert faiss  # imported by the store


# -- pairs -> EmbeddingData, and the refusals -------------------------------------------------------------------
def test_training_data_pairs_and_refusals():
    x = fake_embed(DOCS[:10])
    ids = [f"id{i}" for i in range(10)]
    ids[9] = "id0"  # a repeated id (LlamaIndex ref_doc ids): every row with it is relevant
    q = fake_embed(["q: document number 3"])[0]
    pairs = [("q: document number 1", "id1"), (q, "id3"), ("q: document number 1", "id2"),
             (q.tolist(), "id0"), ("q: document number 5", "id5")]
    data = stores.training_data(x, ids, pairs, fake_embed, seed=1, fractions=(0.5, 0.5, 0.0))
    assert [r.tolist() for r in data.qrels] == [[1, 2], [0, 3, 9], [5]]
    np.testing.assert_array_equal(data.queries, np.stack([fake_embed(["q: document number 1"])[0], q,
                                                          fake_embed(["q: document number 5"])[0]]))
    assert data.query_text is None  # one query was a vector
    assert set(data.query_split.tolist()) <= {0, 1} and data.info["pairs"] == 5
    only_vectors = stores.training_data(x, ids, [(q, "id3")])  # no texts: no embed needed
    assert only_vectors.qrels[0].tolist() == [3]
    refusals = [
        (dict(pairs=[]), "pairs: none given"),
        (dict(pairs=[("a", "nope"), ("b", "id1"), ("c", "gone")]), r"2 document id\(s\) not in the store, e.g. 'nope'"),
        (dict(pairs=[(np.ones(8), "id1")]), "query vector of dimension 8, the store's vectors have 16"),
        (dict(pairs=[("a", "id1")], embed=lambda t: np.ones((len(t), 8))), "returns 8-d query vectors, the store's"),
        (dict(pairs=[("a", "id1")], embed=None), "queries given as text need embed"),
        (dict(pairs=[("a",)]), r"pairs\[0\]: expected \(query text or vector, document id\)"),
        (dict(ids=ids[:5]), "ids: 5 ids for 10 vectors"),
    ]
    for kw, message in refusals:
        args = {"vectors": x, "ids": ids, "pairs": pairs, "embed": fake_embed, **kw}
        with pytest.raises(InputError, match=message) as e:
            stores.training_data(**args)
        assert "\n" not in str(e.value)


def test_module_imports_without_frameworks():
    code = ("import sys, simskip_faiss.integrations.stores\n"
            "print([m for m in ('langchain_core', 'llama_index', 'chromadb', 'faiss_contrib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
