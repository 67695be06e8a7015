"""Export a trained refiner to one self-contained ONNX file, verified against torch before it is written.

The file carries its own description in the metadata key "simskip" (dimensions, normalisation,
metric, alpha, training config, package version, guard report), so a refiner is never
separated from what it was made for.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .persistence import atomic_write_bytes
from .refiner import METADATA_KEY, Refiner

log = logging.getLogger(__name__)

PARITY_BATCHES = (1, 7, 1000)


def to_onnx_proto(model, d: int, opset: int = 18):
    """Trace `model` (eval mode) with a dynamic batch dimension into an ONNX ModelProto."""
    import torch

    model.eval()
    example = torch.randn(4, d)
    # the exporter logs about optional torchvision ops and deprecations that do not concern us
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                    input_names=["x"], output_names=["refined"])
    return program.model_proto


def with_metadata(proto, metadata: dict) -> bytes:
    """Stamp the refiner's description into the model, check it, and serialise it."""
    import onnx

    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    proto.producer_name = "simskip_faiss"
    proto.producer_version = __version__
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def verify(model, onnx_bytes: bytes, d: int, batches=PARITY_BATCHES, tol: float = 1e-5, seed: int = 0) -> float:
    """Max |onnxruntime - torch| over random batches of the given sizes; raises if above `tol`."""
    import torch

    rt = Refiner(onnx_bytes, threads=1)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in batches:
        x = rng.standard_normal((n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = rt.transform(x)
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX export is wrong: output shape {got.shape} != torch {ref.shape} at batch {n}")
        worst = max(worst, float(np.abs(got - ref).max()))
    if not worst <= tol:
        raise RuntimeError(f"ONNX export does not match torch: max abs error {worst:.3g} > {tol:g}")
    return worst


def export(model, path: str | os.PathLike, metadata: dict | None = None, opset: int = 18) -> dict:
    """Export a `SimSkip` model to `path` atomically, after checking it with onnx.checker and onnxruntime.

    Returns the metadata written, including the measured parity error (`parity_max_abs_err`).
    """
    d = model.f[-1].out_features
    meta = {"format": "simskip-refiner/1", "version": __version__, "d_in": d, "d_out": d,
            "normalize": bool(model.normalize), "alpha": float(model.alpha), "apply_to": "both"}
    meta.update(metadata or {})
    proto = to_onnx_proto(model, d, opset)
    meta["parity_max_abs_err"] = verify(model, with_metadata(proto, meta), d)
    data = with_metadata(proto, meta)  # the same graph, stamped with its measured parity
    atomic_write_bytes(Path(path), data)
    log.info("exported refiner to %s (parity max abs err %.2e)", path, meta["parity_max_abs_err"])
    return meta
