"""LangChain: an `Embeddings` that refines your embeddings, for any LangChain vector store.

    from langchain_community.vectorstores import FAISS
    from simskip_faiss.integrations import langchain as sl

    store = FAISS.from_texts(texts, sl.RefinedEmbeddings(your_embeddings, "refiner.onnx"))
    sl.save_local(store, "store/")                         # + the refiner's record and a copy of it
    store = sl.load_local(FAISS, "store/", your_embeddings, allow_dangerous_deserialization=True)

Queries (`embed_query`) are always refined; documents (`embed_documents`) only when the refiner's
apply_to is "both". `load_local` refuses a store saved without a refiner record or with another
refiner (`RefinerMismatchError`).
"""
from __future__ import annotations

import os

from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor

from .base import checked_refiner, refine_documents, refine_queries, resolve_refiner, saving
from ..errors import InputTypeError

__all__ = ["RefinedEmbeddings", "save_local", "load_local"]


class RefinedEmbeddings(Embeddings):
    """`embeddings` (any LangChain Embeddings) followed by a refiner, under the apply_to rule.

    refiner: a refiner, a `RefinedIndex`, an ONNX path or a bundle directory.
    """

    def __init__(self, embeddings: Embeddings, refiner, threads: int | None = 1):
        if isinstance(embeddings, RefinedEmbeddings):
            raise InputTypeError("embeddings are already refined; wrap the base model, not a RefinedEmbeddings")
        self.embeddings = embeddings
        self.refiner = resolve_refiner(refiner, threads)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return refine_documents(self.refiner, self.embeddings.embed_documents(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return refine_queries(self.refiner, [self.embeddings.embed_query(text)])[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        raw = await self.embeddings.aembed_documents(texts)
        return await run_in_executor(None, lambda: refine_documents(self.refiner, raw).tolist())

    async def aembed_query(self, text: str) -> list[float]:
        raw = await self.embeddings.aembed_query(text)
        return await run_in_executor(None, lambda: refine_queries(self.refiner, [raw])[0].tolist())

    def __repr__(self) -> str:
        return f"RefinedEmbeddings({self.embeddings!r}, {self.refiner!r})"


def _refined_embeddings(store) -> RefinedEmbeddings:
    emb = getattr(store, "embeddings", None)
    if not isinstance(emb, RefinedEmbeddings):
        raise InputTypeError(f"this {type(store).__name__} does not embed with RefinedEmbeddings "
                        f"(it uses {type(emb).__name__}); nothing to record")
    return emb


def save_local(store, path: str | os.PathLike) -> None:
    """Save a LangChain vector store and, beside it, its refiner's record and (ONNX) a copy of the refiner.

    Stores with `save_local(folder)` (FAISS, ...) keep the record inside the folder; stores with
    `dump(path)` (InMemoryVectorStore, ...) get `<path>.simskip.json` beside the file.
    """
    emb = _refined_embeddings(store)
    folder = hasattr(store, "save_local")
    if not folder and not hasattr(store, "dump"):
        raise InputTypeError(f"{type(store).__name__} has neither save_local nor dump; persist it yourself inside "
                        f"simskip_faiss.integrations.base.saving(path, refiner, folder=...)")
    with saving(path, emb.refiner, folder):
        if folder:
            store.save_local(str(path))
        else:
            store.dump(str(path))


def load_local(store_cls, path: str | os.PathLike, embeddings: Embeddings, refiner=None,
               threads: int | None = 1, **kwargs):
    """Reopen a store saved by `save_local`, embedding with `embeddings` + the store's refiner.

    refiner: None uses the copy saved with the store; a refiner (or path) given is checked against
    the record. `RefinerMismatchError` when they differ or when the store has no record. `kwargs`
    go to the store's own loader (e.g. FAISS's `allow_dangerous_deserialization=True`: LangChain's
    FAISS docstore is a pickle, so open only folders you wrote).
    """
    if isinstance(embeddings, RefinedEmbeddings):
        refiner = embeddings.refiner if refiner is None else refiner
        embeddings = embeddings.embeddings
    wrapped = RefinedEmbeddings(embeddings, checked_refiner(path, refiner, threads))
    if hasattr(store_cls, "load_local"):
        return store_cls.load_local(str(path), wrapped, **kwargs)
    if hasattr(store_cls, "load"):
        return store_cls.load(str(path), wrapped, **kwargs)
    raise InputTypeError(f"{getattr(store_cls, '__name__', store_cls)} has neither load_local nor load")
