"""Deprecated: moved to `simskip_faiss.training.nudge`."""
from ._moved import alias

alias(__name__, "simskip_faiss.training.nudge")
