"""Refine at ingest on Spark, and build a refined FAISS bundle from shards built in parallel.

- `refine_dataframe`: a lazy DataFrame whose vector column has gone through the ONNX refiner, in
  Arrow batches (`mapInArrow`). The ONNX bytes are broadcast once; each Python worker process
  keeps one onnxruntime session (1 thread: one task per core, no oversubscription).
- `write_refined`: validate every row first, then write parquet to a staging path and rename it:
  a bad row (null or wrong-length vector, NaN/Inf, null id) fails with its id and writes nothing.
- `build_index`: train the FAISS index on a refined sample on the driver, ship the trained empty
  index (`faiss.serialize_index`) to every partition, add each partition's refined vectors to its
  own copy and write it as a shard, then `merge_from` the shards in partition order into one
  index saved as an ordinary bundle (`RefinedIndex.load` opens it). Same trained index and same
  rows give the same search results as `RefinedIndex.add_with_ids` on one machine.

pyspark and pyarrow are imported lazily: `arrow_vectors` and the merge need only pyarrow/faiss.
The package must be importable on the executors (installed there, or shipped with --py-files).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from .index import RefinedIndex
from .refiner import IdentityRefiner, Refiner

MAX_LISTED = 10  # bad rows named in one error message
_WORKER_CACHE: dict[str, Any] = {}  # per Python worker process: refiners and trained templates by sha256


class BadRowsError(ValueError):
    """Rows that cannot be refined; `rows` holds (id, problem) pairs, the message names the first ones."""

    def __init__(self, rows: list[tuple[Any, str]], total: int | None = None, what: str = "input"):
        self.rows = list(rows)
        self.total = len(self.rows) if total is None else int(total)
        listed = "; ".join(f"id {i!r}: {p}" for i, p in self.rows[:MAX_LISTED])
        more = f" (and {self.total - min(len(self.rows), MAX_LISTED)} more)" if self.total > MAX_LISTED else ""
        super().__init__(f"{what} has {self.total} bad row(s), nothing was written: {listed}{more}")


# -- Arrow <-> numpy, shared by the Spark workers and parquet ingest --------------------------------
def _bad_rows(col, d: int) -> list[tuple[int, str]]:
    """(position, problem) for null vectors, wrong lengths and null/NaN/Inf values in an Arrow list column."""
    import pyarrow.compute as pc

    bad: dict[int, str] = {}
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(nulls):
        bad[int(i)] = "null vector"
    for i in np.flatnonzero(~nulls & (lengths != d)):
        bad[int(i)] = f"length {int(lengths[i])}, expected {d}"
    ok = ~nulls & (lengths == d)
    if ok.any():
        vals = col.filter(ok).flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        finite = np.isfinite(vals.reshape(-1, d)).all(axis=1)  # nulls inside a vector became NaN
        for i in np.flatnonzero(ok)[~finite]:
            bad[int(i)] = "null, NaN or Inf value"
    return sorted(bad.items())


def arrow_vectors(col, d: int, ids=None, what: str = "input") -> np.ndarray:
    """An Arrow list / fixed-size-list column of floats as C-contiguous float32 (n, d).

    Raises BadRowsError naming the ids (`ids`: an Arrow array or sequence, positions if None) of
    every null vector, wrong-length vector and vector holding a null, NaN or Inf.
    """
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise TypeError(f"{what}: the vector column must be a list of floats, got Arrow type {col.type}")
    if not pa.types.is_floating(col.type.value_type):
        raise TypeError(f"{what}: vectors must hold floats, got {col.type.value_type}")
    n = len(col)
    lengths_ok = col.null_count == 0 and (pa.types.is_fixed_size_list(col.type) and col.type.list_size == d
                                          or n == 0 or _all_equal(col, d))
    if lengths_ok:
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(n, d)
        if np.isfinite(x).all():
            return np.ascontiguousarray(x, dtype=np.float32)
    bad = _bad_rows(col, d)
    id_list = ids.to_pylist() if hasattr(ids, "to_pylist") else ids
    raise BadRowsError([(id_list[i] if id_list is not None else i, p) for i, p in bad], what=what)


def _all_equal(col, d: int) -> bool:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(col)
    return pc.min(lengths).as_py() == d and pc.max(lengths).as_py() == d


def to_arrow_list(x: np.ndarray):
    """float32 (n, d) -> Arrow list<float> (what Spark's ArrayType(FloatType) maps to)."""
    import pyarrow as pa

    n, d = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if n * d < 2**31 else
                       np.arange(0, (n + 1) * d, d, dtype=np.int64))
    values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return (pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray).from_arrays(offsets, values)


