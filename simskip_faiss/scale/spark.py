"""Refine at ingest on Spark, and build a refined FAISS bundle from shards built in parallel.

Two ways in. A parquet path (the fast one, what the CLI uses): Spark only distributes tasks —
contiguous rows of (file, row group), `arrow.plan_parquet` — and each Python worker reads its rows
with pyarrow, so vectors never go through the JVM's array<float> <-> Arrow conversion (the way
autofaiss's embedding-reader works; bench/results/scale.md measures the three ways). A DataFrame:
Arrow batches through `mapInArrow`, for data that is not plain parquet files.

- `refine_dataframe`: a lazy DataFrame whose vector column has gone through the ONNX refiner. The
  ONNX bytes are broadcast once; each Python worker process keeps one onnxruntime session (1
  thread: one task per core, no oversubscription).
- `write_refined`: validate every row first, then write parquet to a staging path and rename it:
  a bad row (null or wrong-length vector, NaN/Inf, null id, or an L2 norm a normalising refiner
  cannot normalise in float32) fails with its id and writes nothing.
- `build_index`: train the FAISS index on a refined sample on the driver (optionally two-level
  k-means for a large nlist, `quantizer.py`), ship the trained empty index (`faiss.serialize_index`) to every
  task, add each task's refined vectors to its own copy and write it as a shard, then
  `merge_from` the shards in task order into one index saved as an ordinary bundle
  (`RefinedIndex.load` opens it). Ids follow FAISS's rules (integers, never -1, never twice),
  checked before anything is built. Same trained index and same rows give the same search
  results as `RefinedIndex.add_with_ids` on one machine.

pyspark and pyarrow are imported lazily. The package must be importable on the executors
(installed there, or shipped with --py-files); a parquet path must be readable there by pyarrow
(local or shared paths, s3://, gs://, hdfs://) and by Spark (the duplicate-id check).
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

from .arrow import (MAX_LISTED, BadRowsError, ParquetPlan, arrow_vectors, filesystem,  # noqa: F401
                    plan_parquet, to_arrow_list)
from ..index import RefinedIndex
from ..refiners.base import BaseRefiner
from ..refiners.registry import refiner_from_bytes
from ..errors import InputError, InputTypeError, faiss_reason

_WORKER_CACHE: dict[str, Any] = {}  # per Python worker process: refiners and trained templates by sha256


# -- shipping the refiner to the workers ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RefinerSpec:
    """What a worker needs to rebuild the refiner: its kind, record (`BaseRefiner.info()`) and a broadcast of its bytes.

    `refines_documents` is the refiner's own answer (`BaseRefiner.refines_documents`), taken on the driver so
    that a worker storing raw documents need not build the refiner at all."""

    key: str
    kind: str
    info: dict
    refines_documents: bool
    payload: Any = None  # Broadcast[bytes] or _Held[bytes]; None for the identity
    documents: Any = None  # Broadcast[bytes] or _Held[bytes] of its document updates; None without

    d_in = property(lambda self: self.info["d_in"])
    d_out = property(lambda self: self.info["d_out"])


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
    """Describe any refiner kind (ONNX, linear, identity) so that workers can rebuild it from its bytes."""
    if not isinstance(refiner, BaseRefiner):
        raise InputTypeError(f"Spark refinement needs a simskip_faiss refiner, got {type(refiner).__name__}")
    refiner.check_documents_loaded()
    info, data, docs = refiner.info(), refiner.to_bytes(), refiner.documents
    rec = refiner.record()  # the worker cache's key: the refiner's identity, its sha256 first (named in errors)
    key = ":".join(str(rec[k]) for k in ("sha256", "kind", "d_in", "d_out", "normalize", "apply_to", "documents"))
    return RefinerSpec(key, refiner.kind, info, refiner.refines_documents, None if data is None else _ship(spark, data),
                       None if docs is None else _ship(spark, docs.to_bytes()))


def worker_refiner(spec: RefinerSpec) -> BaseRefiner:
    """The refiner for `spec`, built once per Python worker process (onnxruntime 1 thread) and cached.

    `refiner_from_bytes` checks the rebuilt refiner against the driver's record (sha256 included), so
    bytes corrupted on the way fail loudly.
    """
    r = _WORKER_CACHE.get(spec.key)
    if r is None:
        data = None if spec.payload is None else spec.payload.value
        r = refiner_from_bytes(spec.kind, data, spec.info, threads=1, source=f"refiner {spec.key[:16]}",
                               documents=None if spec.documents is None else spec.documents.value)
        _WORKER_CACHE[spec.key] = r
    return r


def _refine(spec: RefinerSpec, x: np.ndarray, role: str, ids=None) -> np.ndarray:
    """Refine queries always; documents only when the refiner applies to both (query-only stores raw).

    Rows a normalising refiner cannot normalise in float32 are refused first, by id (`ids`: an
    Arrow array or sequence; positions in `x` if None), as Milvus and `RefinedIndex` refuse them.
    Documents then take the refiner's document update of their id (documents.py), which needs integer ids.
    """
    if role == "documents" and not spec.refines_documents and spec.documents is None:
        return x  # stored raw: no refiner needed in this worker
    refiner = worker_refiner(spec)
    if role == "queries":
        refiner.refuse_norm_range(x, ids)
        return refiner.apply_checked(x)  # never a silent non-unit or zero row
    refiner.refuse_document_norms(x, ids)
    return refiner.refine_documents(x, None if spec.documents is None else _int_ids(ids, len(x)))


def _int_ids(ids, n: int) -> np.ndarray:
    """`ids` (an Arrow array or sequence) as int64, for document updates keyed by id; refused otherwise."""
    if ids is None:
        raise InputError("this refiner carries document updates keyed by document id: give the id column (id_col) "
                         "so that each row takes its own")
    arr = np.asarray(ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else ids)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise InputError(f"this refiner carries document updates keyed by integer document id, but the id column "
                         f"holds {arr.dtype} values: give the int64 ids the refiner was trained with")
    return arr.astype(np.int64)


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


def _schema_errors(names: list[str], vector_col: str, id_col: str | None, vector_type: str, vector_ok: bool,
                   id_type: str, id_integer: bool, integer_ids: bool) -> None:
    """The column checks of a DataFrame and of a parquet schema alike (names and types given as strings)."""
    if vector_col not in names:
        raise InputError(f"no vector column {vector_col!r}; columns are {names}")
    if not vector_ok:
        raise InputTypeError(f"vector column {vector_col!r} must be array<float> or array<double>, got {vector_type}")
    if id_col is not None:
        if id_col not in names:
            raise InputError(f"no id column {id_col!r}; columns are {names}")
        if integer_ids and not id_integer:
            raise InputTypeError(f"FAISS ids must be integers; id column {id_col!r} is {id_type}")


def _check_columns(df, vector_col: str, id_col: str | None, integer_ids: bool = False) -> None:
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    vt, it = fields.get(vector_col), fields.get(id_col)
    _schema_errors(list(fields), vector_col, id_col, vt.simpleString() if vt else "",
                   isinstance(vt, T.ArrayType) and isinstance(vt.elementType, (T.FloatType, T.DoubleType)),
                   it.simpleString() if it else "", isinstance(it, (T.LongType, T.IntegerType, T.ShortType, T.ByteType)),
                   integer_ids)


def _check_plan_columns(plan: ParquetPlan, vector_col: str, id_col: str | None, integer_ids: bool = False) -> None:
    import pyarrow as pa

    fields = {f.name: f.type for f in plan.schema}
    vt, it = fields.get(vector_col), fields.get(id_col)
    listy = vt is not None and (pa.types.is_list(vt) or pa.types.is_large_list(vt) or pa.types.is_fixed_size_list(vt))
    _schema_errors(list(fields), vector_col, id_col, str(vt), listy and pa.types.is_floating(vt.value_type),
                   str(it), it is not None and pa.types.is_integer(it), integer_ids)


MINUS_ONE = "id -1 is FAISS's 'no result' marker, it cannot be stored"


def _duplicate_ids(df, id_col: str, limit: int) -> tuple[list[tuple[Any, str]], int]:
    """(id, problem) of up to `limit` ids that occur more than once, and how many rows carry them (Spark SQL)."""
    from pyspark.sql import functions as F

    dup = df.groupBy(id_col).agg(F.count(F.lit(1)).alias("_n")).where(F.col("_n") > 1)
    total = dup.agg(F.sum("_n").alias("rows")).collect()[0]["rows"] or 0
    listed = dup.orderBy(id_col).limit(limit).collect() if total else []
    return [(r[id_col], f"duplicate id ({r['_n']} rows)") for r in listed], int(total)


def validate(df, d: int, vector_col: str = "vector", id_col: str | None = "id", limit: int = MAX_LISTED,
             faiss_ids: bool = False) -> int:
    """Count the rows, or raise BadRowsError naming bad ones: null id, null vector, length != d, null/NaN/Inf;
    with faiss_ids also id -1 and duplicate ids (FAISS ids, as `checks.as_ids` refuses them).

    Runs as Spark SQL (no Python UDF): one pass over the data (two with faiss_ids: the duplicate
    check groups the ids), plus one more only when rows are bad.
    """
    from pyspark.sql import functions as F

    v = F.col(vector_col)
    problem = (F.when(v.isNull(), F.lit("null vector"))
               .when(F.size(v) != d, F.concat(F.lit("length "), F.size(v).cast("string"), F.lit(f", expected {d}")))
               .when(F.exists(v, lambda e: e.isNull() | F.isnan(e) | (F.abs(e) == F.lit(float("inf")))),
                     F.lit("null, NaN or Inf value")))
    if id_col is not None:
        if faiss_ids:
            problem = F.when(F.col(id_col) == -1, F.lit(MINUS_ONE)).otherwise(problem)
        problem = F.when(F.col(id_col).isNull(), F.lit("null id")).otherwise(problem)
    checked = df.select((F.col(id_col) if id_col else F.lit(None)).alias("_id"), problem.alias("_problem"))
    counts = checked.agg(F.count(F.lit(1)).alias("n"), F.count("_problem").alias("bad")).collect()[0]
    rows, bad = [], int(counts["bad"])
    if bad:
        rows = [(r["_id"], r["_problem"]) for r in checked.where(F.col("_problem").isNotNull()).limit(limit).collect()]
    if faiss_ids and id_col is not None:
        dup_rows, dups = _duplicate_ids(df.select(id_col).where(F.col(id_col).isNotNull()), id_col, limit)
        rows, bad = rows + dup_rows, bad + dups
    if bad:
        raise BadRowsError(rows[:limit], total=bad)
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
        raise InputError(f"role must be 'documents' or 'queries', got {role!r}")
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
            ids = b.column(id_col) if id_col else None
            x = arrow_vectors(b.column(vector_col), spec.d_in, ids)
            y = to_arrow_list(_refine(spec, x, role, ids))
            names = b.schema.names
            yield b.set_column(names.index(out), out, y) if out in names else b.append_column(out, y)
    return run


# -- parquet read by the Python workers: vectors never go through the JVM ---------------------------
def _session(spark):
    """`spark`, or the active SparkSession (a parquet path needs one to run the tasks)."""
    if spark is not None:
        return spark
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None:
        raise InputError("a parquet path needs a SparkSession: pass spark=..., or start one with "
                         "simskip_faiss.spark.session()")
    return active


def parquet_plan(spark, source: str | os.PathLike, partitions: int | None = None) -> ParquetPlan:
    """The tasks that read `source` in Python: one per row group, at least one per core (`partitions`: exactly)."""
    try:
        cores = int(spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect
        cores = 1
    return plan_parquet(source, partitions, cores)


@dataclasses.dataclass(frozen=True)
class _Tasks:
    """mapInArrow over spark.range(tasks): task t reads its parquet pieces with pyarrow and runs `job` on them."""

    plan: ParquetPlan
    job: Any  # has .run(batches, task) -> Iterator[RecordBatch]
    columns: tuple[str, ...] | None

    def __call__(self, batches: Iterator) -> Iterator:
        faiss.omp_set_num_threads(1)  # one task per core
        for b in batches:
            for t in b.column(0).to_pylist():
                yield from self.job.run(self.plan.batches(t, list(self.columns) if self.columns else None), t)


def _run_tasks(spark, plan: ParquetPlan, job, schema: str, columns=None) -> list:
    n = len(plan.tasks)
    return spark.range(0, n, 1, n).mapInArrow(_Tasks(plan, job, tuple(columns) if columns else None), schema).collect()


def _save_npy(path: Path, x: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, x)
    os.replace(tmp, path)  # a retried task rewrites the same content


@dataclasses.dataclass(frozen=True)
class _CheckJob:
    """Validate a task's rows in Python (and draw its share of the training sample into `sample_dir`)."""

    d: int
    vector_col: str
    id_col: str | None
    faiss_ids: bool
    limit: int
    sample_fraction: float = 0.0
    seed: int = 0
    sample_dir: str = ""

    def run(self, batches: Iterator, task: int) -> Iterator:
        import json

        import pyarrow as pa

        rows, bad, listed, sample = 0, 0, [], []
        rng = np.random.default_rng([self.seed, task])
        for b in batches:
            rows += b.num_rows
            ids = b.column(self.id_col) if self.id_col else None
            problems = []
            if ids is not None:
                problems += [(None, "null id")] * ids.null_count
                if self.faiss_ids:
                    problems += [(-1, MINUS_ONE)] * int((ids.fill_null(0).to_numpy(zero_copy_only=False) == -1).sum())
            try:
                x = arrow_vectors(b.column(self.vector_col), self.d, ids)
            except BadRowsError as e:
                problems, x = problems + e.rows, None
            bad += len(problems)
            listed += problems[:self.limit - len(listed)]
            if self.sample_fraction and x is not None and not problems:
                sample.append(x[rng.random(len(x)) < self.sample_fraction])
        if sample and not bad:
            _save_npy(Path(self.sample_dir) / f"sample-{task:05d}.npy", np.concatenate(sample))
        yield pa.RecordBatch.from_pydict({"task": [task], "rows": [rows], "bad": [bad],
                                          "listed": [json.dumps(listed, default=str)]})


