"""RefinedIndex: same results as refining by hand, FAISS round trips, bad input, threads, persistence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from helpers import mlp_refiner_bytes
from simskip_faiss import BundleError, IdentityRefiner, RefinedIndex, Refiner


@pytest.fixture()
def refiner(serving_onnx):
    return Refiner.load(serving_onnx[0])


def test_search_equals_refine_then_plain_faiss(refiner, data):
    x, _ = data
    idx = RefinedIndex(refiner, "Flat", "ip")
    idx.add(x[:500])
    D, I = idx.search(x[500:], 10)
    plain = faiss.IndexFlatIP(16)
    plain.add(refiner.transform(x[:500]))
    D2, I2 = plain.search(refiner.transform(x[500:]), 10)
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_allclose(D, D2, rtol=1e-6)
    # and the refined space differs from raw: refinement actually took place
    raw = faiss.IndexFlatIP(16)
    raw.add(x[:500])
    assert (raw.search(x[500:], 10)[1] != I).any()


def test_ivf_train_add_with_ids_remove_range(refiner, data):
    x, _ = data
    idx = RefinedIndex(refiner, "IVF8,Flat", "l2")
    with pytest.raises(RuntimeError, match="trained"):
        idx.add(x)
    idx.train(x)
    ids = np.arange(1000, 1000 + len(x))
    idx.add_with_ids(x, ids)
    assert idx.ntotal == len(x) and idx.d == 16
    idx.index.nprobe = 8  # exhaustive
    D, I = idx.search(x[:3], 1)
    np.testing.assert_array_equal(I[:, 0], ids[:3])
    assert idx.remove_ids(ids[:3]) == 3 and idx.ntotal == len(x) - 3
    D, I = idx.search(x[:3], 1)
    assert not np.isin(I, ids[:3]).any()
    lims, Dr, Ir = idx.range_search(x[3:5], 0.05)
    r = refiner.transform(x)
    for q in range(2):  # every id within the radius, found by brute force
        dist = ((r[3 + q] - r[3:]) ** 2).sum(1)
        want = set(ids[3:][dist < 0.05])
        assert set(Ir[lims[q]:lims[q + 1]]) == want and ids[3 + q] in want
    idx.reset()
    assert idx.ntotal == 0


def test_query_only_refiner_stores_raw_vectors(tmp_path, data):
    (tmp_path / "q.onnx").write_bytes(mlp_refiner_bytes(d=16, hidden=8, seed=1, apply_to="queries"))
    ref = Refiner.load(tmp_path / "q.onnx")
    x, _ = data
    idx = RefinedIndex(ref, "Flat", "ip")
    idx.add(x)
    np.testing.assert_array_equal(idx.reconstruct_n(), x)  # bit-identical
    D, I = idx.search(x[:5], 3)
    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    np.testing.assert_array_equal(I, flat.search(ref.transform(x[:5]), 3)[1])


def test_construction_refuses_misfits(refiner):
    with pytest.raises(ValueError, match="dimension 32"):
        RefinedIndex(refiner, faiss.IndexFlatIP(32), "ip")
    with pytest.raises(ValueError, match="metric"):
        RefinedIndex(refiner, faiss.IndexFlatL2(16), "ip")
    with pytest.raises(ValueError, match="normalis"):
        RefinedIndex(_unnormalised_refiner(refiner), "Flat", "ip")
    with pytest.raises(ValueError, match="FAISS could not build"):
        RefinedIndex(refiner, "NotAnIndex42", "ip")
    with pytest.raises(ValueError, match="metric must be"):
        RefinedIndex(refiner, "Flat", "cosine")


def _unnormalised_refiner(refiner):
    fake = Refiner(refiner.model_bytes)
    fake.normalize = False
    return fake


BAD_VECTORS = [
    (np.zeros((3, 15), np.float32), ValueError, "dimension 15, expected 16"),
    (np.zeros((3, 16), bool), TypeError, "dtype bool"),
    (np.zeros((3, 16), np.complex64), TypeError, "dtype complex64"),
    (np.zeros(16, np.float32), ValueError, "2-D"),
    (np.zeros((2, 3, 16), np.float32), ValueError, "2-D"),
    (np.zeros((0, 16), np.float32), ValueError, "empty"),
    (np.array([[np.nan] * 16], np.float32), ValueError, "NaN"),
    (np.array([[0] * 15 + [np.inf]], np.float32), ValueError, "NaN or Inf"),
    ("not an array", TypeError, "numpy array"),
]


@pytest.mark.parametrize("bad, exc, msg", BAD_VECTORS)
def test_bad_vectors_rejected_and_index_unchanged(refiner, data, bad, exc, msg):
    x, _ = data
    idx = RefinedIndex(refiner, "IDMap,Flat", "ip")
    idx.add_with_ids(x[:50], np.arange(50))
    for call in (lambda: idx.add(bad), lambda: idx.add_with_ids(bad, np.arange(3)), lambda: idx.search(bad, 5)):
        with pytest.raises(exc, match=msg):
            call()
    assert idx.ntotal == 50
    D, I = idx.search(x[:50], 1)
    np.testing.assert_array_equal(I[:, 0], np.arange(50))


def test_nan_deep_in_a_large_batch_leaves_index_unchanged(refiner, data):
    x, _ = data
    idx = RefinedIndex(refiner, "Flat", "ip", chunk_size=64)
    idx.add(x[:10])
    big = np.tile(x, (2, 1))
    big[-1, 3] = np.nan  # in the last chunk: nothing before it may be stored
    with pytest.raises(ValueError, match=f"row {len(big) - 1}"):
        idx.add(big)
    assert idx.ntotal == 10


@pytest.mark.parametrize("k, exc, msg", [(0, ValueError, "positive"), (-1, ValueError, "positive"),
                                         (True, TypeError, "integer"), (2.0, TypeError, "integer")])
def test_bad_k(refiner, data, k, exc, msg):
    x, _ = data
    idx = RefinedIndex(refiner, "Flat", "ip")
    idx.add(x[:50])
    with pytest.raises(exc, match=msg):
        idx.search(x[:2], k)


@pytest.mark.parametrize("factory, metric", [("Flat", "ip"), ("Flat", "l2"), ("IDMap,Flat", "l2"), ("HNSW8", "ip")])
def test_k_above_ntotal_pads_as_faiss_does(refiner, data, factory, metric):
    """FAISS pads missing hits with id -1 and -FLT_MAX (ip) / FLT_MAX (l2); so does the wrapper, empty index included."""
    x, _ = data
    idx = RefinedIndex(refiner, factory, metric)
    plain = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    worst = np.finfo(np.float32).max * (-1 if metric == "ip" else 1)
    D, I = idx.search(x[:3], 4)
    assert (I == -1).all() and (D == worst).all() and D.shape == (3, 4)
    ids = np.arange(5) + 100
    if factory.startswith("IDMap"):
        idx.add_with_ids(x[:5], ids)
        plain.add_with_ids(refiner.transform(x[:5]), ids)
    else:
        idx.add(x[:5])
        plain.add(refiner.transform(x[:5]))
    D, I = idx.search(x[10:13], 8)
    D2, I2 = plain.search(refiner.transform(x[10:13]), 8)
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_allclose(D, D2, rtol=1e-6)
    assert (I[:, 5:] == -1).all() and (D[:, 5:] == worst).all()
    assert sorted(I[0, :5]) == sorted(ids if factory.startswith("IDMap") else range(5))


@pytest.mark.parametrize("ids, exc, msg", [(np.arange(4), ValueError, "length 4, expected 5"),
                                           (np.arange(5, dtype=np.float32), TypeError, "integer"),
                                           (np.arange(10).reshape(5, 2), ValueError, "1-D")])
def test_bad_ids(refiner, data, ids, exc, msg):
    x, _ = data
    idx = RefinedIndex(refiner, "IDMap,Flat", "ip")
    with pytest.raises(exc, match=msg):
        idx.add_with_ids(x[:5], ids)
    assert idx.ntotal == 0


def test_non_onnx_and_missing_refiner_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        Refiner.load(bad)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        Refiner.load(tmp_path / "nope.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Refiner.load(tmp_path / "empty.onnx")


def test_refiner_batches_match_one_shot(serving_onnx, data):
    x, _ = data
    one = Refiner.load(serving_onnx[0], batch_size=10_000).transform(x)
    many = Refiner.load(serving_onnx[0], batch_size=7).transform(x)
    np.testing.assert_allclose(one, many, atol=1e-6)


def test_concurrent_searches_equal_serial(refiner, data):
    x, _ = data
    idx = RefinedIndex(refiner, "HNSW16", "ip")
    idx.add(x)
    queries = [x[i::7] for i in range(7)]
    serial = [idx.search(q, 5) for q in queries]
    results = [None] * 7

    def work(i):
        for _ in range(5):
            results[i] = idx.search(queries[i], 5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (D, I), (D2, I2) in zip(serial, results):
        np.testing.assert_array_equal(I, I2)
        np.testing.assert_array_equal(D, D2)


def test_identity_refiner_equals_plain_faiss(data):
    x, _ = data
    idx = RefinedIndex(IdentityRefiner(16), "Flat", "l2")
    idx.add(x)
    flat = faiss.IndexFlatL2(16)
    flat.add(x)
    np.testing.assert_array_equal(idx.search(x[:20], 5)[1], flat.search(x[:20], 5)[1])


# -- persistence ------------------------------------------------------------------------------

def _built(refiner, x):
    idx = RefinedIndex(refiner, "HNSW16", "ip")
    idx.add(x)
    return idx


def test_save_load_round_trip(refiner, data, tmp_path):
    x, _ = data
    idx = _built(refiner, x)
    idx.save(tmp_path / "b")
    back = RefinedIndex.load(tmp_path / "b")
    assert back.ntotal == idx.ntotal and back.factory == "HNSW16" and back.refiner.sha256 == refiner.sha256
    for a, b in zip(idx.search(x[:30], 5), back.search(x[:30], 5)):
        np.testing.assert_array_equal(a, b)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["d"] == 16 and m["ntotal"] == len(x) and m["metric"] == "ip" and m["format_version"] == 2


def test_identity_bundle_round_trip(data, tmp_path):
    x, _ = data
    idx = RefinedIndex(IdentityRefiner(16, normalize=True), "Flat", "ip")
    idx.add(x)
    idx.save(tmp_path / "id")
    back = RefinedIndex.load(tmp_path / "id")
    assert back.refiner.is_identity and back.refiner.normalize
    np.testing.assert_array_equal(back.search(x[:5], 3)[1], idx.search(x[:5], 3)[1])


def _files(bundle: Path, stem: str) -> Path:
    return next(bundle.glob(f"{stem}-*"))


@pytest.mark.parametrize("damage, msg", [
    (lambda b: _files(b, "index").write_bytes(_files(b, "index").read_bytes()[:-100]), "truncated"),
    (lambda b: _flip_byte(_files(b, "refiner")), "modified"),
    (lambda b: _files(b, "index").unlink(), "missing"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "corrupt"),
    (lambda b: (b / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda b: _edit_manifest(b, ntotal=5), "ntotal"),
    (lambda b: _edit_manifest(b, format_version=99), "not supported"),
])
def test_damaged_bundle_refused(refiner, data, tmp_path, damage, msg):
    x, _ = data
    _built(refiner, x).save(tmp_path / "b")
    damage(tmp_path / "b")
    with pytest.raises(BundleError, match=msg):
        RefinedIndex.load(tmp_path / "b")


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(bundle: Path, **fields):
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(fields)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_missing_bundle_and_foreign_directory(refiner, data, tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle not found"):
        RefinedIndex.load(tmp_path / "nothing")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(BundleError, match="not a bundle"):
        _built(refiner, data[0]).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_failed_save_keeps_previous_bundle(refiner, data, tmp_path, monkeypatch):
    x, _ = data
    _built(refiner, x[:100]).save(tmp_path / "b")
    import simskip_faiss.persistence as p

    def boom(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(p, "atomic_write_bytes", boom)  # the manifest write fails
    with pytest.raises(OSError, match="disk full"):
        _built(refiner, x).save(tmp_path / "b")
    monkeypatch.undo()
    back = RefinedIndex.load(tmp_path / "b")
    assert back.ntotal == 100
    assert not list((tmp_path / "b").glob(".tmp-*"))


KILLER = textwrap.dedent("""
    import sys, numpy as np
    from simskip_faiss import RefinedIndex, Refiner
    ref = Refiner.load(sys.argv[1]); x = np.load(sys.argv[2])
    idx = RefinedIndex(ref, "Flat", "ip"); idx.add(x)
    print("ready", flush=True)
    while True:
        idx.save(sys.argv[3])
""")


def test_killed_save_keeps_a_readable_bundle(serving_onnx, data, tmp_path):
    """SIGKILL a process that saves in a loop, at several moments: the bundle always loads whole."""
    x, _ = data
    big = np.tile(x, (200, 1))  # ~7.7 MB index: saves take long enough to be interrupted
    np.save(tmp_path / "x.npy", big)
    bundle = tmp_path / "b"
    RefinedIndex(Refiner.load(serving_onnx[0]), "Flat", "ip").save(bundle)  # the previous copy (empty)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, str(script), str(serving_onnx[0]), str(tmp_path / "x.npy"), str(bundle)],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        threading.Event().wait(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        back = RefinedIndex.load(bundle)
        assert back.ntotal in (0, len(big))
