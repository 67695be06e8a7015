"""A client-side refined collection over pymilvus.MilvusClient: Milvus stores and searches refined vectors.

The refiner runs here, in the client, on every vector inserted and every query, exactly as
`RefinedIndex` does in front of FAISS (a query-only refiner leaves stored vectors raw). The
collection records which refiner made its vectors — sha256, dimensions, normalisation, apply_to,
metric — in its collection properties, and `RefinedCollection` refuses to open it with another
refiner: vectors from two refiners are not comparable and mixing them fails silently otherwise.

Works against milvus-lite (`MilvusClient("file.db")`) and a Milvus server or cluster
(`MilvusClient("http://host:19530", token=...)`) alike; pymilvus is imported lazily.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..checks import as_ids, check_shape, load_npy, nonfinite_rows, to_float32
from ..faiss_utils import METRIC_NAMES, metric_code
from .arrow import BadRowsError, arrow_vectors
from ..errors import InputError, InputTypeError, RefinerMismatchError

PREFIX = "simskip."
FORMAT = "1"
MILVUS_METRIC = {"ip": "IP", "l2": "L2"}
PAD = {"ip": -np.finfo(np.float32).max, "l2": np.finfo(np.float32).max}  # FAISS's padding for missing hits


def connect(uri: str, token: str | None = None, db_name: str | None = None):
    """A MilvusClient for a milvus-lite file ('data/vectors.db') or a server URI ('http://host:19530')."""
    from pymilvus import MilvusClient

    kw: dict[str, Any] = {}
    if token:
        kw["token"] = token
    if db_name:
        kw["db_name"] = db_name
    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri, **kw)


def refiner_properties(refiner, metric: str) -> dict[str, str]:
    """The collection properties that identify a refiner: its `record()` (without its kind and document
    updates, which collections have never recorded) and the metric, as strings (Milvus properties are)."""
    r = refiner.record()
    return {PREFIX + "format": FORMAT, PREFIX + "refiner_sha256": r["sha256"], PREFIX + "d_in": str(r["d_in"]),
            PREFIX + "d_out": str(r["d_out"]), PREFIX + "normalize": str(r["normalize"]).lower(),
            PREFIX + "apply_to": r["apply_to"], PREFIX + "metric": metric}


def _describe(props: dict[str, str]) -> str:
    sha = props.get(PREFIX + "refiner_sha256", "?")
    return (f"refiner {sha[:16] + '…' if len(sha) == 64 else sha} (d {props.get(PREFIX + 'd_in')}→"
            f"{props.get(PREFIX + 'd_out')}, normalize={props.get(PREFIX + 'normalize')}, "
            f"apply_to={props.get(PREFIX + 'apply_to')}, metric={props.get(PREFIX + 'metric')})")


class RefinedCollection:
    """A Milvus collection of refined vectors with int64 ids, searched with refined queries.

    client: a MilvusClient or a URI. create: make the collection if it does not exist (else it must).
    index_type: Milvus index ("AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT", ...). Other keyword columns
    passed to insert/upsert are stored as dynamic fields. Consistency "Strong" reads your writes.
    """

    def __init__(self, client, name: str, refiner, metric: str = "ip", *, create: bool = True,
                 index_type: str = "AUTOINDEX", index_params: dict | None = None,
                 consistency_level: str = "Strong", batch_size: int = 2000):
        self.client = connect(client) if isinstance(client, (str, os.PathLike)) else client
        self.name, self.refiner = name, refiner
        self.metric = METRIC_NAMES[metric_code(metric)]
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self._check_refiner()
        self.properties = refiner_properties(refiner, self.metric)
        if self.client.has_collection(name):
            self._verify(self.client.describe_collection(name).get("properties") or {})
            self._load()
        elif create:
            self._create(index_type, index_params or {}, consistency_level)
        else:
            raise InputError(f"Milvus collection {name!r} does not exist (create=False)")

    # -- set-up ---------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (`BaseRefiner.stored_dim`): refined, or raw for a query-only refiner."""
        return self.refiner.stored_dim

    def _check_refiner(self) -> None:
        self.refiner.refuse_migration_map("a Milvus collection (create, ingest, search)")
        self.refiner.check_metric(self.metric, "collection")

    def _create(self, index_type: str, index_params: dict, consistency_level: str) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=True,
                                           description=f"simskip_faiss refined vectors: {_describe(self.properties)}")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        ip = self.client.prepare_index_params()
        ip.add_index("vector", index_type=index_type, metric_type=MILVUS_METRIC[self.metric], params=index_params)
        self.client.create_collection(self.name, schema=schema, consistency_level=consistency_level,
                                      properties=self.properties)
        self._verify(self.client.describe_collection(self.name).get("properties") or {})  # the server kept them
        # The collection is empty, so its index is complete once created: sync=False skips pymilvus's wait
        # for the build, which asks for a timestamp that milvus-lite does not implement (it logs a traceback).
        self.client.create_index(self.name, ip, sync=False)
        self._load()

    def _load(self) -> None:
        """Load the collection for search unless it is loaded: Milvus releases it when its last client goes."""
        state = self.client.get_load_state(self.name).get("state")
        if getattr(state, "name", str(state)) != "Loaded":
            self.client.load_collection(self.name)

    def _verify(self, props: dict[str, str]) -> None:
        """Refuse a collection made by another refiner, with another metric, or not by this package."""
        if PREFIX + "refiner_sha256" not in props:
            raise RefinerMismatchError(f"Milvus collection {self.name!r} records no refiner (not created by "
                                       f"simskip_faiss); refusing to mix refined and unrefined vectors")
        theirs = {k: v for k, v in props.items() if k.startswith(PREFIX) and k != PREFIX + "format"}
        ours = {k: v for k, v in self.properties.items() if k != PREFIX + "format"}
        if theirs != ours:
            raise RefinerMismatchError(f"Milvus collection {self.name!r} holds vectors made by {_describe(props)}, "
                                       f"but this is {_describe(self.properties)}: vectors from different "
                                       f"refiners are not comparable; use the collection's refiner or a new collection")

    # -- writing --------------------------------------------------------------------------------------
    def refine_documents(self, x: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Stored vectors of validated rows `x`: refined (output checked) unless query-only, then each id's
        document update (the refiner's, documents.py) when `ids` are given."""
        return self.refiner.refine_documents(x, ids)

    def insert(self, ids, vectors, fields: dict[str, Sequence] | None = None) -> int:
        """Refine and insert; every row is validated before the first write (bad rows named by id)."""
        return self._write("insert", ids, vectors, fields)

    def upsert(self, ids, vectors, fields: dict[str, Sequence] | None = None) -> int:
        """Refine and insert-or-replace by id (idempotent: a failed ingest can simply be run again)."""
        return self._write("upsert", ids, vectors, fields)

    def _write(self, op: str, ids, vectors, fields: dict[str, Sequence] | None) -> int:
        ids, x = checked_rows(ids, vectors, self.refiner.document_dim)
        self.refiner.refuse_document_norms(x, ids)  # before the first write, like every other row check
        fields = fields or {}
        for k, col in fields.items():
            if k in ("id", "vector"):
                raise InputError(f"extra field {k!r} clashes with the collection's own fields")
            if len(col) != len(ids):
                raise InputError(f"extra field {k!r} has {len(col)} values for {len(ids)} rows")
        write = getattr(self.client, op)
        for s in range(0, len(ids), self.batch_size):
            y = self.refine_documents(x[s:s + self.batch_size], ids[s:s + self.batch_size])
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[s:s + self.batch_size].tolist(), y)]
            for k, col in fields.items():
                for row, val in zip(rows, col[s:s + self.batch_size]):
                    row[k] = val
            write(self.name, rows)
        return len(ids)

    def delete(self, ids) -> int:
        """Delete by id; returns how many ids were asked for (Milvus does not report misses)."""
        ids = as_ids(ids, to_store=False)
        if len(ids):
            self.client.delete(self.name, ids=ids.tolist())
        return len(ids)

    # -- reading --------------------------------------------------------------------------------------
    def count(self) -> int:
        """Number of live (not deleted) rows."""
        res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def search_raw(self, queries, k: int, filter: str = "", output_fields: list[str] | None = None,
                   search_params: dict | None = None):
        """Refine queries and search; the pymilvus hit lists (with any `output_fields`)."""
        q = self.refiner.refine_queries(queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        params = {"metric_type": MILVUS_METRIC[self.metric], "params": search_params or {}}
        return self.client.search(self.name, data=[row for row in q], limit=int(k), filter=filter,
                                  output_fields=output_fields or [], search_params=params, anns_field="vector")

    def search(self, queries, k: int, filter: str = "", search_params: dict | None = None):
        """Refine queries and search; (D, I) of shape (n, k) like FAISS, padded with id -1 when fewer hits."""
        hits = self.search_raw(queries, k, filter, None, search_params)
        D = np.full((len(hits), k), PAD[self.metric], dtype=np.float32)
        I = np.full((len(hits), k), -1, dtype=np.int64)
        for qi, row in enumerate(hits):
            for j, h in enumerate(row):
                D[qi, j], I[qi, j] = h["distance"], h["id"]
        return D, I

    def __repr__(self) -> str:
        return f"RefinedCollection({self.name!r}, {self.refiner!r}, metric={self.metric!r})"


def checked_rows(ids, vectors, d: int) -> tuple[np.ndarray, np.ndarray]:
    """ids as int64 and vectors as float32 (n, d), or BadRowsError naming the ids of null, wrong-length
    and non-finite vectors. Accepts an array or a sequence of sequences (with None for missing).
    Vectors follow the package's one contract (checks.py): real numbers, finite after the float32 cast."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        ids = as_ids(ids, vectors.shape[0])
        check_shape(vectors, d, "vectors", allow_empty=True)
        x = vectors
    else:
        import pyarrow as pa

        vectors = list(vectors)
        ids = as_ids(ids, len(vectors))
        col = pa.array([None if v is None else np.asarray(v, dtype=np.float64).tolist() for v in vectors],
                       type=pa.list_(pa.float64()))
        with np.errstate(over="ignore"):  # overflow is reported just below, by id
            x = arrow_vectors(col, d, ids.tolist())
    bad = [(int(ids[i]), "NaN or Inf (after conversion to float32)") for i in nonfinite_rows(x)]
    if bad:
        raise BadRowsError(bad)
    return ids, to_float32(x)


# -- ingest from files (the CLI) --------------------------------------------------------------------
def ingest_npy(coll: RefinedCollection, vectors_path: str | os.PathLike, ids: np.ndarray | None = None,
               upsert: bool = False) -> int:
    """Refine and write a memory-mapped .npy (ids: an int array, or row numbers when None)."""
    x = load_npy(vectors_path, "vectors")
    check_shape(x, name=f"vectors {vectors_path}")
    ids = np.arange(len(x), dtype=np.int64) if ids is None else ids
    ids, x = checked_rows(ids, x, coll.refiner.document_dim)
    return coll.upsert(ids, x) if upsert else coll.insert(ids, x)


def ingest_parquet(coll: RefinedCollection, path: str | os.PathLike, vector_col: str = "vector",
                   id_col: str = "id", keep: Iterable[str] | None = None, upsert: bool = False,
                   batch_rows: int = 65536) -> int:
    """Refine and write a parquet file or directory: every row is validated first, then written in batches.

    keep: other columns stored as dynamic fields (default: all of them).
    """
    import pyarrow.dataset as ds

    data = ds.dataset(str(path), format="parquet")
    names = data.schema.names
    for c in (vector_col, id_col):
        if c not in names:
            raise InputError(f"{path}: no column {c!r}; columns are {names}")
    extra = [c for c in (names if keep is None else keep) if c not in (vector_col, id_col)]
    bad, total = [], 0
    for b in data.to_batches(columns=[id_col, vector_col], batch_size=batch_rows):  # pass 1: validate all
        try:
            _batch_arrays(b, vector_col, id_col, coll.refiner.document_dim)
        except BadRowsError as e:
            bad += e.rows
            total += e.total
    if bad:
        raise BadRowsError(bad, total=total, what=str(path))
    n = 0
    for b in data.to_batches(columns=[id_col, vector_col, *extra], batch_size=batch_rows):  # pass 2: write
        ids, x = _batch_arrays(b, vector_col, id_col, coll.refiner.document_dim)
        fields = {c: b.column(c).to_pylist() for c in extra}
        n += coll.upsert(ids, x, fields) if upsert else coll.insert(ids, x, fields)
    return n


def _batch_arrays(batch, vector_col: str, id_col: str, d: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    idcol = batch.column(id_col)
    if not pa.types.is_integer(idcol.type):
        raise InputTypeError(f"Milvus ids here are int64; id column {id_col!r} is {idcol.type}")
    null_ids = np.flatnonzero(idcol.is_null().to_numpy(zero_copy_only=False))
    if len(null_ids):
        raise BadRowsError([(None, f"null id (row {int(i)} of its batch)") for i in null_ids])
    x = arrow_vectors(batch.column(vector_col), d, idcol)
    return idcol.to_numpy(zero_copy_only=False).astype(np.int64), x
