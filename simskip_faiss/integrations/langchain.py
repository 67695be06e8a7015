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
store: `FAISS.from_texts` / `from_documents` (read from the call while it embeds the documents),
`save_local` and `load_local` then warn (`RankingMismatchWarning`) and name the fix, e.g.
`FAISS.from_texts(..., distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)`.

Opening a saved FAISS folder, every path refines or refuses:

- `load_local(FAISS, folder, base_embeddings, ...)` (this module): the saved refiner, checked; refines.
- `FAISS.load_local(folder, base_embeddings)` (LangChain's default index name "index"): the folder holds,
  under that name, an empty index and a pickle that raises `RefinerMismatchError` naming `load_local`.
- `FAISS.load_local(folder, embeddings, index_name="simskip_index")`: the pickled docstore carries the
  refiner record and, when LangChain unpickles it inside `FAISS.load_local`, checks the `embeddings`
  that call was given (read from the loader's frame): raw embeddings, or `RefinedEmbeddings` with another
  refiner, raise `RefinerMismatchError`; `RefinedEmbeddings` with the saved refiner refine. A docstore that
  is not LangChain's `InMemoryDocstore` cannot carry the check, and a pickle opened by anything but
  `FAISS.load_local` is not checked (there is no embeddings to check).

A store saved with `dump(path)` (InMemoryVectorStore) is written inside a LangChain serialization
envelope of type "not_implemented" naming `load_local`: `InMemoryVectorStore.load(path, embeddings)`
raises `NotImplementedError` with that text, while `load_local(InMemoryVectorStore, path, embeddings)`
unwraps it (and still opens files dumped before, without the envelope).
"""
from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor

from .refining import refine_documents, refine_queries, resolve_refiner
from .sidecar import check_record, checked_refiner, describe, refiner_record, saving
from ..errors import InputTypeError, RefinerMismatchError

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
        vectors = refine_documents(self.refiner, self.embeddings.embed_documents(texts))
        _check_building(vectors, self.refiner)
        return vectors.tolist()

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


def _check_building(vectors, refiner) -> None:
    """Inside `FAISS.from_texts` / `from_documents`: warn, as `save_local` would, when the store being built
    will rank unlike the refiner's metric (its distance_strategy and normalize_L2 are read from that call)."""
    frame = sys._getframe(2)
    while frame is not None and not (frame.f_code.co_name == "from_texts" and
                                     frame.f_globals.get("__name__") == "langchain_community.vectorstores.faiss"):
        frame = frame.f_back
    if frame is None:
        return
    import faiss
    from types import SimpleNamespace

    from langchain_community.vectorstores.utils import DistanceStrategy

    options = frame.f_locals.get("kwargs") or {}
    strategy = options.get("distance_strategy", DistanceStrategy.EUCLIDEAN_DISTANCE)
    x = np.asarray(vectors, dtype=np.float32)
    index = SimpleNamespace(metric_type=faiss.METRIC_INNER_PRODUCT if strategy == DistanceStrategy.MAX_INNER_PRODUCT
                            else faiss.METRIC_L2, ntotal=len(x), reconstruct_n=lambda i, n: x[i:i + n])
    store = type("FAISS", (), {})()
    store.index, store.distance_strategy, store._normalize_L2 = index, strategy, bool(options.get("normalize_L2"))
    why = ranking_mismatch(store, refiner)
    if why:
        warnings.warn(why, RankingMismatchWarning, stacklevel=4)


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


# -- the guards FAISS.load_local meets in a folder save_local wrote ------------------------------------
OPEN_WITH = ("open it with simskip_faiss.integrations.langchain.load_local(FAISS, folder, your_embeddings, "
             "allow_dangerous_deserialization=True)")


def _refuse_default_name():
    """Called by unpickling the `index.pkl` save_local writes: LangChain's default index name."""
    raise RefinerMismatchError("this folder holds a FAISS store saved by simskip_faiss with a refiner (under index "
                               f"name {INDEX_NAME!r}); FAISS.load_local would search it with unrefined queries: "
                               + OPEN_WITH)


class _RefuseDefaultName:
    def __reduce__(self):
        return (_refuse_default_name, ())


def _write_default_name_refusal(store, path) -> None:
    """`index.faiss` (an empty index of the store's dimension) and an `index.pkl` whose unpickling raises,
    so `FAISS.load_local(folder, embeddings)` fails with what to do instead of a missing-file error."""
    import faiss

    from ..persistence import atomic_write_bytes

    d = int(getattr(getattr(store, "index", None), "d", 1) or 1)
    atomic_write_bytes(Path(path, "index.faiss"), faiss.serialize_index(faiss.IndexFlatIP(d)).tobytes())
    atomic_write_bytes(Path(path, "index.pkl"), pickle.dumps((_RefuseDefaultName(), {})))


def _loader_embeddings():
    """(True, embeddings) of the nearest `FAISS.load_local(folder_path, embeddings, ...)` call on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "load_local":
            names = frame.f_locals
            if "folder_path" in names and "embeddings" in names:
                return True, names["embeddings"]
        frame = frame.f_back
    return False, None


# -- the envelope a dumped store is saved in --------------------------------------------------------
ENVELOPE = "simskip_faiss_store"


def _wrap_dump(path) -> None:
    """Rewrite the file `dump` wrote inside an envelope LangChain's `load` refuses, naming `load_local`."""
    import json

    from ..persistence import atomic_write_bytes

    inner = json.loads(Path(path).read_text(encoding="utf-8"))
    refuse = {"lc": 1, "type": "not_implemented", "id": ["simskip_faiss", "integrations", "langchain", ENVELOPE],
              "repr": ("a store saved by simskip_faiss with a refiner; opening it with the framework's own "
                       "loader would search it with unrefined queries: open it with "
                       "simskip_faiss.integrations.langchain.load_local(InMemoryVectorStore, path, your_embeddings)")}
    envelope = {"simskip_faiss_refuse": refuse, ENVELOPE: inner}  # the refusal's message holds only itself
    atomic_write_bytes(Path(path), json.dumps(envelope, indent=2).encode("utf-8"))


def _load_dumped(store_cls, path, embeddings, **kwargs):
    """`store_cls.load` on the enveloped file's content (or on the file itself when it has no envelope)."""
    import json
    import tempfile

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, dict) and ENVELOPE in data):
        return store_cls.load(str(path), embeddings, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        inner = Path(tmp, Path(path).name)
        inner.write_text(json.dumps(data[ENVELOPE]), encoding="utf-8")
        return store_cls.load(str(inner), embeddings, **kwargs)


try:
    from langchain_community.docstore.in_memory import InMemoryDocstore
except ImportError:  # langchain-core alone: no FAISS store to guard
    InMemoryDocstore = None

if InMemoryDocstore is not None:
    class RefinerCheckedDocstore(InMemoryDocstore):
        """LangChain's `InMemoryDocstore` as `save_local` pickles it: it carries the refiner record, and when
        `FAISS.load_local` unpickles it, refuses the embeddings that call was given unless they are
        `RefinedEmbeddings` with that refiner (module docstring)."""

        def __init__(self, _dict=None, simskip_record=None):
            super().__init__(_dict)
            self.simskip_record = simskip_record

        def __setstate__(self, state):
            self.__dict__.update(state)
            record = self.__dict__.get("simskip_record")
            found, emb = _loader_embeddings()
            if not found or record is None:
                return
            if not isinstance(emb, RefinedEmbeddings):
                raise RefinerMismatchError(f"this FAISS store holds vectors made by {describe(record)}, but "
                                           f"FAISS.load_local was given {type(emb).__name__}, which would search it "
                                           "with unrefined queries: " + OPEN_WITH)
            check_record(record, emb.refiner, "this FAISS store (opened by FAISS.load_local)")
else:
    RefinerCheckedDocstore = None


class _guarded_docstore:
    """While saving, the store's `InMemoryDocstore` is swapped for a `RefinerCheckedDocstore` (same documents)."""

    def __init__(self, store, refiner):
        self.store, self.refiner, self.old = store, refiner, None

    def __enter__(self):
        docstore = getattr(self.store, "docstore", None)
        if RefinerCheckedDocstore is not None and type(docstore) in (InMemoryDocstore, RefinerCheckedDocstore):
            self.old = docstore
            self.store.docstore = RefinerCheckedDocstore(docstore._dict, refiner_record(self.refiner))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.store.docstore = self.old
        return False


def save_local(store, path: str | os.PathLike) -> None:
    """Save a LangChain vector store and, beside it, its refiner's record and (ONNX) a copy of the refiner.

    Stores with `save_local(folder)` (FAISS, ...) keep the record inside the folder; stores with
    `dump(path)` (InMemoryVectorStore, ...) get `<path>.simskip.json` beside the file (the store itself
    in an envelope the framework's `load` refuses, module docstring). A FAISS store
    that ranks unlike the refiner's metric is saved with a `RankingMismatchWarning` (module docstring).
    A FAISS folder is saved under index name "simskip_index", its pickled docstore checking the embeddings
    `FAISS.load_local` is given, and LangChain's default name "index" holds a pickle that refuses to open
    (module docstring: every way to open the folder refines or refuses).
    """
    emb = _refined_embeddings(store)
    _check_ranking(store, emb.refiner)
    folder = hasattr(store, "save_local")
    if not folder and not hasattr(store, "dump"):
        raise InputTypeError(f"{type(store).__name__} has neither save_local nor dump; persist it yourself inside "
                        f"simskip_faiss.integrations.base.saving(path, refiner, folder=...)")
    with saving(path, emb.refiner, folder):
        if folder:
            named = _index_name(store.save_local, INDEX_NAME)
            with _guarded_docstore(store, emb.refiner):
                store.save_local(str(path), **named)
            if named:
                _write_default_name_refusal(store, path)
        else:
            store.dump(str(path))
            _wrap_dump(path)


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
        store = _load_dumped(store_cls, path, wrapped, **kwargs)
    else:
        raise InputTypeError(f"{getattr(store_cls, '__name__', store_cls)} has neither load_local nor load")
    _check_ranking(store, wrapped.refiner)
    return store
