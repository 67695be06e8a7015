"""Deprecated: moved to `simskip_faiss.metrics.scoring`."""
from ._moved import alias

alias(__name__, "simskip_faiss.metrics.scoring")
