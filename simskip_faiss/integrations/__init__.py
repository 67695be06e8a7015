"""Drop a refiner into the frameworks people reach FAISS through (optional extra `[integrations]`).

Each submodule imports its framework when it is imported itself, never before, so
`import simskip_faiss` (and this package) loads none of them:

- `simskip_faiss.integrations.langchain`: `RefinedEmbeddings`, `save_local` / `load_local`
- `simskip_faiss.integrations.llama_index`: `RefinedEmbedding`, `persist` / `load_index`
- `simskip_faiss.integrations.chroma`: `RefinedEmbeddingFunction`, `get_collection`
- `simskip_faiss.integrations.sentence_transformers`: `append_refiner`, `SimSkipModule`, `load_model`
- `simskip_faiss.integrations.stores`: read a store you have (`*_corpus`), pairs by document id -> `training_data`

Every one applies the same rule as `RefinedIndex`: queries are always refined, documents only
when the refiner's `apply_to` is "both" (a query-only refiner leaves stored vectors raw). And every
one records the refiner (sha256, dimensions, normalisation, apply_to) next to what the framework
persists, refusing to reopen a store with a missing or different refiner
(`RefinerMismatchError`): vectors from two refiners are not comparable, and nothing says so
otherwise.
"""
from ..errors import RefinerMismatchError
from .sidecar import MissingRefinerError, refiner_record

__all__ = ["RefinerMismatchError", "MissingRefinerError", "refiner_record"]