def check_parquet(spark, plan: ParquetPlan, d: int, vector_col: str = "vector", id_col: str | None = "id",
                  faiss_ids: bool = False, sample_size: int = 0, seed: int = 0, work_dir: str | os.PathLike = "",
                  limit: int = MAX_LISTED) -> tuple[int, np.ndarray | None]:
    """Validate every row of `plan` in the Python workers; (row count, training sample or None).

    Raises BadRowsError naming bad rows: null id, null vector, length != d, null/NaN/Inf; with
    faiss_ids also id -1 and duplicate ids (the duplicate check is Spark SQL over the id column
    only). With sample_size, about that many rows drawn uniformly (deterministic for a seed and a
    plan) come back, via .npy files in `work_dir` (a path that the executors and the driver see).
    """
    import json

    fraction = min(1.0, 1.2 * sample_size / plan.rows) if sample_size and plan.rows else 0.0
    job = _CheckJob(d, vector_col, id_col, faiss_ids, limit, fraction, seed, str(work_dir))
    cols = [c for c in (id_col, vector_col) if c]
    out = sorted(_run_tasks(spark, plan, job, "task long, rows long, bad long, listed string", cols))
    bad = sum(r["bad"] for r in out)
    listed = [tuple(p) for r in out for p in json.loads(r["listed"])]
    if faiss_ids and id_col is not None:
        from pyspark.sql import functions as F

        ids = spark.read.parquet(plan.uri).select(id_col)
        dup_rows, dups = _duplicate_ids(ids.where(F.col(id_col).isNotNull()), id_col, limit)
        listed, bad = listed + dup_rows, bad + dups
    if bad:
        raise BadRowsError(listed[:limit], total=bad)
    if not fraction:
        return sum(r["rows"] for r in out), None
    files = sorted(Path(work_dir).glob("sample-*.npy"))
    sample = np.concatenate([np.load(f) for f in files]) if files else np.empty((0, d), np.float32)
    for f in files:
        f.unlink()
    if len(sample) > sample_size:  # drawn 1.2x over, so that it falls short rarely: keep a uniform subset
        sample = sample[np.sort(np.random.default_rng(seed).choice(len(sample), sample_size, replace=False))]
    return sum(r["rows"] for r in out), sample


