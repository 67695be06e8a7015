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

from ..config import WORDNET_SYNSETS
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


COMMON_FIELDS = ("progress", "threads")  # TrainConfig fields set by the common options --quiet and --threads


def add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, its help, choices and default read from the field (config.field_help),
    so the CLI and the Python API cannot drift apart."""
    import typing

    from ..config import TrainConfig, field_help

    hints = typing.get_type_hints(TrainConfig)
    g = p.add_argument_group("training (TrainConfig; an option left unset is chosen for you, see --help of each)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in COMMON_FIELDS:
            continue
        text, choices, metavar = field_help(f)
        kw: dict = {"default": f.default, "help": with_default(text, f.default), "metavar": metavar,
                    "choices": list(choices) if choices else None}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):  # nargs options parse as lists; train_config makes them tuples
            kw.update(type=typing.get_args(hints[f.name])[0], nargs="+" if f.default else "*", default=list(f.default))
        else:  # an optional field (None: chosen for you) takes the type it holds when set
            kw["type"] = next(t for t in typing.get_args(hints[f.name]) if t is not type(None)) \
                if f.default is None else type(f.default)
        g.add_argument("--" + f.name.replace("_", "-"), **kw)


def with_default(text: str, default) -> str:
    """A field's help sentence as a flag's help: its default appended unless unset (None or empty, which the
    sentence explains); % escaped for argparse."""
    text = text.rstrip(".").replace("%", "%%")
    if default is None or default == ():
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"


def train_config(args):
    """The TrainConfig of the parsed training options (and the common --threads, --quiet)."""
    from ..config import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in COMMON_FIELDS}
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
    g.add_argument("--n-synsets", type=int, default=WORDNET_SYNSETS, help="WordNet subset size (default: %(default)s)")
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


# -- which model embedded the vectors given with a queries map (training/mapping.py) ---------------------------
CORPUS_MODEL_HELP = ("with a queries map between two models (train-map): which model embedded the input vectors; "
                     "new = the new model's, mapped like the queries (required for such a map)")


def add_corpus_model_option(p: argparse.ArgumentParser, old: bool = False) -> None:
    """`--corpus-model` (`old` too where the vectors can be stored as they are: `build`)."""
    p.add_argument("--corpus-model", choices=["old", "new"] if old else ["new"],
                   help=CORPUS_MODEL_HELP + ("; old = the old model's, stored as they are" if old else ""))


def corpus_model(refiner, args, what: str, old_ok: bool = False) -> str | None:
    """The model that embedded the input vectors (`what` names them) when `refiner` is a queries map: "new" (they go
    through the map) or "old" (stored as they are, where the command allows it). The file cannot tell, and a wrong
    guess is silent when the widths are equal, so the user must say it: CLIError otherwise. None for other refiners
    (and --corpus-model is refused for them)."""
    given = getattr(args, "corpus_model", None)
    if getattr(refiner, "map_direction", None) != "queries":
        if given:
            raise CLIError(f"--corpus-model is for a queries map between two models; {args.refiner} is not one")
        return None
    if not given:
        raise CLIError(f"{args.refiner} maps new-model vectors into the old model's {refiner.d_out}-d space: say which "
                       f"model embedded {what} with --corpus-model new (mapped like the queries)"
                       + (" or --corpus-model old (stored as they are; the bundle serves new-model queries)" if old_ok else
                          "; old-model vectors need no map: store them with 'identity', or build a bundle with "
                          "simskip-faiss build --corpus-model old"))
    return given
