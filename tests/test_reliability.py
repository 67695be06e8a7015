"""Reliability: one input contract on every path, no crash, no silent corruption, thread safety."""
from __future__ import annotations

import numpy as np
import pytest

from simskip_faiss import IdentityRefiner, LinearRefiner, RefinedIndex, Refiner
from simskip_faiss import checks
from simskip_faiss.cli import main


@pytest.fixture()
def refiner(serving_onnx):
    return Refiner.load(serving_onnx[0])


def _vector_paths():
    """Every entry point that takes vectors, as f(x) -> the float32 array it accepted."""
    from simskip_faiss.datasets import load_user

    def index_add(x, chunk=1):
        idx = RefinedIndex(IdentityRefiner(x.shape[1]), "Flat", "l2", chunk_size=chunk)
        idx.add(x)
        return idx.reconstruct_n()

    paths = {"RefinedIndex.add (chunked)": index_add,
             "RefinedIndex.add (one block)": lambda x: index_add(x, chunk=1 << 20),
             "RefinedIndex.search": lambda x: (RefinedIndex(IdentityRefiner(x.shape[1]), "Flat", "l2"),
                                               None)[0].refine_queries(x),
             "Refiner.transform": lambda x: IdentityRefiner(x.shape[1]).transform(x),
             "load_user": lambda x: load_user(x).corpus}

    def training(x):  # the corpus check of the training loop; supervision is its torch-free home
        from simskip_faiss.training.supervision import _corpus

        return np.asarray(_corpus(x), dtype=np.float32)

    def milvus_array(x):  # the package's own modules are imported unguarded: an import error fails
        from simskip_faiss.scale.milvus import checked_rows

        return checked_rows(np.arange(len(x)), x, x.shape[1])[1]

    def milvus_rows(x):  # lists of rows are read through Arrow (the scale extra)
        pytest.importorskip("pyarrow")
        from simskip_faiss.scale.milvus import checked_rows

        return checked_rows(np.arange(len(x)), [list(r) for r in x], x.shape[1])[1]

    paths.update({"training": training, "milvus (array)": milvus_array, "milvus (rows)": milvus_rows})
    return paths


PATHS = _vector_paths()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_vector_contract_everywhere(path):
    """10.4: integers are accepted (as FAISS does) and cast to float32; bool is refused; same rule on every path."""
    f = PATHS[path]
    x = np.arange(6 * 8, dtype=np.int32).reshape(6, 8) - 20
    np.testing.assert_array_equal(f(x), x.astype(np.float32))
    if "rows" not in path:  # a list of Python rows has no dtype to refuse
        with pytest.raises((TypeError, ValueError), match="dtype bool"):
            f(np.ones((6, 8), bool))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_finite_after_the_float32_cast_on_every_path(path):
    """11.4: 1e39 is a finite float64 but Inf in float32: refused everywhere, naming the row."""
    x = np.ones((6, 8))
    x[4, 3] = 1e39
    with pytest.raises(ValueError, match=r"NaN or Inf") as e:
        PATHS[path](x)
    assert "row 4" in str(e.value) or "4" in str(getattr(e.value, "rows", ""))


