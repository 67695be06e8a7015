"""The single-query path and MicroBatcher: same results as a plain search, per caller, under concurrency.

Expectations come from FAISS searched directly (or by brute force), never from timing.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from simskip_faiss import RefinedIndex, Refiner
from simskip_faiss.batching import MicroBatcher
from simskip_faiss.refiners import as_input


@pytest.fixture(scope="module")
def refined(serving_onnx, data):
    x, _ = data
    idx = RefinedIndex(Refiner.load(serving_onnx[0]), "Flat", "ip")
    idx.add(x)
    return idx


# -- the single-vector path ------------------------------------------------------------------
def test_single_vector_path_equals_the_batched_run(serving_onnx, data):
    x, _ = data
    r = Refiner.load(serving_onnx[0])
    whole = r._session.run(None, {r._session.get_inputs()[0].name: x[:20]})[0]  # onnxruntime, no binding
    ones = [r.transform(x[i:i + 1]) for i in range(20)]
    np.testing.assert_allclose(np.vstack(ones), whole, atol=1e-6)
    # each result is the caller's own: the next call does not overwrite it
    a, b = r.transform(x[:1]), r.transform(x[1:2])
    assert not np.shares_memory(a, b)
    np.testing.assert_allclose(a, whole[:1], atol=1e-6)


def test_single_vector_path_is_thread_safe(serving_onnx, data):
    x, _ = data
    r = Refiner.load(serving_onnx[0])
    want = r.transform(x)
    got = np.empty_like(want)

    def one(i):
        for _ in range(5):
            got[i] = r.transform(x[i:i + 1])[0]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(x))))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_fast_input_check_refuses_non_finite_and_keeps_huge_finite_values():
    for bad in (np.nan, np.inf, -np.inf):
        v = np.zeros((1, 8), np.float32)
        v[0, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            as_input(v, 8)
    huge = np.full((2, 8), 3e38, np.float32)  # finite (a check by summing would overflow)
    assert as_input(huge, 8) is huge


def test_search_k_checks_still_apply(refined, data):
    x, _ = data
    with pytest.raises(ValueError, match="positive"):
        refined.search(x[:1], 0)
    D, I = refined.search(x[:1], np.int64(refined.ntotal + 2))  # the slow path pads too
    assert I.shape == (1, refined.ntotal + 2) and (I[0, -2:] == -1).all() and (I[0, :-2] >= 0).all()
    with pytest.raises(TypeError, match="integer"):
        refined.search(x[:1], 2.0)
    assert refined.search(x[:1], np.int64(3))[1].shape == (1, 3)


# -- MicroBatcher ----------------------------------------------------------------------------
def test_concurrent_callers_get_their_own_results(refined, data):
    x, _ = data
    want_D, want_I = refined.search(x[:200], 5)
    with MicroBatcher(refined, max_batch=8, max_wait_us=2000) as mb:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: mb.search(x[i:i + 1], 5), range(200)))
    np.testing.assert_array_equal(np.vstack([I for _, I in got]), want_I)
    np.testing.assert_allclose(np.vstack([D for D, _ in got]), want_D, rtol=1e-6)


def test_batches_really_form_and_mixed_k_and_sizes_are_exact(data):
    x, _ = data
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sizes = []

    class Recording:  # a FAISS index that remembers the batch sizes it was asked for
        d, ntotal = index.d, index.ntotal

        def search(self, q, k):
            sizes.append(len(q))
            time.sleep(0.002)  # slow enough for the other callers to queue up
            return index.search(q, k)

    calls = [(x[i:i + 1 + i % 3], 1 + i % 4) for i in range(60)]  # 1-3 rows, k in 1..4
    with MicroBatcher(Recording(), max_batch=6, max_wait_us=5000) as mb:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda c: mb.search(*c), calls))
    for (q, k), (D, I) in zip(calls, got):
        wD, wI = index.search(q, k)
        np.testing.assert_array_equal(I, wI)
        np.testing.assert_array_equal(D, wD)
    assert max(sizes) > 1 and max(sizes) <= 6 and sum(sizes) == sum(len(q) for q, _ in calls)


def test_a_bad_query_fails_only_its_caller(refined, data):
    x, _ = data
    bad = x[:1].copy()
    bad[0, 3] = np.nan
    with MicroBatcher(refined, max_batch=4, max_wait_us=1000) as mb:
        with ThreadPoolExecutor(4) as pool:
            fut = {i: pool.submit(mb.search, bad if i == 2 else x[i:i + 1], 3) for i in range(4)}
            with pytest.raises(ValueError, match="NaN or Inf"):
                fut[2].result()
            for i in (0, 1, 3):
                np.testing.assert_array_equal(fut[i].result()[1], refined.search(x[i:i + 1], 3)[1])
        with pytest.raises(ValueError, match="dimension 15"):
            mb.search(x[:1, :15], 3)
        with pytest.raises(ValueError, match="positive"):
            mb.search(x[:1], -3)
        big = refined.ntotal + 1  # padded with -1, as index.search does
        for got, want in zip(mb.search(x[:2], big), refined.search(x[:2], big)):
            np.testing.assert_array_equal(got, want)


def test_a_failing_batch_raises_in_each_of_its_callers_and_the_worker_survives(data):
    x, _ = data
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    fail = threading.Event()
    fail.set()

    class Flaky:
        d, ntotal = index.d, index.ntotal

        def search(self, q, k):
            if fail.is_set():
                raise RuntimeError("disk on fire")
            return index.search(q, k)

    with MicroBatcher(Flaky(), max_batch=4, max_wait_us=500) as mb:
        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(mb.search, x[i:i + 1], 2) for i in range(4)]
            for f in futs:
                with pytest.raises(RuntimeError, match="disk on fire"):
                    f.result()
        fail.clear()
        np.testing.assert_array_equal(mb.search(x[:1], 2)[1], index.search(x[:1], 2)[1])


def test_close_serves_queued_calls_then_refuses(data):
    x, _ = data
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    mb = MicroBatcher(index, max_batch=100, max_wait_us=200_000)  # waits long for a full batch
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(mb.search, x[i:i + 1], 1) for i in range(3)]
        time.sleep(0.05)
        t = time.perf_counter()
        mb.close()  # does not wait out max_wait_us: closing flushes the partial batch
        assert time.perf_counter() - t < 0.15
        assert [f.result()[1][0, 0] for f in futs] == [0, 1, 2]
    assert not mb._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        mb.search(x[:1], 1)
    mb.close()  # idempotent


def test_a_lone_caller_waits_at_most_about_max_wait(data):
    x, _ = data
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    with MicroBatcher(index, max_batch=64, max_wait_us=20_000) as mb:
        t = time.perf_counter()
        mb.search(x[:1], 1)
        took = time.perf_counter() - t
    assert 0.015 < took < 1.0  # it waited for company (bounded), and then searched alone


def test_constructor_refuses_bad_settings(data):
    index = faiss.IndexFlatIP(16)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(index, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_us"):
        MicroBatcher(index, max_wait_us=-1)


def test_initializer_runs_in_the_worker_and_its_failure_reaches_callers(data):
    x, _ = data
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    seen = []
    with MicroBatcher(index, initializer=lambda: seen.append(threading.current_thread().name)) as mb:
        mb.search(x[:1], 1)
    assert seen == ["simskip-microbatcher"]
    with MicroBatcher(index, initializer=lambda: 1 / 0) as mb:
        with pytest.raises(RuntimeError, match="initializer failed: ZeroDivisionError"):
            mb.search(x[:1], 1)