# -- shipping the refiner to the workers ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RefinerSpec:
    """What a worker needs to rebuild the refiner: a sha256 key and a broadcast of the ONNX bytes."""

    key: str
    d_in: int
    d_out: int
    apply_to: str
    normalize: bool
    payload: Any = None  # Broadcast[bytes] or _Held[bytes]; None for the identity


@dataclasses.dataclass(frozen=True)
class _Held:
    """Stand-in for a Broadcast where there is no SparkContext (Spark Connect): shipped in the closure."""

    value: Any


def _ship(spark, data: bytes):
    """Broadcast `data` once per executor; under Spark Connect, fall back to shipping it with each task."""
    try:
        return spark.sparkContext.broadcast(data)
    except Exception:  # Spark Connect has no SparkContext
        return _Held(data)


def refiner_spec(spark, refiner) -> RefinerSpec:
    """Describe an ONNX `Refiner` or an `IdentityRefiner` so that workers can rebuild it."""
    if isinstance(refiner, IdentityRefiner):
        return RefinerSpec(f"identity:{refiner.d_in}:{refiner.normalize}", refiner.d_in, refiner.d_out,
                           "both", refiner.normalize)
    if not isinstance(refiner, Refiner):
        raise TypeError(f"Spark refinement needs an ONNX Refiner or an IdentityRefiner, got {type(refiner).__name__}")
    return RefinerSpec(refiner.sha256, refiner.d_in, refiner.d_out, refiner.apply_to, refiner.normalize,
                       _ship(spark, refiner.model_bytes))


def worker_refiner(spec: RefinerSpec):
    """The refiner for `spec`, built once per Python worker process (onnxruntime 1 thread) and cached."""
    r = _WORKER_CACHE.get(spec.key)
    if r is None:
        if spec.payload is None:
            r = IdentityRefiner(spec.d_in, normalize=spec.normalize)
        else:
            r = Refiner(spec.payload.value, threads=1, source=f"refiner {spec.key[:16]}")
            if r.sha256 != spec.key:
                raise RuntimeError(f"refiner bytes arrived corrupted on the worker (sha256 {r.sha256[:16]}…)")
        _WORKER_CACHE[spec.key] = r
    return r


def _refine(spec: RefinerSpec, x: np.ndarray, role: str) -> np.ndarray:
    """Refine queries always; documents only when the refiner applies to both (query-only stores raw)."""
    if role == "documents" and spec.apply_to == "queries":
        return x
    return worker_refiner(spec).apply_unchecked(x)


# -- Spark helpers ------------------------------------------------------------------------------------
def session(master: str = "local[2]", app_name: str = "simskip-faiss", conf: dict | None = None):
    """A SparkSession set up for refinement: no UI, small Arrow batches, 1 BLAS/OpenMP thread per task.

    In local mode the Python workers use this interpreter (so they see the same venv).
    """
    from pyspark.sql import SparkSession

    if master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                "spark.sql.execution.arrow.maxRecordsPerBatch": "4096", "spark.python.worker.reuse": "true",
                "spark.sql.shuffle.partitions": "8", "spark.task.cpus": "1",
                **{f"spark.executorEnv.{v}": "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
                **(conf or {})}
    builder = SparkSession.builder.master(master).appName(app_name)
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    try:
        spark.sparkContext.setLogLevel("ERROR")
    except Exception:  # Spark Connect
        pass
    return spark


def _check_columns(df, vector_col: str, id_col: str | None, integer_ids: bool = False) -> None:
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    if vector_col not in fields:
        raise ValueError(f"no vector column {vector_col!r}; columns are {list(fields)}")
    vt = fields[vector_col]
    if not (isinstance(vt, T.ArrayType) and isinstance(vt.elementType, (T.FloatType, T.DoubleType))):
        raise TypeError(f"vector column {vector_col!r} must be array<float> or array<double>, got {vt.simpleString()}")
    if id_col is not None:
        if id_col not in fields:
            raise ValueError(f"no id column {id_col!r}; columns are {list(fields)}")
        if integer_ids and not isinstance(fields[id_col], (T.LongType, T.IntegerType, T.ShortType, T.ByteType)):
            raise TypeError(f"FAISS ids must be integers; id column {id_col!r} is {fields[id_col].simpleString()}")


