"""Chroma's embedding-function interface over the fake embedding of helpers.py, registered once under
"simskip_test_fake" (its own module: chromadb is an extra; a reopened collection rebuilds it by that name)."""
from __future__ import annotations

from chromadb.api.types import Documents, EmbeddingFunction
from chromadb.utils.embedding_functions import register_embedding_function

from helpers import fake_embed


@register_embedding_function
class FakeEF(EmbeddingFunction[Documents]):
    """Deterministic unit vectors (helpers.fake_embed): 'q: <doc>' lands near <doc>."""

    def __init__(self, dim: int = 16):
        self.dim = dim

    def __call__(self, input):
        return list(fake_embed(input))

    @staticmethod
    def name():
        return "simskip_test_fake"

    def get_config(self):
        return {"dim": self.dim}

    @staticmethod
    def build_from_config(config):
        return FakeEF(**config)
