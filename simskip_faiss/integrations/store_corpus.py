"""Reading an existing store for training: `StoreCorpus` and one reader per framework, and (query, document
id) pairs turned into an `EmbeddingData` whose qrels are the store's rows. The public face is `stores`."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..checks import as_matrix
from ..datasets.container import DEFAULT_FRACTIONS, EmbeddingData
from ..datasets.loaders import load_user
from ..errors import InputError, InputTypeError

__all__ = ["StoreCorpus", "langchain_corpus", "chroma_corpus", "chroma_copy", "llama_index_corpus", "training_data"]

Embed = Callable[[list[str]], Any]
UPDATES_KEY = "simskip_documents_sha256"  # Chroma collection metadata: the updates last written into it


@dataclass(frozen=True)
class StoreCorpus:
    """What a store holds and how it searches: `vectors` (n, d) float32 and the document id of each row,
    `embed_queries` (texts -> (m, d) float32) embedding queries as the store's model does, `metric` the
    `TrainConfig.metric` that ranks as the store ranks ("ip" or "l2"), and `cosine`: the store compares by
    cosine (inner product between unit vectors), so `training_data` trains on the rows L2-normalised."""

    vectors: np.ndarray
    ids: list[str]
    embed_queries: Embed
    metric: str = "ip"
    cosine: bool = False

    def training_data(self, pairs, **kwargs) -> EmbeddingData:
        """`training_data(self.vectors, self.ids, pairs, self.embed_queries, normalize=self.cosine, **kwargs)`."""
        return training_data(self.vectors, self.ids, pairs, self.embed_queries, normalize=self.cosine, **kwargs)


def _float32(rows, what: str) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise InputError(f"{what}: no vectors to read (shape {x.shape})")
    return np.ascontiguousarray(x)


def _faiss_vectors(index, what: str) -> np.ndarray:
    """Every vector of a FAISS index, by position, without changing the index (an IVF index without a
    direct map is cloned and the clone given one; PQ/SQ codes come back decoded, as FAISS compares them)."""
    import faiss

    n = int(index.ntotal)
    if n == 0:
        raise InputError(f"{what}: the FAISS index is empty")
    try:
        return _float32(index.reconstruct_n(0, n), what)
    except RuntimeError:
        pass
    try:
        clone = faiss.clone_index(index)
        faiss.extract_index_ivf(clone).make_direct_map()
        return _float32(clone.reconstruct_n(0, n), what)
    except RuntimeError as e:
        raise InputError(f"{what}: this FAISS index ({type(index).__name__}) cannot give its vectors back "
                         f"({str(e).strip().splitlines()[-1]})") from None


def _faiss_metric(index) -> str:
    import faiss

    kind = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(getattr(index, "metric_type", None))
    if kind is None:
        raise InputError(f"the FAISS index compares by metric {index.metric_type}; training knows 'ip' and 'l2'")
    return kind


def _queries_as(fn: Callable[[str], Any]) -> Embed:
    def embed_queries(texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InputTypeError("embed_queries takes a list of texts, not one string")
        return np.asarray([fn(t) for t in texts], dtype=np.float32).reshape(len(texts), -1)
    return embed_queries


# -- readers -----------------------------------------------------------------------------------------
def langchain_corpus(store) -> StoreCorpus:
    """A LangChain `FAISS` store: its index's vectors by position, `index_to_docstore_id` as the ids, and
    queries through the store's `embed_query` (before the store's own `normalize_L2`, as the refiner sees them)."""
    from langchain_core.embeddings import Embeddings

    from .langchain import RefinedEmbeddings

    index, mapping = getattr(store, "index", None), getattr(store, "index_to_docstore_id", None)
    if index is None or mapping is None:
        raise InputTypeError(f"expected LangChain's FAISS vector store (with index and index_to_docstore_id), "
                             f"got {type(store).__name__}")
    emb = getattr(store, "embedding_function", None)
    if isinstance(emb, RefinedEmbeddings):
        raise InputError("this store already embeds through a refiner (RefinedEmbeddings); read the store "
                         "built with your base model")
    vectors = _faiss_vectors(index, "LangChain FAISS store")
    missing = [i for i in range(len(vectors)) if i not in mapping]
    if missing:
        raise InputError(f"LangChain FAISS store: index_to_docstore_id has no id for {len(missing)} of "
                         f"{len(vectors)} index positions (first {missing[0]})")
    query = emb.embed_query if isinstance(emb, Embeddings) else emb
    cosine = bool(getattr(store, "_normalize_L2", False))  # vectors stored unit, queries normalised on search
    return StoreCorpus(vectors, [str(mapping[i]) for i in range(len(vectors))], _queries_as(query),
                       "ip" if cosine else _faiss_metric(index), cosine)


def chroma_corpus(collection, batch: int = 10_000) -> StoreCorpus:
    """A Chroma collection: every record's stored embedding and id (`collection.get`, `batch` at a time),
    and queries through the collection's own query path (the function's `embed_query`)."""
    from .chroma import NAME

    if not hasattr(collection, "get") or not hasattr(collection, "count"):
        raise InputTypeError(f"expected a Chroma collection, got {type(collection).__name__}")
    ef = ((getattr(collection, "configuration_json", None) or {}).get("embedding_function") or {})
    if ef.get("name") == NAME:
        raise InputError(f"Chroma collection {collection.name!r} already embeds through a refiner; read the "
                         f"collection built with your base function")
    n = collection.count()
    ids: list[str] = []
    rows = []
    for offset in range(0, n, batch):
        got = collection.get(limit=batch, offset=offset, include=["embeddings"])
        ids += list(got["ids"])
        rows.append(np.asarray(got["embeddings"], dtype=np.float32))
    if not ids:
        raise InputError(f"Chroma collection {collection.name!r} is empty")
    vectors = _float32(np.concatenate(rows), f"Chroma collection {collection.name!r}")
    if len(set(ids)) != len(ids) or len(ids) != n:
        raise InputError(f"Chroma collection {collection.name!r} changed while being read ({n} records, "
                         f"{len(set(ids))} ids read)")

    def embed_queries(texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InputTypeError("embed_queries takes a list of texts, not one string")
        return np.asarray(collection._embed(input=list(texts), is_query=True), dtype=np.float32)

    space = _chroma_space(collection)
    return StoreCorpus(vectors, ids, embed_queries, "l2" if space == "l2" else "ip", space == "cosine")


def chroma_copy(client, collection, name: str, embedding_function, batch: int = 10_000):
    """A new collection `name` holding `collection`'s records (ids, stored embeddings, documents, metadatas)
    as they are, searched through `embedding_function` (a `RefinedEmbeddingFunction`), in the same space,
    with the record of document updates `apply_updates` wrote into it (metadata `simskip_documents_sha256`).

    Chroma does not let a collection change its embedding function, so wrapping an existing collection
    means copying it. Its stored vectors are raw, so the refiner must be query-only (pairs alone train
    one); a refiner that also refines documents is refused: add your documents through it instead."""
    refiner = getattr(embedding_function, "refiner", None)
    if refiner is None or getattr(refiner, "refines_documents", True):
        raise InputError("chroma_copy keeps the stored vectors as they are: it needs a RefinedEmbeddingFunction "
                         "with a query-only refiner (apply_to='queries'); with apply_to='both', add the documents "
                         "through the refined function instead")
    space = _chroma_space(collection)
    applied = (collection.metadata or {}).get(UPDATES_KEY)  # document updates written into it (apply_updates)
    new = client.create_collection(name, embedding_function=embedding_function, configuration={"hnsw": {"space": space}},
                                   metadata={UPDATES_KEY: applied} if applied else None)
    for offset in range(0, collection.count(), batch):
        got = collection.get(limit=batch, offset=offset, include=["embeddings", "documents", "metadatas"])
        new.add(ids=got["ids"], embeddings=got["embeddings"], documents=got["documents"], metadatas=got["metadatas"])
    return new


def _chroma_space(collection) -> str:
    """The collection's distance: its configuration's hnsw/spann space, else the legacy "hnsw:space"
    metadata, else Chroma's default "l2"."""
    config = getattr(collection, "configuration_json", None) or {}
    for key in ("hnsw", "spann"):
        space = (config.get(key) or {}).get("space")
        if space:
            return str(space)
    return str((getattr(collection, "metadata", None) or {}).get("hnsw:space", "l2"))


