"""Milvus (milvus-lite): a refined collection searches like a refined FAISS Flat index, and keeps its refiner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
torch = pytest.importorskip("torch")

import faiss  # noqa: E402

from simskip_faiss import IdentityRefiner, Refiner  # noqa: E402
from simskip_faiss.cli import main  # noqa: E402
from simskip_faiss.scale.milvus import BadRowsError, RefinedCollection, RefinerMismatchError, connect  # noqa: E402

D_IN, N = 16, 300
ROOT = Path(__file__).resolve().parents[1]


def make_refiner(path, seed: int = 0) -> Refiner:
    """A tiny untrained SimSkip with a non-zero last layer (L2-normalised output)."""
    from simskip_faiss.training.export import export
    from simskip_faiss.training import SimSkip

    torch.manual_seed(seed)
    m = SimSkip(D_IN, hidden=8)
    torch.nn.init.normal_(m.f[-1].weight, std=0.3)
    export(m, path)
    return Refiner.load(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("milvus")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, D_IN)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {"dir": d, "x": x, "ids": (np.arange(N) * 3 + 11).astype(np.int64), "client": connect(str(d / "m.db")),
            "refiner": make_refiner(d / "r.onnx"), "other": make_refiner(d / "other.onnx", seed=5)}


def flat(refiner, x, ids, metric: str) -> faiss.Index:
    index = faiss.IndexIDMap(faiss.IndexFlatIP(D_IN) if metric == "ip" else faiss.IndexFlatL2(D_IN))
    index.add_with_ids(refiner.transform(x), ids)
    return index


def assert_same(coll, index, refiner, q, k=8):
    D1, I1 = coll.search(q, k)
    D2, I2 = index.search(refiner.transform(q), k)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_round_trip_equals_refined_flat(env, metric):
    x, ids, r = env["x"], env["ids"], env["refiner"]
    coll = RefinedCollection(env["client"], f"docs_{metric}", r, metric, index_type="FLAT")
    assert coll.insert(ids, x, {"title": [f"t{i}" for i in ids]}) == N and coll.count() == N
    index = flat(r, x, ids, metric)
    assert_same(coll, index, r, x[:40])
    raw = flat(IdentityRefiner(D_IN), x, ids, metric)
    assert (raw.search(x[:40], 8)[1] != coll.search(x[:40], 8)[1]).any()  # refinement changed the ranking
    gone = ids[:40:2]
    coll.delete(gone)
    index.remove_ids(gone)
    assert coll.count() == N - len(gone)
    assert_same(coll, index, r, x[:40])
    assert not np.isin(coll.search(x[:40], 8)[1], gone).any()
    new = np.roll(x[50:60], 1, axis=1)  # upsert replaces vectors by id
    coll.upsert(ids[50:60], new)
    index.remove_ids(ids[50:60])
    index.add_with_ids(r.transform(new), ids[50:60])
    assert coll.count() == N - len(gone)
    assert_same(coll, index, r, new)
    hits = coll.search_raw(x[100:101], 1, output_fields=["title"])
    assert hits[0][0]["entity"]["title"] == f"t{ids[100]}"
    D, I = coll.search(x[:2], 5, filter=f"id in [{ids[1]}, {ids[3]}]")
    assert set(I[I >= 0].ravel()) <= {ids[1], ids[3]} and (I[:, 2:] == -1).all()  # FAISS-style padding


def test_mismatched_refiner_is_refused(env):
    client, r = env["client"], env["refiner"]
    RefinedCollection(client, "guarded", r, "ip")
    for other, metric in ((env["other"], "ip"), (IdentityRefiner(D_IN, normalize=True), "ip"), (r, "l2")):
        with pytest.raises(RefinerMismatchError, match="not comparable") as e:
            RefinedCollection(client, "guarded", other, metric)
        assert r.sha256[:16] in str(e.value)
    RefinedCollection(client, "guarded", Refiner.load(env["dir"] / "r.onnx"), "ip")  # the same refiner reopens it


def test_collection_without_refiner_record_is_refused(env):
    from pymilvus import DataType

    client = env["client"]
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=D_IN)
    client.create_collection("foreign", schema=schema)
    with pytest.raises(RefinerMismatchError, match="records no refiner"):
        RefinedCollection(client, "foreign", env["refiner"])
    with pytest.raises(ValueError, match="does not exist"):
        RefinedCollection(client, "missing", env["refiner"], create=False)


def test_bad_rows_named_and_nothing_written(env, tmp_path):
    x, ids, r = env["x"][:30], env["ids"][:30], env["refiner"]
    coll = RefinedCollection(env["client"], "strict", r, index_type="FLAT")
    rows = [v.tolist() for v in x]
    rows[3], rows[12], rows[29] = None, rows[12][:5], rows[29][:-1] + [float("inf")]
    with pytest.raises(BadRowsError) as e:
        coll.insert(ids, rows)
    assert sorted(i for i, _ in e.value.rows) == [ids[3], ids[12], ids[29]]
    assert f"id {ids[12]}: length 5, expected 16" in str(e.value)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(BadRowsError, match=f"id {ids[7]}: NaN"):
        coll.upsert(ids, bad)
    assert r.normalize and r.apply_to == "both"
    huge = x.copy()
    huge[21] *= 1e19  # finite, but its squared norm overflows float32: the refiner cannot normalise it
    with pytest.raises(BadRowsError, match=f"id {ids[21]}: L2 norm outside"):
        coll.insert(ids, huge)
    table = pa.table({"id": ids, "vector": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "bad.parquet", row_group_size=8)
    from simskip_faiss.scale.milvus import ingest_parquet

    with pytest.raises(BadRowsError) as e:  # the bad rows sit in several batches, the last at the very end
        ingest_parquet(coll, tmp_path / "bad.parquet", batch_rows=8)
    assert e.value.total == 3 and sorted(i for i, _ in e.value.rows) == [ids[3], ids[12], ids[29]]
    assert coll.count() == 0


def test_cli_ingest_and_search(env, tmp_path, capsys):
    x, ids, r = env["x"], env["ids"], env["refiner"]
    onnx, uri = str(env["dir"] / "r.onnx"), str(tmp_path / "cli.db")
    np.save(tmp_path / "x.npy", x[:150])
    np.save(tmp_path / "ids.npy", ids[:150])
    pq.write_table(pa.table({"id": ids[150:], "vector": pa.array([v.tolist() for v in x[150:]], pa.list_(pa.float32())),
                             "title": [f"t{i}" for i in ids[150:]]}), tmp_path / "rest.parquet")
    common = ["--uri", uri, "--collection", "c", "-q"]
    assert main(["milvus-ingest", onnx, str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.npy"),
                 "--index-type", "FLAT", *common]) == 0
    assert main(["milvus-ingest", onnx, str(tmp_path / "rest.parquet"), *common]) == 0
    assert "the collection holds 300" in capsys.readouterr().out
    np.save(tmp_path / "q.npy", x[:25])
    assert main(["milvus-search", onnx, str(tmp_path / "q.npy"), "-k", "5", "-o", str(tmp_path / "res.npz"), *common]) == 0
    res = np.load(tmp_path / "res.npz")
    D, I = flat(r, x, ids, "ip").search(r.transform(x[:25]), 5)
    np.testing.assert_array_equal(res["I"], I)
    rc = main(["milvus-search", str(env["dir"] / "other.onnx"), str(tmp_path / "q.npy"), "-o", str(tmp_path / "r2.npz"),
               *common])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not comparable" in err and not (tmp_path / "r2.npz").exists()


def test_released_collection_is_loaded_before_search(env):
    """Milvus releases a collection when its last client goes; reopening it must load it again."""
    x, ids, r = env["x"], env["ids"], env["refiner"]
    RefinedCollection(env["client"], "released", r, index_type="FLAT").insert(ids, x)
    env["client"].release_collection("released")
    coll = RefinedCollection(connect(str(env["dir"] / "m.db")), "released", r, create=False)
    assert_same(coll, flat(r, x, ids, "ip"), r, x[:10])


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "simskip_faiss.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_ingest_then_search_in_new_processes(env, tmp_path):
    """The README flow: ingest in one process, search in another; success prints no log and no traceback."""
    x, ids, r = env["x"], env["ids"], env["refiner"]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "q.npy", x[:20])
    common = ["--uri", "m.db", "--collection", "docs", "-q"]
    ing = _cli("milvus-ingest", str(env["dir"] / "r.onnx"), "x.npy", "--ids", "ids.npy", *common, cwd=tmp_path)
    assert ing.returncode == 0 and ing.stderr == "" and f"holds {N}" in ing.stdout, ing.stderr
    res = _cli("milvus-search", str(env["dir"] / "r.onnx"), "q.npy", "-k", "5", "-o", "res.npz", *common, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    D, I = flat(r, x, ids, "ip").search(r.transform(x[:20]), 5)
    np.testing.assert_array_equal(np.load(tmp_path / "res.npz")["I"], I)
    bad = _cli("milvus-search", str(env["dir"] / "r.onnx"), "q.npy", "--filter", "id ==== 3", "-o", "r2.npz",
               *common, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr


def test_document_updates_by_primary_key_and_the_output_check(env):
    """Milvus ingest applies each id's document update (as RefinedIndex.add_with_ids does), and its write path
    checks the refined output like every other path (it wrote apply_unchecked output: a graph's bad rows went in)."""
    from simskip_faiss import LinearRefiner, RefinedIndex
    from simskip_faiss.training.nudge import make_updates

    x, ids, r = env["x"], env["ids"], env["refiner"]
    rows = np.array([4, 40, 200])
    y = r.transform(x)
    moved = y[rows] + 0.5 * np.random.default_rng(3).standard_normal((3, D_IN)).astype(np.float32)
    upd = make_updates(x, y, rows, moved, {}).renamed(ids, "test ids")
    ref = Refiner(r.to_bytes()).with_documents(upd)
    coll = RefinedCollection(env["client"], "docs_updates", ref, "ip", index_type="FLAT")
    coll.insert(ids, x)
    single = RefinedIndex(ref, "IDMap,Flat")
    single.add_with_ids(x, ids)
    got = env["client"].query("docs_updates", ids=ids[rows].tolist(), output_fields=["vector"])
    stored = np.array([g["vector"] for g in sorted(got, key=lambda g: list(ids[rows]).index(g["id"]))], np.float32)
    np.testing.assert_allclose(stored, upd.apply(x[rows], y[rows], ids[rows]), atol=1e-6)  # the moved vectors
    assert np.abs(stored - y[rows]).max() > 0.05
    np.testing.assert_array_equal(coll.search(x[:30], 8)[1], single.search(x[:30], 8)[1])
    scale = LinearRefiner(np.eye(D_IN) * 1e15, np.zeros(D_IN), normalize=False)
    bad = RefinedCollection(env["client"], "docs_overflow", scale, "l2", index_type="FLAT")
    with pytest.raises(ValueError, match="L2 norm above"):
        bad.insert(ids[:3], x[:3] * 1e10)  # finite input, refined past float32's squared range
    assert bad.count() == 0
