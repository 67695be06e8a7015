"""What every command module of the CLI shares: the one-line usage errors, output checks, reading .npy
arguments, writing search results, and the data and training option groups with their readers."""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from ..datasets.container import PROTOCOLS
from ..errors import SimSkipError


class CLIError(SimSkipError):
    """A user error reported as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"simskip-faiss: error: {message} (see '{self.prog} --help')\n")


def check_output(path: str | os.PathLike, kind: str) -> None:
    """Fail before any work if `path` cannot be written: `kind` is "file" or "dir" (a bundle or report).

    The target must not be the other kind, and the nearest existing ancestor must be a directory in
    which a file can be created (tried, then removed: permission bits do not tell root, /proc or a
    read-only mount apart). Missing parents are fine: writers create them.
    """
    p = Path(path)
    if "://" in str(path):  # a URI (Spark, Milvus): checked by its own system
        return
    if kind == "file" and p.is_dir():
        raise CLIError(f"output {p} is a directory; give a file name")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise CLIError(f"output {p} is an existing file; give a directory")
    probe = p if kind == "dir" else p.parent
    probe = probe.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"cannot write {p}: {probe} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".simskip-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CLIError(f"cannot write {p}: cannot create files in {probe} ({e.strerror or e})") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0 (argparse reports anything else as a one-line usage error)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def load_npy(path: str, what: str, mmap: bool = True) -> np.ndarray:
    """The .npy argument `path` (`what` names it in errors), a missing or malformed file as a CLIError."""
    from .. import checks

    try:
        return checks.load_npy(path, what, mmap=mmap)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None


def add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, so the CLI and the Python API cannot drift apart."""
    import typing

    from ..config import DOCUMENT_METHODS, LABEL_LOSSES, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    g = p.add_argument_group("training (TrainConfig; an option left unset is chosen for you, see --help of each)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("progress", "threads"):  # --threads and --quiet are common options
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "guard_tasks":
            g.add_argument(flag, nargs="*", choices=["labels", "pairs"], default=list(default),
                           help="tasks the guard protects (default: every task with validation data)")
        elif f.name == "guard_metrics":
            g.add_argument(flag, nargs="*", default=list(default), metavar="TASK:METRIC",
                           help="metrics held to the no-drop rule, e.g. pairs:ndcg@10 (default: all)")
        elif isinstance(default, tuple):
            g.add_argument(flag, type=float, nargs="+", default=list(default), metavar="A")
        elif f.name == "label_loss":
            g.add_argument(flag, choices=list(LABEL_LOSSES), default=default,
                           help="decoupled (default): same-label rows scored against other labels only; supcon: SupCon")
        elif f.name == "documents":
            g.add_argument(flag, choices=list(DOCUMENT_METHODS), default=default,
                           help="move the stored vectors of documents that training queries found (contrastive, "
                                "the default; mean; none), the step chosen on validation; they travel beside the "
                                "refiner file and `build` applies them by corpus row")
        elif f.name == "pair_mode":
            g.add_argument(flag, choices=["symmetric", "query_only"], default=None,
                           help="default: query_only for pairs alone (the index keeps raw vectors), else symmetric")
        elif default is None:  # optional: "auto" unless given
            kind = next(t for t in typing.get_args(hints[f.name]) if t is not type(None))
            g.add_argument(flag, type=kind, default=None, help="default: chosen for you")
        else:
            g.add_argument(flag, type=type(default), default=default)


def train_config(args):
    """The TrainConfig of the parsed training options (and the common --threads, --quiet)."""
    from ..config import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("progress", "threads")}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # nargs options parse as lists
    return TrainConfig(**kw, threads=args.threads, progress=not args.quiet)


def data_from_args(args, fractions=None, protocol: str | None = None):
    """A named data set (--data) or the user's files (--corpus, --queries, --qrels, --labels)."""
    from .. import datasets

    split = {"fractions": fractions} if fractions else {}
    protocol = protocol or getattr(args, "protocol", None)
    if getattr(args, "corpus", None):
        return datasets.load_user(args.corpus, queries=args.queries, labels=args.labels, qrels=args.qrels,
                                  seed=args.split_seed, protocol=protocol or "shared", **split)
    if args.queries or args.qrels or args.labels:
        raise CLIError("--queries/--qrels/--labels go with --corpus")
    kw = {"seed": args.split_seed, **split}
    if args.data == "wordnet":
        kw.update(n_synsets=args.n_synsets, progress=not args.quiet)
    data = datasets.load(args.data, **kw)
    if protocol == "shared":
        if data.queries is None:
            raise CLIError(f"--protocol shared splits queries, and {args.data} has none")
        data = datasets.shared_corpus(data, args.split_seed, **split)
    return data


def add_data_options(p: argparse.ArgumentParser, default: str = "wordnet") -> None:
    """The data group: a built-in data set or the user's own files, and how they are split."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, choices=["wordnet", "digits", "synthetic"],
                   help=f"a built-in data set (default: {default}); ignored with --corpus")
    g.add_argument("--n-synsets", type=int, default=20000, help="WordNet subset size (default: 20000)")
    g.add_argument("--corpus", help="your corpus embeddings, .npy (n, d)")
    g.add_argument("--queries", help="your query embeddings, .npy (m, d)")
    g.add_argument("--qrels", help="BEIR-style TSV: query_row<TAB>doc_row[<TAB>grade]; grade > 0 is relevant (binary: grades are not gains)")
    g.add_argument("--labels", help="one label per corpus row, .npy")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    g.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                   help="how queries are split: shared (at random over the corpus, as logged pairs are; the default "
                        "for --corpus) or disjoint (a query takes its document's split; the default for built-in "
                        "data, and `run` reports both)")


def write_results(path: str | os.PathLike, D: np.ndarray, I: np.ndarray) -> None:  # noqa: E741
    """Search results as an .npz of arrays D and I, written atomically."""
    from ..persistence import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, D=D, I=I)
    atomic_write_bytes(Path(path), buf.getvalue())
