"""sentence-transformers: a refiner as modules appended to a SentenceTransformer, saved and reloaded with it.

    from simskip_faiss.integrations.sentence_transformers import append_refiner, load_model

    model = append_refiner(SentenceTransformer(...), "refiner.onnx")
    model.save("refined-model/")
    model = load_model("refined-model/")

- A linear refiner (`LinearRefiner`: centring, whitening, distilled) becomes the built-in `Dense`
  (+ `Normalize`): `SentenceTransformer(path)` reloads it with no custom code at all.
- An ONNX (MLP) refiner becomes a `SimSkipModule`, which runs the ONNX file with onnxruntime and
  saves it (with its sha256, checked on load) in the module's folder. sentence-transformers >= 6
  imports module classes from outside its own namespace only with `trust_remote_code=True`;
  `load_model` instead hands it this already-imported class, so nothing named by the model's files
  is imported (any other foreign class still needs the flag).
- A query-only refiner goes behind a `Router`: `encode_query` takes the refined route,
  `encode_document` the raw one, and plain `encode()` the document (raw) route — encode queries
  with `encode_query`.
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
    route of a `Router` whose "document" route is empty; `encode_query` refines, `encode_document`
    and plain `encode()` (the default route) return the raw vectors.
    """
    r = resolve_refiner(refiner)
    mods = refiner_modules(r)
    if r.refines_documents:
        tail = mods
    else:
        tail = [Router({"query": mods, "document": []}, default_route="document")]
    for m in tail:
        model.append(m)
    return model


def load_model(path: str | os.PathLike, **kwargs) -> SentenceTransformer:
    """`SentenceTransformer(path, **kwargs)` that resolves `SimSkipModule` to this class without trust_remote_code."""
    loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
    if loader is None:  # sentence-transformers < 6 imports installed classes without the flag
        return SentenceTransformer(str(path), **kwargs)
    return loader(str(path), {MODULE_REF: SimSkipModule}, **kwargs)