def llama_index_corpus(index, ids: str = "node") -> StoreCorpus:
    """A LlamaIndex `VectorStoreIndex` over a `FaissVectorStore` (or `FaissMapVectorStore`) or the default
    `SimpleVectorStore`: the stored vectors (embedded with each node's metadata, `MetadataMode.EMBED`),
    with ids="node" the node id of each row, ids="ref_doc" its source document's id (several rows can
    share one), and queries through the index's embed model as its retriever embeds them.

    `FaissVectorStore` knows positions only (its ids are "0", "1", ...): the index's `index_struct.nodes_dict`
    maps them to node ids. A vector without a node there (a FAISS store shared by several indexes) is refused."""
    if ids not in ("node", "ref_doc"):
        raise InputError(f"ids must be 'node' or 'ref_doc', got {ids!r}")
    store, struct = getattr(index, "vector_store", None), getattr(index, "index_struct", None)
    nodes_dict = getattr(struct, "nodes_dict", None)
    if store is None or nodes_dict is None:
        raise InputTypeError(f"expected a LlamaIndex VectorStoreIndex, got {type(index).__name__}")
    embed = getattr(index, "_embed_model", None)
    if embed is not None and embed.class_name() == "SimSkipRefinedEmbedding":
        raise InputError("this index already embeds through a refiner (RefinedEmbedding); read the index built "
                         "with your base embed model")
    kind = type(store).__name__
    if hasattr(store, "data") and hasattr(store.data, "embedding_dict"):  # SimpleVectorStore
        store_ids = list(store.data.embedding_dict)
        vectors = _float32([store.data.embedding_dict[i] for i in store_ids], f"LlamaIndex {kind}")
        metric, cosine = "ip", True  # its default query ranks by cosine similarity
    elif hasattr(store, "_faiss_index"):  # FaissVectorStore, FaissMapVectorStore
        import faiss

        client = store.client
        id_map = getattr(store, "_faiss_id_to_node_id_map", None)
        if id_map is not None and hasattr(client, "id_map"):  # IndexIDMap(2): positions -> faiss ids -> node ids
            vectors = _faiss_vectors(faiss.downcast_index(client.index), f"LlamaIndex {kind}")
            metric, cosine = _faiss_metric(client), False
            store_ids = [id_map.get(int(f)) for f in faiss.vector_to_array(client.id_map)]
        else:  # FaissVectorStore.add returns str(position) as the id
            vectors = _faiss_vectors(client, f"LlamaIndex {kind}")
            metric, cosine = _faiss_metric(client), False
            store_ids = [str(i) for i in range(len(vectors))]
    else:
        raise InputTypeError(f"LlamaIndex {kind}: reading vectors back is supported for FaissVectorStore, "
                             f"FaissMapVectorStore and SimpleVectorStore; read the store behind it directly")
    node_ids = [nodes_dict.get(i) if i is not None else None for i in store_ids]
    orphans = [p for p, i in enumerate(node_ids) if i is None]
    if orphans:
        raise InputError(f"LlamaIndex {kind}: {len(orphans)} of {len(node_ids)} stored vectors belong to no node "
                         f"of this index (first at position {orphans[0]}); was the vector store shared?")
    if ids == "ref_doc":
        nodes = index.docstore.get_nodes(node_ids)
        node_ids = [n.ref_doc_id or n.node_id for n in nodes]
    if embed is None:
        raise InputError("this index has no embed model to embed queries with")
    return StoreCorpus(vectors, [str(i) for i in node_ids],
                       _queries_as(lambda t: embed.get_agg_embedding_from_queries([t])), metric, cosine)


