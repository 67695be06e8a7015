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

The code lives in spark_common.py (session, row checks, parquet tasks), spark_refine.py (the refiner
on the workers, `refine_dataframe`, `write_refined`) and spark_build.py (`build_index`, shards, merge);
this module keeps their names under the one import path the CLI, the benches and users know.

pyspark and pyarrow are imported lazily. The package must be importable on the executors
(installed there, or shipped with --py-files); a parquet path must be readable there by pyarrow
(local or shared paths, s3://, gs://, hdfs://) and by Spark (the duplicate-id check).
"""
from __future__ import annotations

from .arrow import (MAX_LISTED, BadRowsError, ParquetPlan, arrow_vectors, filesystem,  # noqa: F401
                    plan_parquet, to_arrow_list)
from .spark_build import (_SHARD_SCHEMA, BuildResult, _check_mergeable, _sample, _shard_job,  # noqa: F401
                          _ShardJob, _shards, _template_key, add_shards, add_shards_parquet, build_index,
                          merge_shards)
from .spark_common import (_WORKER_CACHE, MINUS_ONE, _check_columns, _check_plan_columns, _CheckJob,  # noqa: F401
                           _duplicate_ids, _Held, _is_path, _run_tasks, _save_npy, _schema_errors, _session,
                           _ship, _Tasks, check_parquet, parquet_plan, session, validate)
from .spark_refine import (RefinerSpec, _int_ids, _local_path, _refine, _refine_batches, _rename,  # noqa: F401
                           _write_parquet_refined, _WriteJob, refine_dataframe, refiner_spec, worker_refiner,
                           write_refined)
