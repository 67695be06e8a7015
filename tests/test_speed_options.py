"""Speed options: reduced-precision refiners, the native FAISS linear path, bounded-memory streaming ingest.

Each option is checked against an independent expectation (torch, numpy brute force, the fp32
file, a round trip through disk), never against timing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import faiss
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from simskip_faiss import IdentityRefiner, RefinedIndex, Refiner  # noqa: E402
from simskip_faiss.training.export import PARITY_TOLERANCE, export, quantize, sample_recall, split_sample  # noqa: E402
from simskip_faiss.faiss_utils import release_rows, reserve  # noqa: E402
from simskip_faiss.refiners import LinearRefiner, distil_linear  # noqa: E402


def intersection_at_10(a: np.ndarray, b: np.ndarray) -> float:
    """10-recall@10 (|top-10 ∩ top-10| / 10, averaged) of two result lists."""
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


def top10(docs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact inner-product top-10 by numpy (no FAISS)."""
    return np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :10]


@pytest.fixture(scope="module")
def int8_export(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "r8.onnx"
    return path, export(trained.model, path, {"metric": "ip"}, precision="int8")


# -- reduced precision -------------------------------------------------------------------------
def test_int8_export_is_stamped_verified_and_keeps_neighbours(int8_export, onnx_path, trained, data):
    path, meta = int8_export
    r8, r32 = Refiner.load(path), Refiner.load(onnx_path[0])
    assert meta["precision"] == r8.precision == "int8" and r8.metadata == meta
    assert meta["parity_tolerance"] == PARITY_TOLERANCE["int8"]
    assert meta["fp32_parity_max_abs_err"] <= 1e-5
    proto = onnx.load(path)
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops  # the weights really are int8
    mats = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert len(mats) == 2 and all(i.data_type == onnx.TensorProto.INT8 for i in mats)
    x, _ = data
    with torch.no_grad():
        want = trained.model(torch.from_numpy(x)).numpy()
    err = np.abs(r8.transform(x) - want).max()
    assert 0 < err <= PARITY_TOLERANCE["int8"]  # quantised (not bit-equal), yet within the stamped tolerance
    assert intersection_at_10(top10(r32(x), r32(x[:200])), top10(r8(x), r8(x[:200]))) >= 0.9


def test_auto_precision_ships_int8_or_falls_back_to_fp32(trained, tmp_path, data, monkeypatch):
    """auto = int8 when it passes its parity check; when it fails, the exact fp32 file, saying why.
    An explicit int8 that fails raises and leaves the file at the path as it was."""
    x, _ = data
    with torch.no_grad():
        want = trained.model(torch.from_numpy(x)).numpy()
    assert export(trained.model, tmp_path / "a.onnx", precision="auto")["precision"] == "int8"
    monkeypatch.setitem(PARITY_TOLERANCE, "int8", 1e-7)  # no int8 graph is that close to torch
    meta = export(trained.model, tmp_path / "b.onnx", precision="auto")
    r = Refiner.load(tmp_path / "b.onnx")
    assert meta["precision"] == r.precision == "fp32" and r.metadata == meta
    assert meta["precision_fallback"].startswith("int8 exceeded its parity tolerance") and "> 1e-07" in meta["precision_fallback"]
    assert "parity_tolerance" not in meta and meta["parity_max_abs_err"] <= 1e-5
    np.testing.assert_allclose(r.transform(x), want, atol=1e-5)
    before = (tmp_path / "a.onnx").read_bytes()
    with pytest.raises(ValueError, match="at int8; export it at another precision, e.g. fp32"):
        export(trained.model, tmp_path / "a.onnx", precision="int8")
    assert (tmp_path / "a.onnx").read_bytes() == before


def test_sample_recall_is_faiss_10_recall_at_10_by_brute_force(trained, tmp_path, data):
    """The neighbour check against numpy: top-10 of the fp32 and int8 files, queries and corpus refined
    (or the corpus left raw for a query-only refiner)."""
    x, _ = data
    export(trained.model, tmp_path / "f.onnx", {"metric": "ip"})
    export(trained.model, tmp_path / "i.onnx", {"metric": "ip"}, precision="int8")
    fb, ib = (tmp_path / "f.onnx").read_bytes(), (tmp_path / "i.onnx").read_bytes()
    r32, r8 = Refiner(fb), Refiner(ib)
    q, docs = split_sample(x)
    assert len(q) == min(1000, len(x) // 2) and len(q) + len(docs) == len(x)
    assert sorted(map(bytes, np.vstack([q, docs]))) == sorted(map(bytes, x))  # a split of the rows, each once
    want = intersection_at_10(top10(r32(docs), r32(q)), top10(r8(docs), r8(q)))
    assert sample_recall(fb, ib, q, docs) == pytest.approx(want, abs=1e-9)
    want_q = intersection_at_10(top10(docs, r32(q)), top10(docs, r8(q)))
    assert sample_recall(fb, ib, q, docs, apply_to="queries") == pytest.approx(want_q, abs=1e-9)
    with pytest.raises(ValueError, match="sample has 15 rows"):
        split_sample(x[:15])


def test_auto_precision_falls_back_when_int8_reorders_the_sample(trained, tmp_path, data, caplog):
    """Near-ties int8 cannot separate: its parity on random inputs passes, its neighbours on this sample
    do not, so auto ships fp32 and says why; an explicit int8 is kept, stamped and warned about."""
    x, _ = data
    rng = np.random.default_rng(0)
    ties = (x[0] + 2e-3 * rng.standard_normal((400, x.shape[1]))).astype(np.float32)  # one dense cluster
    meta = export(trained.model, tmp_path / "a.onnx", {"metric": "ip"}, precision="auto", sample=x)
    assert meta["precision"] == "int8" and meta["sample_recall"] >= 0.99 and meta["sample_queries"] == len(x) // 2
    meta = export(trained.model, tmp_path / "b.onnx", {"metric": "ip"}, precision="auto", sample=ties)
    assert meta["precision"] == Refiner.load(tmp_path / "b.onnx").precision == "fp32"
    assert "10-recall@10" in meta["precision_fallback"] and "200 queries over 200 rows" in meta["precision_fallback"]
    with caplog.at_level("WARNING", logger="simskip_faiss.training.export"):
        meta = export(trained.model, tmp_path / "c.onnx", {"metric": "ip"}, precision="int8", sample=ties)
    assert meta["precision"] == "int8" and meta["sample_recall"] < 0.99 and "precision_fallback" not in meta
    assert "kept: asked for explicitly" in caplog.text


def test_fp16_export_stores_half_weights(trained, tmp_path, data):
    meta = export(trained.model, tmp_path / "h.onnx", precision="fp16")
    proto = onnx.load(tmp_path / "h.onnx")
    mats = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert mats and all(i.data_type == onnx.TensorProto.FLOAT16 for i in mats)
    x, _ = data
    with torch.no_grad():
        want = trained.model(torch.from_numpy(x)).numpy()
    err = np.abs(Refiner.load(tmp_path / "h.onnx").transform(x) - want).max()
    assert meta["precision"] == "fp16" and 0 < err <= PARITY_TOLERANCE["fp16"]


def test_quantize_file_round_trip_and_refusals(onnx_path, tmp_path, data):
    src = Refiner.load(onnx_path[0])
    meta = quantize(onnx_path[0], tmp_path / "q.onnx")
    q = Refiner.load(tmp_path / "q.onnx")
    assert q.precision == "int8" and meta["quantized_from"] == src.sha256
    x, _ = data
    assert np.abs(q.transform(x) - src.transform(x)).max() <= meta["parity_tolerance"]
    with pytest.raises(ValueError, match="already int8"):
        quantize(tmp_path / "q.onnx", tmp_path / "qq.onnx")
    with pytest.raises(ValueError, match="precision must be"):
        quantize(onnx_path[0], tmp_path / "x.onnx", precision="int4")
    with pytest.raises(ValueError, match="does not match"):  # bad input: cannot be quantised at that tolerance
        quantize(onnx_path[0], tmp_path / "tight.onnx", tol=1e-9)
    assert not (tmp_path / "tight.onnx").exists() and not (tmp_path / "x.onnx").exists()
    meta = quantize(onnx_path[0], tmp_path / "s.onnx", sample=x)  # the neighbour check, against the fp32 file
    s8, (qs, docs) = Refiner.load(tmp_path / "s.onnx"), split_sample(x)
    want = intersection_at_10(top10(src(docs), src(qs)), top10(s8(docs), s8(qs)))
    assert meta["sample_recall"] == pytest.approx(want, abs=1e-9) == s8.metadata["sample_recall"]


def test_fp32_export_graph_is_lean_and_exact(trained, tmp_path, data):
    """alpha != 1 is folded into the weights and normalisation is one node: same function."""
    from simskip_faiss.training import SimSkip

    m = SimSkip(16, 32)
    m.load_state_dict(trained.model.state_dict())
    m.alpha.fill_(0.3)
    export(m, tmp_path / "a.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "a.onnx").graph.node]
    assert ops == ["Gemm", "Gelu", "Gemm", "Add", "RMSNormalization"], ops
    x, _ = data
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(Refiner.load(tmp_path / "a.onnx").transform(x), want, atol=1e-5)


def test_fast_input_path_equals_general_validation(onnx_path, data):
    r = Refiner.load(onnx_path[0])
    x, _ = data
    one = x[:1].copy()
    np.testing.assert_array_equal(r.transform(one), r.transform(one.astype(np.float64)))
    np.testing.assert_array_equal(r.transform(x[:3, :]), r.transform(np.asfortranarray(x[:3])))
    bad = one.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        r.transform(bad)
    with pytest.raises(ValueError, match="dimension"):
        r.transform(one[:, :8].copy())


# -- native FAISS linear path ------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear(data):
    x, _ = data
    rng = np.random.default_rng(1)
    A = (np.eye(16) + 0.3 * rng.standard_normal((16, 16))).astype(np.float32)
    return LinearRefiner(A, x.mean(0), normalize=True, name="test", bias=rng.standard_normal(16).astype(np.float32))


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_to_faiss_matches_numpy_and_survives_write_index(linear, data, factory, tmp_path):
    x, _ = data
    native = linear.to_faiss(factory, "ip")
    assert isinstance(native, faiss.IndexPreTransform) and native.chain.size() == 2
    native.train(x)
    native.add(x)
    if factory.startswith("IVF"):
        faiss.extract_index_ivf(native).nprobe = 4  # exhaustive
    D, I = native.search(x[:50], 10)
    # independent expectation: the refiner's own numpy transform and brute force
    y = linear.transform(x)
    want = top10(y, y[:50])
    assert intersection_at_10(I, want) >= 0.999
    np.testing.assert_allclose(D[:, 0], (y[:50] * y[I[:, 0]]).sum(1), atol=1e-5)
    # the ONNX/numpy path (RefinedIndex) agrees too
    ri = RefinedIndex(linear, factory, "ip")
    ri.train(x)
    ri.add(x)
    if factory.startswith("IVF"):
        ri.index.nprobe = 4
    np.testing.assert_array_equal(ri.search(x[:50], 10)[1], I)
    faiss.write_index(native, str(tmp_path / "native.faiss"))
    back = faiss.read_index(str(tmp_path / "native.faiss"))
    D2, I2 = back.search(x[:50], 10)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_allclose(D2, D, atol=1e-6)


def test_to_faiss_l2_without_normalisation(data):
    x, _ = data
    lin = LinearRefiner.whitening(x, normalize=False)
    native = lin.to_faiss("Flat", "l2")
    assert native.chain.size() == 1
    native.add(x)
    D, I = native.search(x[:20], 5)
    y = lin.transform(x)
    d2 = ((y[:20, None, :] - y[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(D, np.sort(d2, axis=1)[:, :5], rtol=1e-3, atol=1e-3)


def test_to_faiss_refusals(data):
    x, _ = data
    with pytest.raises(ValueError, match="L2-normalises"):
        LinearRefiner.centring(x, normalize=False).to_faiss("Flat", "ip")
    full = faiss.IndexFlatIP(16)
    full.add(x)
    with pytest.raises(ValueError, match="empty"):
        LinearRefiner.centring(x).to_faiss(full, "ip")
    with pytest.raises(ValueError, match="dimension"):
        LinearRefiner.centring(x).to_faiss(faiss.IndexFlatIP(8), "ip")


def test_distil_recovers_an_affine_map_exactly(linear, data):
    x, _ = data
    unnormalised = LinearRefiner(linear.A, linear.mean, normalize=False, bias=linear.bias)
    d = distil_linear(unnormalised, x, ridge=0.0)
    assert d.metadata["fit_r2"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(d.transform(x), unnormalised.transform(x), atol=1e-4)


def test_distil_mlp_refiner_is_closer_than_raw(onnx_path, data):
    r = Refiner.load(onnx_path[0])
    x, _ = data
    d = distil_linear(r, x)
    assert d.normalize and 0 < d.metadata["fit_r2"] < 1 and d.metadata["distilled_from"] == r.sha256
    y = r.transform(x)
    assert np.abs(d.transform(x) - y).mean() < np.abs(x - y).mean()
    with pytest.raises(ValueError, match="at least 2"):
        distil_linear(r, x[:1])


# -- streaming ingest ----------------------------------------------------------------------------
def test_memmap_ingest_equals_in_memory_and_reports_bad_rows(refiner_path_data, tmp_path):
    path, x = refiner_path_data
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    streamed = RefinedIndex(path, "Flat", "ip", chunk_size=64)
    streamed.add(mm)
    whole = RefinedIndex(path, "Flat", "ip")
    whole.add(x)
    np.testing.assert_array_equal(streamed.reconstruct_n(), whole.reconstruct_n())
    x2 = x.copy()
    x2[300, 5] = np.inf
    np.save(tmp_path / "bad.npy", x2)
    with pytest.raises(ValueError, match="first at row 300"):
        streamed.add(np.load(tmp_path / "bad.npy", mmap_mode="r"))
    assert streamed.ntotal == len(x)  # all or nothing


@pytest.fixture()
def refiner_path_data(onnx_path, data):
    return onnx_path[0], data[0]


def test_reserve_keeps_flat_contents_and_skips_other_indexes(data):
    x, _ = data
    flat = faiss.IndexFlatIP(16)
    flat.add(x[:10])
    reserve(flat, 500)
    assert flat.ntotal == 10 and flat.codes.size() == 10 * flat.code_size
    flat.add(x[10:])
    np.testing.assert_array_equal(flat.reconstruct_n(0, len(x)), x)
    hnsw = faiss.IndexHNSWFlat(16, 8)
    reserve(hnsw, 500)  # not a flat-codes index: nothing happens, nothing breaks
    hnsw.add(x)
    assert hnsw.ntotal == len(x)


def test_release_rows_leaves_copy_on_write_maps_alone(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((64, 1024), np.float32))
    cow = np.load(tmp_path / "c.npy", mmap_mode="c")
    cow[:] = 7.0  # private writes, never flushed to the file
    release_rows(cow, 0, 64)
    assert (cow == 7.0).all()
    ro = np.load(tmp_path / "c.npy", mmap_mode="r")
    release_rows(ro, 0, 64)  # a read-only map re-reads the file after release
    assert (ro == 0.0).all()


INGEST = textwrap.dedent("""
    import json, sys
    import numpy as np
    from simskip_faiss import IdentityRefiner, RefinedIndex

    def kb(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

    idx = RefinedIndex(IdentityRefiner(384, normalize=True), "Flat", "ip", chunk_size=4096)
    x = np.load(sys.argv[1], mmap_mode="r")
    base = kb("VmRSS:")
    idx.add(x)
    print(json.dumps({"growth_kb": kb("VmHWM:") - base, "index_kb": idx.ntotal * 384 * 4 // 1024}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streamed_ingest_peak_memory_is_the_index_plus_a_few_chunks(tmp_path):
    """Without page release and one-time growth the peak is ~2.5x the index (file pages + vector doubling)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "big.npy", rng.standard_normal((48_000, 384), dtype=np.float32))
    out = subprocess.run([sys.executable, "-c", INGEST, str(tmp_path / "big.npy")], capture_output=True,
                         text=True, check=True, timeout=120)
    m = json.loads(out.stdout)
    chunk_kb = 4096 * 384 * 4 // 1024
    assert m["growth_kb"] <= m["index_kb"] + 6 * chunk_kb, m


def test_a_failing_sub_batch_raises_in_the_caller_and_stops_the_rest(onnx_path, data):
    """A worker's exception reaches the caller (not swallowed by the pool); no sub-batch starts after it."""
    r = Refiner.load(onnx_path[0], threads=2, batch_size=256)
    x = np.tile(data[0], (20, 1))[:256 * 12]  # 12 sub-batches for 2 runners
    calls, run, failed = [], r._run, threading.Event()

    def flaky(part):
        calls.append(threading.get_ident())
        if threading.get_ident() != caller:
            failed.set()
            raise MemoryError("worker failed")
        failed.wait(10)  # the caller's first sub-batch ends only after the worker's has failed
        time.sleep(0.01)
        return run(part)

    caller, r._run = threading.get_ident(), flaky
    with pytest.raises(MemoryError, match="worker failed"):
        r.transform(x)
    assert len(calls) <= 3, calls  # the caller's first, the worker's failed one, at most one more in flight


def test_default_sub_batch_splits_large_inputs_exactly(onnx_path, data):
    """1024 rows per onnxruntime run by default; the split result equals one run."""
    two = Refiner.load(onnx_path[0], threads=2)
    assert two.batch_size == 1024
    x = np.tile(data[0], (4, 1))[:2500]  # > 1024 rows: split into sub-batches
    np.testing.assert_allclose(two.transform(x), Refiner.load(onnx_path[0], batch_size=4096).transform(x), atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        Refiner.load(onnx_path[0], batch_size=0)


def test_threads_split_one_call_across_workers_with_the_same_result(onnx_path, data):
    """threads=2 runs sub-batches concurrently; results match one single-threaded run, row order kept."""
    x = np.tile(data[0], (2, 1))[:1000]  # 2 workers x 500 rows, each >= MIN_PARALLEL_ROWS
    one = Refiner.load(onnx_path[0], threads=1).transform(x)
    two = Refiner.load(onnx_path[0], threads=2)
    np.testing.assert_allclose(two.transform(x), one, atol=1e-6)
    np.testing.assert_allclose(two.transform(x[::-1].copy()), one[::-1], atol=1e-6)
    ran_on, run, other = [], two._run, threading.Event()

    def recorded(part):
        ran_on.append(threading.get_ident())
        if threading.get_ident() == caller:
            other.wait(10)  # hold the caller until the pool worker has taken the other sub-batch
        else:
            other.set()
        return run(part)

    caller, two._run = threading.get_ident(), recorded
    np.testing.assert_allclose(two.transform(x), one, atol=1e-6)
    # the split really happened: the caller ran one sub-batch, the one pool worker the other
    assert len(ran_on) == 2 and caller in ran_on and len(set(ran_on)) == 2
    assert two._pool._max_workers == 1
    assert Refiner.load(onnx_path[0], threads=None).threads >= 1
    with pytest.raises(ValueError, match="threads must be positive"):
        Refiner.load(onnx_path[0], threads=0)
