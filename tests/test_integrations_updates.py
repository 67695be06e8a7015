"""Document updates written into an existing store (`stores.apply_updates`): a LangChain FAISS store, a Chroma
collection and LlamaIndex indexes (FAISS, FAISS map, simple) built with the fake embedding; a refiner carrying
known updates (constructed here, keyed by corpus row) is applied. Exactly the updated rows change, to the
vectors computed here from the update rule; every other vector is bit-identical; the wrapped store then
searches as `RefinedIndex` with the full refiner (updates included) over the same vectors added with
ids = rows. A second application is refused, and so are a corpus read from another store, a symmetric
refiner, updates made for another corpus, removed documents and index types that cannot be written in
place: each with the store unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DOCS, D, K, QUERIES, fake_embed, mlp_refiner_bytes
import simskip_faiss as sf
from simskip_faiss.errors import InputError, InputTypeError
from simskip_faiss.integrations import stores
from simskip_faiss.refiners import DocumentUpdates
from simskip_faiss.refiners.documents import DocumentMismatchError, sketch

pytest.importorskip("onnx")
SHUFFLE = np.random.default_rng(11).permutation(len(DOCS))[:40]  # store order differs from DOCS order
TEXTS = [DOCS[i] for i in SHUFFLE]
ROWS = np.array([1, 4, 5, 9, 20, 33, 39])  # the corpus rows with an update


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def updates_for(corpus, rows=ROWS, n_corpus=None, seed=0):
    """Updates pulling each row toward a query (so rankings change), bound to the rows' vectors."""
    x = unit(corpus.vectors[rows]) if corpus.cosine else corpus.vectors[rows]
    pull = fake_embed([QUERIES[j % len(QUERIES)] for j in range(len(rows))])
    delta = 1.5 * (pull - x) + 0.1 * np.random.default_rng(seed).standard_normal(x.shape)
    return DocumentUpdates(rows, delta.astype(np.float32), sketch(x),
                           {"n_corpus": len(corpus.ids) if n_corpus is None else n_corpus})


def moved(corpus, updates):
    """The update rule, in float64: (x + delta) * |x| / |x + delta| (cosine stores: x at unit norm)."""
    x = corpus.vectors[updates.ids].astype(np.float64)
    x = unit(x) if corpus.cosine else x
    z = x + updates.delta
    return z * (np.linalg.norm(x, axis=1) / np.linalg.norm(z, axis=1))[:, None]


def refiners(tmp_path, updates=None, apply_to="queries"):
    """(the file's refiner with `updates`, its path): the file declares none, so reopening it finds none."""
    path = tmp_path / f"{apply_to}.onnx"
    path.write_bytes(mlp_refiner_bytes(apply_to=apply_to))
    full = sf.Refiner.load(path)
    return (full if updates is None else full.with_documents(updates)), path


def check_store(before, after, corpus, updates):
    """Exactly the updated rows changed, to the expected vectors; the others are bit-identical."""
    assert after.shape == before.shape
    changed = np.flatnonzero(np.any(after != before, axis=1))
    np.testing.assert_array_equal(changed, updates.ids)
    np.testing.assert_allclose(after[updates.ids], moved(corpus, updates), atol=2e-6)
    keep = np.setdiff1d(np.arange(len(before)), updates.ids)
    np.testing.assert_array_equal(after[keep], before[keep])


def reference(full, corpus, queries=QUERIES, k=K):
    """`RefinedIndex` with the full refiner (updates by id) over the store's vectors added with ids = rows."""
    index = sf.RefinedIndex(full, "IDMap,Flat", metric=corpus.metric)
    vectors = unit(corpus.vectors) if corpus.cosine else corpus.vectors
    index.add_with_ids(vectors, np.arange(len(corpus.ids)))
    return [[corpus.ids[r] for r in index.search(fake_embed([q]), k)[1][0]] for q in queries]


