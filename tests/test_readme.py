"""The README's Python example runs as written (on small synthetic files)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_example_runs(tmp_path, monkeypatch):
    import torch

    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "corpus.npy", x)
    np.save(tmp_path / "queries.npy", x[:200])
    (tmp_path / "qrels.tsv").write_text("".join(f"{i}\t{i}\n" for i in range(200)))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the example leaves torch's threads alone; keep the suite fast on a shared machine
    try:
        env: dict = {}
        exec(compile(code, "README.md", "exec"), env)
    finally:
        torch.set_num_threads(threads)
    index, D, I, result = env["index"], env["D"], env["I"], env["result"]
    assert result.config.signals() == ["pairs", "preserve"] and result.guard is not None
    assert index.refiner.apply_to == "queries"  # pairs alone: a query-only refiner, the index keeps raw vectors
    np.testing.assert_array_equal(index.index.reconstruct_n(0, 5), x[:5])
    assert index.ntotal == 600 and I.shape == (200, 10)
    assert (I[:, 0] == np.arange(200)).all()  # each query finds itself first after refinement
    np.testing.assert_array_equal(index.search(x[:200], 10)[1], I)  # the reloaded bundle agrees


def test_batcher_example_in_the_speed_page_runs():
    """docs/speed.md's MicroBatcher snippet runs with the names it assumes (an index, faiss, a query)."""
    import faiss

    import simskip_faiss as sf

    speed = README.parent / "docs" / "speed.md"
    blocks = re.findall(r"```python\n(.*?)```", speed.read_text(), re.S)
    code = next(b for b in blocks if "MicroBatcher" in b)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    index = sf.RefinedIndex(sf.IdentityRefiner(8), "Flat", metric="ip")
    index.add(x)
    threads = faiss.omp_get_max_threads()
    env: dict = {"index": index, "faiss": faiss, "q": x[:1]}
    try:
        exec(compile(code, "docs/speed.md", "exec"), env)
    finally:
        faiss.omp_set_num_threads(threads)
    assert env["I"].shape == (1, 10) and env["I"][0, 0] == index.search(x[:1], 10)[1][0, 0]
