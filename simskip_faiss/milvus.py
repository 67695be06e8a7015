"""Deprecated: moved to `simskip_faiss.scale.milvus`."""
from ._moved import alias

alias(__name__, "simskip_faiss.scale.milvus")