def validate(df, d: int, vector_col: str = "vector", id_col: str | None = "id", limit: int = MAX_LISTED) -> int:
    """Count the rows, or raise BadRowsError naming bad ones: null id, null vector, length != d, null/NaN/Inf.

    Runs as Spark SQL (no Python UDF): one pass over the data, plus one more only when rows are bad.
    """
    from pyspark.sql import functions as F

    v = F.col(vector_col)
    problem = (F.when(v.isNull(), F.lit("null vector"))
               .when(F.size(v) != d, F.concat(F.lit("length "), F.size(v).cast("string"), F.lit(f", expected {d}")))
               .when(F.exists(v, lambda e: e.isNull() | F.isnan(e) | (F.abs(e) == F.lit(float("inf")))),
                     F.lit("null, NaN or Inf value")))
    if id_col is not None:
        problem = F.when(F.col(id_col).isNull(), F.lit("null id")).otherwise(problem)
    checked = df.select((F.col(id_col) if id_col else F.lit(None)).alias("_id"), problem.alias("_problem"))
    counts = checked.agg(F.count(F.lit(1)).alias("n"), F.count("_problem").alias("bad")).collect()[0]
    if counts["bad"]:
        rows = checked.where(F.col("_problem").isNotNull()).limit(limit).collect()
        raise BadRowsError([(r["_id"], r["_problem"]) for r in rows], total=counts["bad"])
    return int(counts["n"])


def refine_dataframe(df, refiner, vector_col: str = "vector", id_col: str | None = "id",
                     output_col: str | None = None, role: str = "documents"):
    """A lazy DataFrame with `vector_col` refined into `output_col` (default: in place) as array<float>.

    Every other column is kept. role="documents" leaves vectors raw for a query-only refiner (as
    RefinedIndex does); role="queries" always refines. Bad rows raise BadRowsError (with ids) in the
    task that meets them: call `validate` first, or use `write_refined`, to fail before anything runs.
    """
    from pyspark.sql import types as T

    if role not in ("documents", "queries"):
        raise ValueError(f"role must be 'documents' or 'queries', got {role!r}")
    _check_columns(df, vector_col, id_col)
    out = output_col or vector_col
    spec = refiner_spec(df.sparkSession, refiner)
    field = T.StructField(out, T.ArrayType(T.FloatType(), containsNull=False), True)
    names = [f.name for f in df.schema.fields]
    schema = T.StructType([field if f.name == out else f for f in df.schema.fields] + ([] if out in names else [field]))
    return df.mapInArrow(_refine_batches(spec, vector_col, id_col, out, role), schema)


def _refine_batches(spec: RefinerSpec, vector_col: str, id_col: str | None, out: str, role: str) -> Callable:
    """The mapInArrow function: Arrow batch in, same batch with the refined column out."""
    def run(batches: Iterator) -> Iterator:
        for b in batches:
            x = arrow_vectors(b.column(vector_col), spec.d_in, b.column(id_col) if id_col else None)
            y = to_arrow_list(_refine(spec, x, role))
            names = b.schema.names
            yield b.set_column(names.index(out), out, y) if out in names else b.append_column(out, y)
    return run


