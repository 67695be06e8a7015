"""Document updates written into an existing store: `apply_updates` moves the stored vectors of the
documents a refiner's training queries found, in place (one writer per framework). The public face is `stores`."""
from __future__ import annotations

import numpy as np

from ..errors import InputError, InputTypeError
from .store_corpus import UPDATES_KEY, StoreCorpus, chroma_corpus, langchain_corpus, llama_index_corpus


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
