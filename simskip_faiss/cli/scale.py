"""`spark-refine`, `spark-build` (Spark) and `milvus-ingest`, `milvus-search` (Milvus), with the glue that
turns those systems' errors and logs into the CLI's one-line reports."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path

from ..config import INDEX_TRAIN_SIZE, MERGEABLE_FACTORY, METRICS
from .common import (CLIError, Parser, add_corpus_model_option, corpus_model, load_npy, positive_int,
                     write_results)


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
    from ..refiners import load_refiner

    if str(args.refiner) != "identity":
        return load_refiner(args.refiner, threads=1)
    from pyspark.sql import functions as F

    first = df.select(F.size(vector_col).alias("d")).where(F.col(vector_col).isNotNull()).first()
    if first is None:
        raise CLIError("the input has no vectors")
    return load_refiner(None, d=int(first["d"]))


def _check_corpus_model(args) -> None:
    """`common.corpus_model` for the document column of a Spark job, before Spark starts (a map is a file)."""
    from ..refiners import load_refiner

    if getattr(args, "role", "documents") == "documents" or args.corpus_model:
        refiner = None if str(args.refiner) == "identity" else load_refiner(args.refiner, threads=1)  # not a map
        corpus_model(refiner, args, f"the {args.vector_col} column of {args.input}")


def cmd_spark_refine(args) -> None:
    from ..scale.spark import write_refined

    _check_corpus_model(args)
    with _spark_job(args) as spark:
        refiner = _spark_refiner(args, spark.read.parquet(args.input), args.vector_col)
        n = write_refined(args.input, refiner, args.output, args.vector_col, args.id_col, args.output_col, args.role,
                          spark=spark, partitions=args.partitions)
    print(f"wrote {args.output}: {n} rows refined by {refiner!r}")


def cmd_spark_build(args) -> None:
    from ..scale.spark import build_index

    _check_corpus_model(args)
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
    from ..refiners import load_refiner

    if str(args.refiner) == "identity" and d is None:
        raise CLIError("an identity refiner needs the input dimension")
    refiner = load_refiner(args.refiner, d=d, threads=args.threads)
    if hasattr(args, "corpus_model"):  # ingest: the vectors written
        corpus_model(refiner, args, args.input)
    client = connect(args.uri, token=args.token or os.environ.get("MILVUS_TOKEN"), db_name=args.db)
    new = {k: getattr(args, k) for k in ("index_type", "batch_size") if hasattr(args, k)}  # ingest's; search: defaults
    return RefinedCollection(client, args.collection, refiner, args.metric, create=getattr(args, "create", False), **new)


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
        x = load_npy(args.input, "vectors")
        ids = load_npy(args.ids, "ids", mmap=False) if args.ids else None
        coll = _milvus_collection(args, x.shape[1] if x.ndim == 2 else None)
        n = ingest_npy(coll, src, ids, upsert=args.upsert)
    else:
        if args.ids:
            raise CLIError("--ids goes with .npy input; parquet input has an --id-col")
        coll = _milvus_collection(args, _parquet_dim(args.input, args.vector_col) if args.refiner == "identity" else None)
        n = ingest_parquet(coll, src, args.vector_col, args.id_col, upsert=args.upsert)
    return n, coll


def cmd_milvus_search(args) -> None:
    q = load_npy(args.queries, "queries", mmap=False)
    with _MilvusQuiet(args.verbose), _milvus_errors():
        coll = _milvus_collection(args, q.shape[1] if q.ndim == 2 else None)
        t0 = time.perf_counter()
        D, I = coll.search(q, args.k, filter=args.filter)
        dt = time.perf_counter() - t0
    write_results(args.output, D, I)
    print(f"wrote {args.output}: D, I of shape {I.shape} ({len(q) / dt:.0f} queries/s)")


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register the Spark and Milvus commands."""
    spark = Parser(add_help=False)
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
    add_corpus_model_option(s)
    s.set_defaults(func=cmd_spark_refine, output_kind="dir")

    s = sub.add_parser("spark-build", parents=[common, spark], help="build a refined index bundle on Spark",
                       description="Train the FAISS index on a refined sample on the driver, add each task's rows (parquet "
                                   "row groups read by the Python workers) to a copy of it on the executors, merge "
                                   "the shards and save an ordinary bundle. Ids must be integers, never -1, never "
                                   "twice.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("input", help="parquet file or directory with an integer id column and a vector column")
    s.add_argument("-o", "--output", required=True, help="bundle directory to write")
    s.add_argument("--factory", default=MERGEABLE_FACTORY,
                   help="a mergeable FAISS factory: IVF..., or IDMap,Flat (default: %(default)s)")
    s.add_argument("--metric", default="ip", choices=list(METRICS),
                   help="index metric: inner product (cosine on normalised vectors) or L2 (default: ip)")
    s.add_argument("--train-size", type=positive_int, default=INDEX_TRAIN_SIZE,
                   help="vectors sampled to train IVF/PQ (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    s.add_argument("--quantizer", default="mini-batch", choices=["mini-batch", "flat", "two-level"],
                   help="k-means of the IVF coarse quantizer: mini-batch (default: ~4x fewer CPU-seconds than FAISS's "
                        "flat k-means at large nlist, equal or better recall), flat (FAISS's) or two-level (cheapest, "
                        "lower recall at equal nprobe); see bench/results/scale.md")
    s.add_argument("--shard-dir", help="where executors write shards: a path the driver sees too "
                                       "(default: a temporary directory beside the output)")
    add_corpus_model_option(s)
    s.set_defaults(func=cmd_spark_build, output_kind="dir")

    milvus = Parser(add_help=False)
    g = milvus.add_argument_group("milvus")
    g.add_argument("--uri", default="milvus.db", help="milvus-lite file or server URI (default: milvus.db)")
    g.add_argument("--token", help="server token (default: $MILVUS_TOKEN)")
    g.add_argument("--db", help="database name")
    g.add_argument("--collection", required=True, help="Milvus collection name")
    g.add_argument("--metric", default="ip", choices=list(METRICS),
                   help="index metric: inner product (cosine on normalised vectors) or L2 (default: ip)")

    s = sub.add_parser("milvus-ingest", parents=[common, milvus], help="refine vectors and write them to Milvus",
                       description="Refine INPUT (.npy, or parquet with id and vector columns; other columns become "
                                   "dynamic fields) and insert it into a Milvus collection that records the refiner. "
                                   "All rows are validated before the first write.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("input", help=".npy (n, d), or a parquet file or directory")
    s.add_argument("--ids", help="int64 ids .npy for .npy input (default: row numbers)")
    s.add_argument("--vector-col", default="vector", help="parquet vector column (default: vector)")
    s.add_argument("--id-col", default="id", help="parquet id column (default: id)")
    s.add_argument("--upsert", action="store_true", help="replace rows with the same ids (idempotent re-runs)")
    s.add_argument("--index-type", default="AUTOINDEX", help="Milvus index of a new collection (default: AUTOINDEX)")
    s.add_argument("--batch-size", type=int, default=2000, help="rows per insert request")
    add_corpus_model_option(s)
    s.set_defaults(func=cmd_milvus_ingest, create=True)

    s = sub.add_parser("milvus-search", parents=[common, milvus], help="search a refined Milvus collection",
                       description="Refine QUERIES.npy and search the collection; writes D and I to an .npz file.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity' (must be the collection's)")
    s.add_argument("queries", help="query embeddings .npy (m, d)")
    s.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    s.add_argument("--filter", default="", help="Milvus boolean filter expression")
    s.add_argument("-o", "--output", required=True, help="results .npz (arrays D, I)")
    s.set_defaults(func=cmd_milvus_search, create=False, output_kind="file")
