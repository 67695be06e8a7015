"""Spark: refine-at-ingest equals the single-process refiner; the distributed build equals the single-machine one.

One local[2] SparkSession for the whole module (it takes ~10 s to start); tiny data.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("pyspark")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
torch = pytest.importorskip("torch")

import faiss  # noqa: E402

from simskip_faiss import RefinedIndex, Refiner  # noqa: E402
from simskip_faiss.scale import spark as S  # noqa: E402
from simskip_faiss.cli import main  # noqa: E402

D_IN, N = 16, 600


def make_refiner(path, apply_to: str = "both", seed: int = 0) -> Refiner:
    """A tiny untrained SimSkip with a non-zero last layer, so refinement visibly changes vectors."""
    from simskip_faiss.training.export import export
    from simskip_faiss.training import SimSkip

    torch.manual_seed(seed)
    m = SimSkip(D_IN, hidden=8)
    torch.nn.init.normal_(m.f[-1].weight, std=0.3)
    export(m, path, {"apply_to": apply_to})
    return Refiner.load(path)


def vectors_table(x: np.ndarray, ids: np.ndarray, vectors=None) -> "pa.Table":
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]) if vectors is None else vectors
    return pa.table({"id": pa.array(ids, pa.int64()), "vector": col, "label": [f"doc{i}" for i in ids]})


@pytest.fixture(scope="module")
def spark():
    s = S.session("local[2]", conf={"spark.sql.shuffle.partitions": "3"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spark):
    d = tmp_path_factory.mktemp("spark")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D_IN)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = (np.arange(N) * 7 + 1000).astype(np.int64)
    pq.write_table(vectors_table(x, ids), d / "in.parquet")
    return {"dir": d, "x": x, "ids": ids, "refiner": make_refiner(d / "r.onnx"), "parquet": d / "in.parquet"}


def frame(spark, setup, partitions: int = 3):
    """The input as a DataFrame of `partitions` partitions, each in id order (a deterministic layout)."""
    df = spark.read.parquet(str(setup["parquet"]))
    return df.repartitionByRange(partitions, "id").sortWithinPartitions("id")


def by_id(table, col: str, ids: np.ndarray) -> np.ndarray:
    order = {int(i): k for k, i in enumerate(table.column("id").to_pylist())}
    rows = table.column(col).to_pylist()
    return np.array([rows[order[int(i)]] for i in ids], dtype=np.float32)


def test_spark_refined_equals_single_process(spark, setup):
    x, ids, r = setup["x"], setup["ids"], setup["refiner"]
    out = S.refine_dataframe(frame(spark, setup), r).toArrow()
    assert out.column_names == ["id", "vector", "label"] and out.num_rows == N
    got = by_id(out, "vector", ids)
    want = r.transform(x)
    assert np.abs(got - want).max() <= 1e-6
    assert np.abs(got - x).max() > 0.05  # the refiner really changed the vectors
    labels = dict(zip(out.column("id").to_pylist(), out.column("label").to_pylist()))
    assert all(labels[int(i)] == f"doc{i}" for i in ids)  # other columns travel with their row


def test_every_refiner_kind_ships_to_the_workers(spark, setup):
    """A linear refiner (centring, a distilled map) and the identity refine on Spark as in-process."""
    from simskip_faiss import IdentityRefiner, LinearRefiner

    x, ids = setup["x"], setup["ids"]
    rng = np.random.default_rng(3)
    lin = LinearRefiner(np.eye(D_IN, dtype=np.float32) + 0.2 * rng.standard_normal((D_IN, D_IN)).astype(np.float32),
                        mean=x.mean(0), normalize=True)
    for r in (lin, IdentityRefiner(D_IN, normalize=True)):
        got = by_id(S.refine_dataframe(frame(spark, setup, 2), r).toArrow(), "vector", ids)
        assert np.abs(got - r.transform(x)).max() <= 1e-6, r


def test_query_only_refiner_leaves_documents_raw(spark, setup, tmp_path):
    x, ids = setup["x"], setup["ids"]
    qr = make_refiner(tmp_path / "q.onnx", apply_to="queries", seed=1)
    df = frame(spark, setup, 2)
    docs = S.refine_dataframe(df, qr, output_col="refined").toArrow()
    queries = S.refine_dataframe(df, qr, output_col="refined", role="queries").toArrow()
    assert docs.column_names == ["id", "vector", "label", "refined"]
    np.testing.assert_array_equal(by_id(docs, "refined", ids), x)
    assert np.abs(by_id(queries, "refined", ids) - qr.transform(x)).max() <= 1e-6
    np.testing.assert_array_equal(by_id(queries, "vector", ids), x)  # the input column is kept


def test_worker_refuses_a_row_the_refiner_cannot_normalise_by_id(spark, setup, tmp_path):
    """A finite row whose squared norm overflows float32 fails its task naming its id (as Milvus and
    RefinedIndex refuse it), not as a zero vector; written through Spark, nothing is written."""
    spec = S.refiner_spec(spark, setup["refiner"])
    x, ids = setup["x"][:4].copy(), setup["ids"][:4]
    np.testing.assert_allclose(S._refine(spec, x, "queries"), setup["refiner"].transform(x), atol=1e-6)
    x[2] *= 1e21
    for role in ("queries", "documents"):
        with pytest.raises(S.BadRowsError, match=f"id {ids[2]}: L2 norm outside") as e:
            S._refine(spec, x, role, pa.array(ids))
        assert e.value.rows == [(int(ids[2]), e.value.rows[0][1])]
        with pytest.raises(S.BadRowsError, match="id 2: L2 norm outside"):  # no ids: its position
            S._refine(spec, x, role)
    pq.write_table(vectors_table(x, ids), tmp_path / "huge.parquet")
    df = spark.read.parquet(str(tmp_path / "huge.parquet"))
    with pytest.raises(Exception, match=f"id {ids[2]}: L2 norm outside"):
        S.write_refined(df, setup["refiner"], tmp_path / "out")
    with pytest.raises(Exception, match=f"id {ids[2]}: L2 norm outside"):
        S.build_index(df, setup["refiner"], tmp_path / "bundle", factory="IDMap,Flat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.parquet"]  # no output, no staging, no shards


def test_one_onnx_session_per_worker_process(spark, setup):
    """Each Python worker builds the refiner once and reuses it across tasks (no session per task)."""
    r = setup["refiner"]
    spec = S.refiner_spec(spark, r)

    def probe(batches):
        for b in batches:
            x = S.arrow_vectors(b.column("vector"), D_IN)
            S.worker_refiner(spec).apply_unchecked(x)
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "session": [id(S.worker_refiner(spec))]})

    rows = frame(spark, setup, 6).mapInArrow(probe, "pid long, session long").collect()
    assert len(rows) == 6
    sessions_per_pid: dict[int, set] = {}
    for row in rows:
        sessions_per_pid.setdefault(row["pid"], set()).add(row["session"])
    assert all(len(s) == 1 for s in sessions_per_pid.values())
    assert len(sessions_per_pid) < 6  # workers were reused across tasks


@pytest.mark.parametrize("source", ["parquet", "frame"])
@pytest.mark.parametrize("factory", ["IVF4,Flat", "IVF4,PQ4x4"])
def test_distributed_build_equals_single_machine(spark, setup, tmp_path, factory, source):
    x, ids, r = setup["x"], setup["ids"], setup["refiner"]
    src = str(setup["parquet"]) if source == "parquet" else frame(spark, setup)
    how = "two-level" if source == "parquet" else "mini-batch"  # mini-batch: the default
    res = S.build_index(src, r, tmp_path / "bundle", factory=factory, metric="ip", train_size=400, partitions=3,
                        **({"quantizer": how} if how != "mini-batch" else {}))
    assert res.quantizer == how
    assert len(res.shards) == 3 and sum(n for _, n in res.shards) == res.n == N
    assert not any(p.name.startswith(".shards-") for p in tmp_path.iterdir())  # shards cleaned up
    dist = RefinedIndex.load(tmp_path / "bundle")
    assert dist.ntotal == N and dist.manifest()["refiner"]["sha256"] == r.sha256 and dist.factory == factory
    trained = faiss.clone_index(dist.index)
    trained.reset()  # the same trained, empty index
    single = RefinedIndex(r, trained, "ip")
    single.add_with_ids(x, ids)  # one process, rows in id order
    for nprobe in (1, 4):
        dist.index.nprobe = single.index.nprobe = nprobe
        D1, I1 = single.search(x[:100], 10)
        D2, I2 = dist.search(x[:100], 10)
        np.testing.assert_array_equal(I2, I1)
        np.testing.assert_allclose(D2, D1, rtol=1e-6, atol=1e-6)
    own = ids[:100]  # each query is a stored vector: its own id must come back (mapped ids, not shard rows)
    if factory == "IVF4,Flat":
        assert I1[:, 0].tolist() == own.tolist()  # exact codes: every vector finds itself first
    else:  # 16-bit PQ codes are lossy (measured 0.63-0.74 first, 0.98-1.0 in the top 10); wrong ids give ~1/600
        assert (I1[:, 0] == own).mean() >= 0.5 and (I1 == own[:, None]).any(axis=1).mean() >= 0.9


def test_build_with_given_trained_index(spark, setup, tmp_path):
    x, ids, r = setup["x"], setup["ids"], setup["refiner"]
    single = RefinedIndex(r, "IVF8,Flat", "l2")
    single.train(x[::2])
    res = S.build_index(frame(spark, setup, 2), r, tmp_path / "b", metric="l2", factory="IVF8,Flat",
                        trained_index=faiss.clone_index(single.index), shard_dir=tmp_path / "sh", keep_shards=True)
    assert len(res.shard_paths) == 2 and all(os.path.isfile(p) for p in res.shard_paths)
    assert sum(faiss.read_index(p).ntotal for p in res.shard_paths) == N
    single.add_with_ids(x, ids)
    dist = RefinedIndex.load(tmp_path / "b")
    dist.index.nprobe = single.index.nprobe = 3
    D1, I1 = single.search(x[-50:], 5)
    D2, I2 = dist.search(x[-50:], 5)
    np.testing.assert_array_equal(I2, I1)
    np.testing.assert_allclose(D2, D1, rtol=1e-6, atol=1e-6)
    assert len(res.shards) == 2
    with pytest.raises(ValueError, match="must be empty"):
        S.build_index(frame(spark, setup), r, tmp_path / "c", trained_index=single.index, metric="l2")


def test_unmergeable_index_refused(spark, setup, tmp_path):
    with pytest.raises(ValueError, match="cannot be built from shards"):
        S.build_index(frame(spark, setup, 2), setup["refiner"], tmp_path / "b", factory="HNSW8", metric="ip")
    assert not (tmp_path / "b").exists()


def test_bad_rows_named_and_nothing_written(spark, setup, tmp_path):
    x, ids = setup["x"][:40].copy(), setup["ids"][:40]
    rows = [v.tolist() for v in x]
    rows[5], rows[17], rows[30] = None, rows[17][:9], [float("nan")] + rows[30][1:]
    pq.write_table(vectors_table(x, ids, pa.array(rows, pa.list_(pa.float32()))), tmp_path / "bad.parquet")
    df = spark.read.parquet(str(tmp_path / "bad.parquet")).repartition(2)
    r = setup["refiner"]
    with pytest.raises(S.BadRowsError) as e:
        S.write_refined(df, r, tmp_path / "out")
    assert sorted(i for i, _ in e.value.rows) == sorted(int(ids[k]) for k in (5, 17, 30))
    msg = str(e.value)
    assert "3 bad row" in msg and f"id {ids[17]}: length 9, expected 16" in msg and "null vector" in msg
    with pytest.raises(S.BadRowsError, match=f"id {ids[30]}: null, NaN or Inf"):
        S.build_index(df, r, tmp_path / "bundle", factory="IVF2,Flat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]  # no output, no staging, no shards
    # the parquet path (rows read by the Python workers) names the same rows and writes nothing either
    path = str(tmp_path / "bad.parquet")
    with pytest.raises(S.BadRowsError) as e:
        S.write_refined(path, r, tmp_path / "out", partitions=3)
    assert sorted(i for i, _ in e.value.rows) == sorted(int(ids[k]) for k in (5, 17, 30)) and e.value.total == 3
    assert f"id {ids[17]}: length 9, expected 16" in str(e.value)
    with pytest.raises(S.BadRowsError, match=f"id {ids[30]}: null, NaN or Inf"):
        S.build_index(path, r, tmp_path / "bundle", factory="IVF2,Flat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]
    # the same refiner in a worker names the ids too (refine_dataframe without validating first)
    with pytest.raises(Exception, match=f"id {ids[5]}: null vector"):
        S.refine_dataframe(df.where(f"id = {ids[5]}"), r).collect()


def test_write_refined_round_trip(spark, setup, tmp_path):
    n = S.write_refined(frame(spark, setup, 2), setup["refiner"], tmp_path / "out", output_col="refined")
    table = pq.read_table(tmp_path / "out")
    assert n == N and table.num_rows == N and set(table.column_names) == {"id", "vector", "label", "refined"}
    got = by_id(table, "refined", setup["ids"])
    assert np.abs(got - setup["refiner"].transform(setup["x"])).max() <= 1e-6
    with pytest.raises(FileExistsError):
        S.write_refined(frame(spark, setup, 2), setup["refiner"], tmp_path / "out")


def test_cli_spark_build_and_search(spark, setup, tmp_path, capsys):
    d = setup["dir"]
    np.save(tmp_path / "q.npy", setup["x"][:20])
    assert main(["spark-build", str(d / "r.onnx"), str(setup["parquet"]), "-o", str(tmp_path / "bundle"),
                 "--factory", "IVF4,Flat", "--partitions", "2", "--train-size", "300", "-q"]) == 0
    assert "from 2 shards" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "bundle"), str(tmp_path / "q.npy"), "-k", "3", "-o", str(tmp_path / "r.npz"),
                 "--param", "nprobe=4"]) == 0
    assert np.load(tmp_path / "r.npz")["I"][:, 0].tolist() == setup["ids"][:20].tolist()
    assert spark.range(3).count() == 3  # the CLI left the running session alone
    assert main(["spark-refine", str(d / "r.onnx"), str(setup["parquet"]), "-o", str(tmp_path / "refined"),
                 "--partitions", "2", "-q"]) == 0
    refined = pq.read_table(tmp_path / "refined")
    assert len(list((tmp_path / "refined").glob("part-*.parquet"))) == 2
    assert np.abs(by_id(refined, "vector", setup["ids"]) - setup["refiner"].transform(setup["x"])).max() <= 1e-6
    rc = main(["spark-build", str(d / "r.onnx"), str(setup["parquet"]), "-o", str(tmp_path / "b2"),
               "--vector-col", "nope", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no vector column 'nope'" in err


@pytest.mark.parametrize("source", ["parquet", "frame"])
def test_faiss_id_rules(spark, setup, tmp_path, source):
    """Id -1 (FAISS's 'no result') and ids given twice are refused by id before anything is built."""
    x, r = setup["x"][:50], setup["refiner"]
    ids = np.arange(50, dtype=np.int64) + 10
    ids[3], ids[20], ids[40] = -1, 15, 15  # 15 is also ids[5]: three rows carry it
    pq.write_table(vectors_table(x, ids), tmp_path / "ids.parquet")
    src = str(tmp_path / "ids.parquet") if source == "parquet" else spark.read.parquet(str(tmp_path / "ids.parquet"))
    with pytest.raises(S.BadRowsError) as e:
        S.build_index(src, r, tmp_path / "bundle", factory="IVF2,Flat", partitions=2)
    assert sorted(e.value.rows, key=str) == [(-1, S.MINUS_ONE), (15, "duplicate id (3 rows)")]
    assert e.value.total == 4 and "4 bad row(s), nothing was written" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.parquet"]


def test_parquet_plan_reads_every_row_once_in_order(tmp_path):
    """Tasks hold contiguous rows: reading them in task order reads the files in order, whatever the split."""
    from simskip_faiss.scale.arrow import plan_parquet

    x = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    for f, (a, b) in enumerate([(0, 300), (300, 1000)]):
        pq.write_table(vectors_table(x[a:b], np.arange(a, b)), tmp_path / f"part-{f}.parquet", row_group_size=128)
    (tmp_path / "_SUCCESS").write_text("")  # what Spark leaves beside its output: skipped
    for tasks, expected in [(None, 9), (1, 1), (3, 3), (7, 7), (5000, 1000)]:
        plan = plan_parquet(tmp_path, tasks)
        assert len(plan.tasks) == expected and plan.rows == 1000
        got = [b for t in range(len(plan.tasks)) for b in plan.batches(t, ["id", "vector"], batch_size=50)]
        np.testing.assert_array_equal(np.concatenate([b.column("id").to_numpy() for b in got]), np.arange(1000))
        np.testing.assert_array_equal(np.concatenate([S.arrow_vectors(b.column("vector"), 4) for b in got]), x)
    sizes = [sum(p.stop - p.start for p in t) for t in plan_parquet(tmp_path, 3).tasks]
    assert sizes == [333, 333, 334]
    assert all(len(t) == 1 for t in plan_parquet(tmp_path).tasks)  # default: one whole row group per task


def test_write_refined_from_parquet_readable_everywhere(spark, setup, tmp_path):
    x, ids, r = setup["x"], setup["ids"], setup["refiner"]
    n = S.write_refined(str(setup["parquet"]), r, tmp_path / "out", output_col="refined", partitions=3)
    assert n == N and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left
    table = pq.read_table(tmp_path / "out")
    assert table.column_names == ["id", "vector", "label", "refined"] and table.num_rows == N
    assert np.abs(by_id(table, "refined", ids) - r.transform(x)).max() <= 1e-6
    np.testing.assert_array_equal(by_id(table, "vector", ids), x)
    frame_ = spark.read.parquet(str(tmp_path / "out"))
    assert frame_.schema["refined"].dataType.simpleString() == "array<float>" and frame_.count() == N
    pd = pytest.importorskip("pandas")
    pdf = pd.read_parquet(tmp_path / "out")
    assert len(pdf) == N and pdf["label"].tolist() == [f"doc{i}" for i in pdf["id"]]
    with pytest.raises(FileExistsError):
        S.write_refined(str(setup["parquet"]), r, tmp_path / "out")


def test_document_updates_apply_by_id_at_ingest_and_build(spark, setup, tmp_path):
    """A refiner with document updates keyed by id: Spark refine and the distributed build store exactly what
    RefinedIndex.add_with_ids stores; a refiner whose updates file is missing is refused on the driver."""
    from simskip_faiss.training.nudge import make_updates

    x, ids = setup["x"], setup["ids"]
    qr = make_refiner(tmp_path / "q.onnx", apply_to="queries", seed=2)
    rows = np.array([3, 50, 599])
    rng = np.random.default_rng(5)
    moved = x[rows] + 0.5 * rng.standard_normal((3, D_IN)).astype(np.float32)
    upd = make_updates(x, x, rows, moved, {}).renamed(ids, "test ids")
    qr.with_documents(upd)
    docs = by_id(S.refine_dataframe(frame(spark, setup, 2), qr, output_col="refined").toArrow(), "refined", ids)
    single = RefinedIndex(qr, "IDMap,Flat")
    single.add_with_ids(x, ids)
    expect = upd.apply(x, x, ids)
    np.testing.assert_allclose(docs, expect, atol=1e-6)
    assert np.abs(docs[rows] - x[rows]).max() > 0.05 and np.array_equal(np.delete(docs, rows, 0), np.delete(x, rows, 0))
    res = S.build_index(str(setup["parquet"]), qr, tmp_path / "bundle", factory="IVF4,Flat", metric="ip", train_size=400,
                        partitions=2)
    dist = RefinedIndex.load(tmp_path / "bundle")
    assert res.n == N and dist.refiner.documents.sha256 == upd.sha256
    dist.index.nprobe = 4  # every list: exact
    np.testing.assert_array_equal(dist.search(moved, 5)[1][:, 0], ids[rows])
    missing = Refiner(qr.to_bytes())  # the bytes alone: its updates were exported beside it, not inside
    missing.documents_missing = "3 documents in simskip-documents-x.bin"
    with pytest.raises(ValueError, match="document updates .* not loaded"):
        S.refine_dataframe(frame(spark, setup, 2), missing)
