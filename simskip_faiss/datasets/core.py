"""Compatibility: the names other modules still import from `simskip_faiss.datasets.core`, which was split
into container, wordnet, encoding and loaders. Import from `simskip_faiss.datasets` (or those modules)."""
from .container import EmbeddingData, answer_pairs, answered_rows

__all__ = ["EmbeddingData", "answer_pairs", "answered_rows"]