def check_refused_twice(store, full, corpus, read, match="in the store already"):
    snapshot = read()
    with pytest.raises(InputError, match=match):
        stores.apply_updates(store, full, corpus)
    np.testing.assert_array_equal(read(), snapshot)


# -- LangChain ----------------------------------------------------------------------------------------------
def langchain_store(texts=TEXTS, ids=None, **kw):
    pytest.importorskip("langchain_community")
    from helpers_langchain import FakeEmbeddings
    from langchain_community.vectorstores import FAISS

    ids = ids or [f"doc-{DOCS.index(t)}" for t in texts]
    return FAISS.from_texts(texts, FakeEmbeddings(), ids=ids, **kw)


def lc_vectors(store):
    return store.index.reconstruct_n(0, store.index.ntotal)


def lc_search(store, queries=QUERIES, k=K):
    id_of = {store.docstore.search(i).page_content: i for i in store.index_to_docstore_id.values()}
    return [[id_of[d.page_content] for d in store.similarity_search(q, k=k)] for q in queries]


def test_langchain_store_gets_the_updates(tmp_path):
    from simskip_faiss.integrations import langchain as sl

    store = langchain_store()
    corpus = stores.langchain_corpus(store)
    updates = updates_for(corpus)
    full, path = refiners(tmp_path, updates)
    before, mapping, index = lc_vectors(store), dict(store.index_to_docstore_id), store.index
    plain = reference(sf.Refiner.load(path), corpus)  # without updates
    query_side = stores.apply_updates(store, full, corpus)
    assert query_side.documents is None and full.documents is updates  # a copy: the caller's keeps its updates
    assert query_side.sha256 == full.sha256 and query_side.apply_to == "queries"
    assert store.index is index and store.index_to_docstore_id == mapping  # in place, positions and ids kept
    check_store(before, lc_vectors(store), corpus, updates)
    check_refused_twice(store, full, corpus, lambda: lc_vectors(store))  # the sketches see the moved vectors
    check_refused_twice(store, full, stores.langchain_corpus(store), lambda: lc_vectors(store))  # read again
    store.embedding_function = sl.RefinedEmbeddings(store.embedding_function, query_side)
    want = reference(full, corpus)
    assert lc_search(store) == want and want != plain  # the updates change some rankings
    check_refused_twice(store, full, corpus, lambda: lc_vectors(store), "already embeds through a refiner")
    # saved and reopened: the moved vectors and the refiner's record travel; a document added later is raw
    sl.save_local(store, tmp_path / "lc")
    again = sl.load_local(type(store), tmp_path / "lc", store.embedding_function.embeddings, refiner=path,
                          allow_dangerous_deserialization=True)
    np.testing.assert_array_equal(lc_vectors(again), lc_vectors(store))
    assert lc_search(again) == want
    again.add_texts(["a document added later"], ids=["later"])
    np.testing.assert_array_equal(lc_vectors(again)[-1], fake_embed(["a document added later"])[0])


