"""LangChain's embedding interface over the test data (its own module: langchain is an extra, so helpers.py
does not import it): the fake embedding of helpers.py, and a model that looks texts up in a table of vectors."""
from __future__ import annotations

import numpy as np
from langchain_core.embeddings import Embeddings

from helpers import fake_embed


class FakeEmbeddings(Embeddings):
    """Deterministic unit vectors (helpers.fake_embed): 'q: <doc>' lands near <doc>."""

    def embed_documents(self, texts):
        return fake_embed(texts).tolist()

    def embed_query(self, text):
        return fake_embed([text])[0].tolist()


class TableEmbeddings(Embeddings):
    """A fake model whose vector of text t is row `rows[t]` of `vectors` (one encoder of the map tests)."""

    def __init__(self, vectors: np.ndarray, rows: dict[str, int]):
        self.vectors, self.rows = vectors, rows

    def embed_documents(self, texts):
        return self.vectors[[self.rows[t] for t in texts]].tolist()

    def embed_query(self, text):
        return self.vectors[self.rows[text]].tolist()