@dataclasses.dataclass(frozen=True)
class _WriteJob:
    """Refine a task's rows and write them, every column kept, as one parquet file in `stage`."""

    spec: RefinerSpec
    vector_col: str
    id_col: str | None
    out: str
    role: str
    filesystem: Any
    stage: str

    def run(self, batches: Iterator, task: int) -> Iterator:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, writer, rows = f"{self.stage}/part-{task:05d}.parquet", None, 0
        tmp = f"{self.stage}/.part-{task:05d}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            for b in _refine_batches(self.spec, self.vector_col, self.id_col, self.out, self.role)(batches):
                if writer is None:
                    writer = pq.ParquetWriter(self.filesystem.open_output_stream(tmp), b.schema)
                writer.write_batch(b)
                rows += b.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            self.filesystem.move(tmp, path)  # a retried task rewrites the same content
        yield pa.RecordBatch.from_pydict({"task": [task], "rows": [rows]})


def _write_parquet_refined(spark, source, refiner, output: str, vector_col, id_col, output_col, role,
                           partitions) -> int:
    """write_refined for a parquet path: validate in the workers, refine and write in the workers, rename."""
    plan = parquet_plan(spark, source, partitions)
    _check_plan_columns(plan, vector_col, id_col)
    if role not in ("documents", "queries"):
        raise InputError(f"role must be 'documents' or 'queries', got {role!r}")
    n, _ = check_parquet(spark, plan, refiner.d_in, vector_col, id_col)
    fs, out = filesystem(output)
    stage = f"{out.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    fs.create_dir(stage)
    try:
        job = _WriteJob(refiner_spec(spark, refiner), vector_col, id_col, output_col or vector_col, role, fs, stage)
        _run_tasks(spark, plan, job, "task long, rows long")
        fs.move(stage, out)
    finally:
        import pyarrow.fs as pafs

        if fs.get_file_info(stage).type != pafs.FileType.NotFound:
            fs.delete_dir(stage)
    return n


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


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


