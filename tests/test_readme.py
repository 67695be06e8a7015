"""The README's Python example runs as written (on small synthetic files)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "corpus.npy", x)
    np.save(tmp_path / "queries.npy", x[:20])
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    index, D, I = env["index"], env["D"], env["I"]
    assert index.ntotal == 600 and I.shape == (20, 10)
    assert (I[:, 0] == np.arange(20)).all()  # each query finds itself first after refinement
    np.testing.assert_array_equal(index.search(x[:20], 10)[1], I)  # the reloaded bundle agrees
