"""Export a trained refiner to one self-contained ONNX file, verified against torch before it is written.

The file carries its own description in the metadata key "simskip" (dimensions, normalisation,
metric, alpha, precision, training config, package version, guard report), so a refiner is never
separated from what it was made for.

Precision: "fp32" (default, parity with torch to 1e-5), "int8" (dynamic quantisation of the weight
matrices: about half the single-query latency, 4x smaller file) or "fp16" (weights stored in half
precision, computed in fp32: half the file, same speed). The reduced precisions are verified
against torch with the looser tolerance in PARITY_TOLERANCE, and the error measured is stamped
into the file; bench/speed.py measures what they do to 10-recall@10. "auto" (what the CLI ships)
is config.DEFAULT_PRECISION when that passes its check and fp32 when it does not: a refiner that
moves vectors far (label training at alpha 1, say) can exceed int8's tolerance, and then gets the
exact file instead of an error after training, with the reason stamped in `precision_fallback`.

Random inputs catch a broken conversion, not a harmless-looking error that reorders the neighbours
of the user's own vectors (dense clusters, near-ties). Given a `sample` of those vectors, a reduced
precision is also checked where it matters: the 10 nearest neighbours found with it against those
found with fp32 (`sample_recall`, FAISS's 10-recall@10), and "auto" keeps it only at >= SAMPLE_RECALL.
The CLI passes the training corpus.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import DEFAULT_PRECISION
from ..persistence import atomic_write_bytes, plain_name
from ..refiners import METADATA_KEY, Refiner, documents_path
from ..errors import InputError
from .precision import PRECISIONS, _check_precision, convert  # noqa: F401  (PRECISIONS: still importable here)

log = logging.getLogger(__name__)

PARITY_BATCHES = (1, 7, 1000)
# max |refined - torch| on random unit inputs; int8 and fp16 measured at ~6e-4 and ~1e-4 on a
# d=384, hidden=512 model, so these leave a margin without hiding a broken conversion (a refiner
# that moves vectors far can still exceed int8's: precision "auto" then ships fp32). int8's is 5e-3,
# not 1e-2: in bench/speed.py section 9 every int8 refiner with an error up to 1.3e-3 (WordNet,
# synthetic; 3 widths) kept 10-recall@10 >= 0.992 against fp32, while the digits refiners (label
# training at alpha 1, errors 8.8e-3 to 1.3e-2) kept only 0.94-0.97
PARITY_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "int8": 5e-3}
# 10-recall@10 against fp32 that a reduced precision must keep on the user's sample under "auto" (the
# parity target of bench/speed.py); the sample is split into queries and a corpus of these sizes at most
SAMPLE_RECALL = 0.99
SAMPLE_QUERIES, SAMPLE_CORPUS = 1000, 20000


class ParityError(RuntimeError):
    """An exported graph differs from its reference by more than the tolerance of its precision."""


def to_onnx_proto(model, d: int, opset: int = 23):
    """Trace `model` (eval mode) with a dynamic batch dimension into an ONNX ModelProto; `d`: its input dimension.

    A `SimSkip` is traced through `servable` (fewer graph nodes, same function); opset 20 gives
    GELU as one node and opset 23 the normalisation (RMSNormalization). Both shorten single-query
    latency, which is bound by per-node overhead.
    """
    import torch

    model.eval()
    model = servable(model, d)
    example = torch.randn(4, d)
    # the exporter logs about optional torchvision ops and deprecations that do not concern us
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                    input_names=["x"], output_names=["refined"])
    return program.model_proto


def servable(model, d: int):
    """A `SimSkip` rewritten for serving: alpha folded into f's last layer, normalisation as one node.

    Same function as the model (`model.combine` with alpha already in f and the fused normalisation;
    checked here on a probe; any other model is returned unchanged), but its graph drops the alpha
    Mul, and F.normalize's nodes become one RMSNormalization. Measured (onnxruntime 1.32, 384-d, one
    thread): the normalisation's nodes took 11 us per single vector as ReduceL2+Clip+Div and 7 us as
    one node; 440 us and 163 us per 1024 rows.
    """
    import copy

    import torch

    from .model import combine

    class Lean(torch.nn.Module):
        """refined = normalize?(x + f(x)), alpha already inside f."""

        def __init__(self, f: torch.nn.Module, normalize: bool):
            super().__init__()
            self.f, self.normalize = f, normalize

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return combine(x, self.f(x), None, self.normalize, fused_norm=True)

    if callable(getattr(model, "servable", None)):  # a cross-space MapSkip rewrites itself (model.py)
        lean = model.servable()
    elif not (isinstance(getattr(model, "f", None), torch.nn.Sequential) and torch.is_tensor(getattr(model, "alpha", None))):
        return model  # not a SimSkip (nothing else has f and alpha)
    else:
        f = copy.deepcopy(model.f).eval()
        with torch.no_grad():
            f[-1].weight.mul_(model.alpha)
            f[-1].bias.mul_(model.alpha)
        lean = Lean(f, bool(model.normalize)).eval()
    with torch.no_grad():
        probe = torch.randn(16, d, generator=torch.Generator().manual_seed(0))
        same = torch.allclose(lean(probe), model(probe), atol=1e-6, rtol=0)
    return lean if same else model


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


def max_abs_error(reference, onnx_bytes: bytes, d: int, batches=PARITY_BATCHES, seed: int = 0) -> float:
    """Max |onnxruntime(onnx_bytes) - reference| over random unit vectors in batches of the given sizes.

    `reference` maps a float32 (n, d) array to (n, d_out); a shape mismatch raises RuntimeError.
    """
    rt = Refiner(onnx_bytes, threads=1)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in batches:
        x = rng.standard_normal((n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ref, got = reference(x), rt.transform(x)
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX export is wrong: output shape {got.shape} != reference {ref.shape} at batch {n}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def verify(model, onnx_bytes: bytes, d: int, batches=PARITY_BATCHES, tol: float = 1e-5, seed: int = 0) -> float:
    """Max |onnxruntime - torch| over random batches of the given sizes; raises if above `tol`."""
    import torch

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    worst = max_abs_error(reference, onnx_bytes, d, batches, seed)
    if not worst <= tol:
        raise ParityError(f"ONNX export does not match torch: max abs error {worst:.3g} > {tol:g}")
    return worst


def split_sample(sample, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries, corpus) for the neighbour check, from the user's vectors `sample` (n, d), e.g. the corpus.

    At most SAMPLE_QUERIES + SAMPLE_CORPUS seeded random rows are read (a memory-mapped file is fine);
    up to SAMPLE_QUERIES of them, at most half, are the queries and the rest the corpus.
    """
    from ..checks import as_matrix

    sample = sample if hasattr(sample, "shape") else np.asarray(sample)
    n = len(sample)
    m = min(SAMPLE_QUERIES, n // 2)
    if m < k:
        raise InputError(f"the sample has {n} rows; checking {k} nearest neighbours needs at least {2 * k}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, SAMPLE_QUERIES + SAMPLE_CORPUS, replace=False)) if n > SAMPLE_QUERIES + SAMPLE_CORPUS \
        else np.arange(n)
    x = as_matrix(np.asarray(sample[rows]), name="sample")[rng.permutation(len(rows))]  # queries from anywhere
    return x[:m], x[m:]


def sample_recall(fp32: bytes, reduced: bytes, queries: np.ndarray, corpus: np.ndarray, apply_to: str = "both",
                  metric: str = "ip", k: int = 10) -> float:
    """FAISS's k-recall@k of the `reduced` refiner's exact k-NN against the `fp32` refiner's.

    Both refine the queries and the corpus (the corpus stays raw for apply_to="queries", as in the index).
    """
    import faiss

    from ..metrics.ranking import knn_recall

    tops = []
    for onnx_bytes in (fp32, reduced):
        r = Refiner(onnx_bytes, threads=1)
        docs = corpus if apply_to == "queries" else r.transform(corpus)
        tops.append(faiss.knn(r.transform(queries), docs, k,
                              metric=faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)[1])
    return knn_recall(tops[0], tops[1], ks=(k,))[f"{k}-recall@{k}"]


def _sample_check(fp32: bytes, reduced: bytes, rmeta: dict, sample, k: int = 10) -> str | None:
    """Compare the reduced graph's neighbours on `sample` with fp32's and stamp the result in `rmeta`;
    returns why the reduced graph fails (below SAMPLE_RECALL), or None."""
    if sample is None:
        return None
    if len(sample) < 2 * k:
        log.info("the sample has %d rows: too few to compare %d nearest neighbours, not checked", len(sample), k)
        return None
    q, docs = split_sample(sample, k)
    recall = sample_recall(fp32, reduced, q, docs, rmeta["apply_to"], rmeta.get("metric", "ip"), k)
    rmeta.update(sample_recall=recall, sample_queries=len(q), sample_corpus=len(docs))
    if recall >= SAMPLE_RECALL:
        return None
    return (f"{rmeta['precision']} kept {k}-recall@{k} {recall:.4f} < {SAMPLE_RECALL} against fp32 on "
            f"{len(q)} queries over {len(docs)} rows of the sample")


def write_documents(path: str | os.PathLike, meta: dict, documents) -> None:
    """Write `documents` (DocumentUpdates or None) beside the refiner file `path`, named by their content,
    and record them in `meta` ("documents": file, sha256, n, d): the refiner file names and hashes them."""
    meta.pop("documents", None)
    if documents is None:
        return
    data = documents.to_bytes()
    target = documents_path(path, hashlib.sha256(data).hexdigest())
    atomic_write_bytes(target, data)
    meta["documents"] = {**documents.record(), "file": target.name}


def _named_documents(path: Path) -> str | None:
    """The document-updates file a refiner file names, if it is one and names one."""
    try:
        meta = Refiner.load_metadata(path)
    except (OSError, ValueError):
        return None
    return (meta.get("documents") or {}).get("file")


def replace_refiner(path: str | os.PathLike, data: bytes, meta: dict) -> None:
    """Write refiner bytes to `path` atomically; then delete the updates file the replaced refiner named, unless
    this one or another refiner file beside it (*.onnx) still names it."""
    p = Path(path)
    old = _named_documents(p) if p.is_file() else None
    atomic_write_bytes(p, data)
    if old and old != (meta.get("documents") or {}).get("file") and plain_name(old):
        if not any(_named_documents(o) == old for o in p.parent.glob("*.onnx") if o.is_file()):
            (p.parent / old).unlink(missing_ok=True)


def export(model, path: str | os.PathLike, metadata: dict | None = None, opset: int = 23,
           precision: str = "fp32", tol: float | None = None, sample=None, documents=None) -> dict:
    """Export a `SimSkip` model to `path` atomically, after checking it with onnx.checker and onnxruntime.

    The fp32 graph is always checked against torch to 1e-5 first (so a reduced precision never
    hides a broken export); a reduced `precision` is then checked to `tol` (default
    PARITY_TOLERANCE[precision]). Returns the metadata written, including `precision` and the
    measured `parity_max_abs_err` (and `fp32_parity_max_abs_err` for reduced precisions).

    `metadata["apply_to"]` must not contradict how the model was trained (`model.apply_to`): a
    query-only model exported as "both" would refine the documents it was trained to leave raw.
    A fit or train result exports itself with everything filled in: `result.export(path)`.
    precision="auto": DEFAULT_PRECISION if it passes its check, else fp32 with `precision_fallback`
    saying why (an explicit precision that fails raises ValueError and writes nothing).
    `sample`: the user's vectors (e.g. the corpus); a reduced precision's neighbours on it are
    compared with fp32's (`sample_recall`, stamped). Below SAMPLE_RECALL, "auto" falls back to
    fp32; an explicit precision is kept, with a warning (a lossy format was asked for).
    `documents`: document updates (documents.py) written beside the file (`write_documents`) and named in
    its metadata, so that `Refiner.load` and `build` apply them.
    """
    auto = precision == "auto"
    precision = _check_precision(DEFAULT_PRECISION if auto else precision)
    d_out = int(getattr(model, "d_out", 0)) or model.f[-1].out_features  # a MapSkip may change the dimension
    d = int(getattr(model, "d_in", 0)) or d_out  # the input dimension: what the graph is traced and checked with
    trained_for = getattr(model, "apply_to", "both")
    apply_to = (metadata or {}).get("apply_to")
    if apply_to is None and trained_for != "both":
        raise InputError(f"this model was trained to refine {trained_for} only: export it with "
                         f"metadata={{'apply_to': {trained_for!r}}} or use result.export(path)")
    if apply_to == "both" and trained_for == "queries":
        raise InputError(f"apply_to={apply_to!r} but the model was trained for apply_to={trained_for!r}")
    meta = {"format": "simskip-refiner/1", "version": __version__, "d_in": d, "d_out": d_out,
            "normalize": bool(model.normalize), "alpha": float(model.alpha), "apply_to": trained_for}
    meta.update(metadata or {})
    meta["precision"] = "fp32"
    proto = to_onnx_proto(model, d, opset)
    fp32_bytes = with_metadata(proto, meta)  # checked and serialised once: verified here, compared below
    meta["parity_max_abs_err"] = verify(model, fp32_bytes, d)
    if precision != "fp32":
        tol = PARITY_TOLERANCE[precision] if tol is None else float(tol)
        reduced = convert(proto, precision)
        rmeta = dict(meta, precision=precision, parity_tolerance=tol, fp32_parity_max_abs_err=meta["parity_max_abs_err"])
        try:
            reduced_bytes = with_metadata(reduced, rmeta)
            rmeta["parity_max_abs_err"] = verify(model, reduced_bytes, d, tol=tol)
        except ParityError as e:
            if not auto:
                raise InputError(f"{e} at {precision}; export it at another precision, e.g. fp32") from None
            meta["precision_fallback"] = f"{precision} exceeded its parity tolerance ({e}): exported fp32"
            log.warning("%s", meta["precision_fallback"])
        else:
            why = _sample_check(fp32_bytes, reduced_bytes, rmeta, sample)
            if why is None or not auto:
                proto, meta = reduced, rmeta
                if why:
                    log.warning("%s (kept: asked for explicitly)", why)
            else:
                meta["precision_fallback"] = f"{why}: exported fp32"
                log.warning("%s", meta["precision_fallback"])
    write_documents(path, meta, documents)  # first: the refiner file that names them is written last
    data = with_metadata(proto, meta)  # the same graph, stamped with its measured parity
    replace_refiner(path, data, meta)
    log.info("exported %s refiner to %s (parity max abs err %.2e)", meta["precision"], path, meta["parity_max_abs_err"])
    return meta


def _checked_sample(sample, d: int, k: int = 10):
    """`sample` (None, or the user's (n, d) vectors) as an array fit for the k-NN check, or ValueError."""
    if sample is None:
        return None
    arr = sample if hasattr(sample, "shape") and hasattr(sample, "ndim") else np.asarray(sample)
    if arr.ndim != 2 or arr.shape[1] != d or arr.shape[0] < 2 * k:
        raise InputError(f"the sample must be a 2-D (n, {d}) array with at least {2 * k} rows (half are queries "
                         f"whose {k} nearest neighbours are compared), got shape {tuple(arr.shape)}")
    return arr


def quantize(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike, precision: str = "int8",
             tol: float | None = None, sample=None) -> dict:
    """Convert an exported fp32 refiner file to `precision`, verified against the fp32 file itself.

    No torch needed. Raises ValueError if the input is not an fp32 refiner, if `sample` is not a 2-D
    (n, d_in) array of at least 20 rows, or if the converted model differs from the fp32 file by more
    than `tol` (default PARITY_TOLERANCE[precision]): that refiner cannot be quantised at that precision.
    Nothing is written then. Returns the metadata written (with `quantized_from`: the sha256 of the
    fp32 file). `sample` (the user's vectors): its 10-NN are compared with the fp32 file's and
    `sample_recall` is stamped; below SAMPLE_RECALL, a warning (the conversion was asked for).
    """
    import onnx

    _check_precision(precision)
    src = Refiner.load(onnx_in)
    if src.metadata.get("precision", "fp32") != "fp32":
        raise InputError(f"{onnx_in} is already {src.metadata['precision']}; quantize an fp32 refiner")
    tol = PARITY_TOLERANCE[precision] if tol is None else float(tol)
    sample = _checked_sample(sample, src.d_in)
    proto = convert(onnx.load_from_string(src.model_bytes), precision)
    meta = dict(src.metadata, precision=precision, parity_tolerance=tol, quantized_from=src.sha256)
    if "parity_max_abs_err" in meta:  # the fp32 file's error vs torch; below, this file's vs the fp32 file
        meta["fp32_parity_max_abs_err"] = meta.pop("parity_max_abs_err")
    converted = with_metadata(proto, meta)
    worst = max_abs_error(src.transform, converted, src.d_in)
    if not worst <= tol:
        raise InputError(f"{precision} refiner does not match {onnx_in}: max abs error {worst:.3g} > tolerance "
                         f"{tol:g}; this refiner cannot be quantised to {precision} within it: keep the fp32 file "
                         f"or try another precision")
    meta["parity_max_abs_err"] = worst
    why = _sample_check(src.model_bytes, converted, meta, sample)
    if why:
        log.warning("%s", why)
    write_documents(onnx_out, meta, src.documents)  # they travel with the converted file
    replace_refiner(onnx_out, with_metadata(proto, meta), meta)
    log.info("wrote %s refiner %s (max abs err %.2e vs %s)", precision, onnx_out, worst, onnx_in)
    return meta
