"""Deprecated: moved to `simskip_faiss.scale.spark`."""
from ._moved import alias

alias(__name__, "simskip_faiss.scale.spark")