def write_refined(source, refiner, output: str | os.PathLike, vector_col: str = "vector", id_col: str | None = "id",
                  output_col: str | None = None, role: str = "documents", spark=None,
                  partitions: int | None = None) -> int:
    """Validate all rows, refine, and write parquet to `output` (which must not exist); return the row count.

    source: a parquet file or directory (read by the Python workers with pyarrow, one task per row
    group or `partitions` tasks: the fast path, no JVM conversion of the vectors), or a DataFrame
    (refined with `refine_dataframe` and written by Spark). Either way every row is checked first
    and the data is written to a staging directory beside `output`, renamed only after the job
    succeeded: a failure at any point leaves no `output` at all. The refined column is list<float>
    (Spark's array<float>), readable by Spark, pandas and pyarrow.
    """
    output = str(output)
    lp = _local_path(output)
    if lp is not None and lp.exists():
        raise FileExistsError(f"output {output} already exists")
    if _is_path(source):
        return _write_parquet_refined(_session(spark), source, refiner, output, vector_col, id_col, output_col, role,
                                      partitions)
    df = source
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
    shards: list[tuple[int, int]]  # (task or partition, vectors) of each merged shard
    seconds: dict[str, float]
    shard_paths: list[str] = dataclasses.field(default_factory=list)  # kept shard files (keep_shards=True)
    quantizer: str = "given"  # how the coarse quantizer was trained: 'mini-batch', 'flat', 'two-level' or 'given'


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
        raise InputError(f"{type(index).__name__} cannot be built from shards (it needs add_with_ids and "
                         f"merge_from: use an IVF factory, or 'IDMap,Flat'): {faiss_reason(e)}") from None


