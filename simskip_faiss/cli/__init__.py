"""The `simskip-faiss` command line: `main` (parser, dispatch and one-line error reports) builds its
subcommands from `train`, `serve`, `evaluate` and `scale`; `common` holds what they share."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
