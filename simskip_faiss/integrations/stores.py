"""Train from a store you already have: read its vectors and document ids, and turn (query, document id)
pairs into an `EmbeddingData` whose qrels are the store's rows.

    from simskip_faiss.integrations import stores

    corpus = stores.langchain_corpus(store)      # or chroma_corpus(collection), llama_index_corpus(index)
    data = corpus.training_data([("a kitten on a rug", "doc-7"), ...])  # (query text or vector, document id)
    sf.fit(data, sf.TrainConfig(metric=corpus.metric)).export("refiner.onnx")  # + its document updates
    refiner = stores.apply_updates(store, "refiner.onnx", corpus)  # moves the found documents' vectors

Each reader returns a `StoreCorpus`: the vectors the store holds (float32, read back, never re-embedded:
LlamaIndex embedded each node with its metadata, `MetadataMode.EMBED`, and those are the vectors
returned), the framework's own document id of each row (LangChain docstore ids, Chroma ids, LlamaIndex
node ids or ref_doc ids), a function embedding query texts the way the store's model embeds a query at
search time (what a refiner receives), and the metric the store ranks by. A reader only reads. Each
framework is imported inside its reader, so this module imports without them.

Pairs alone train a query-only refiner (`apply_to="queries"`): the store's vectors stay valid and only its
query embedding is wrapped. A refiner that also refines documents needs the store rebuilt through the
wrapper. Pairs also give document updates (the vectors of documents the training queries found, moved,
keyed by corpus row); the wrappers cannot apply them (they see texts, not ids), so `apply_updates` writes
them into the store the corpus was read from, in place, and returns the refiner without them to wrap it with.
A store that already embeds through a refiner is refused: read the store built with your base model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..checks import as_matrix
from ..datasets.container import DEFAULT_FRACTIONS, EmbeddingData
from ..datasets.loaders import load_user
from ..errors import InputError, InputTypeError

__all__ = ["StoreCorpus", "langchain_corpus", "chroma_corpus", "chroma_copy", "llama_index_corpus", "training_data",
           "apply_updates"]

Embed = Callable[[list[str]], Any]


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


# -- document updates -> the store's own vectors ------------------------------------------------------------
UPDATES_KEY = "simskip_documents_sha256"  # Chroma collection metadata: the updates last written into it


def apply_updates(store, refiner, corpus: StoreCorpus):
    """Write a refiner's document updates into the store `corpus` was read from; return the refiner to wrap it with.

    A refiner fitted on `corpus.training_data(pairs)` can carry document updates (documents.py) keyed by
    `corpus` row: the stored vectors of documents its training queries found, moved. A framework's wrapper
    sees texts, not ids, so it cannot apply them; this moves those documents' vectors in the store itself,
    in place, and leaves every other vector bit for bit as it was. `store`: the LangChain FAISS store, the
    Chroma collection or the LlamaIndex `VectorStoreIndex` that `corpus` was read from. `refiner`: a refiner
    object, an ONNX path (its updates file beside it) or a bundle directory.

    Returns the refiner without its updates (`with_documents(None)`, a copy: yours keeps them): wrap the
    store's query embedding with it. A refiner without updates is returned as it is. Documents added
    later have no update and are stored as today (raw: the refiner is query-only).

    Checked before the first write, else `InputError` and the store unchanged: the refiner is query-only (a
    refiner that also refines documents needs the store rebuilt through the wrapper); the updates were made
    for this corpus (its size, its rows); each updated document is still in the store under the id it had
    in `corpus` and holds the vector `corpus` read (else `corpus` was read from another store, or the store
    changed since) and the vector its update was learned for (`DocumentMismatchError`); the updates are not
    in the store already (applying twice is refused; a Chroma collection also records the updates'
    sha256 in its metadata, `simskip_documents_sha256`). An application interrupted part-way (Chroma
    writes in batches) is completed: rows already holding their update are left, the others moved.

    Where each framework writes: Chroma `collection.update(ids, embeddings)`; LangChain FAISS and LlamaIndex
    FAISS stores: the flat FAISS index's vectors at their positions (ids and positions kept; other FAISS
    index types are refused); LlamaIndex `SimpleVectorStore`: its embedding dict. In-memory stores are then
    saved as usual (`save_local`, `persist`). A store compared by cosine gets the moved vectors at unit norm
    (the space the updates were learned in); its other vectors are kept as they are.
    """
    import copy

    from .refining import resolve_refiner

    refiner = resolve_refiner(refiner)
    if refiner.refines_documents:
        raise InputError("apply_updates: this refiner refines documents too (apply_to='both'), but the store holds "
                         "raw vectors: a refiner that also refines documents needs the store rebuilt through the "
                         "wrapper (add the documents through the refined embeddings)")
    refiner.check_documents_loaded()
    updates = refiner.documents
    if updates is None or not len(updates):
        return refiner
    if not isinstance(corpus, StoreCorpus):
        raise InputTypeError(f"corpus: expected the StoreCorpus read from this store, got {type(corpus).__name__}")
    target = _target(store)
    n, d = corpus.vectors.shape
    declared = updates.meta.get("n_corpus")
    if declared is not None and int(declared) != n:
        raise InputError(f"{target.name}: the refiner's document updates were made for a corpus of {declared} "
                         f"documents; this corpus holds {n}: read it from the store the refiner was trained on")
    if updates.ids[-1] >= n:
        raise InputError(f"{target.name}: the refiner's document updates name row {int(updates.ids[-1])}, not in "
                         f"this corpus of {n} rows: they were made for another corpus")
    if updates.d != d or refiner.d_in != d:
        raise InputError(f"{target.name}: the store's vectors are {d}-d, the refiner takes {refiner.d_in}-d and its "
                         f"updates are {updates.d}-d")
    target.check_marker(updates)
    rows = updates.ids
    fresh = target.read(corpus)
    positions = _positions(corpus, fresh, rows, target.name)
    current = np.ascontiguousarray(fresh.vectors[positions])
    space = _unit(current) if corpus.cosine else current
    applied = _holds_update(space, updates) & ~_is_raw(space, updates)  # a tiny update's raw vector passes both
    read = np.all(current == corpus.vectors[rows], axis=1)
    stale = np.flatnonzero(~read & ~applied)
    if stale.size:
        r = int(rows[stale[0]])
        raise InputError(f"{target.name}: document {corpus.ids[r]!r} (row {r}) holds another vector than the corpus "
                         f"read ({stale.size} of {len(rows)} updated documents differ): the corpus was read from "
                         "another store, or this one changed since; read it again from this store")
    todo = np.flatnonzero(~applied)
    if not todo.size:
        raise InputError(f"{target.name}: the refiner's document updates ({len(rows)} documents, sha256 "
                         f"{updates.sha256[:16]}…) are in the store already; applying them twice would move the "
                         "vectors twice: wrap the store with refiner.with_documents(None)")
    if todo.size < len(rows):
        import logging

        logging.getLogger(__name__).warning("%s: %d of %d documents already hold their update (an interrupted "
                                            "application): moving the other %d", target.name,
                                            len(rows) - todo.size, len(rows), todo.size)
    moved = refiner.refine_documents(np.ascontiguousarray(space[todo]), ids=rows[todo])  # sketch-checked
    if not np.isfinite(moved).all():
        raise InputError(f"{target.name}: the moved vectors are not finite; nothing was written")
    query_side = copy.copy(refiner).with_documents(None)  # before the first write: nothing can fail after it
    target.write(fresh, positions[todo], np.ascontiguousarray(moved, dtype=np.float32))
    target.mark(updates)
    return query_side


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _is_raw(x: np.ndarray, updates) -> np.ndarray:
    """Per row: whether it is the vector its update was learned for (`DocumentUpdates.check`'s test, per row)."""
    from ..refiners.documents import SKETCH_TOLERANCE, sketch

    want = updates.sketches
    return (np.abs(sketch(x) - want) <= SKETCH_TOLERANCE * np.maximum(want[:, :1], 1e-12) + 1e-7).all(axis=1)


def _holds_update(y: np.ndarray, updates) -> np.ndarray:
    """Per row of `y` (the stored vectors of `updates.ids`, in order): whether it already is its raw vector
    moved by its update. A moved vector y = (raw + delta) r / |raw + delta| keeps the raw norm r (documents.py),
    so raw = c y - delta for some c > 0 with |raw| = r: a quadratic in c; a root whose raw matches the sketch
    means the update is in the store already."""
    from ..refiners.documents import SKETCH_TOLERANCE, sketch

    y = np.asarray(y, np.float64)
    delta = updates.delta.astype(np.float64)
    want = updates.sketches.astype(np.float64)
    r2 = want[:, 0] ** 2
    yy = np.einsum("ij,ij->i", y, y)
    yd = np.einsum("ij,ij->i", y, delta)
    dd = np.einsum("ij,ij->i", delta, delta)
    disc = yd ** 2 - yy * (dd - r2)
    out = np.zeros(len(y), bool)
    ok = (disc >= 0) & (yy > 0) & (dd > 0)
    root = np.sqrt(np.maximum(disc, 0))
    for sign in (1.0, -1.0):
        c = np.where(ok, (yd + sign * root) / np.where(yy > 0, yy, 1), 0)
        raw = c[:, None] * y - delta
        got = sketch(raw.astype(np.float32)).astype(np.float64)
        close = (np.abs(got - want) <= SKETCH_TOLERANCE * np.maximum(want[:, :1], 1e-12) + 1e-6).all(axis=1)
        out |= ok & (c > 0) & close
    return out


def _positions(corpus: StoreCorpus, fresh: StoreCorpus, rows: np.ndarray, name: str) -> np.ndarray:
    """The store position, in `fresh` (the store read now), of each of `corpus`'s `rows`: by id when ids are
    unique (documents added or removed since do not matter), else the store must list the same ids in order."""
    if len(set(corpus.ids)) == len(corpus.ids) and len(set(fresh.ids)) == len(fresh.ids):
        where = {i: p for p, i in enumerate(fresh.ids)}
        missing = [int(r) for r in rows if corpus.ids[r] not in where]
        if missing:
            raise InputError(f"{name}: document {corpus.ids[missing[0]]!r} (row {missing[0]}; {len(missing)} of "
                             f"{len(rows)} updated documents) is not in the store: it was removed since the corpus "
                             "was read, or the corpus was read from another store")
        return np.array([where[corpus.ids[r]] for r in rows], np.int64)
    if fresh.ids != corpus.ids:
        raise InputError(f"{name}: the store does not list the corpus's ids in the corpus's order ({len(fresh.ids)} "
                         f"rows now, {len(corpus.ids)} read): it changed since the corpus was read, or the corpus "
                         "was read from another store")
    return np.asarray(rows, np.int64)


class _Target:
    """Reading a store again and writing vectors back into it, by position in what `read` returns."""

    name = "store"

    def read(self, corpus: StoreCorpus) -> StoreCorpus:
        raise NotImplementedError

    def write(self, fresh: StoreCorpus, positions: np.ndarray, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def check_marker(self, updates) -> None:
        pass

    def mark(self, updates) -> None:
        pass


def _target(store) -> _Target:
    if hasattr(store, "index_to_docstore_id") and hasattr(store, "index"):
        return _LangChainTarget(store)
    if hasattr(store, "vector_store") and hasattr(store, "index_struct"):
        return _LlamaIndexTarget(store)
    if all(hasattr(store, a) for a in ("get", "count", "update", "modify")):
        return _ChromaTarget(store)
    raise InputTypeError(f"apply_updates: expected a LangChain FAISS store, a Chroma collection or a LlamaIndex "
                         f"VectorStoreIndex, got {type(store).__name__}")


def _flat_rows(index, what: str) -> np.ndarray:
    """A writable (ntotal, d) float32 view of a flat FAISS index's vectors; other index types are refused."""
    import faiss

    index = faiss.downcast_index(index)
    if type(index) not in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        raise InputError(f"{what}: its FAISS index is a {type(index).__name__}; document updates are written in place "
                         "into a flat index (IndexFlatIP, IndexFlatL2) only: rebuild the store through the wrapper "
                         "or with RefinedIndex, which apply the updates by id")
    n, d = int(index.ntotal), int(index.d)
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


def _write_flat(index, what: str, positions: np.ndarray, vectors: np.ndarray) -> None:
    import faiss

    view = _flat_rows(index, what)
    view[positions] = vectors
    flat = faiss.downcast_index(index)
    if isinstance(flat, faiss.IndexFlatL2) and flat.cached_l2norms.size():  # norms cached for search: recompute
        flat.sync_l2norms()


class _LangChainTarget(_Target):
    name = "LangChain FAISS store"

    def __init__(self, store):
        self.store = store
        _flat_rows(store.index, self.name)

    def read(self, corpus):
        return langchain_corpus(self.store)

    def write(self, fresh, positions, vectors):
        _write_flat(self.store.index, self.name, positions, vectors)


class _LlamaIndexTarget(_Target):
    def __init__(self, index):
        self.index = index
        self.vs = index.vector_store
        self.name = f"LlamaIndex {type(self.vs).__name__}"
        if hasattr(self.vs, "data") and hasattr(self.vs.data, "embedding_dict"):
            self.flat = None
        elif hasattr(self.vs, "_faiss_index"):
            client = self.vs.client
            self.flat = client.index if getattr(self.vs, "_faiss_id_to_node_id_map", None) is not None \
                and hasattr(client, "id_map") else client
            _flat_rows(self.flat, self.name)
        else:
            raise InputTypeError(f"{self.name}: writing vectors back is supported for FaissVectorStore, "
                                 "FaissMapVectorStore and SimpleVectorStore")

    def read(self, corpus):
        fresh = llama_index_corpus(self.index)
        if not set(corpus.ids) <= set(fresh.ids):  # the corpus was read with ids="ref_doc"
            by_doc = llama_index_corpus(self.index, ids="ref_doc")
            if set(corpus.ids) <= set(by_doc.ids):
                return by_doc
        return fresh

    def write(self, fresh, positions, vectors):
        if self.flat is None:
            keys = list(self.vs.data.embedding_dict)
            for p, v in zip(positions, vectors):
                self.vs.data.embedding_dict[keys[p]] = [float(a) for a in v]
        else:
            _write_flat(self.flat, self.name, positions, vectors)


class _ChromaTarget(_Target):
    def __init__(self, collection):
        self.coll = collection
        self.name = f"Chroma collection {collection.name!r}"

    def read(self, corpus):
        return chroma_corpus(self.coll)

    def check_marker(self, updates):
        if (self.coll.metadata or {}).get(UPDATES_KEY) == updates.sha256:
            raise InputError(f"{self.name}: its metadata records these document updates as applied ({UPDATES_KEY} "
                             f"{updates.sha256[:16]}…); applying them twice would move the vectors twice: wrap the "
                             "collection with refiner.with_documents(None)")

    def write(self, fresh, positions, vectors):
        ids = [fresh.ids[p] for p in positions]
        step = max(1, int(getattr(getattr(self.coll, "_client", None), "get_max_batch_size", lambda: 5000)()))
        for s in range(0, len(ids), step):
            self.coll.update(ids=ids[s:s + step], embeddings=vectors[s:s + step])

    def mark(self, updates):
        meta = {k: v for k, v in (self.coll.metadata or {}).items() if not k.startswith("hnsw:")}
        self.coll.modify(metadata={**meta, UPDATES_KEY: updates.sha256})