def test_cli_build_refuses_values_beyond_float32(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((50, 8))
    x[45, 0] = -3e39
    np.save(tmp_path / "c.npy", x)
    assert main(["build", "identity", str(tmp_path / "c.npy"), "-o", str(tmp_path / "b"), "--metric", "l2", "-q"]) != 0
    assert "row 45" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_load_npy_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        checks.load_npy(tmp_path / "nope.npy", "corpus")
    (tmp_path / "t.npy").write_text("hello")
    with pytest.raises(ValueError, match="not a .npy file"):
        checks.load_npy(tmp_path / "t.npy", "corpus")
    np.savez(tmp_path / "z.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="npz"):
        checks.load_npy(tmp_path / "z.npz", "corpus")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        checks.load_npy(tmp_path / "o.npy", "corpus")
    np.save(tmp_path / "ok.npy", np.ones((3, 2), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-5])
    with pytest.raises(ValueError, match="cut.npy"):
        checks.load_npy(tmp_path / "cut.npy", "corpus", mmap=False)


def test_file_sha256_and_l2_normalize_agree_with_references(tmp_path):
    import hashlib

    data = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "f").write_bytes(data)
    assert checks.file_sha256(tmp_path / "f", chunk=999) == hashlib.sha256(data).hexdigest()
    assert checks.file_sha256(tmp_path / "f", 100, 2000, chunk=7) == hashlib.sha256(data[100:2100]).hexdigest()
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(checks.l2_normalize(x), [[0.6, 0.8], [0, 0]], rtol=1e-7)
    assert checks.l2_normalize(x).dtype == np.float32


# -- 11.2 thread safety ------------------------------------------------------------------------------
def test_concurrent_search_add_remove_save_equal_a_serial_reference(refiner, data, tmp_path):
    """Searches from 3 threads while one thread adds, removes and saves: each result equals the
    serial result of one state the writer went through, and each thread sees states in order."""
    import threading

    x, _ = data
    rng = np.random.default_rng(0)
    queries = x[rng.choice(len(x), 16, replace=False)] + 0.05  # < 20 rows: FAISS's exact, BLAS-free path
    ops = []  # the writer's script
    for j in range(24):
        ops.append(("add", np.arange(20 * j, 20 * j + 20)))
        if j % 3 == 2:
            ops.append(("remove", np.arange(20 * j - 30, 20 * j - 20)))
    vecs = {i: x[i % len(x)] * (1 + (i // len(x))) for i in range(20 * 24)}

    def apply(idx, op):
        kind, ids = op
        if kind == "add":
            idx.add_with_ids(np.stack([vecs[i] for i in ids]), ids)
        else:
            idx.remove_ids(ids)

    ref = RefinedIndex(refiner, "IDMap,Flat", "ip")
    expected = []  # serial (D, I) after each op; k=5 needs >= 5 vectors, so states start at op 0's add
    for op in ops:
        apply(ref, op)
        expected.append(ref.search(queries, 5))

    def state_of(D, I) -> int:
        for s, (eD, eI) in enumerate(expected):
            if np.array_equal(I, eI) and np.array_equal(D, eD):
                return s
        return -1

    shared = RefinedIndex(refiner, "IDMap,Flat", "ip")
    apply(shared, ops[0])
    done, seen, errors, saved = threading.Event(), [[] for _ in range(3)], [], []

    def searcher(t):
        try:
            while not done.is_set():
                seen[t].append(state_of(*shared.search(queries, 5)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    try:
        for s, op in enumerate(ops[1:], start=1):
            apply(shared, op)
            if s % 8 == 0:
                shared.save(tmp_path / f"b{s}")
                saved.append(s)
    finally:
        done.set()
        for th in threads:
            th.join(timeout=60)
    assert not errors
    for t in range(3):
        assert seen[t] and -1 not in seen[t], f"thread {t} saw a result no serial state gives"
        assert seen[t] == sorted(seen[t]), f"thread {t} saw states out of order"
    assert sum(len(s) for s in seen) > 20
    for s in saved:
        back = RefinedIndex.load(tmp_path / f"b{s}")
        for a, b in zip(back.search(queries, 5), expected[s]):
            np.testing.assert_array_equal(a, b)


def test_read_lock_costs_a_few_microseconds():
    """The single-query path takes the read lock once: it must stay cheap (measured, generous bound)."""
    import time

    from simskip_faiss.index import RWLock

    lock, n = RWLock(), 20000
    t0 = time.perf_counter()
    for _ in range(n):
        lock.acquire_read()
        lock.release_read()
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 20e-6, f"read lock + unlock took {per_call * 1e6:.1f} µs"


# -- 11.3 reconstruct never aborts ---------------------------------------------------------------------
def test_reconstruct_n_on_idmap_and_unreconstructable_indexes_raises_or_works(data):
    import faiss

    x, _ = data
    ident = IdentityRefiner(16)
    idm = RefinedIndex(ident, "IDMap,Flat", "l2")
    idm.add_with_ids(x[:50], np.arange(50) * 10 + 3)
    np.testing.assert_array_equal(idm.reconstruct_n(), x[:50])  # storage order, through the id map
    np.testing.assert_array_equal(idm.reconstruct_n(5, 3), x[5:8])
    hnsw = RefinedIndex(ident, "IDMap,HNSW16", "l2")
    hnsw.add_with_ids(x[:50], np.arange(50) + 100)
    np.testing.assert_array_equal(hnsw.reconstruct_n(0, 50), x[:50])
    with pytest.raises(ValueError, match="beyond the 50 stored"):
        hnsw.reconstruct_n(40, 20)
    with pytest.raises(ValueError, match="non-negative"):
        idm.reconstruct_n(-1, 2)
    dedup = RefinedIndex(ident, faiss.index_factory(16, "IVF4,FlatDedup"), "l2")
    dedup.train(x)
    dedup.add(x[:100])
    with pytest.raises(ValueError, match="IndexIVFFlatDedup cannot reconstruct"):
        dedup.reconstruct_n()
    idm2 = RefinedIndex(ident, "IDMap2,Flat", "l2")
    idm2.add_with_ids(x[:20], np.arange(20) * 7 + 1)
    np.testing.assert_array_equal(idm2.reconstruct_n(2, 3), x[2:5])
    lsh = RefinedIndex(ident, faiss.IndexLSH(16, 32), "l2")  # stores bits only
    lsh.add(x[:10])
    assert lsh.reconstruct_n().shape == (10, 16)


# -- 11.5 refined output is checked ---------------------------------------------------------------------
def test_normalising_refiner_refuses_rows_outside_its_float32_range(refiner, data):
    x, _ = data
    for r in (refiner, IdentityRefiner(16, normalize=True)):
        idx = RefinedIndex(r, "Flat", "ip", chunk_size=64)
        idx.add(x[:10])
        big = np.tile(x, (2, 1))
        big[700] *= 1e19
        with pytest.raises(ValueError, match="row 700.*norm"):
            idx.add(big)  # streamed: refused before anything is stored
        small = x[:5].copy()
        small[3] *= 1e-25
        with pytest.raises(ValueError, match="row 3"):
            idx.add(small)
        assert idx.ntotal == 10
        q = np.stack([x[0], x[1] * 1e21])
        if r.is_identity:  # numpy normalises in float64: any finite row comes out unit-length
            np.testing.assert_allclose(np.linalg.norm(r.transform(q), axis=1), 1, rtol=1e-6)
            zero = np.zeros((1, 16), np.float32)  # zero rows are accepted (they stay zero)
            np.testing.assert_array_equal(r.transform(zero), zero)
        else:  # the ONNX graph normalises in float32: its squared norm overflows, refused by name
            with pytest.raises(ValueError, match="refined row 1 .*not unit vectors"):
                idx.search(q, 3)
            with pytest.raises(ValueError, match="not unit vectors"):
                r.transform(x[:2] * 3e21)


def test_a_zero_refined_row_is_accepted_only_for_a_zero_input_row(data):
    """A normalising refiner that returns zero for a non-zero row (an overflowed float32 norm) is refused."""
    x, _ = data
    collapse = LinearRefiner(np.zeros((16, 16), np.float32), np.zeros(16), normalize=True)  # every row -> 0
    q = x[:3].copy()
    q[1] = 0
    with pytest.raises(ValueError, match=r"refined rows 0, 2 \(2 in all\) are not unit vectors \(norm 0 "):
        collapse.transform(q)
    np.testing.assert_array_equal(collapse.transform(np.zeros((2, 16), np.float32)), 0)  # zero in, zero out
    idx = RefinedIndex(collapse, "Flat", "ip")
    with pytest.raises(ValueError, match="not unit vectors"):
        idx.refine_queries(x[:1])  # the single-query path
    with pytest.raises(ValueError, match="not unit vectors"):
        idx.add(x[:4])
    assert idx.ntotal == 0


def test_non_finite_refined_output_is_refused_and_a_failed_stream_rolled_back(data):
    x, _ = data
    lin = LinearRefiner(np.eye(16, dtype=np.float32) * 1e15, np.zeros(16), normalize=False)
    bad = x.copy()
    bad[333] *= 1e25  # fine as input, Inf once refined
    with pytest.raises(ValueError, match="refined row 333 .*NaN or Inf"):
        lin.transform(bad)
    flat = RefinedIndex(lin, "Flat", "l2", chunk_size=64)
    flat.add(x[:5])
    with pytest.raises(ValueError, match="row 333"):
        flat.add(bad)  # chunks 0..4 were stored, then removed again
    assert flat.ntotal == 5
    np.testing.assert_array_equal(flat.reconstruct_n(), lin.transform(x[:5]))
    hnsw = RefinedIndex(lin, "HNSW16", "l2", chunk_size=64)
    with pytest.raises(RuntimeError, match="cannot remove them"):
        hnsw.add(bad)  # HNSW cannot remove: the error says the index keeps the rows


# -- 11.6 ids --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, msg", [(np.array([0, 1, -1, 3]), "contains -1"),
                                      (np.array([0, 1, 1, 3]), "duplicated id"),
                                      (np.array([0, 7, 9, 3]), "already stored, e.g. \\[7, 9\\]")])
def test_add_with_ids_refuses_minus_one_duplicates_and_stored_ids(data, ids, msg):
    x, _ = data
    idx = RefinedIndex(IdentityRefiner(16), "IDMap,Flat", "l2")
    idx.add_with_ids(x[:3], [7, 8, 9])
    with pytest.raises(ValueError, match=msg):
        idx.add_with_ids(x[3:7], ids)
    assert idx.ntotal == 3
    with pytest.raises(ValueError, match=msg.split(",")[0] if "stored" not in msg else "duplicated|-1"):
        checks.as_ids(ids if "stored" not in msg else np.array([5, 5]), 4 if "stored" not in msg else 2)
    assert checks.as_ids([-1, -1], to_store=False).tolist() == [-1, -1]  # removal may name anything


def test_milvus_shares_the_id_rule():
    pytest.importorskip("pyarrow")
    from simskip_faiss.scale import milvus  # the package's own module: an import error is a failure, not a skip
    with pytest.raises(ValueError, match="contains -1"):
        milvus.checked_rows([1, -1], np.ones((2, 4), np.float32), 4)
    with pytest.raises(ValueError, match="duplicated"):
        milvus.checked_rows([2, 2], [[1, 2, 3, 4], [1, 2, 3, 4]], 4)
    ids, x = milvus.checked_rows([], [], 4)  # 11.14: an empty batch is empty, not a dtype error
    assert ids.shape == (0,) and x.shape == (0, 4)


# -- 11.7 search parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -5, 1e30, float("nan"), 2.5, True])
def test_search_parameters_are_validated_in_the_api(data, value):
    import faiss

    x, _ = data
    idx = RefinedIndex(IdentityRefiner(16), "HNSW16", "l2")
    idx.add(x)
    with pytest.raises(ValueError, match="efSearch must be an integer in \\[1, "):
        idx.search(x[:3], 5, params={"efSearch": value})
    if isinstance(value, int) and not isinstance(value, bool):
        p = faiss.SearchParametersHNSW()
        p.efSearch = value
        with pytest.raises(ValueError, match="efSearch"):
            idx.search(x[:3], 5, params=p)


def test_search_parameters_reach_faiss_and_keep_the_index_defaults(data):
    import faiss

    x, _ = data
    idx = RefinedIndex(IdentityRefiner(16), "IVF8,Flat", "l2")
    idx.train(x)
    idx.add(x)
    idx.index.nprobe = 8  # the index's own setting: kept when the call sets only other parameters
    flat = faiss.IndexFlatL2(16)
    flat.add(x)
    exact = flat.search(x[:20] + 0.1, 5)[1]
    np.testing.assert_array_equal(idx.search(x[:20] + 0.1, 5, params={"max_codes": 10 ** 9})[1], exact)
    assert (idx.search(x[:20] + 0.1, 5, params={"nprobe": 1})[1] != exact).any()
    with pytest.raises(ValueError, match="no search parameter efSearch"):
        idx.search(x[:3], 5, params={"efSearch": 16})


@pytest.mark.parametrize("value", ["0", "-5", "1e30", "nan", "x"])
def test_cli_search_refuses_bad_params(tmp_path, data, value, capsys):
    x, _ = data
    np.save(tmp_path / "c.npy", x)
    assert main(["build", "identity", str(tmp_path / "c.npy"), "-o", str(tmp_path / "b"), "--factory", "HNSW16",
                 "--metric", "l2", "-q"]) == 0
    argv = ["search", str(tmp_path / "b"), str(tmp_path / "c.npy"), "-k", "3", "-o", str(tmp_path / "r.npz")]
    assert main(argv + ["--param", f"efSearch={value}"]) != 0
    assert "efSearch must be an integer" in capsys.readouterr().err and not (tmp_path / "r.npz").exists()
    assert main(argv + ["--param", "efSearch=32"]) == 0


# -- 11.8 range search radius ----------------------------------------------------------------------------
def test_range_search_refuses_nan_and_negative_l2_radius(data):
    x, _ = data
    l2 = RefinedIndex(IdentityRefiner(16), "Flat", "l2")
    l2.add(x)
    for r in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            l2.range_search(x[:2], r)
    with pytest.raises(ValueError, match="negative"):
        l2.range_search(x[:2], -0.5)
    lims, D, I = l2.range_search(x[:2], 0.01)
    assert I[lims[0]:lims[1]].tolist() == [0]
    ip = RefinedIndex(IdentityRefiner(16, normalize=True), "Flat", "ip")
    ip.add(x)
    assert ip.range_search(x[:1], -0.5)[0][1] > 0  # an inner-product threshold may be negative


# -- 11.14 empty inputs and the public refine path ------------------------------------------------------
def test_empty_inputs_get_an_answer_or_a_clear_message(refiner, data):
    x, _ = data
    idx = RefinedIndex(refiner, "IDMap,Flat", "ip")
    idx.add_with_ids(x[:5], np.arange(5))
    assert idx.remove_ids([]) == 0 and idx.remove_ids(np.array([], np.int64)) == 0 and idx.ntotal == 5
    with pytest.raises(ValueError, match="empty batch"):
        idx.add_with_ids(np.zeros((0, 16), np.float32), [])
    with pytest.raises(ValueError, match="empty batch"):
        idx.search(np.zeros((0, 16), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        refiner.transform(np.full((1, 16), np.nan, np.float32))  # the public path validates


# -- issue 30: hostile-user probe -----------------------------------------------------------------------
class _RecordingIndex:
    """A stand-in index that records the k it is asked for (a real FAISS index would abort on a huge k)."""

    d, ntotal = 4, 3

    def __init__(self):
        self.ks = []

    def search(self, x, k):
        self.ks.append(k)
        return np.zeros((len(x), k), np.float32), np.zeros((len(x), k), np.int64)


@pytest.mark.parametrize("k", [2 ** 31, 2 ** 40, np.int64(2 ** 62)])
def test_a_k_beyond_faiss_int_is_refused_before_faiss(k):
    """30.1: k >= 2**31 made FAISS throw std::bad_alloc and abort the process (SIGABRT)."""
    with pytest.raises(ValueError, match=r"k must be at most 2147483647"):
        checks.check_k(k)
    assert checks.check_k(checks.MAX_K) == checks.MAX_K
    with pytest.raises(ValueError, match=r"\(n, k\) results"):  # n rows x k results that no machine holds
        checks.check_k(2 ** 20, n=2 ** 12)
    from simskip_faiss.batching import MicroBatcher

    fake = _RecordingIndex()
    with MicroBatcher(fake) as mb:
        with pytest.raises(ValueError, match=r"k must be at most"):
            mb.search(np.ones((1, 4), np.float32), k)
    assert fake.ks == []


@pytest.mark.parametrize("wait", [float("inf"), 1e17, 6e7 + 1, float("nan"), -1.0, "200", True])
def test_microbatcher_refuses_a_wait_it_cannot_sleep(wait):
    """30.2: max_wait_us=inf (or >= ~1e17) was accepted; the worker died of OverflowError, callers blocked forever."""
    from simskip_faiss.batching import MicroBatcher

    with pytest.raises((ValueError, TypeError), match="max_wait_us"):
        MicroBatcher(_RecordingIndex(), max_wait_us=wait)
    MicroBatcher(_RecordingIndex(), max_wait_us=6e7).close()  # the bound itself: 60 s


def test_a_dead_microbatcher_worker_fails_its_callers_instead_of_blocking_them():
    """30.2: whatever kills the worker thread, every queued caller (and every later one) gets an exception."""
    import threading

    from simskip_faiss.batching import MicroBatcher

    mb = MicroBatcher(_RecordingIndex(), max_batch=16)
    mb.max_wait_us = float("inf")  # past the constructor's check: the worker's Condition.wait overflows
    errors = []

    def call():
        try:
            mb.search(np.ones((1, 4), np.float32), 1)
        except Exception as e:  # noqa: BLE001 - the test records what the caller got
            errors.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "the caller is blocked on a dead worker"
    assert len(errors) == 1 and "worker" in str(errors[0])
    with pytest.raises(RuntimeError, match="worker thread failed"):
        mb.search(np.ones((1, 4), np.float32), 1)
    mb.close()


def _special_files(tmp_path):
    """A symlink, a FIFO, a directory and (as root) a character device, each where a file is to be written."""
    import os
    import stat

    target = tmp_path / "target.txt"
    target.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    made = {"link": stat.S_ISLNK, "fifo": stat.S_ISFIFO, "dir": stat.S_ISDIR}
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
        made["null"] = stat.S_ISCHR
    except (PermissionError, AttributeError):
        pass
    return made


def test_writes_never_replace_a_device_fifo_symlink_or_directory(tmp_path):
    """30.3: as root, `search ... -o /dev/null` replaced /dev/null by a regular file."""
    import os

    from simskip_faiss.persistence import atomic_write_bytes

    for name, is_kind in _special_files(tmp_path).items():
        with pytest.raises(ValueError, match=f"{name} exists and is not a regular file"):
            atomic_write_bytes(tmp_path / name, b"data")
        assert is_kind(os.lstat(tmp_path / name).st_mode), name
    assert (tmp_path / "target.txt").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []
    atomic_write_bytes(tmp_path / "target.txt", b"new")  # a regular file is replaced as before
    assert (tmp_path / "target.txt").read_bytes() == b"new"


def test_cli_search_output_onto_a_fifo_is_refused(tmp_path, data, capsys):
    import os
    import stat

    x, _ = data
    np.save(tmp_path / "c.npy", x)
    assert main(["build", "identity", str(tmp_path / "c.npy"), "-o", str(tmp_path / "b"), "--metric", "l2", "-q"]) == 0
    os.mkfifo(tmp_path / "out")
    assert main(["search", str(tmp_path / "b"), str(tmp_path / "c.npy"), "-k", "3", "-o", str(tmp_path / "out")]) == 2
    assert "not a regular file" in capsys.readouterr().err and stat.S_ISFIFO(os.lstat(tmp_path / "out").st_mode)


def _linear(seed=0, d=4):
    rng = np.random.default_rng(seed)
    return LinearRefiner(np.eye(d) + 0.1 * rng.standard_normal((d, d)), np.zeros(d))


def test_saving_a_store_removes_only_its_own_refiner_copies(tmp_path):
    """30.4: a store named v[12].json deleted v1.json's and v2.json's refiner copies (an unescaped glob);
    a folder store deleted any user file named simskip_refiner-*."""
    from simskip_faiss.integrations.base import checked_refiner, write_sidecar

    for i, name in enumerate(["v1.json", "v2.json", "v[12].json", "v*.json"]):
        (tmp_path / name).write_text("{}")
        write_sidecar(tmp_path / name, _linear(i), folder=False)
    copies = sorted(p.name for p in tmp_path.glob("*_refiner-*"))
    assert len(copies) == 4, copies
    for i, name in enumerate(["v1.json", "v2.json", "v[12].json", "v*.json"]):
        assert checked_refiner(tmp_path / name).sha256 == _linear(i).sha256
    store = tmp_path / "store"
    store.mkdir()
    (store / "simskip_refiner-notes.txt").write_text("mine")
    (store / "simskip_refiner-old").mkdir()
    write_sidecar(store, _linear(0))
    write_sidecar(store, _linear(1))  # replaces the package's copy of refiner 0, nothing else
    assert sorted(p.name for p in store.iterdir()) == sorted(
        ["simskip_refiner.json", "simskip_refiner-notes.txt", "simskip_refiner-old",
         f"simskip_refiner-{_linear(1).sha256[:16]}.npy"])


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink", "fifo"])
def test_a_store_record_cannot_open_a_refiner_outside_the_store(tmp_path, how):
    """30.5: the record's "file" was joined to the store folder unchecked: ../x, an absolute path or a
    symlinked copy opened a refiner outside the store."""
    import json
    import os

    from simskip_faiss.integrations.base import SIDECAR, RefinerMismatchError, checked_refiner, write_sidecar

    store = tmp_path / "store"
    store.mkdir()
    r = _linear(0)
    write_sidecar(store, r)
    outside = tmp_path / "x.npy"
    outside.write_bytes(r.to_bytes())  # the very refiner, but outside the store
    record = json.loads((store / SIDECAR).read_text())
    if how == "parent":
        record["file"] = "../x.npy"
    elif how == "absolute":
        record["file"] = str(outside)
    elif how == "symlink":
        (store / record["file"]).unlink()
        (store / record["file"]).symlink_to(outside)
    else:
        (store / record["file"]).unlink()
        os.mkfifo(store / record["file"])
    (store / SIDECAR).write_text(json.dumps(record))
    want = {"parent": "not a plain file name", "absolute": "not a plain file name",
            "symlink": "symbolic link", "fifo": "not a regular file"}[how]
    with pytest.raises(RefinerMismatchError, match=want):
        checked_refiner(store)


def _doubling_onnx(d=4):
    """An ONNX 'refiner' that returns 2n rows for n (the input concatenated with itself along axis 0)."""
    import json

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["y"], axis=0)], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"simskip": json.dumps({"d_in": d, "d_out": d, "normalize": False})})
    return Refiner(model.SerializeToString())


def test_refined_output_of_the_wrong_shape_is_refused_and_nothing_stored():
    """30.6: an ONNX graph returning 2n rows stored 6 vectors for 3 added."""
    from simskip_faiss.refiners import BaseRefiner

    bad = _doubling_onnx()
    x = np.eye(4, dtype=np.float32)[:3]
    with pytest.raises(ValueError, match=r"shape \(6, 4\) for 3 input rows; expected \(3, 4\)"):
        bad.transform(x)
    idx = RefinedIndex(bad, "Flat", "l2")
    with pytest.raises(ValueError, match=r"expected \(3, 4\)"):
        idx.add(x)
    assert idx.ntotal == 0

    class Narrow(BaseRefiner):  # one column short
        kind, d_in, d_out, apply_to, normalize, metadata, sha256 = "linear", 4, 4, "both", False, {}, None

        def apply_unchecked(self, x):
            return x[:, :3]

        def to_bytes(self):
            return None

    with pytest.raises(ValueError, match=r"shape \(1, 3\) for 1 input rows; expected \(1, 4\)"):
        Narrow().transform(x[:1])


def test_sparse_integer_labels_are_reindexed_keeping_their_names():
    """30.7: product ids (~1e12) as labels made np.bincount raise MemoryError (an 'internal error')."""
    from simskip_faiss.datasets import EmbeddingData, load_user
    from simskip_faiss.metrics.scoring import label_relevant

    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    ids = np.array([10 ** 12, 5, 10 ** 12, 7, 5, 2 ** 62], np.int64)
    for given in (ids, ids.astype(np.float64)[:5].tolist() + [2.0 ** 62]):
        d = load_user(x, labels=np.asarray(given))
        assert d.labels.tolist() == [2, 0, 2, 1, 0, 3]
        assert d.label_names == ["5", "7", "1000000000000", "4611686018427387904"]
        assert label_relevant(d.labels, np.arange(6)).tolist() == [1, 1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="labels .* beyond int64"):
        load_user(x, labels=np.array([1e19, 0, 0, 0, 0, 0]))
    direct = EmbeddingData("u", x, np.zeros(6, np.int8), labels=ids)  # built by hand: the same rule
    assert direct.labels.max() < 6 and direct.label_names[int(direct.labels[0])] == "1000000000000"


def test_qrels_not_utf8_or_with_a_numeric_first_line_are_refused(tmp_path, capsys):
    """30.8: a non-UTF-8 qrels file was an 'internal error (a bug)'; a malformed first line `0.5<TAB>3`
    was silently dropped as if it were a header."""
    from simskip_faiss.datasets import parse_qrels

    latin = tmp_path / "latin1.tsv"
    latin.write_bytes("requête\tdoc\n0\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.tsv is not UTF-8 text"):
        parse_qrels(latin, 3, 5)
    for first in ("0.5\t3", "1e3\t2", "nan\t1", "-0.0\t1"):
        p = tmp_path / "q.tsv"
        p.write_text(f"{first}\n0\t1\n")
        with pytest.raises(ValueError, match="not an integer row index") as e:
            parse_qrels(p, 3, 5)
        assert f"{p}:1:" in str(e.value)
    p.write_text("query-id\tcorpus-id\n0\t1\n")  # a header: its first field is no number at all
    assert [r.tolist() for r in parse_qrels(p, 2, 5)] == [[1], []]
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "q.npy", x[:3])
    rc = main(["eval", "--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy"),
               "--qrels", str(latin), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "not UTF-8" in err and "internal error" not in err


def _matmul_onnx(path, d=8):
    """A tiny fp32 refiner file without torch: y = x @ W (W has weights int8 can quantise)."""
    import json

    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((d, d)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"simskip": json.dumps({"d_in": d, "d_out": d, "normalize": False,
                                                          "apply_to": "both", "precision": "fp32"})})
    path.write_bytes(model.SerializeToString())
    return path


def test_quantize_reports_bad_input_as_value_errors(tmp_path):
    """30.9: an int8 file failing its parity check raised RuntimeError (an 'internal error' in the CLI);
    a 1-D sample or one of fewer than 20 rows was silently not checked."""
    from simskip_faiss.training.export import quantize

    src = _matmul_onnx(tmp_path / "r.onnx")
    out = tmp_path / "q.onnx"
    with pytest.raises(ValueError, match=r"int8 .* max abs error [0-9.e-]+ > tolerance 1e-09"):
        quantize(src, out, tol=1e-9)
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    for sample in (x[0], x[:19], x[:, :5], x[None]):
        with pytest.raises(ValueError, match=r"sample must be a 2-D \(n, 8\) array with at least 20 rows"):
            quantize(src, out, sample=sample)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx"]
    assert "sample_recall" in quantize(src, out, tol=1.0, sample=x[:20])  # 20 rows: checked


def test_refined_index_search_refuses_a_k_faiss_cannot_take():
    """search(q, 2**31) aborted the process (std::bad_alloc in FAISS); now a ValueError before FAISS is called."""
    index = RefinedIndex(IdentityRefiner(4), "Flat")
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be at most 2147483647"):
        index.search(np.eye(4, dtype=np.float32)[:1], 2**31)
    with pytest.raises(ValueError, match="results"):
        index.search(np.ones((4096, 4), np.float32), 2**20)
    I = index.search(np.eye(4, dtype=np.float32)[:1], 6)[1]
    assert I[0, 0] == 0 and I[0, 4:].tolist() == [-1, -1]


def test_train_takes_sparse_integer_labels_without_counting_every_value():
    """Labels ~1e12 passed straight to train(): np.bincount would allocate terabytes (MemoryError)."""
    pytest.importorskip("torch")
    from simskip_faiss.training import Supervision, TrainConfig, train

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    labels = np.where(np.arange(64) % 2 == 0, 10**12, 7 * 10**11).astype(np.int64)
    cfg = TrainConfig(hidden=8, max_steps=2, eval_every=1, batch_size=32, label_weight=1.0, unsupervised_weight=0.0,
                      pair_weight=0.0, progress=False, threads=1)
    res = train(x, cfg, Supervision(labels=labels))
    assert res.n_train > 0


@pytest.mark.parametrize("argv, says", [
    (["--factory", "IVF64,Flat"], "Number of training points (40) should be at least as large as number of clusters (64)"),
    (["--factory", "NSG32"], "cannot build a graph smaller than 100"),
    (["--factory", "IDMap,Flat"], "--ids"),
    (["--factory", "IVF4,Flat", "--train-size", "-5"], "must be at least 1"),
])
def test_ordinary_bad_build_input_is_bad_input_not_a_bug(tmp_path, capsys, argv, says):
    """IVF/PQ with too few training points, NSG under 100 rows, IDMap without --ids, a negative --train-size:
    exit 2 with one line naming the problem (they were 'internal error (a bug)', exit 1)."""
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    try:
        code = main(["build", "identity", str(tmp_path / "c.npy"), "-o", str(tmp_path / "b"), "-q", *argv])
    except SystemExit as e:  # argparse's own refusals exit from the parser, with status 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "internal error" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_the_error_family_marks_refused_input_by_type():
    from simskip_faiss.errors import InputError, SimSkipError
    from simskip_faiss.persistence import BundleError

    with pytest.raises(InputError) as e:
        checks.check_k(0)
    assert isinstance(e.value, ValueError) and issubclass(BundleError, SimSkipError)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("apply_to", ["both", "queries"])
def test_rows_whose_squared_norm_overflows_float32_are_refused(metric, apply_to):
    """Norm ~2e19 through a non-normalising refiner: L2 search over 4 stored vectors returned 1 hit and three
    -1 pads, inner product D = inf. Now refused, naming the row, and nothing is stored."""
    x = np.eye(4, dtype=np.float32)
    big = x.copy()
    big[2] *= 2e19
    index = RefinedIndex(IdentityRefiner(4, apply_to=apply_to), "Flat", metric=metric)
    with pytest.raises(ValueError, match="row.* 2.*above 1.8e\\+19"):
        index.add(big)
    assert index.ntotal == 0
    index.add(x * 1e18)  # large but representable: stored
    with pytest.raises(ValueError, match="above 1.8e\\+19"):
        index.search(big[2:3], 4)
    lin = RefinedIndex(LinearRefiner(np.eye(4) * 1e10, np.zeros(4), normalize=False), "Flat", metric="l2")
    with pytest.raises(ValueError, match="L2 norm above"):
        lin.add(x * 1e10)  # finite input, refined past float32's squared range


def test_an_onnx_refiner_with_external_data_is_refused(tmp_path, monkeypatch):
    """An initializer stored as external data at a relative path made onnxruntime read that file from the
    working directory: the refined vectors exposed its bytes. Refused at load, on every path (Refiner())."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert np.allclose(Refiner(model.SerializeToString()).transform(np.eye(4, dtype=np.float32)), np.eye(4))
    (tmp_path / "secret.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "secret.bin"
    model.graph.initializer[0].CopyFrom(w)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="external data"):
        Refiner(model.SerializeToString())
    (tmp_path / "r.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="external data"):
        Refiner.load(tmp_path / "r.onnx")


def test_a_manifest_edited_to_drop_its_refiner_is_refused(tmp_path):
    """A manifest edited to kind 'identity' (refiner file and sha dropped) loaded and searched refined vectors
    with raw queries. The manifest now binds the refiner record to the index file."""
    import json

    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    index = RefinedIndex(LinearRefiner(np.eye(4) * 2 + 0.1, np.zeros(4)), "Flat")
    index.add(x)
    index.save(tmp_path / "b")
    mpath = tmp_path / "b" / "manifest.json"
    m = json.loads(mpath.read_text())
    assert m["format_version"] == 2 and len(m["binding"]) == 64
    edited = dict(m, refiner={**m["refiner"], "kind": "identity", "sha256": None},
                  files={"index": m["files"]["index"]})
    mpath.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="does not match the index it was saved with"):
        RefinedIndex.load(tmp_path / "b")
    mpath.write_text(json.dumps(dict(m, metric="l2")))  # any field the stored vectors depend on
    with pytest.raises(ValueError, match="binding|metric"):
        RefinedIndex.load(tmp_path / "b")
    mpath.write_text(json.dumps(m))
    assert RefinedIndex.load(tmp_path / "b").ntotal == 20
    old = {k: v for k, v in m.items() if k != "binding"}  # a bundle of the previous format: still read
    mpath.write_text(json.dumps(dict(old, format_version=1)))
    assert RefinedIndex.load(tmp_path / "b").ntotal == 20
