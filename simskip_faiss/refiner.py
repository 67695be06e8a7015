"""Run a refiner at serving time with onnxruntime: no torch on this path.

A refiner maps float32 (n, d_in) embeddings to (n, d_out). `Refiner` runs an exported ONNX
file; `IdentityRefiner` is the no-op baseline (optionally L2-normalising) with the same API.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .checks import as_matrix

METADATA_KEY = "simskip"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in place-safe form; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class IdentityRefiner:
    """The raw vectors, unchanged (or only L2-normalised): the baseline every refiner is judged against."""

    is_identity = True
    apply_to = "both"
    sha256 = None

    def __init__(self, d: int, normalize: bool = False):
        if int(d) <= 0:
            raise ValueError(f"dimension must be positive, got {d}")
        self.d_in = self.d_out = int(d)
        self.normalize = bool(normalize)
        self.metadata: dict = {"kind": "identity", "d_in": self.d_in, "d_out": self.d_out,
                               "normalize": self.normalize}

    def transform(self, x) -> np.ndarray:
        return self.apply(as_matrix(x, self.d_in))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """`transform` for input already validated as float32 (n, d_in)."""
        return l2_normalize(x) if self.normalize else x

    __call__ = transform

    def __repr__(self) -> str:
        return f"IdentityRefiner(d={self.d_in}, normalize={self.normalize})"


class Refiner:
    """An exported ONNX refiner run by onnxruntime in bounded-size batches.

    `threads` sets onnxruntime's intra-op pool explicitly (it otherwise takes every core and
    fights FAISS and BLAS for them); `batch_size` bounds the memory of one run.
    """

    is_identity = False

    def __init__(self, model: bytes, threads: int | None = 1, batch_size: int = 4096,
                 source: str = "<bytes>"):
        import onnxruntime as ort

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_bytes = bytes(model)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.batch_size = int(batch_size)
        self.threads = threads
        self.source = source
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(self.model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{source} is not a valid ONNX model: {str(e).splitlines()[0][:200]}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{source}: a refiner has one input (n, d) and one output, "
                             f"got {len(inputs)} inputs and {len(outputs)} outputs")
        self._in, self._out = inputs[0].name, outputs[0].name
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"{source}: refiner input must be float32, model declares {inputs[0].type}")
        raw_meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            self.metadata: dict = json.loads(raw_meta) if raw_meta else {}
        except json.JSONDecodeError:
            raise ValueError(f"{source}: the '{METADATA_KEY}' metadata is not valid JSON") from None
        d_in, d_out = inputs[0].shape[-1], outputs[0].shape[-1]
        self.d_in = int(self.metadata.get("d_in", d_in if isinstance(d_in, int) else 0))
        self.d_out = int(self.metadata.get("d_out", d_out if isinstance(d_out, int) else 0))
        if self.d_in <= 0 or self.d_out <= 0 or len(inputs[0].shape) != 2:
            raise ValueError(f"{source}: cannot tell the refiner's dimensions: input shape "
                             f"{inputs[0].shape}, output shape {outputs[0].shape}")
        self.normalize = bool(self.metadata.get("normalize", False))
        self.apply_to = self.metadata.get("apply_to", "both")
        if self.apply_to not in ("both", "queries"):
            raise ValueError(f"{source}: apply_to must be 'both' or 'queries', got {self.apply_to!r}")

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = 1, batch_size: int = 4096) -> "Refiner":
        """Load an ONNX refiner file; missing, empty and non-ONNX files raise with the path named."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"refiner file not found: {p}")
        data = p.read_bytes()
        if not data:
            raise ValueError(f"{p} is empty, not an ONNX model")
        return cls(data, threads=threads, batch_size=batch_size, source=str(p))

    def transform(self, x) -> np.ndarray:
        """Refine a float32 (n, d_in) array into (n, d_out)."""
        return self.apply(as_matrix(x, self.d_in))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """`transform` for input already validated as C-contiguous float32 (n, d_in)."""
        n = x.shape[0]
        if n <= self.batch_size:
            return self._session.run([self._out], {self._in: x})[0]
        out = np.empty((n, self.d_out), dtype=np.float32)
        for s in range(0, n, self.batch_size):
            out[s:s + self.batch_size] = self._session.run([self._out], {self._in: x[s:s + self.batch_size]})[0]
        return out

    __call__ = transform

    def __repr__(self) -> str:
        a = self.metadata.get("alpha")
        return (f"Refiner({self.source}, d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize}, "
                f"apply_to={self.apply_to}" + (f", alpha={a}" if a is not None else "") + ")")


def load_refiner(path: str | os.PathLike | None, d: int | None = None, threads: int | None = 1,
                 normalize: bool = False):
    """A `Refiner` from an ONNX path, or an `IdentityRefiner(d)` when path is None or 'identity'."""
    if path is None or str(path) == "identity":
        if d is None:
            raise ValueError("an identity refiner needs the dimension d")
        return IdentityRefiner(d, normalize=normalize)
    return Refiner.load(path, threads=threads)


class LinearRefiner:
    """y = normalize?((x - mean) @ A.T): centring, whitening, all-but-the-top, or a distilled linear refiner.

    Linear maps need no ONNX: `to_faiss` puts them inside a native faiss.IndexPreTransform.
    """

    is_identity = False
    apply_to = "both"

    def __init__(self, A: np.ndarray, mean: np.ndarray, normalize: bool = True, name: str = "linear"):
        self.A = np.ascontiguousarray(A, dtype=np.float32)
        self.mean = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        if self.A.ndim != 2 or self.A.shape[1] != self.mean.shape[0]:
            raise ValueError(f"A must be (d_out, d_in) with d_in = len(mean); got {self.A.shape} and {self.mean.shape}")
        self.d_out, self.d_in = self.A.shape
        self.normalize = bool(normalize)
        self.name = name
        self.sha256 = hashlib.sha256(self.A.tobytes() + self.mean.tobytes()).hexdigest()
        self.metadata = {"kind": "linear", "name": name, "d_in": self.d_in, "d_out": self.d_out, "normalize": self.normalize}

    def transform(self, x) -> np.ndarray:
        return self.apply(as_matrix(x, self.d_in))

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = (x - self.mean) @ self.A.T
        return l2_normalize(y) if self.normalize else y

    __call__ = transform

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
        return f"LinearRefiner({self.name}, d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize})"
