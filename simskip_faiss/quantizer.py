"""Deprecated: moved to `simskip_faiss.scale.quantizer`."""
from ._moved import alias

alias(__name__, "simskip_faiss.scale.quantizer")
