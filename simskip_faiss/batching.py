"""Serve many one-query callers at near-batch throughput: micro-batching across threads.

A service that answers each request on its own thread calls `search` with one query at a time.
One query at a time pays the per-call costs of onnxruntime and FAISS on every query; a batch
pays them once. `MicroBatcher` sits in front of an index: each caller's `search(q, k)` joins a
queue, one worker thread takes whatever has arrived (waiting at most `max_wait_us` for more, up
to `max_batch` rows), searches it as one batch and hands every caller its own rows.

    with MicroBatcher(index, max_batch=8, max_wait_us=200) as mb:   # index: RefinedIndex or faiss.Index
        D, I = mb.search(q, 10)                                      # from any number of threads

Inputs are validated in the caller's thread, so a bad query raises for its caller alone; an
error raised by the batch search is raised in every caller whose query was in that batch.
`close()` serves what is queued, then stops the worker; later calls raise RuntimeError. Should the
worker thread itself fail, every queued caller gets the error and later calls raise RuntimeError:
no caller is ever left waiting on a dead worker.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import numpy as np

from .checks import check_k
from .refiners.base import as_input
from .errors import InputError, InputTypeError

MAX_WAIT_US = 6e7  # 60 s: the longest max_wait_us accepted (a wait beyond ~1e17 us overflows Condition.wait)


class MicroBatcher:
    """Batches concurrent `search(x, k)` calls on `index` (anything with FAISS's search, `d` and `ntotal`).

    max_batch: most query rows in one batch; the worker starts as soon as this many are queued.
    max_wait_us: how long the worker waits, after the first query of a batch arrives, for more
    (the most latency a lone caller pays for batching; finite, at most MAX_WAIT_US = 60 s). Calls
    with different k are searched as separate batches, so every caller gets exactly what
    `index.search(x, k)` would return.
    initializer: run once in the worker thread before it serves, as in concurrent.futures (e.g.
    `lambda: faiss.omp_set_num_threads(1)`: OpenMP thread counts are per thread, and a new thread
    starts from OMP_NUM_THREADS / every core).
    """

    def __init__(self, index, max_batch: int = 16, max_wait_us: float = 200.0,
                 initializer: Callable[[], object] | None = None):
        if int(max_batch) <= 0:
            raise InputError(f"max_batch must be positive, got {max_batch}")
        if isinstance(max_wait_us, bool) or not isinstance(max_wait_us, (int, float, np.integer, np.floating)):
            raise InputTypeError(f"max_wait_us must be a number of microseconds, got {type(max_wait_us).__name__}")
        if not (math.isfinite(max_wait_us) and 0 <= max_wait_us <= MAX_WAIT_US):
            raise InputError(f"max_wait_us must be a finite number of microseconds in [0, {MAX_WAIT_US:g}] "
                             f"(60 s), got {max_wait_us}")
        self.index = index
        self.d = int(index.d)
        self.max_batch = int(max_batch)
        self.max_wait_us = float(max_wait_us)
        self._initializer = initializer
        self._cv = threading.Condition()
        self._queue: deque[tuple[np.ndarray, int, Future]] = deque()
        self._rows = 0  # query rows queued
        self._closed = False
        self._broken: BaseException | None = None  # the initializer's error: calls fail with it
        self._dead: BaseException | None = None  # what killed the worker thread: calls fail with it
        self._current: list[tuple[np.ndarray, int, Future]] = []  # the batch being served
        self._worker = threading.Thread(target=self._serve, name="simskip-microbatcher", daemon=True)
        self._worker.start()

    def search(self, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of `index.search(x, k)` for this caller's queries, searched in a batch with other callers'."""
        x = as_input(x, self.d, "queries")
        k = check_k(k, x.shape[0])
        done: Future = Future()
        with self._cv:
            if self._dead is not None:
                raise RuntimeError(f"this MicroBatcher's worker thread failed ({self._dead!r}); create a new one")
            if self._closed:
                raise RuntimeError("this MicroBatcher is closed")
            self._queue.append((x, k, done))
            self._rows += x.shape[0]
            if len(self._queue) == 1 or self._rows >= self.max_batch:  # the worker waits for one of these
                self._cv.notify()
        return done.result()

    def close(self) -> None:
        """Serve the queued calls, then stop the worker thread (idempotent)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> "MicroBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker ----------------------------------------------------------------------------------
    def _take(self) -> list[tuple[np.ndarray, int, Future]] | None:
        """The next batch: wait for a first call, then up to max_wait_us for max_batch rows (None: closed and empty)."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            deadline = time.perf_counter() + self.max_wait_us * 1e-6
            while self._rows < self.max_batch and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, rows = [], 0
            while self._queue and (not batch or rows + self._queue[0][0].shape[0] <= self.max_batch):
                batch.append(self._queue.popleft())
                rows += batch[-1][0].shape[0]
            self._rows -= rows
            return batch

    def _serve(self) -> None:
        try:
            self._serve_batches()
        except BaseException as e:  # the worker dies: no caller may be left waiting for it
            with self._cv:
                self._dead, self._closed = e, True
                waiting = self._current + list(self._queue)
                self._queue.clear()
                self._rows = 0
            err = RuntimeError(f"MicroBatcher worker thread failed: {e!r}")
            for _, _, done in waiting:
                if not done.done():
                    done.set_exception(err)

    def _serve_batches(self) -> None:
        try:
            if self._initializer is not None:
                self._initializer()
        except BaseException as e:  # nothing can be served: every call fails with the initializer's error
            self._broken = e
        while (batch := self._take()) is not None:
            self._current = batch
            if self._broken is not None:
                for _, _, done in batch:
                    done.set_exception(RuntimeError(f"MicroBatcher initializer failed: {self._broken!r}"))
                continue
            for k in dict.fromkeys(k for _, k, _ in batch):  # distinct k, in order of arrival
                self._search([r for r in batch if r[1] == k], k)
            self._current = []

    def _search(self, requests: list[tuple[np.ndarray, int, Future]], k: int) -> None:
        """One FAISS-style search for `requests` (same k); each caller gets its rows or the exception."""
        try:
            x = requests[0][0] if len(requests) == 1 else np.concatenate([r[0] for r in requests])
            D, I = self.index.search(x, k)
        except BaseException as e:  # every caller of this batch sees the error; the worker goes on
            for _, _, done in requests:
                done.set_exception(e)
            return
        s = 0
        for q, _, done in requests:
            n = q.shape[0]
            done.set_result((D[s:s + n], I[s:s + n]))
            s += n
