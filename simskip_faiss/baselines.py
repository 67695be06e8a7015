"""Deprecated: moved to `simskip_faiss.evaluation.baselines`."""
from ._moved import alias

alias(__name__, "simskip_faiss.evaluation.baselines")