def _local_path(uri: str) -> Path | None:
    """A local filesystem path for 'path' or 'file:/path'; None for other schemes (hdfs:, s3a:, ...)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("file:"):
        return Path(uri[len("file:"):])
    return None if "://" in uri else Path(uri)


def _rename(spark, src: str, dst: str) -> None:
    """Move the staged output into place: os.replace locally, the Hadoop FileSystem otherwise."""
    ls, ld = _local_path(src), _local_path(dst)
    if ls is not None and ld is not None:
        os.replace(ls, ld)
        return
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path
    fs = hpath(src).getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if not fs.rename(hpath(src), hpath(dst)):
        raise OSError(f"could not move staged output {src} to {dst}")


def write_refined(df, refiner, output: str | os.PathLike, vector_col: str = "vector", id_col: str | None = "id",
                  output_col: str | None = None, role: str = "documents") -> int:
    """Validate all rows, refine, and write parquet to `output` (which must not exist); return the row count.

    The data is written to a staging directory beside `output` and renamed only after the Spark job
    succeeded, so a failure at any point leaves no `output` at all.
    """
    output = str(output)
    lp = _local_path(output)
    if lp is not None and lp.exists():
        raise FileExistsError(f"output {output} already exists")
    n = validate(df, refiner.d_in, vector_col, id_col)
    refined = refine_dataframe(df, refiner, vector_col, id_col, output_col, role)
    stage = f"{output.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    try:
        refined.write.mode("errorifexists").parquet(stage)
        _rename(df.sparkSession, stage, output)
    finally:
        sp = _local_path(stage)
        if sp is not None and sp.exists():
            shutil.rmtree(sp, ignore_errors=True)
    return n


# -- distributed FAISS build ----------------------------------------------------------------------
@dataclasses.dataclass
class BuildResult:
    """A distributed build: the refined index (saved as a bundle) and where the time went."""

    index: RefinedIndex
    n: int
    shards: list[tuple[int, int]]  # (partition, vectors) of each merged shard
    seconds: dict[str, float]
    shard_paths: list[str] = dataclasses.field(default_factory=list)  # kept shard files (keep_shards=True)


def _template_key(template: bytes) -> str:
    import hashlib

    return "index:" + hashlib.sha256(template).hexdigest()


def _check_mergeable(index: faiss.Index, sample: np.ndarray) -> None:
    """Fail on the driver, before any Spark work, if this index type cannot take ids or be merged."""
    a, b = faiss.clone_index(index), faiss.clone_index(index)
    try:
        a.add_with_ids(sample[:1], np.array([0], dtype=np.int64))
        b.add_with_ids(sample[:1], np.array([1], dtype=np.int64))
        a.merge_from(b, 0)
    except RuntimeError as e:
        raise ValueError(f"{type(index).__name__} cannot be built from shards (it needs add_with_ids and "
                         f"merge_from: use an IVF factory, or 'IDMap,Flat'): {str(e).strip().splitlines()[-1]}") from None


def _sample(df, n: int, size: int, seed: int, vector_col: str, d: int) -> np.ndarray:
    """About `size` raw vectors drawn uniformly (deterministic for a seed and a partitioning) to the driver."""
    part = df.select(vector_col)
    if size < n:
        part = part.sample(False, min(1.0, 1.2 * size / n), seed).limit(size)
    table = part.toArrow()
    return arrow_vectors(table.column(vector_col), d, what="training sample")


def build_index(df, refiner, output: str | os.PathLike, factory: str | None = None, metric: str = "ip",
                vector_col: str = "vector", id_col: str = "id", train_size: int = 100_000, seed: int = 0,
                trained_index: faiss.Index | None = None, shard_dir: str | os.PathLike | None = None,
                keep_shards: bool = False) -> BuildResult:
    """Refine `df` on Spark, add each partition to a copy of the trained index, merge, save a bundle.

    factory: a mergeable FAISS factory string (default "IVF1024,Flat"), trained on a refined sample of
    `train_size` rows on the driver; with `trained_index` (an empty, trained FAISS index used as is)
    it is only recorded in the manifest. shard_dir: where partitions write their shards — a path
    that the executors and the driver both see (local in local mode; a shared mount on a cluster).
    Shards go to a fresh subdirectory of it (default: beside `output`), removed after the merge
    unless keep_shards.
    """
    t0 = time.perf_counter()
    if trained_index is not None:
        if trained_index.ntotal:
            raise ValueError(f"trained_index must be empty, it holds {trained_index.ntotal} vectors")
        ri = RefinedIndex(refiner, trained_index, metric)
        ri.factory = factory
    else:
        ri = RefinedIndex(refiner, factory or "IVF1024,Flat", metric)
    _check_columns(df, vector_col, id_col, integer_ids=True)
    n = validate(df, refiner.d_in, vector_col, id_col)
    if n == 0:
        raise ValueError("the input has no rows")
    seconds = {"validate": time.perf_counter() - t0}
    t = time.perf_counter()
    sample = _sample(df, n, 1 if ri.is_trained else min(train_size, n), seed, vector_col, refiner.d_in)
    if not ri.is_trained:
        ri.train(sample)
    _check_mergeable(ri.index, ri.refine_documents(sample[:1]))
    seconds["train"] = time.perf_counter() - t
    sdir = Path(shard_dir or Path(output).parent) / f".shards-{uuid.uuid4().hex[:8]}"
    sdir.mkdir(parents=True)
    try:
        t = time.perf_counter()
        shards = add_shards(df, refiner, ri.index, sdir, vector_col, id_col)
        seconds["refine_add"] = time.perf_counter() - t
        t = time.perf_counter()
        ri.index = merge_shards(ri.index, [p for _, p, _ in shards])
        if ri.ntotal != n:
            raise RuntimeError(f"merged index holds {ri.ntotal} vectors, the input has {n} rows")
        seconds["merge"] = time.perf_counter() - t
        t = time.perf_counter()
        ri.save(output)
        seconds["save"] = time.perf_counter() - t
    finally:
        if not keep_shards:
            shutil.rmtree(sdir, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t0
    return BuildResult(ri, n, [(pid, k) for pid, _, k in shards], seconds,
                       [p for _, p, _ in shards] if keep_shards else [])


def add_shards(df, refiner, trained: faiss.Index, shard_dir: Path, vector_col: str = "vector",
               id_col: str = "id") -> list[tuple[int, str, int]]:
    """Each partition refines its rows, adds them with their ids to a copy of `trained`, writes a shard.

    Returns (partition, path, ntotal) per non-empty shard, in partition order.
    """
    from pyspark.sql import types as T

    template = faiss.serialize_index(trained).tobytes()
    spark = df.sparkSession
    job = _ShardJob(refiner_spec(spark, refiner), _ship(spark, template), _template_key(template),
                    str(Path(shard_dir).resolve()), vector_col, id_col)
    schema = T.StructType([T.StructField("partition", T.IntegerType()), T.StructField("path", T.StringType()),
                           T.StructField("ntotal", T.LongType())])
    rows = df.select(id_col, vector_col).mapInArrow(job, schema).collect()
    return sorted((r["partition"], r["path"], r["ntotal"]) for r in rows if r["ntotal"])


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    """The mapInArrow function of `add_shards` (a picklable object, not a closure)."""

    spec: RefinerSpec
    template: Any  # Broadcast[bytes] of faiss.serialize_index(trained empty index)
    template_key: str
    shard_dir: str
    vector_col: str
    id_col: str

    def empty_index(self) -> faiss.Index:
        """A fresh copy of the trained empty index (deserialised once per worker process, cloned per task)."""
        base = _WORKER_CACHE.get(self.template_key)
        if base is None:
            base = faiss.deserialize_index(np.frombuffer(self.template.value, dtype=np.uint8))
            _WORKER_CACHE[self.template_key] = base
        return faiss.clone_index(base)

    def __call__(self, batches: Iterator) -> Iterator:
        import pyarrow as pa
        from pyspark import TaskContext

        faiss.omp_set_num_threads(1)  # one task per core
        pid = TaskContext.get().partitionId()
        index = self.empty_index()
        for b in batches:
            ids = b.column(self.id_col)
            x = arrow_vectors(b.column(self.vector_col), self.spec.d_in, ids)
            index.add_with_ids(_refine(self.spec, x, "documents"), ids.to_numpy(zero_copy_only=False).astype(np.int64))
        path = ""
        if index.ntotal:
            path = str(Path(self.shard_dir) / f"shard-{pid:05d}.faiss")
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            faiss.write_index(index, tmp)
            os.replace(tmp, path)  # a retried task rewrites the same content
        yield pa.RecordBatch.from_pydict({"partition": [pid], "path": [path], "ntotal": [int(index.ntotal)]},
                                         schema=pa.schema([("partition", pa.int32()), ("path", pa.string()),
                                                           ("ntotal", pa.int64())]))


def merge_shards(trained: faiss.Index, paths: list[str]) -> faiss.Index:
    """Merge shard files into a copy of the trained empty index, in the given order (ids kept)."""
    merged = faiss.clone_index(trained)
    for p in paths:
        shard = faiss.read_index(str(p))
        merged.merge_from(shard, 0)
        del shard
    return merged
