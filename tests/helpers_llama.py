"""LlamaIndex's embedding interface over the fake embedding of helpers.py (its own module: llama_index is an
extra, and the class must be importable by name for LlamaIndex's multi-worker ingestion to pickle it)."""
from __future__ import annotations

from llama_index.core.base.embeddings.base import BaseEmbedding

from helpers import fake_embed


class FakeEmbedding(BaseEmbedding):
    """Deterministic unit vectors (helpers.fake_embed): 'q: <doc>' lands near <doc>."""

    model_name: str = "fake"

    def _get_query_embedding(self, query):
        return fake_embed([query])[0].tolist()

    async def _aget_query_embedding(self, query):
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text):
        return fake_embed([text])[0].tolist()

    def _get_text_embeddings(self, texts):
        return fake_embed(texts).tolist()
