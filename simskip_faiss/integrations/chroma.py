"""Chroma: an `EmbeddingFunction` that refines another one, stored with the collection under a stable name.

    import simskip_faiss.integrations.chroma as sc       # registers "simskip_faiss_refined" with Chroma

    ef = sc.RefinedEmbeddingFunction(your_embedding_function, "refiner.onnx")
    docs = client.create_collection("docs", embedding_function=ef)
    ...
    docs = sc.get_collection(client, "docs")             # the collection's recorded refiner, re-hashed

The collection's configuration records the base function (its registered name and config), the
refiner's path and its sha256, dimensions, normalisation and apply_to. Documents (`__call__`) are
refined only when apply_to is "both"; queries (`embed_query`, what Chroma calls for `query_texts`) always.

The collection's own record. Chroma's configuration can be changed (`collection.modify`), so for a
persistent client the package keeps its own record of the refiner that made a collection's vectors,
with a copy of the refiner, in the persist directory: `<persist>/simskip/<collection id>/`
(`simskip_refiner.json` + `simskip_refiner-<sha>.onnx`, written atomically by `sidecar.write_sidecar`).
It is written the first time the function runs for the collection (its first `add`), or the first
time a collection made before this record existed is opened. Because it lives inside the persist
directory and is found from the collection's id, a moved or copied folder opens on another machine.
Whenever Chroma calls the function for a collection (it passes no collection, so the function finds
the `Collection` whose method is running on the call stack):

- `build_from_config` (what Chroma runs for every `query_texts` when the collection was opened
  without a function, `client.get_collection(name)`) uses the recorded refiner; a configuration that
  names another refiner (changed outside this package) is overridden, with a warning.
- `__call__` / `embed_query` of a function passed in (`client.get_collection(name, embedding_function=ef)`,
  which Chroma compares by name only) raise `RefinerMismatchError` unless `ef`'s refiner is the recorded one.
- `collection.modify(configuration={"embedding_function": <other refiner>})` raises
  `RefinerMismatchError` before Chroma stores anything (`validate_config`, which Chroma runs while
  serialising the update, before persisting it).
- `collection.modify(configuration={"embedding_function": <a function not this package's>})`: Chroma
  stores it before any code of this package runs; then, rebuilding the collection's old function, this
  module stores that function back and raises `RefinerMismatchError` (sync clients; an async client's
  change cannot be undone from there, and the error says so).

`get_collection` (this module) does the same checks without the stack, and refuses a collection whose
configuration names another function while its record says which refiner made the vectors. Not
guarded: a configuration changed by a process that has not imported this module (with `modify` to a
function not this package's, or Chroma's own API): plain `client.get_collection(name)` then embeds
queries with that function. A process that has not imported this module cannot build the function:
Chroma raises "Embedding function simskip_faiss_refined not found" at the first `query_texts`. Clients
without a local persist directory (`EphemeralClient`, `HttpClient`) keep no record: their checks compare
with the collection's current configuration, and the configuration's refiner path must exist where the
function is rebuilt. The stack lookups follow chromadb 1.5 (`CollectionCommon` methods,
`_update_model_after_modify_success`); where they find no collection, the function is rebuilt from the
configuration alone, as before the record existed.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import known_embedding_functions, register_embedding_function

from ..refiners.onnx import Refiner
from ..errors import InputError, InputTypeError, RefinerMismatchError
from .refining import refine_documents, refine_queries, resolve_refiner
from .sidecar import (RECORD_KEYS, SIDECAR, MissingRefinerError, check_record, checked_refiner, describe,
                      identity_from_record, read_sidecar, refiner_record, write_sidecar)

NAME = "simskip_faiss_refined"

__all__ = ["NAME", "RefinedEmbeddingFunction", "get_collection", "record_folder"]
RECORDS = "simskip"  # <persist directory>/simskip/<collection id>/: the package's record of each collection


def refiner_file(refiner) -> str | None:
    """The absolute path the config records: an ONNX file or a bundle directory, or None for an identity."""
    if hasattr(refiner, "refiner") and hasattr(refiner, "index"):
        refiner = refiner.refiner
    if getattr(refiner, "kind", None) == "identity":
        return None
    if isinstance(refiner, (str, os.PathLike)):
        return str(Path(refiner).resolve())
    source = Path(str(getattr(refiner, "source", "")))
    if isinstance(refiner, Refiner) and source.is_file():
        return str(source.resolve())
    raise InputTypeError(f"a Chroma collection records its refiner by file: pass the ONNX path (or a bundle "
                    f"directory), not a {type(refiner).__name__} held only in memory")


# -- the collection's own record, in its persist directory --------------------------------------------
def _running_collection():
    """The chromadb `Collection` whose method (add, query, modify, configuration, ...) is on the call stack."""
    from chromadb.api.models.CollectionCommon import CollectionCommon

    frame = sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("chromadb."):
            me = frame.f_locals.get("self")
            if isinstance(me, CollectionCommon):
                return me
        frame = frame.f_back
    return None


def record_folder(collection) -> Path | None:
    """`<persist directory>/simskip/<collection id>`, or None for a client without a local persist directory."""
    try:
        settings = collection._client.get_settings()
    except Exception:  # noqa: BLE001  (a client that does not say: keep no record)
        return None
    if not getattr(settings, "is_persistent", False) or not getattr(settings, "persist_directory", None):
        return None
    return Path(settings.persist_directory) / RECORDS / str(collection.id)


_cache: dict = {}
_cache_lock = threading.Lock()


def _recorded(folder: Path | None):
    """(record, refiner) the collection's folder holds, or None when it has no record. The refiner (the
    stored copy, re-hashed) is cached while the record and copy files stay the same."""
    if folder is None or not (folder / SIDECAR).is_file():
        return None
    record = read_sidecar(folder)
    files = [folder / SIDECAR] + ([folder / record["file"]] if record.get("file") else [])
    try:
        key = tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (f.stat() for f in files))
    except FileNotFoundError:
        key = None
    with _cache_lock:
        held = _cache.get(str(folder))
    if key is not None and held is not None and held[0] == key:
        return held[1]
    hit = (record, checked_refiner(folder))
    if key is not None:
        with _cache_lock:
            _cache[str(folder)] = (key, hit)  # one entry per collection folder: the files it was read from
    return hit


def _bind(collection, folder: Path | None, refiner) -> None:
    """Check `refiner` against the collection's record, or write the record when it has none yet."""
    if folder is None:
        return
    held = _recorded(folder)
    if held is not None:
        check_record(held[0], refiner, f"Chroma collection {collection.name!r} (record {folder})")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_sidecar(folder, refiner, folder=True)


