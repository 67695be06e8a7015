"""Chroma: an `EmbeddingFunction` that refines another one, stored with the collection under a stable name.

    import simskip_faiss.integrations.chroma as sc       # registers "simskip_faiss_refined" with Chroma

    ef = sc.RefinedEmbeddingFunction(your_embedding_function, "refiner.onnx")
    docs = client.create_collection("docs", embedding_function=ef)
    ...
    docs = sc.get_collection(client, "docs")             # rebuilt from the stored config, refiner re-hashed

The collection's configuration records the base function (its registered name and config), the
refiner's path and its sha256, dimensions, normalisation and apply_to. Reopening rebuilds the
function from that record and refuses a refiner file that is missing or no longer the same
(`RefinerMismatchError`); `get_collection` also checks a function you pass in, which Chroma itself
compares by name only. Documents (`__call__`) are refined only when apply_to is "both"; queries
(`embed_query`, what Chroma calls for `query_texts`) always.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import known_embedding_functions, register_embedding_function

from ..refiners.onnx import Refiner
from ..errors import InputError, InputTypeError, RefinerMismatchError
from .refining import refine_documents, refine_queries, resolve_refiner
from .sidecar import RECORD_KEYS, MissingRefinerError, check_record, describe, identity_from_record, refiner_record

NAME = "simskip_faiss_refined"

__all__ = ["NAME", "RefinedEmbeddingFunction", "get_collection"]


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

    def __call__(self, input: Documents) -> Embeddings:
        return list(refine_documents(self.refiner, self.embedding_function(input)))

    def embed_query(self, input: Documents) -> Embeddings:
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

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "RefinedEmbeddingFunction":
        """Rebuild from a collection's stored config: the base function by its registered name, the refiner
        from its path, re-hashed and checked against the record."""
        inner = config.get("embedding_function") or {}
        if inner.get("name") not in known_embedding_functions:
            raise InputError(f"the base embedding function {inner.get('name')!r} is not registered with Chroma "
                             f"(import the module that registers it before opening the collection)")
        base = known_embedding_functions[inner["name"]].build_from_config(inner.get("config") or {})
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

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        if any(old_config.get(k) != new_config.get(k) for k in RECORD_KEYS):
            raise RefinerMismatchError(f"a collection's refiner cannot change: it holds vectors made by "
                                       f"{describe(old_config)}, the update has {describe(new_config)}")


def get_collection(client, name: str, embedding_function: RefinedEmbeddingFunction | None = None):
    """Open a collection made with `RefinedEmbeddingFunction`, its refiner checked.

    Without `embedding_function`, the function is rebuilt from the stored config (refiner file
    re-hashed); with one, its refiner must match the stored record. A collection that records no
    refined function raises `MissingRefinerError`; another refiner, `RefinerMismatchError`.
    """
    stored = (client.get_collection(name).configuration_json or {}).get("embedding_function") or {}
    if stored.get("name") != NAME:
        raise MissingRefinerError(f"Chroma collection {name!r} records no simskip refiner (its embedding "
                                  f"function is {stored.get('name')!r}); refusing to search it with refined queries")
    if embedding_function is None:
        embedding_function = RefinedEmbeddingFunction.build_from_config(stored["config"])
    else:
        check_record(stored["config"], embedding_function.refiner, f"Chroma collection {name!r}")
        theirs, ours = stored["config"].get("embedding_function"), embedding_function.get_config()["embedding_function"]
        if theirs != ours:
            raise RefinerMismatchError(f"Chroma collection {name!r} was embedded with {theirs}, not {ours}")
    return client.get_collection(name, embedding_function=embedding_function)
