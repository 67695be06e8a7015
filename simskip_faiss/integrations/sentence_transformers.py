"""sentence-transformers: a refiner as modules appended to a SentenceTransformer, saved and reloaded with it.

    from simskip_faiss.integrations.sentence_transformers import append_refiner, load_model

    model = append_refiner(SentenceTransformer(...), "refiner.onnx")
    model.save("refined-model/")
    model = load_model("refined-model/")     # or SentenceTransformer("refined-model/", trust_remote_code=True)

- A linear refiner (`LinearRefiner`: centring, whitening, distilled) becomes the built-in `Dense`
  (+ `Normalize`): `SentenceTransformer(path)` reloads it with no custom code at all.
- An ONNX (MLP) refiner becomes a `SimSkipModule`, which runs the ONNX file with onnxruntime and
  saves it (with its sha256, checked on load) in the module's folder. sentence-transformers >= 6
  imports module classes from outside its own namespace only with `trust_remote_code=True`, and that
  flag also lets a model folder run code of its own (transformers' dynamic modules); `load_model`
  instead hands sentence-transformers this already-imported class, so nothing named by the model's
  files is imported (any other foreign class still needs the flag).

Symmetric refiner (apply_to "both"): the modules run on every encode path (`encode`,
`encode_query`, `encode_document`, any `prompt_name` or `task`), so any framework wrapper of the
saved model (Chroma's `SentenceTransformerEmbeddingFunction`, LangChain's `HuggingFaceEmbeddings`)
gets the vectors `RefinedIndex` would store and search with.

Query-only refiner (apply_to "queries"): one model serves both sides only if every call says which
side it encodes. The modules sit on the "query" route of a `Router` whose "document" route is empty
and which has NO default route: `encode_query` / `encode(task="query")` refine, `encode_document` /
`encode(task="document")` return the raw vectors, and every call that names no task (plain
`encode()`, `encode(prompt_name="query")`, Chroma's and LangChain's sentence-transformers wrappers,
which call plain `encode()`) raises sentence-transformers' one-line "Could not determine route"
error instead of returning raw query vectors. Do not give that Router a default route: pass
`task=`, or in LangChain / LlamaIndex / Chroma wrap the base model with this package's wrappers
(`RefinedEmbeddings`, `RefinedEmbedding`, `RefinedEmbeddingFunction`), which apply the refiner
to queries only. A model saved by an earlier release routed plain `encode()` to the raw document
route; such a model reopens without that default however it is loaded when its refiner is ONNX (the
module removes it), and through `load_model` when it is linear; `model.save` then rewrites it.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from ..persistence import atomic_write_bytes
from ..errors import InputTypeError
from .refining import resolve_refiner
from .sidecar import MissingRefinerError, check_record, refiner_record

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import Module
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Router
except ImportError:  # pragma: no cover - older layout
    from sentence_transformers.models import Dense, Module, Normalize, Router

__all__ = ["SimSkipModule", "refiner_modules", "append_refiner", "load_model"]

MODULE_REF = f"{__name__}.SimSkipModule"


class SimSkipModule(Module):
    """Runs an ONNX refiner (onnxruntime, no torch autograd) on `sentence_embedding`.

    Saved as `refiner.onnx` plus `config.json` recording its sha256, dimensions, normalisation and
    apply_to; loading refuses a missing or different file. The module always refines: a
    query-only refiner is applied only on the query route of a `Router` (see `append_refiner`).
    """

    ONNX_FILE = "refiner.onnx"

    def __init__(self, refiner, threads: int | None = 1):
        super().__init__()
        self.refiner = resolve_refiner(refiner, threads)
        if self.refiner.kind != "onnx":
            raise InputTypeError(f"SimSkipModule runs ONNX refiners; {type(self.refiner).__name__} is not one "
                            f"(a linear refiner becomes a built-in Dense: use refiner_modules)")

    def forward(self, features: dict, **kwargs) -> dict:
        x = features["sentence_embedding"]
        y = self.refiner.transform(np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()))
        features["sentence_embedding"] = torch.from_numpy(y).to(device=x.device, dtype=x.dtype)
        return features

    def get_embedding_dimension(self) -> int:
        return self.refiner.d_out

    def on_model_ready(self, model) -> None:
        """Called by sentence-transformers >= 6 once a model holding this module is built or loaded (however it is
        loaded): a query-only refiner's Router saved by an earlier release loses its raw default route here."""
        hook = getattr(super(), "on_model_ready", None)
        if hook is not None:
            hook(model)
        if not self.refiner.refines_documents:
            _drop_raw_default(model)

    get_sentence_embedding_dimension = get_embedding_dimension  # older sentence-transformers

    def get_config_dict(self) -> dict:
        return refiner_record(self.refiner)

    def save(self, output_path: str, *args, **kwargs) -> None:
        atomic_write_bytes(os.path.join(output_path, self.ONNX_FILE), self.refiner.to_bytes())
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> "SimSkipModule":
        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, **hub)
        where = f"{os.path.join(model_name_or_path, subfolder)}"
        path = cls.load_file_path(model_name_or_path, cls.ONNX_FILE, **hub)
        if path is None:
            raise MissingRefinerError(f"{where}: the refiner file {cls.ONNX_FILE} is missing")
        if "sha256" not in config:
            raise MissingRefinerError(f"{where}: config.json records no refiner (sha256, dimensions)")
        module = cls(path)
        check_record(config, module.refiner, where)
        return module

    def __repr__(self) -> str:
        return f"SimSkipModule({self.refiner!r})"


