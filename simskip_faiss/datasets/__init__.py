"""Data: the embedding container every stage reads (`EmbeddingData`), its splits and protocols, and the
loaders of the data sets the package ships with (WordNet with a cached encoder, digits, synthetic, the user's
own `.npy` + labels/qrels).

- `container`: EmbeddingData, splits, protocols, answer pairs;
- `wordnet`: the WordNet 3.0 parser and loader;
- `encoding`: the MiniLM encoder, its identity and the embedding cache;
- `loaders`: digits, synthetic, the user's own data, qrels, `load` by name.
"""
from .container import (DEFAULT_FRACTIONS, PROTOCOLS, SPLITS, EmbeddingData, answer_pairs, answered_rows,
                        make_splits, shared_corpus)
from .encoding import Encoder, default_cache_dir, encode_cached, minilm_identity
from .loaders import load, load_digits, load_user, make_synthetic, parse_qrels
from .wordnet import Synset, load_wordnet, parse_wordnet, wordnet_dir

__all__ = ["DEFAULT_FRACTIONS", "PROTOCOLS", "SPLITS", "EmbeddingData", "Encoder", "Synset", "answer_pairs",
           "answered_rows", "default_cache_dir", "encode_cached", "load", "load_digits", "load_user",
           "load_wordnet", "make_splits", "make_synthetic", "minilm_identity", "parse_qrels", "parse_wordnet",
           "shared_corpus", "wordnet_dir"]