_undoing = threading.local()


def _undo_foreign_modify(coll, ef) -> None:
    """Inside `collection.modify(configuration={"embedding_function": <not this package's>})`, after Chroma
    stored the update (it runs no code of the new function's owner before that), while it rebuilds the
    collection's old function (`ef`): store `ef` back and raise, so the refined vectors are never searched
    with the other function's queries."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_update_model_after_modify_success" and frame.f_locals.get("self") is coll:
            new = (frame.f_locals.get("configuration") or {}).get("embedding_function")
            break
        frame = frame.f_back
    else:
        return
    if new is None or isinstance(new, RefinedEmbeddingFunction) or getattr(_undoing, "active", False):
        return
    _undoing.active = True
    try:
        undone = coll._client._modify(id=coll.id, new_configuration={"embedding_function": ef},
                                      tenant=coll.tenant, database=coll.database)
    finally:
        _undoing.active = False
    if hasattr(undone, "close"):  # an async client: the coroutine cannot be run from here
        undone.close()
        what = "Chroma has stored the change; open the collection with get_collection (this module) only"
    else:
        what = "the change Chroma had stored was undone"
    raise RefinerMismatchError(f"Chroma collection {coll.name!r} cannot change its embedding function to "
                               f"{getattr(new, 'name', lambda: type(new).__name__)()!r}: its vectors were made by "
                               f"{describe(refiner_record(ef.refiner))}; {what} (build a new collection for "
                               f"another embedding function)")


def _fields(config: dict) -> dict:
    return {k: (config or {}).get(k) for k in RECORD_KEYS}


@register_embedding_function
class RefinedEmbeddingFunction(EmbeddingFunction[Documents]):
    """`embedding_function` (a registered Chroma EmbeddingFunction) followed by a refiner, under the apply_to rule.

    refiner: an ONNX path, a bundle directory (any refiner kind; the bundle is re-verified on reopen), a
    `Refiner` loaded from a file, or an `IdentityRefiner`.
    """

    def __init__(self, embedding_function: EmbeddingFunction, refiner, threads: int | None = 1):
        if isinstance(embedding_function, RefinedEmbeddingFunction):
            raise InputTypeError("the embedding function is already refined; wrap the base function")
        self.embedding_function = embedding_function
        self.refiner_path = refiner_file(refiner)
        self.refiner = resolve_refiner(refiner, threads)

    def _check_collection(self) -> None:
        """Inside a collection's method: this refiner must be the collection's recorded one (written if none)."""
        coll = _running_collection()
        if coll is not None:
            _bind(coll, record_folder(coll), self.refiner)

    def __call__(self, input: Documents) -> Embeddings:
        self._check_collection()
        return list(refine_documents(self.refiner, self.embedding_function(input)))

    def embed_query(self, input: Documents) -> Embeddings:
        self._check_collection()
        return list(refine_queries(self.refiner, self.embedding_function.embed_query(input)))

    @staticmethod
    def name() -> str:
        return NAME

    def default_space(self):
        return self.embedding_function.default_space()

    def supported_spaces(self):
        return self.embedding_function.supported_spaces()

    def get_config(self) -> dict[str, Any]:
        ef = self.embedding_function
        return {"embedding_function": {"name": ef.name(), "config": ef.get_config()},
                "refiner_path": self.refiner_path, **refiner_record(self.refiner)}

    @classmethod
    def _with_refiner(cls, base: EmbeddingFunction, refiner, path: str | None) -> "RefinedEmbeddingFunction":
        """A function over an already resolved refiner (a collection's recorded copy), recorded by `path`."""
        ef = cls.__new__(cls)
        ef.embedding_function, ef.refiner_path, ef.refiner = base, path, refiner
        return ef

    @staticmethod
    def _base_from_config(config: dict[str, Any]) -> EmbeddingFunction:
        inner = config.get("embedding_function") or {}
        if inner.get("name") not in known_embedding_functions:
            raise InputError(f"the base embedding function {inner.get('name')!r} is not registered with Chroma "
                             f"(import the module that registers it before opening the collection)")
        return known_embedding_functions[inner["name"]].build_from_config(inner.get("config") or {})

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "RefinedEmbeddingFunction":
        """Rebuild from a collection's stored config: the base function by its registered name; the refiner
        from the collection's own record when Chroma runs this for a persisted collection (module docstring),
        else from the config's path, re-hashed and checked against the config."""
        coll = _running_collection()
        folder = record_folder(coll) if coll is not None else None
        held = _recorded(folder)
        if held is not None:
            record, refiner = held
            stored = ((coll.configuration_json or {}).get("embedding_function") or {}).get("config") or {}
            if _fields(config) != _fields(record) and _fields(config) == _fields(stored):  # not a modify's new one
                warnings.warn(f"Chroma collection {coll.name!r}: its configuration names {describe(config)}, but its "
                              f"vectors were made by {describe(record)} (record {folder}); using the recorded refiner",
                              RuntimeWarning, stacklevel=2)
            copy = folder / record["file"] if record.get("file") else None
            ef = RefinedEmbeddingFunction._with_refiner(RefinedEmbeddingFunction._base_from_config(config),
                                                        refiner, str(copy) if copy else None)
        else:
            ef = RefinedEmbeddingFunction._from_config_path(config)
            if folder is not None:
                _bind(coll, folder, ef.refiner)
        if coll is not None:
            _undo_foreign_modify(coll, ef)
        return ef

    @staticmethod
    def _from_config_path(config: dict[str, Any]) -> "RefinedEmbeddingFunction":
        base = RefinedEmbeddingFunction._base_from_config(config)
        path = config.get("refiner_path")
        if path is None and config.get("kind") == "identity":
            refiner = identity_from_record(config)
        elif path is None or not Path(path).exists():
            raise MissingRefinerError(f"the collection's refiner file {path} is missing: its vectors were made by "
                                      f"{describe(config)}; restore that file to open the collection")
        else:
            refiner = path
        ef = RefinedEmbeddingFunction(base, refiner)
        check_record(config, ef.refiner, f"the Chroma collection (refiner file {path})")
        return ef

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        """Chroma runs this while serialising a `collection.modify` update, before it stores anything: an update
        to another refiner than the collection's (its record, else its current configuration) is refused."""
        coll = _running_collection()
        if coll is None:
            return
        held = _recorded(record_folder(coll))
        if held is not None:
            theirs = held[0]
        else:
            current = (coll.configuration_json or {}).get("embedding_function") or {}
            if current.get("name") != NAME:
                return
            theirs = current.get("config") or {}
        if _fields(theirs) != _fields(config):
            raise RefinerMismatchError(f"Chroma collection {coll.name!r} cannot change its refiner: it holds vectors "
                                       f"made by {describe(theirs)}, the update has {describe(config)}; nothing was "
                                       f"changed (build a new collection for another refiner)")

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        if any(old_config.get(k) != new_config.get(k) for k in RECORD_KEYS):
            raise RefinerMismatchError(f"a collection's refiner cannot change: it holds vectors made by "
                                       f"{describe(old_config)}, the update has {describe(new_config)}")
        old_base, new_base = old_config.get("embedding_function") or {}, new_config.get("embedding_function") or {}
        if old_base.get("name") != new_base.get("name"):
            raise RefinerMismatchError(f"a collection's base embedding function cannot change: it holds vectors of "
                                       f"{old_base.get('name')!r}, the update has {new_base.get('name')!r}")
        if old_base.get("name") in known_embedding_functions:  # the base function's own rule (e.g. its model name)
            self.embedding_function.validate_config_update(old_base.get("config") or {}, new_base.get("config") or {})


def get_collection(client, name: str, embedding_function: RefinedEmbeddingFunction | None = None):
    """Open a collection made with `RefinedEmbeddingFunction`, its refiner checked.

    Without `embedding_function`, the function is rebuilt: its refiner from the collection's own record
    (persistent clients, module docstring), else from the stored config (refiner file re-hashed); with
    one, its refiner must match the record (else the stored config). A collection that records no refined
    function raises `MissingRefinerError`; another refiner, `RefinerMismatchError`.
    """
    coll = client.get_collection(name)
    folder = record_folder(coll)
    held = _recorded(folder)
    stored = (coll.configuration_json or {}).get("embedding_function") or {}
    if stored.get("name") != NAME:
        made = f"its vectors were made by {describe(held[0])} (record {folder}); " if held else ""
        raise MissingRefinerError(f"Chroma collection {name!r} records no simskip refiner (its embedding function "
                                  f"is {stored.get('name')!r}); {made}refusing to search it with refined queries")
    if embedding_function is None:
        if held is not None:
            record, refiner = held
            if _fields(stored["config"]) != _fields(record):
                raise RefinerMismatchError(f"Chroma collection {name!r}: its configuration names "
                                           f"{describe(stored['config'])}, but its vectors were made by "
                                           f"{describe(record)} (record {folder}); open it with that refiner: "
                                           f"get_collection(client, {name!r}, RefinedEmbeddingFunction(base, <it>))")
            copy = folder / record["file"] if record.get("file") else None
            embedding_function = RefinedEmbeddingFunction._with_refiner(
                RefinedEmbeddingFunction._base_from_config(stored["config"]), refiner, str(copy) if copy else None)
        else:
            embedding_function = RefinedEmbeddingFunction._from_config_path(stored["config"])
            _bind(coll, folder, embedding_function.refiner)
    else:
        if held is not None:
            check_record(held[0], embedding_function.refiner, f"Chroma collection {name!r} (record {folder})")
        else:
            check_record(stored["config"], embedding_function.refiner, f"Chroma collection {name!r}")
        theirs, ours = stored["config"].get("embedding_function"), embedding_function.get_config()["embedding_function"]
        if theirs != ours:
            raise RefinerMismatchError(f"Chroma collection {name!r} was embedded with {theirs}, not {ours}")
        _bind(coll, folder, embedding_function.refiner)
    return client.get_collection(name, embedding_function=embedding_function)
