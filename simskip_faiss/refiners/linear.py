"""`LinearRefiner`: an affine map (centring, whitening, all-but-the-top, a distilled refiner), and `distil_linear`."""
from __future__ import annotations

import hashlib

import numpy as np

from ..checks import as_matrix, l2_normalize
from ..errors import InputError
from ..faiss_utils import build_index
from .base import BaseRefiner, check_apply_to
from .npyfile import pack, unpack


class LinearRefiner(BaseRefiner):
    """y = normalize?((x - mean) @ A.T + bias): centring, whitening, all-but-the-top, or a distilled linear refiner.

    Linear maps need no ONNX: `to_faiss` puts them inside a native faiss.IndexPreTransform, so
    the whole refined index is one FAISS file with no Python on its search path. `apply_to`
    "queries" maps queries only (stored vectors stay raw; then `to_faiss` does not apply).

    Bytes (`to_bytes`, what a bundle stores): four .npy arrays back to back — a JSON header
    (uint8), A, mean, bias (empty when none) — read with allow_pickle=False. Chosen over a FAISS
    VectorTransform file because that folds the mean into the bias (results change in the last
    bit) and cannot carry the name and metadata; over ONNX because serving needs no `onnx` package.
    """

    kind = "linear"
    suffix = ".npy"
    FORMAT = "simskip-linear-refiner"

    def __init__(self, A: np.ndarray, mean: np.ndarray, normalize: bool = True, name: str = "linear",
                 bias: np.ndarray | None = None, apply_to: str = "both", metadata: dict | None = None):
        self.A = np.ascontiguousarray(A, dtype=np.float32)
        self.mean = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        if self.A.ndim != 2 or self.A.shape[1] != self.mean.shape[0] or self.A.size == 0:
            raise InputError(f"A must be (d_out, d_in) with d_in = len(mean); got {self.A.shape} and {self.mean.shape}")
        self.d_out, self.d_in = self.A.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
        if self.bias is not None and self.bias.shape != (self.d_out,):
            raise InputError(f"bias must have d_out = {self.d_out} entries, got shape {self.bias.shape}")
        for what, arr in (("A", self.A), ("mean", self.mean), ("bias", self.bias)):
            if arr is not None and not np.isfinite(arr).all():
                raise InputError(f"LinearRefiner {what} holds NaN or Inf")
        self.normalize = bool(normalize)
        self.apply_to = check_apply_to(apply_to)
        self.name = name
        self.metadata = {"kind": "linear", "name": name, "d_in": self.d_in, "d_out": self.d_out,
                         "normalize": self.normalize, "apply_to": self.apply_to, **(metadata or {})}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        y = (x - self.mean) @ self.A.T
        if self.bias is not None:
            y += self.bias
        return l2_normalize(y) if self.normalize else y

    def to_bytes(self) -> bytes:
        header = {"format": self.FORMAT, "version": 1, "name": self.name, "normalize": self.normalize,
                  "apply_to": self.apply_to, "metadata": self.metadata}
        return pack(header, (self.A, self.mean, np.empty(0, np.float32) if self.bias is None else self.bias))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "LinearRefiner":
        """Read `to_bytes()` output; anything else raises InputError naming `source`."""
        header, (A, mean, bias) = unpack(data, 3, cls.FORMAT, "linear refiner", source)
        meta = {k: v for k, v in dict(header.get("metadata") or {}).items()
                if k not in ("kind", "name", "d_in", "d_out", "normalize", "apply_to")}
        return cls(A, mean, normalize=bool(header.get("normalize")), name=str(header.get("name", "linear")),
                   bias=bias if bias.size else None, apply_to=header.get("apply_to", "both"), metadata=meta)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with y = normalize?(A x + b): the form faiss.LinearTransform applies."""
        b = -(self.A.astype(np.float64) @ self.mean.astype(np.float64))
        if self.bias is not None:
            b += self.bias
        return self.A, b.astype(np.float32)

    def faiss_transforms(self) -> list:
        """The refiner as FAISS VectorTransforms: a LinearTransform, then L2 normalisation if it normalises."""
        import faiss

        A, b = self.affine()
        lt = faiss.LinearTransform(self.d_in, self.d_out, True)
        faiss.copy_array_to_vector(A.ravel(), lt.A)
        faiss.copy_array_to_vector(b, lt.b)
        lt.is_trained = True
        return [lt] + ([faiss.NormalizationTransform(self.d_out, 2.0)] if self.normalize else [])

    def to_faiss(self, index="Flat", metric="ip"):
        """An empty faiss.IndexPreTransform that applies this refiner before `index`.

        index: a factory string ("Flat", "HNSW32", "IVF1024,Flat") or an empty faiss.Index of
        dimension d_out. Train/add/search it with raw vectors, persist it with faiss.write_index:
        the refiner travels inside the FAISS file.
        """
        import faiss

        if self.apply_to != "both":
            raise InputError("to_faiss applies the map to stored vectors too; this LinearRefiner is query-only")
        inner = build_index(index, self.d_out, metric, self)
        if inner.ntotal:
            raise InputError(f"to_faiss needs an empty index, this one holds {inner.ntotal} vectors")
        *first, last = self.faiss_transforms()
        pre = faiss.IndexPreTransform(last, inner)
        for t in reversed(first):
            pre.prepend_transform(t)
        return pre

    @classmethod
    def centring(cls, x: np.ndarray, normalize: bool = True) -> "LinearRefiner":
        """Subtract the corpus mean (and renormalise): the free baseline SimSkip must beat."""
        x = as_matrix(x)
        return cls(np.eye(x.shape[1], dtype=np.float32), x.mean(0), normalize, "centred")

    @classmethod
    def whitening(cls, x: np.ndarray, normalize: bool = True, eps: float = 1e-5) -> "LinearRefiner":
        """PCA whitening: decorrelate and equalise the variance of every principal direction."""
        x = as_matrix(x)
        mean, (evals, evecs) = x.mean(0), np.linalg.eigh(np.cov(x - x.mean(0), rowvar=False))
        scale = 1.0 / np.sqrt(np.maximum(evals, 0) + eps * max(evals.max(), 1e-12))
        return cls((evecs * scale).T, mean, normalize, "whitened")

    @classmethod
    def all_but_the_top(cls, x: np.ndarray, n_components: int | None = None, normalize: bool = True) -> "LinearRefiner":
        """Mu & Viswanath (ICLR 2018): remove the mean and the top principal directions (default d/100)."""
        x = as_matrix(x)
        d = x.shape[1]
        D = n_components if n_components is not None else max(1, round(d / 100))
        _, evecs = np.linalg.eigh(np.cov(x - x.mean(0), rowvar=False))
        top = evecs[:, ::-1][:, :D]
        return cls(np.eye(d, dtype=np.float32) - top @ top.T, x.mean(0), normalize, f"all-but-the-top({D})")

    def __repr__(self) -> str:
        return (f"LinearRefiner({self.name}, d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize}"
                + (f", apply_to={self.apply_to!r}" if self.apply_to != "both" else "") + ")")


def distil_linear(refiner, sample, ridge: float = 1e-3, name: str = "distilled") -> LinearRefiner:
    """The least-squares affine map x -> refiner(x) on `sample`, as a `LinearRefiner`.

    It keeps the refiner's normalisation, so it can replace it inside a native FAISS index
    (`LinearRefiner.to_faiss`). `ridge` regularises relative to the mean input variance; use a
    sample of several times d_in vectors. The fit's R^2 (share of the refined vectors' variance
    explained) is stamped in the metadata as `fit_r2`: how linear the refiner is on this data.
    """
    x = as_matrix(sample, refiner.d_in, "sample")
    if x.shape[0] < 2:
        raise InputError("distil_linear needs at least 2 sample vectors")
    y = np.asarray(refiner.transform(x), dtype=np.float64)
    x = x.astype(np.float64)
    mu, ybar = x.mean(0), y.mean(0)
    xc, yc = x - mu, y - ybar
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += ridge * max(np.trace(gram) / len(gram), 1e-12)
    W = np.linalg.solve(gram, xc.T @ yc)  # (d_in, d_out)
    resid = yc - xc @ W
    r2 = 1.0 - float((resid ** 2).sum() / max((yc ** 2).sum(), 1e-30))
    return LinearRefiner(W.T, mu, normalize=refiner.normalize, name=name, bias=ybar, apply_to=refiner.apply_to,
                         metadata={"distilled_from": refiner.sha256, "fit_r2": r2, "n_sample": int(x.shape[0])})
