"""LlamaIndex: a `BaseEmbedding` that refines your embed model, and persist/load with the refiner checked.

    from simskip_faiss.integrations import llama_index as sl

    embed = sl.RefinedEmbedding(your_embed_model, "refiner.onnx")
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(
        vector_store=FaissVectorStore(faiss.IndexFlatIP(sl.stored_dim(embed.refiner)))), embed_model=embed)
    sl.persist(index, "storage/")                      # + the refiner's record and a copy of it
    index = sl.load_index("storage/", your_embed_model)

Query embeddings are always refined; text (document) embeddings only when the refiner's apply_to
is "both". `load_index` refuses a persist dir without a refiner record or with another refiner, and
names a vector store that is not FAISS (LlamaIndex's default JSON store) instead of failing in FAISS.
`persist` writes the vector store under a name of its own (VECTOR_STORE_FNAME), so LlamaIndex's own
`load_index_from_storage` fails on the dir instead of searching it with unrefined queries.
The FAISS vector store cannot delete documents (`delete_ref_doc` raises NotImplementedError).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import Field, PrivateAttr

from .refining import refine_documents, refine_queries, resolve_refiner, stored_dim
from .sidecar import check_record, checked_refiner, describe, refiner_record, saving
from ..errors import InputError, InputTypeError, faiss_reason

__all__ = ["RefinedEmbedding", "persist", "load_index", "stored_dim", "VECTOR_STORE_FNAME"]


class RefinedEmbedding(BaseEmbedding):
    """`base` (any LlamaIndex embed model) followed by a refiner, under the apply_to rule.

    refiner: a refiner, a `RefinedIndex`, an ONNX path or a bundle directory.

    `to_dict()` carries the refiner's record (`refiner_record`: sha256, kind, dimensions, apply_to), so
    an `IngestionPipeline` cache keys each refiner apart; `from_dict(data, base=..., refiner=...)` rebuilds
    the wrapper, checking the refiner against that record (the dict holds no refiner bytes). LlamaIndex's
    `embeddings_cache` keys query and text embeddings by the text alone, so with a query-only refiner
    (refined queries, raw documents) it would hand one side's vector to the other: refused.
    """

    base: BaseEmbedding = Field(description="the embedding model whose vectors are refined")
    refiner_record: dict = Field(default_factory=dict, description="the refiner's record (sha256, kind, dims, apply_to)")
    _refiner: Any = PrivateAttr()

    def __init__(self, base: BaseEmbedding, refiner, threads: int | None = 1, **kwargs: Any):
        if isinstance(base, RefinedEmbedding):
            raise InputTypeError("the embed model is already refined; wrap the base model, not a RefinedEmbedding")
        refiner = resolve_refiner(refiner, threads)
        kwargs.setdefault("model_name", f"simskip({base.model_name})")
        kwargs.setdefault("embed_batch_size", base.embed_batch_size)
        kwargs["refiner_record"] = refiner_record(refiner)
        super().__init__(base=base, **kwargs)
        self._refiner = refiner
        self._check_cache()

    def _check_cache(self) -> None:
        if self.embeddings_cache is not None and not self._refiner.refines_documents:
            raise InputError("RefinedEmbedding with a query-only refiner cannot use embeddings_cache: LlamaIndex keys "
                             "query and text embeddings by the text alone, so a refined query vector would be reused "
                             "as a raw document vector (and back); set embeddings_cache=None")

    @classmethod
    def from_dict(cls, data: dict, **kwargs: Any) -> "RefinedEmbedding":
        """Rebuild from `to_dict()`: pass `base=` (the embed model) and `refiner=` (checked against the record)."""
        data = {**data, **kwargs}
        data.pop("class_name", None)
        record = data.pop("refiner_record", None)
        base, refiner = data.pop("base", None), data.pop("refiner", None)
        if refiner is None or not isinstance(base, BaseEmbedding):
            raise InputError(f"RefinedEmbedding.from_dict: the dict records the refiner "
                             f"({describe(record or {})}) but holds neither it nor a live base model; "
                             f"call from_dict(data, base=<embed model>, refiner=<that refiner>)")
        embed = cls(base, refiner, **data)
        if record:
            check_record(record, embed.refiner, "RefinedEmbedding.from_dict's data")
        return embed

    @classmethod
    def class_name(cls) -> str:
        return "SimSkipRefinedEmbedding"

    @property
    def refiner(self):
        return self._refiner

    def __getstate__(self) -> dict:
        """LlamaIndex's components drop private attributes when pickled; the refiner travels explicitly
        (as bytes: `Refiner.__getstate__`), so multi-worker ingestion refines in every worker."""
        state = super().__getstate__()
        state["simskip_refiner"] = self._refiner
        return state

    def __setstate__(self, state: dict) -> None:
        refiner = state.pop("simskip_refiner", None)
        super().__setstate__(state)
        self._refiner = refiner

    def _get_query_embedding(self, query: str) -> list[float]:
        self._check_cache()
        return refine_queries(self._refiner, [self.base.get_query_embedding(query)])[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        self._check_cache()
        return refine_queries(self._refiner, [await self.base.aget_query_embedding(query)])[0].tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        self._check_cache()
        raw = self.base.get_text_embedding_batch(texts)
        return refine_documents(self._refiner, raw).tolist()

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        self._check_cache()
        raw = await self.base.aget_text_embedding_batch(texts)
        return refine_documents(self._refiner, raw).tolist()

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aget_text_embeddings([text]))[0]


# The vector store is persisted under this file name, not LlamaIndex's default "vector_store.json": its own
# `load_index_from_storage(StorageContext.from_defaults(persist_dir=..., vector_store=FaissVectorStore.from_persist_dir(
# ...)))` then finds no default__vector_store.json and fails (and without vector_store=, finds no default store: KeyError
# 'default'), instead of opening the store to search with unrefined queries. `load_index` reads this name, and the
# old one (stores persisted by earlier releases), with the refiner record checked either way.
VECTOR_STORE_FNAME = "simskip_vector_store"


def _store_name(fname: str) -> str:
    from llama_index.core.vector_stores.simple import DEFAULT_VECTOR_STORE, NAMESPACE_SEP

    return f"{DEFAULT_VECTOR_STORE}{NAMESPACE_SEP}{fname}"


def persist(index, persist_dir: str | os.PathLike) -> None:
    """`index.storage_context.persist(persist_dir)` plus the refiner's record (and a copy of an ONNX refiner).

    The vector store goes to default__simskip_vector_store (VECTOR_STORE_FNAME), so LlamaIndex's own loader
    cannot open the dir into a search with raw queries; reopen it with `load_index`."""
    from llama_index.core.vector_stores.simple import NAMESPACE_SEP
    from llama_index.core.vector_stores.types import DEFAULT_PERSIST_FNAME

    embed = getattr(index, "_embed_model", None)
    if not isinstance(embed, RefinedEmbedding):
        raise InputTypeError(f"this index does not embed with RefinedEmbedding (it uses {type(embed).__name__}); "
                        f"nothing to record")
    with saving(persist_dir, embed.refiner, folder=True):
        for name in index.storage_context.vector_stores:  # an earlier persist's files under the default name
            Path(persist_dir, f"{name}{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}").unlink(missing_ok=True)
        index.storage_context.persist(persist_dir=str(persist_dir), vector_store_fname=VECTOR_STORE_FNAME)


def _faiss_store(FaissVectorStore, persist_dir):
    """The `FaissVectorStore` persisted in the dir (under VECTOR_STORE_FNAME, or LlamaIndex's default name for
    dirs persisted by earlier releases), with a store file that is not a FAISS index named in one line."""
    from llama_index.core.vector_stores.types import DEFAULT_PERSIST_FNAME

    paths = [os.path.join(str(persist_dir), _store_name(f)) for f in (VECTOR_STORE_FNAME, DEFAULT_PERSIST_FNAME)]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise InputError(f"{persist_dir}: no vector store file ({' or '.join(map(os.path.basename, paths))}); "
                         f"load_index expects a FaissVectorStore persisted there by persist (or pass vector_store=...)")
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        raise InputError(f"{persist_dir}: {name} is LlamaIndex's default JSON vector store (SimpleVectorStore), "
                         f"not a FAISS index; load_index reads a FaissVectorStore by default: pass "
                         f"vector_store=SimpleVectorStore.from_persist_path({path!r}) to load this one, or rebuild "
                         f"the index with a FaissVectorStore")
    try:
        return FaissVectorStore.from_persist_path(path)
    except RuntimeError as e:  # FAISS's C++ reader: keep its sentence, not its signature
        why = faiss_reason(e, last=False)
        raise InputError(f"{persist_dir}: {name} is not a FAISS index ({why}); load_index expects a "
                         f"FaissVectorStore persisted there (or pass vector_store=...)") from None


def load_index(persist_dir: str | os.PathLike, embed_model: BaseEmbedding, refiner=None, vector_store=None,
               threads: int | None = 1, **kwargs):
    """Reopen an index saved by `persist`, embedding queries with `embed_model` + the stored refiner.

    refiner: None uses the copy persisted with the index; one given is checked against the record
    (`RefinerMismatchError` when it differs or when the dir has no record). vector_store: None
    reads a `FaissVectorStore` from the dir (an `InputError` names what the dir holds instead, e.g.
    LlamaIndex's default JSON `SimpleVectorStore`); pass another store to use LlamaIndex's defaults for it.
    `kwargs` go to `load_index_from_storage`.

    Deleting documents: `index.delete_ref_doc(...)` is not supported by the FAISS vector store
    (LlamaIndex's `FaissVectorStore.delete` raises NotImplementedError, and this package adds no
    delete path); rebuild the index without those documents and `persist` it again.
    """
    from llama_index.core import StorageContext, load_index_from_storage

    if isinstance(embed_model, RefinedEmbedding):
        refiner = embed_model.refiner if refiner is None else refiner
        embed_model = embed_model.base
    embed = RefinedEmbedding(embed_model, checked_refiner(persist_dir, refiner, threads))
    if vector_store is None:
        from llama_index.vector_stores.faiss import FaissVectorStore

        vector_store = _faiss_store(FaissVectorStore, persist_dir)
        if vector_store.client.d != stored_dim(embed.refiner):
            raise InputError(f"{persist_dir}: the FAISS index has dimension {vector_store.client.d}, the refiner "
                             f"stores {stored_dim(embed.refiner)}-d vectors")
    storage = StorageContext.from_defaults(vector_store=vector_store, persist_dir=str(persist_dir))
    return load_index_from_storage(storage, embed_model=embed, **kwargs)