def _sample(df, n: int, size: int, seed: int, vector_col: str, d: int) -> np.ndarray:
    """About `size` raw vectors drawn uniformly (deterministic for a seed and a partitioning) to the driver."""
    part = df.select(vector_col)
    if size < n:
        part = part.sample(False, min(1.0, 1.2 * size / n), seed).limit(size)
    table = part.toArrow()
    return arrow_vectors(table.column(vector_col), d, what="training sample")


def build_index(source, refiner, output: str | os.PathLike, factory: str | None = None, metric: str = "ip",
                vector_col: str = "vector", id_col: str = "id", train_size: int = 100_000, seed: int = 0,
                trained_index: faiss.Index | None = None, shard_dir: str | os.PathLike | None = None,
                keep_shards: bool = False, spark=None, partitions: int | None = None,
                quantizer: str = "mini-batch") -> BuildResult:
    """Refine `source` on Spark, add each task's rows to a copy of the trained index, merge, save a bundle.

    source: a parquet file or directory, read by the Python workers with pyarrow (one task per row
    group, or `partitions` tasks; the fast path: vectors never go through the JVM), or a DataFrame
    (one shard per partition, via mapInArrow). Ids must be integers, never -1, never twice: every
    row is checked before any index is built. factory: a mergeable FAISS factory string (default
    "IVF1024,Flat"), trained on a refined sample of `train_size` rows on the driver, its coarse
    quantizer by `quantizer` ("mini-batch", the default: ~4x fewer CPU-seconds than FAISS's flat
    k-means at 1M vectors and 4,096 lists, at equal or better recall; "flat": FAISS's k-means;
    "two-level": cheapest, lower recall; see `simskip_faiss.quantizer`); with `trained_index` (an
    empty, trained FAISS index used as is) the factory is only recorded in the manifest. shard_dir: where tasks write
    their shards — a path that the executors and the driver both see (local in local mode; a
    shared mount on a cluster). Shards go to a fresh subdirectory of it (default: beside
    `output`), removed after the merge unless keep_shards.
    """
    from .quantizer import check_method, train_ivf

    t0 = time.perf_counter()
    if trained_index is not None:
        if trained_index.ntotal:
            raise InputError(f"trained_index must be empty, it holds {trained_index.ntotal} vectors")
        ri = RefinedIndex(refiner, trained_index, metric)
        ri.factory = factory
    else:
        ri = RefinedIndex(refiner, factory or "IVF1024,Flat", metric)
    check_method(ri.index, quantizer)  # a bad method fails before any Spark work
    plan = None
    if _is_path(source):
        spark = _session(spark)
        plan = parquet_plan(spark, source, partitions)
        _check_plan_columns(plan, vector_col, id_col, integer_ids=True)
    else:
        _check_columns(source, vector_col, id_col, integer_ids=True)
    sdir = Path(shard_dir or Path(output).parent) / f".shards-{uuid.uuid4().hex[:8]}"
    sdir.mkdir(parents=True)
    try:
        size = 0 if ri.is_trained else train_size
        if plan is not None:
            n, sample = check_parquet(spark, plan, refiner.d_in, vector_col, id_col, True, size, seed, sdir)
        else:
            n = validate(source, refiner.d_in, vector_col, id_col, faiss_ids=True)
            sample = _sample(source, n, min(size, n), seed, vector_col, refiner.d_in) if n and size else None
        if n == 0:
            raise InputError("the input has no rows")
        seconds = {"validate": time.perf_counter() - t0}
        t = time.perf_counter()
        how = "given" if ri.is_trained else train_ivf(ri.index, ri.refine_documents(sample), quantizer, seed=seed)
        probe = np.random.default_rng(seed).standard_normal((1, refiner.d_in)).astype(np.float32)
        _check_mergeable(ri.index, ri.refine_documents(probe / np.linalg.norm(probe)))
        seconds["train"] = time.perf_counter() - t
        t = time.perf_counter()
        if plan is not None:
            shards = add_shards_parquet(spark, plan, refiner, ri.index, sdir, vector_col, id_col)
        else:
            shards = add_shards(source, refiner, ri.index, sdir, vector_col, id_col)
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
                       [p for _, p, _ in shards] if keep_shards else [], how)


