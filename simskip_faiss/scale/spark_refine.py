"""Refine at ingest on Spark: `refine_dataframe` (lazy, mapInArrow) and `write_refined` (checked, all or nothing).

The refiner travels as a `RefinerSpec` (its record and a broadcast of its bytes); each Python worker
rebuilds it once (`worker_refiner`) and applies the refiner's own store rules (`BaseRefiner.refine_documents`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .arrow import arrow_vectors, filesystem, to_arrow_list
from .spark_common import (_WORKER_CACHE, _check_columns, _check_plan_columns, _is_path, _run_tasks, _session,
                           _ship, check_parquet, parquet_plan, validate)
from ..refiners.base import BaseRefiner
from ..refiners.registry import refiner_from_bytes
from ..errors import InputError, InputTypeError


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


def refiner_spec(spark, refiner) -> RefinerSpec:
    """Describe any refiner kind (ONNX, linear, identity) so that workers can rebuild it from its bytes."""
    if not isinstance(refiner, BaseRefiner):
        raise InputTypeError(f"Spark refinement needs a simskip_faiss refiner, got {type(refiner).__name__}")
    refiner.check_documents_loaded()
    refiner.check_query_only_dim("Spark")  # Spark validates documents at d_in
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