def refiner_modules(refiner) -> list:
    """The refiner as sentence-transformers modules (applied unconditionally; see `append_refiner` for apply_to)."""
    r = resolve_refiner(refiner)
    if r.kind == "identity":
        mods = []
    elif r.kind == "linear":
        A, b = r.affine()
        mods = [Dense(r.d_in, r.d_out, bias=True, activation_function=None,
                      init_weight=torch.from_numpy(A.copy()), init_bias=torch.from_numpy(b.copy()))]
    else:
        return [SimSkipModule(r)]  # normalises inside the ONNX graph
    return mods + ([Normalize()] if r.normalize else [])


def append_refiner(model: SentenceTransformer, refiner) -> SentenceTransformer:
    """Append `refiner` to `model` (in place; returned for chaining), honouring its apply_to.

    apply_to "both": the refiner modules run on every encode. "queries": they sit on the "query"
    route of a `Router` with an empty "document" route and no default route: `encode_query` refines,
    `encode_document` returns the raw vectors, and a call naming no task (plain `encode()`,
    `prompt_name=` alone) raises instead of returning raw query vectors (module docstring).
    """
    r = resolve_refiner(refiner)
    mods = refiner_modules(r)
    if r.refines_documents:
        tail = mods
    else:
        tail = [Router({"query": mods, "document": []}, default_route=None, allow_empty_key=False)]
    for m in tail:
        model.append(m)
    return model


_REFINER_TYPES = (SimSkipModule, Dense, Normalize)


def _drop_raw_default(model: SentenceTransformer) -> SentenceTransformer:
    """A model saved by an earlier `append_refiner` with a query-only refiner routed a call naming no task to
    the raw "document" route (raw query vectors from plain `encode()`): remove that default route, so such a
    call raises as it does for models saved now. Only the Router `append_refiner` writes is touched: routes
    "query" (refiner modules only) and "document" (empty)."""
    for module in model:
        if not isinstance(module, Router) or module.default_route is None:
            continue
        routes = {name: list(seq) for name, seq in module.sub_modules.items()}
        if set(routes) == {"query", "document"} and not routes["document"] and routes["query"] \
                and all(isinstance(m, _REFINER_TYPES) for m in routes["query"]):
            module.default_route = None
            module.allow_empty_key = False  # else a reload of the saved model takes the first route as default
    return model


def load_model(path: str | os.PathLike, **kwargs) -> SentenceTransformer:
    """`SentenceTransformer(path, **kwargs)` that resolves `SimSkipModule` to this class without trust_remote_code.

    The public way, `SentenceTransformer(path, trust_remote_code=True)`, also reloads these models (the
    class is importable from the installed package), but that flag lets the model folder run its own code
    too; sentence-transformers offers no public way to trust one installed class only, so this uses its
    `_load_with_module_classes` (private, documented there for classes that are "already imported").
    """
    loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
    if loader is None:  # sentence-transformers < 6 imports installed classes without the flag; a later one
        # without this method raises its own error naming trust_remote_code=True, which then loads it
        return _drop_raw_default(SentenceTransformer(str(path), **kwargs))
    return _drop_raw_default(loader(str(path), {MODULE_REF: SimSkipModule}, **kwargs))