_SHARD_SCHEMA = "partition int, path string, ntotal long"


def _shard_job(spark, refiner, trained: faiss.Index, shard_dir: Path, vector_col: str, id_col: str) -> "_ShardJob":
    template = faiss.serialize_index(trained).tobytes()
    return _ShardJob(refiner_spec(spark, refiner), _ship(spark, template), _template_key(template),
                     str(Path(shard_dir).resolve()), vector_col, id_col)


def _shards(rows) -> list[tuple[int, str, int]]:
    return sorted((r["partition"], r["path"], r["ntotal"]) for r in rows if r["ntotal"])


def add_shards(df, refiner, trained: faiss.Index, shard_dir: Path, vector_col: str = "vector",
               id_col: str = "id") -> list[tuple[int, str, int]]:
    """Each partition refines its rows, adds them with their ids to a copy of `trained`, writes a shard.

    Returns (partition, path, ntotal) per non-empty shard, in partition order.
    """
    job = _shard_job(df.sparkSession, refiner, trained, shard_dir, vector_col, id_col)
    return _shards(df.select(id_col, vector_col).mapInArrow(job, _SHARD_SCHEMA).collect())


def add_shards_parquet(spark, plan: ParquetPlan, refiner, trained: faiss.Index, shard_dir: Path,
                       vector_col: str = "vector", id_col: str = "id") -> list[tuple[int, str, int]]:
    """`add_shards` for a parquet plan: each task reads its rows with pyarrow, refines, adds, writes a shard.

    Returns (task, path, ntotal) per non-empty shard, in task order (= the data set's row order).
    """
    job = _shard_job(spark, refiner, trained, shard_dir, vector_col, id_col)
    return _shards(_run_tasks(spark, plan, job, _SHARD_SCHEMA, [id_col, vector_col]))


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    """Refine rows and add them to a copy of the trained index, written as one shard file per task."""

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
        """The mapInArrow function over a DataFrame's partition."""
        from pyspark import TaskContext

        faiss.omp_set_num_threads(1)  # one task per core
        return self.run(batches, TaskContext.get().partitionId())

    def run(self, batches: Iterator, pid: int) -> Iterator:
        import pyarrow as pa

        index = self.empty_index()
        for b in batches:
            ids = b.column(self.id_col)
            x = arrow_vectors(b.column(self.vector_col), self.spec.d_in, ids)
            index.add_with_ids(_refine(self.spec, x, "documents", ids), ids.to_numpy(zero_copy_only=False).astype(np.int64))
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
