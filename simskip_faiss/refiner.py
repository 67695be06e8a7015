"""Deprecated: moved to `simskip_faiss.refiners.core`."""
from ._moved import alias

alias(__name__, "simskip_faiss.refiners.core")