def test_langchain_refusals_leave_the_store_unchanged(tmp_path):
    store = langchain_store()
    corpus = stores.langchain_corpus(store)
    updates = updates_for(corpus)
    full, _ = refiners(tmp_path, updates)
    before = lc_vectors(store)

    def refused(match, *args):
        with pytest.raises(InputError, match=match):
            stores.apply_updates(*args)
        np.testing.assert_array_equal(lc_vectors(store), before)

    other = langchain_store([DOCS[i] for i in range(40)])  # another store: other documents, other ids
    refused("not in the store|holds another vector", store, full, stores.langchain_corpus(other))
    same_ids = langchain_store([DOCS[(i + 1) % len(DOCS)] for i in SHUFFLE], ids=corpus.ids)  # ids kept, vectors not
    refused("holds another vector than the corpus read", store, full, stores.langchain_corpus(same_ids))
    symmetric, _ = refiners(tmp_path, updates, apply_to="both")
    refused("needs the store rebuilt through the wrapper", store, symmetric, corpus)
    refused("made for a corpus of 41 documents", store, refiners(tmp_path, updates_for(corpus, n_corpus=41))[0], corpus)
    far = DocumentUpdates(np.array([3, 40]), np.ones((2, D), np.float32), np.ones((2, 9), np.float32))
    refused("name row 40, not in this corpus of 40 rows", store, refiners(tmp_path, far)[0], corpus)
    wrong = updates_for(corpus)  # bound to other vectors: the updates were made for another corpus
    wrong.sketches[2] = sketch(fake_embed(["something else"]))[0]
    with pytest.raises(DocumentMismatchError, match="another corpus"):
        stores.apply_updates(store, refiners(tmp_path, wrong)[0], corpus)
    np.testing.assert_array_equal(lc_vectors(store), before)
    with pytest.raises(InputTypeError, match="the StoreCorpus read from this store"):
        stores.apply_updates(store, full, corpus.vectors)
    with pytest.raises(InputTypeError, match="expected a LangChain FAISS store"):
        stores.apply_updates(object(), full, corpus)
    plain = sf.Refiner.load(tmp_path / "queries.onnx")
    assert stores.apply_updates(store, plain, corpus) is plain  # nothing to write
    np.testing.assert_array_equal(lc_vectors(store), before)


def test_langchain_non_flat_index_is_refused(tmp_path):
    import faiss

    store = langchain_store()
    corpus = stores.langchain_corpus(store)
    hnsw = faiss.IndexHNSWFlat(D, 8)
    hnsw.add(corpus.vectors)
    store.index = hnsw
    full, _ = refiners(tmp_path, updates_for(corpus))
    with pytest.raises(InputError, match="IndexHNSWFlat; document updates are written in place into a flat index"):
        stores.apply_updates(store, full, corpus)
    np.testing.assert_array_equal(hnsw.reconstruct_n(0, hnsw.ntotal), corpus.vectors)