# -- pairs -> EmbeddingData -----------------------------------------------------------------------------
def training_data(vectors, ids: Sequence[str], pairs, embed: Embed | None = None, *, normalize: bool = False,
                  seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS, name: str = "store") -> EmbeddingData:
    """An `EmbeddingData` from a store's rows and (query, document id) pairs.

    vectors, ids: the store's rows and the document id of each (from a reader above; an id may repeat,
    e.g. LlamaIndex ref_doc ids, and a pair then marks every row with it relevant). pairs: (query text or
    query vector, document id); pairs with the same query (the same text, or the same vector) make one
    query. embed: texts -> vectors, required when a query is text (a reader's `embed_queries`). Corpus
    rows and queries get seeded splits exactly as `load_user(vectors, queries=...)` gives them (its
    "shared" protocol). normalize: L2-normalise the rows (a store that compares by cosine). Unknown ids, no
    pairs and dimensions that differ from the store's are refused."""
    x = as_matrix(np.asarray(vectors, dtype=np.float32), name="vectors")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12).astype(np.float32)
    n, d = x.shape
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"ids: {len(ids)} ids for {n} vectors")
    rows: dict[str, list[int]] = {}
    for r, i in enumerate(ids):
        rows.setdefault(i, []).append(r)
    pairs = list(pairs)
    if not pairs:
        raise InputError("pairs: none given; training from a store needs (query, document id) pairs")
    keys: dict[Any, int] = {}
    texts: list[str] = []
    given: list[np.ndarray] = []
    order: list[tuple[str, int]] = []  # (kind, index into texts / given) per query
    rels: list[set[int]] = []
    unknown = []
    for p, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"pairs[{p}]: expected (query text or vector, document id), got {pair!r:.80}")
        q, doc = pair
        if str(doc) not in rows:
            unknown.append(str(doc))
            continue
        if isinstance(q, str):
            key = ("text", q)
        else:
            v = np.asarray(q, dtype=np.float32).reshape(-1)
            if v.shape != (d,):
                raise InputError(f"pairs[{p}]: query vector of dimension {v.size}, the store's vectors have {d}")
            key = ("vector", v.tobytes())
        if key not in keys:
            keys[key] = len(order)
            if key[0] == "text":
                order.append(("text", len(texts)))
                texts.append(q)
            else:
                order.append(("vector", len(given)))
                given.append(v)
            rels.append(set())
        rels[keys[key]].update(rows[str(doc)])
    if unknown:
        raise InputError(f"pairs: {len(unknown)} document id(s) not in the store, e.g. {unknown[0]!r}")
    embedded = np.zeros((0, d), np.float32)
    if texts:
        if embed is None:
            raise InputError("pairs: queries given as text need embed (texts -> vectors), e.g. a reader's "
                             "embed_queries")
        embedded = np.asarray(embed(texts), dtype=np.float32)
        if embedded.ndim != 2 or embedded.shape[0] != len(texts):
            raise InputError(f"embed: returned shape {embedded.shape} for {len(texts)} texts")
        if embedded.shape[1] != d:
            raise InputError(f"embed: returns {embedded.shape[1]}-d query vectors, the store's vectors are {d}-d")
    queries = np.stack([embedded[j] if kind == "text" else given[j] for kind, j in order])
    data = load_user(x, queries=queries, seed=seed, fractions=fractions, name=name)
    query_text = [texts[j] for kind, j in order] if not given else None
    return replace(data, qrels=[np.array(sorted(r), np.int64) for r in rels], query_text=query_text,
                   info={**data.info, "source": "store", "protocol": "shared", "pairs": len(pairs)})
