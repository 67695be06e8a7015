"""Data: the embedding container every stage reads (`EmbeddingData`), its splits and protocols, and the
loaders of the data sets the package ships with (WordNet with a cached encoder, digits, synthetic, the user's
own `.npy` + labels/qrels)."""
from .core import (DEFAULT_FRACTIONS, PROTOCOLS, SPLITS, EmbeddingData, Encoder, Synset, answer_pairs,
                   answered_rows, default_cache_dir, encode_cached, load, load_digits, load_user, load_wordnet,
                   make_splits, make_synthetic, minilm_identity, parse_qrels, parse_wordnet, shared_corpus,
                   wordnet_dir)

__all__ = ["DEFAULT_FRACTIONS", "PROTOCOLS", "SPLITS", "EmbeddingData", "Encoder", "Synset", "answer_pairs",
           "answered_rows", "default_cache_dir", "encode_cached", "load", "load_digits", "load_user",
           "load_wordnet", "make_splits", "make_synthetic", "minilm_identity", "parse_qrels", "parse_wordnet",
           "shared_corpus", "wordnet_dir"]
