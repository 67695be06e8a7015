"""Deprecated: moved to `simskip_faiss.scale.arrow`."""
from ._moved import alias

alias(__name__, "simskip_faiss.scale.arrow")