def test_langchain_cosine_store(tmp_path):
    from langchain_community.vectorstores.utils import DistanceStrategy

    store = langchain_store(normalize_L2=True, distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    corpus = stores.langchain_corpus(store)
    assert corpus.cosine
    updates = updates_for(corpus)
    full, _ = refiners(tmp_path, updates)
    before = lc_vectors(store)
    from simskip_faiss.integrations import langchain as sl

    store.embedding_function = sl.RefinedEmbeddings(store.embedding_function, stores.apply_updates(store, full, corpus))
    check_store(before, lc_vectors(store), corpus, updates)
    assert lc_search(store) == reference(full, corpus)


# -- Chroma -------------------------------------------------------------------------------------------------
def chroma_collection(tmp_path, space="ip", texts=TEXTS, name="docs"):
    chromadb = pytest.importorskip("chromadb")
    from helpers_chroma import FakeEF

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    coll = client.create_collection(name, embedding_function=FakeEF(), configuration={"hnsw": {"space": space}},
                                    metadata={"owner": "tests"})
    coll.add(ids=[f"c{DOCS.index(t)}" for t in texts], documents=texts)
    return client, coll


def chroma_vectors(coll, ids):
    return np.asarray(coll.get(ids=ids, include=["embeddings"])["embeddings"], np.float32)


def test_chroma_collection_gets_the_updates(tmp_path):
    from simskip_faiss.integrations.chroma import RefinedEmbeddingFunction

    client, coll = chroma_collection(tmp_path)
    corpus = stores.chroma_corpus(coll)
    updates = updates_for(corpus)
    full, path = refiners(tmp_path, updates)
    before = chroma_vectors(coll, corpus.ids)
    query_side = stores.apply_updates(coll, full, corpus)
    assert query_side.documents is None and full.documents is updates
    check_store(before, chroma_vectors(coll, corpus.ids), corpus, updates)
    assert coll.metadata == {"owner": "tests", stores.UPDATES_KEY: updates.sha256}
    assert client.get_collection("docs").metadata[stores.UPDATES_KEY] == updates.sha256  # persisted
    read = lambda: chroma_vectors(coll, corpus.ids)  # noqa: E731
    check_refused_twice(coll, full, corpus, read, "records these document updates as applied")
    docs = stores.chroma_copy(client, coll, "docs-refined", RefinedEmbeddingFunction(coll._embedding_function, query_side))
    assert docs.metadata == {stores.UPDATES_KEY: updates.sha256}  # the record travels with the copy
    coll.modify(metadata={"owner": "tests"})  # the record lost: the sketches still refuse a second move
    check_refused_twice(coll, full, corpus, read)
    check_refused_twice(coll, full, stores.chroma_corpus(coll), read)
    want = reference(full, corpus)
    got = [docs.query(query_texts=[q], n_results=K)["ids"][0] for q in QUERIES]
    assert got == want and want != reference(sf.Refiner.load(path), corpus)
    docs.add(ids=["later"], documents=["a document added later"])  # no update: stored raw, as today
    np.testing.assert_array_equal(chroma_vectors(docs, ["later"])[0], fake_embed(["a document added later"])[0])


def test_chroma_cosine_interrupted_and_refusals(tmp_path):
    client, coll = chroma_collection(tmp_path, space="cosine")
    corpus = stores.chroma_corpus(coll)
    updates = updates_for(corpus)
    full, _ = refiners(tmp_path, updates)
    read = lambda: chroma_vectors(coll, corpus.ids)  # noqa: E731
    before = read()
    # another collection (other documents) and a removed document: refused, nothing written
    _, other = chroma_collection(tmp_path, texts=[DOCS[i] for i in range(40)], name="other")
    with pytest.raises(InputError, match="not in the store|holds another vector"):
        stores.apply_updates(coll, full, stores.chroma_corpus(other))
    coll.delete(ids=[corpus.ids[ROWS[-1]]])
    with pytest.raises(InputError, match=rf"document '{corpus.ids[ROWS[-1]]}' \(row {ROWS[-1]}; 1 of 7 updated "
                       r"documents\) is not in the store"):
        stores.apply_updates(coll, full, corpus)
    coll.add(ids=[corpus.ids[ROWS[-1]]], embeddings=[corpus.vectors[ROWS[-1]]], documents=[DOCS[0]])  # re-added
    np.testing.assert_array_equal(read(), before)
    assert stores.UPDATES_KEY not in (coll.metadata or {})
    # an application interrupted after its first row: completed, that row not moved twice
    target = moved(corpus, updates)
    coll.update(ids=[corpus.ids[ROWS[0]]], embeddings=[target[0].astype(np.float32)])
    stores.apply_updates(coll, full, stores.chroma_corpus(coll))
    check_store(before, read(), corpus, updates)
    assert coll.metadata[stores.UPDATES_KEY] == updates.sha256


# -- LlamaIndex ---------------------------------------------------------------------------------------------
def llama_index(store_kind: str, source=None):
    pytest.importorskip("llama_index.vector_stores.faiss")
    import faiss
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.faiss import FaissMapVectorStore, FaissVectorStore

    from helpers_llama import FakeEmbedding as Fake

    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo

    nodes = [TextNode(text=t, id_=f"n{DOCS.index(t)}") for t in TEXTS]
    for row, node in enumerate(nodes if source else []):  # source(row): the id of the document a node came from
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=source(row))
    kw = {}
    if store_kind == "faiss":
        kw["storage_context"] = StorageContext.from_defaults(vector_store=FaissVectorStore(faiss.IndexFlatIP(D)))
    elif store_kind == "faiss_map":
        kw["storage_context"] = StorageContext.from_defaults(
            vector_store=FaissMapVectorStore(faiss.IndexIDMap2(faiss.IndexFlatIP(D))))
    return VectorStoreIndex(nodes, embed_model=Fake(), **kw)


