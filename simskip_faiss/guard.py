"""Deprecated: moved to `simskip_faiss.training.guard`."""
from ._moved import alias

alias(__name__, "simskip_faiss.training.guard")
