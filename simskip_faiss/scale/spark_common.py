"""What Spark refinement and Spark index builds share: the session, the row checks, and parquet read in Python tasks.

`validate` (a DataFrame, as Spark SQL) and `check_parquet` (a parquet plan, in the Python workers) refuse
bad rows by id before anything is written; `_run_tasks` runs a job over a parquet plan's tasks, each
reading its rows with pyarrow; `_ship` broadcasts bytes once per executor and `_WORKER_CACHE` keeps
what a worker process rebuilt from them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from .arrow import MAX_LISTED, BadRowsError, ParquetPlan, arrow_vectors, plan_parquet
from ..errors import InputError, InputTypeError


_WORKER_CACHE: dict[str, Any] = {}  # per Python worker process: refiners and trained templates by sha256


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


# -- parquet read by the Python workers: vectors never go through the JVM ---------------------------
def _session(spark):
    """`spark`, or the active SparkSession (a parquet path needs one to run the tasks)."""
    if spark is not None:
        return spark
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None:
        raise InputError("a parquet path needs a SparkSession: pass spark=..., or start one with "
                         "simskip_faiss.scale.spark.session()")
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


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))
