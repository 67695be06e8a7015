"""Deprecated: moved to `simskip_faiss.training.export`."""
from ._moved import alias

alias(__name__, "simskip_faiss.training.export")
