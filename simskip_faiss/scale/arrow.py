"""Arrow columns <-> numpy vectors, shared by the Spark workers, the parquet readers and Milvus ingest.

`arrow_vectors` turns an Arrow list column into float32 (n, d), or raises `BadRowsError` naming
the id of every null, wrong-length or non-finite vector; `to_arrow_list` is the way back, as the
`list<float>` that Spark reads as array<float>. `plan_parquet` splits parquet files into tasks of
contiguous rows that Python workers read directly with pyarrow (`ParquetPlan.batches`), the way
autofaiss's embedding-reader does: vectors never pass through the JVM. Only pyarrow and numpy are
needed (imported lazily).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np
from ..checks import as_id_list  # noqa: F401  (the Spark and Milvus modules import it from here)
from ..errors import MAX_LISTED, BadRowsError, InputError, InputTypeError  # noqa: F401



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
        raise InputTypeError(f"{what}: the vector column must be a list of floats, got Arrow type {col.type}")
    if not pa.types.is_floating(col.type.value_type):
        raise InputTypeError(f"{what}: vectors must hold floats, got {col.type.value_type}")
    n = len(col)
    lengths_ok = col.null_count == 0 and (pa.types.is_fixed_size_list(col.type) and col.type.list_size == d
                                          or n == 0 or _all_equal(col, d))
    if lengths_ok:
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(n, d)
        if np.isfinite(x).all():
            return np.ascontiguousarray(x, dtype=np.float32)
    bad = _bad_rows(col, d)
    id_list = as_id_list(ids)
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


# -- parquet files read in Python, in tasks of contiguous rows --------------------------------------
@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one parquet file: what a task reads."""

    path: str
    row_group: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class ParquetPlan:
    """Parquet files split into tasks of contiguous rows, in (file name, row group) order."""

    uri: str
    filesystem: Any  # pyarrow.fs.FileSystem: picklable, shipped to the workers with the plan
    schema: Any  # pyarrow.Schema of the data set
    rows: int
    tasks: tuple[tuple[Piece, ...], ...]

    def batches(self, task: int, columns: list[str] | None = None, batch_size: int = 4096) -> Iterator:
        """The Arrow record batches of one task (at most `batch_size` rows each), in order."""
        import pyarrow.parquet as pq

        for piece in self.tasks[task]:
            with self.filesystem.open_input_file(piece.path) as f:
                offset = 0
                for b in pq.ParquetFile(f).iter_batches(batch_size, row_groups=[piece.row_group], columns=columns):
                    lo, hi = max(piece.start - offset, 0), min(piece.stop - offset, b.num_rows)
                    offset += b.num_rows
                    if lo < hi:
                        yield b if (lo, hi) == (0, b.num_rows) else b.slice(lo, hi - lo)
                    if offset >= piece.stop:
                        break


def filesystem(uri: str | os.PathLike):
    """(pyarrow FileSystem, path) for a local path, file: URI, or a URI pyarrow knows (s3://, gs://, hdfs://)."""
    import pyarrow.fs as pafs

    uri = str(uri)
    if "://" not in uri and not uri.startswith("file:"):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def plan_parquet(uri: str | os.PathLike, tasks: int | None = None, min_tasks: int = 1) -> ParquetPlan:
    """Split the parquet file or directory `uri` into `tasks` tasks of about equal row counts.

    Default: one task per row group, unless that makes fewer than `min_tasks` (the cluster's cores).
    Row groups are cut where equal tasks need it (each task then decodes its whole row group), so tasks hold contiguous rows and reading them in task order reads the
    data set in order. The footers are read here, once (files whose names start with '_' or '.',
    like Spark's _SUCCESS and .crc files, are skipped).
    """
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    fs, root = filesystem(uri)
    dataset = ds.dataset(root, filesystem=fs, format="parquet")
    groups = []  # (path, row group, rows)
    for path in sorted(dataset.files):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    total = sum(r for _, _, r in groups)
    if tasks is None and len(groups) >= min_tasks:  # Spark's own split: one task per row group
        return ParquetPlan(str(uri), fs, dataset.schema, total,
                           tuple((Piece(path, g, 0, rows),) for path, g, rows in groups if rows))
    n_tasks = max(1, min(total, tasks or max(min_tasks, len(groups))))
    bounds = [k * total // n_tasks for k in range(n_tasks + 1)]
    plan: list[list[Piece]] = [[] for _ in range(n_tasks)]
    offset, t = 0, 0
    for path, g, rows in groups:
        start = 0
        while start < rows:
            while bounds[t + 1] <= offset + start:
                t += 1
            stop = min(rows, bounds[t + 1] - offset)
            plan[t].append(Piece(path, g, start, stop))
            start = stop
        offset += rows
    return ParquetPlan(str(uri), fs, dataset.schema, total, tuple(tuple(p) for p in plan))