@pytest.mark.parametrize("store_kind", ["faiss", "faiss_map", "simple"])
def test_llama_index_gets_the_updates(store_kind, tmp_path):
    from llama_index.core import load_index_from_storage
    from simskip_faiss.integrations.llama_index import RefinedEmbedding

    index = llama_index(store_kind)
    corpus = stores.llama_index_corpus(index)
    updates = updates_for(corpus)
    full, path = refiners(tmp_path, updates)
    read = lambda: stores.llama_index_corpus(index).vectors  # noqa: E731
    before = read()
    query_side = stores.apply_updates(index, full, corpus)
    assert query_side.documents is None
    assert stores.llama_index_corpus(index).ids == corpus.ids
    check_store(before, read(), corpus, updates)
    check_refused_twice(index, full, corpus, read)
    wrapped = load_index_from_storage(index.storage_context, embed_model=RefinedEmbedding(index._embed_model, query_side))
    retriever = wrapped.as_retriever(similarity_top_k=K)
    got = [[h.node.node_id for h in retriever.retrieve(q)] for q in QUERIES]
    assert got == reference(full, corpus) and got != reference(sf.Refiner.load(path), corpus)


def test_tiny_updates_and_updates_not_loaded(tmp_path):
    from simskip_faiss.refiners import documents_path

    store = langchain_store()
    corpus = stores.langchain_corpus(store)
    tiny = updates_for(corpus)
    tiny.delta *= 1e-6  # raw and moved are within the sketch tolerance of each other: still applied once
    before = lc_vectors(store)
    stores.apply_updates(store, refiners(tmp_path, tiny)[0], corpus)
    np.testing.assert_allclose(lc_vectors(store)[ROWS], moved(corpus, tiny), atol=2e-6)
    # a refiner file declaring updates, loaded without them: refused, not applied as "none"
    updates = updates_for(corpus)
    path = tmp_path / "declared.onnx"
    meta = {"documents": {**updates.record(), "file": documents_path(path, updates.sha256).name}}
    path.write_bytes(mlp_refiner_bytes(apply_to="queries", metadata=meta))
    after = lc_vectors(store)
    with pytest.raises(InputError, match="were not loaded with it"):
        stores.apply_updates(store, sf.Refiner(path.read_bytes()), corpus)
    with pytest.raises(FileNotFoundError, match="which is missing"):
        stores.apply_updates(store, path, corpus)  # its updates file is missing: Refiner.load refuses
    np.testing.assert_array_equal(lc_vectors(store), after)
    documents_path(path, updates.sha256).write_bytes(updates.to_bytes())
    other = langchain_store()
    assert stores.apply_updates(other, path, stores.langchain_corpus(other)).documents is None  # the file's updates
    check_store(before, lc_vectors(other), corpus, updates)


def test_llama_index_ref_doc_corpus(tmp_path):
    """ids="ref_doc": two nodes per document, so the ids repeat and the store must list them in the corpus's order."""
    index = llama_index("faiss", source=lambda row: f"d{row // 2}")
    corpus = stores.llama_index_corpus(index, ids="ref_doc")
    assert corpus.ids[:4] == ["d0", "d0", "d1", "d1"]
    updates = updates_for(corpus)
    full, _ = refiners(tmp_path, updates)
    read = lambda: stores.llama_index_corpus(index).vectors  # noqa: E731
    before = read()
    stores.apply_updates(index, full, corpus)
    check_store(before, read(), corpus, updates)
    check_refused_twice(index, full, corpus, read)
    index.vector_store.client.add(np.ones((1, D), np.float32))  # a vector no node owns: the store cannot be read
    with pytest.raises(InputError, match="belong to no node"):
        stores.apply_updates(index, refiners(tmp_path, updates_for(corpus))[0], corpus)
