"""LangChain: an `Embeddings` that refines your embeddings, for any LangChain vector store.

    from langchain_community.vectorstores import FAISS
    from simskip_faiss.integrations import langchain as sl

    store = FAISS.from_texts(texts, sl.RefinedEmbeddings(your_embeddings, "refiner.onnx"))
    sl.save_local(store, "store/")                         # + the refiner's record and a copy of it
    store = sl.load_local(FAISS, "store/", your_embeddings, allow_dangerous_deserialization=True)

Queries (`embed_query`) are always refined; documents (`embed_documents`) only when the refiner's
apply_to is "both". `load_local` refuses a store saved without a refiner record or with another
refiner (`RefinerMismatchError`).

A refiner is trained and guarded for one metric (its metadata "metric", "ip" unless it says
otherwise), while `FAISS.from_texts` ranks by Euclidean distance by default. When the refiner
normalises both sides the two rank alike; when it refines queries only (or does not normalise) and
the stored vectors' norms differ, they do not, and the guard's measurement does not hold for the
store: `save_local` and `load_local` then warn (`RankingMismatchWarning`) and name the fix, e.g.
`FAISS.from_texts(..., distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor

from .refining import refine_documents, refine_queries, resolve_refiner
from .sidecar import checked_refiner, saving
from ..errors import InputTypeError

__all__ = ["RefinedEmbeddings", "RankingMismatchWarning", "save_local", "load_local", "ranking_mismatch"]


class RankingMismatchWarning(UserWarning):
    """The store ranks by another metric than the refiner was guarded for, and the rankings can differ."""


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


_STRATEGY = {"ip": "MAX_INNER_PRODUCT", "l2": "EUCLIDEAN_DISTANCE"}


def ranking_mismatch(store, refiner) -> str | None:
    """Why `store` (LangChain's FAISS, or any store with `index` and `distance_strategy`) can rank unlike
    the metric `refiner` was guarded for; None when it ranks alike (or is not such a store).

    L2, inner product and cosine rank alike when every stored vector has the same norm: the refiner
    normalises and refines the documents too, or the stored vectors' norms are equal (checked)."""
    index, strategy = getattr(store, "index", None), getattr(store, "distance_strategy", None)
    if index is None or strategy is None or not hasattr(index, "metric_type"):
        return None
    import faiss

    want = str((getattr(refiner, "metadata", None) or {}).get("metric", "ip")).lower()
    have = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(index.metric_type,
                                                                        f"metric {index.metric_type}")
    cosine = bool(getattr(store, "_normalize_L2", False))
    if have == want and not cosine:
        return None
    if getattr(refiner, "normalize", False) and refiner.refines_documents:
        return None  # unit vectors on both sides
    if not cosine and index.ntotal:
        try:
            x = index.reconstruct_n(0, min(int(index.ntotal), 100_000))
        except RuntimeError:  # an index that cannot give its vectors back: assume they can differ
            x = None
        if x is not None:
            norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
            if norms.max() - norms.min() <= 1e-4 * max(norms.max(), 1e-12):
                return None
    kind = getattr(strategy, "value", strategy)
    sides = "refines queries only (documents stored raw)" if not refiner.refines_documents else "does not normalise"
    got = f"{kind}" + (" with normalize_L2=True (cosine: the documents are rescaled)" if cosine else f" ({have})")
    fix = _STRATEGY.get(want)
    fix = (f"build the store with distance_strategy=DistanceStrategy.{fix}"
           + (" and without normalize_L2" if cosine else "") if fix else f"build the store with the refiner's metric {want!r}")
    return (f"the {type(store).__name__} store ranks by {got}, but its refiner was guarded for {want!r} and {sides}, "
            f"with stored vectors of different norms, so the ranking differs from the one the guard measured; "
            f"{fix} (or use a refiner that normalises and applies to both sides)")


def _check_ranking(store, refiner) -> None:
    why = ranking_mismatch(store, refiner)
    if why:
        warnings.warn(why, RankingMismatchWarning, stacklevel=3)


# A folder store is saved under this index name, not the framework's default "index": `FAISS.load_local(dir,
# embeddings)`, a LangChain user's habit, then finds no index.faiss and fails instead of opening the store
# with unrefined queries. `load_local` below opens it (and folders saved before, under "index").
INDEX_NAME = "simskip_index"


def _index_name(method, name: str) -> dict:
    """{"index_name": name} when the store's save/load takes it (FAISS does), else {}."""
    import inspect

    try:
        return {"index_name": name} if "index_name" in inspect.signature(method).parameters else {}
    except (TypeError, ValueError):
        return {}


def save_local(store, path: str | os.PathLike) -> None:
    """Save a LangChain vector store and, beside it, its refiner's record and (ONNX) a copy of the refiner.

    Stores with `save_local(folder)` (FAISS, ...) keep the record inside the folder; stores with
    `dump(path)` (InMemoryVectorStore, ...) get `<path>.simskip.json` beside the file. A FAISS store
    that ranks unlike the refiner's metric is saved with a `RankingMismatchWarning` (module docstring).
    """
    emb = _refined_embeddings(store)
    _check_ranking(store, emb.refiner)
    folder = hasattr(store, "save_local")
    if not folder and not hasattr(store, "dump"):
        raise InputTypeError(f"{type(store).__name__} has neither save_local nor dump; persist it yourself inside "
                        f"simskip_faiss.integrations.base.saving(path, refiner, folder=...)")
    with saving(path, emb.refiner, folder):
        if folder:
            store.save_local(str(path), **_index_name(store.save_local, INDEX_NAME))
        else:
            store.dump(str(path))


def load_local(store_cls, path: str | os.PathLike, embeddings: Embeddings, refiner=None,
               threads: int | None = 1, **kwargs):
    """Reopen a store saved by `save_local`, embedding with `embeddings` + the store's refiner.

    refiner: None uses the copy saved with the store; a refiner (or path) given is checked against
    the record. `RefinerMismatchError` when they differ or when the store has no record. `kwargs`
    go to the store's own loader (e.g. FAISS's `allow_dangerous_deserialization=True`: LangChain's
    FAISS docstore is a pickle, so open only folders you wrote). A store that ranks unlike the
    refiner's metric loads with a `RankingMismatchWarning` (module docstring).
    """
    if isinstance(embeddings, RefinedEmbeddings):
        refiner = embeddings.refiner if refiner is None else refiner
        embeddings = embeddings.embeddings
    wrapped = RefinedEmbeddings(embeddings, checked_refiner(path, refiner, threads))
    if hasattr(store_cls, "load_local"):
        if "index_name" not in kwargs and Path(path, f"{INDEX_NAME}.faiss").is_file():  # saved by this module
            kwargs.update(_index_name(store_cls.load_local, INDEX_NAME))
        store = store_cls.load_local(str(path), wrapped, **kwargs)
    elif hasattr(store_cls, "load"):
        store = store_cls.load(str(path), wrapped, **kwargs)
    else:
        raise InputTypeError(f"{getattr(store_cls, '__name__', store_cls)} has neither load_local nor load")
    _check_ranking(store, wrapped.refiner)
    return store
