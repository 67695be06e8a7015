"""Evaluation: identity == raw exactly, baselines are what they claim, reports are written, ANN recall is sane."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from simskip_faiss import IdentityRefiner
from simskip_faiss.datasets import load_digits, make_synthetic
from simskip_faiss.evaluation import EvalConfig, ann_sweep, evaluate
from simskip_faiss.refiner import LinearRefiner

FAST = dict(progress=False, bootstrap=200, threads=2)


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(n=1500, d=24, n_queries=400, seed=1)


def test_identity_refiner_equals_raw_exactly(synth):
    rep = evaluate(synth, {"same": IdentityRefiner(synth.corpus.shape[1])}, EvalConfig(ann_factory=None, **FAST))
    for r in (r for r in rep.quality if r["method"] == "same"):
        assert r["value"] == rep.value("raw", r["task"], r["metric"])
        assert r["delta"] == 0.0 and not r["significant"]
    assert {r["task"] for r in rep.quality} == {"labels", "pairs"}


def test_label_metrics_match_a_direct_computation():
    """precision@10 of raw digits, recomputed here with numpy brute force (not through FAISS or metrics.py)."""
    data = load_digits()
    rep = evaluate(data, None, EvalConfig(ann_factory=None, baselines=("raw",), **FAST))
    rows = data.split_rows("test")
    sims = data.corpus[rows] @ data.corpus.T
    sims[np.arange(len(rows)), rows] = -np.inf  # drop self
    top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    want = (data.labels[top] == data.labels[rows][:, None]).mean()
    assert rep.value("raw", "labels", "precision@10") == pytest.approx(want, abs=1e-3)


def test_baselines_are_what_they_claim(digits):
    x, _ = digits
    c = LinearRefiner.centring(x, normalize=False)
    np.testing.assert_allclose(c.transform(x), x - x.mean(0), atol=1e-6)
    rng = np.random.default_rng(0)  # full-rank correlated data: whitened covariance is the identity
    z = (rng.standard_normal((4000, 8)) @ (np.eye(8) + 0.4 * rng.standard_normal((8, 8)))).astype(np.float32)
    w = LinearRefiner.whitening(z, normalize=False)
    np.testing.assert_allclose(np.cov(w.transform(z), rowvar=False), np.eye(8), atol=5e-3)  # eps-regularised
    a = LinearRefiner.all_but_the_top(x, n_components=2, normalize=False)
    y = a.transform(x)
    evecs = np.linalg.eigh(np.cov(x, rowvar=False))[1][:, ::-1][:, :2]
    assert np.abs(y @ evecs).max() < 1e-4  # nothing left along the top-2 principal directions


def test_report_files(synth, tmp_path):
    rep = evaluate(synth, None, EvalConfig(ann_factory="IVF16,Flat", ann_sweep=(1, 16), **FAST))
    rep.write(tmp_path)
    plots = ("quality.png", "ann.png") if importlib.util.find_spec("matplotlib") else ()  # the data extra
    for f in ("report.json", "report.md", *plots):
        assert (tmp_path / f).stat().st_size > 100, f
    j = json.loads((tmp_path / "report.json").read_text())
    assert {r["method"] for r in j["quality"]} == {"raw", "centred", "whitened", "abtt"}
    assert "ndcg@10" in (tmp_path / "report.md").read_text() and "raw" in rep.table()


def test_ann_sweep_recall_rises_with_nprobe(synth):
    rows = ann_sweep(IdentityRefiner(24), synth.corpus, synth.queries, "IVF32,Flat", "ip", (1, 32), threads=1)
    assert rows[0]["10-recall@10"] < rows[1]["10-recall@10"]
    assert rows[1]["10-recall@10"] == pytest.approx(1.0)  # nprobe = nlist is exhaustive
    assert rows[1]["1-recall@1"] == pytest.approx(1.0) and rows[0]["qps"] > 0


def test_corpus_only_data_gets_the_ann_axis():
    from simskip_faiss.datasets import load_user

    data = load_user(make_synthetic(n=500, d=8).corpus)
    rep = evaluate(data, None, EvalConfig(ann_factory="Flat", **FAST))
    assert not rep.quality and rep.ann[0]["10-recall@10"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(data, None, EvalConfig(ann_factory=None, **FAST))
