"""Training signals and the guard: each signal learns its planted structure; a harmful refiner ships as identity."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simskip_faiss import Refiner  # noqa: E402
from simskip_faiss.config import TrainConfig  # noqa: E402
from simskip_faiss.datasets import make_synthetic  # noqa: E402
from simskip_faiss.export import export  # noqa: E402
from simskip_faiss.training import fit  # noqa: E402

BASE = dict(hidden=64, batch_size=128, threads=2, progress=False, seed=0, max_val_queries=400)


@pytest.fixture(scope="module")
def planted():
    return make_synthetic(n=1500, d=24, n_queries=600, seed=3)


@pytest.mark.parametrize("signal", [
    dict(),  # unsupervised
    dict(unsupervised_weight=0, label_weight=1),
    dict(unsupervised_weight=0, pair_weight=1),
    dict(unsupervised_weight=0, pair_weight=1, pair_mode="query_only"),
    dict(unsupervised_weight=0.5, label_weight=1, pair_weight=1),
])
def test_each_signal_lowers_its_own_loss(planted, signal):
    cfg = TrainConfig(epochs=8, guard=False, patience=8, **{**BASE, "batch_size": 64}, **signal)
    res = fit(planted, cfg)
    losses = [h["loss"] for h in res.history[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.95, losses


def test_labels_signal_improves_label_retrieval_on_validation(planted):
    res = fit(planted, TrainConfig(epochs=4, unsupervised_weight=0, label_weight=1, **BASE))
    g = res.guard
    assert g.alpha > 0
    chosen = next(c for c in g.candidates if c["alpha"] == g.alpha)
    assert chosen["metrics"]["labels:map@100"] > g.raw["labels:map@100"]
    assert all(chosen["metrics"][k] >= g.raw[k] for k in g.raw)  # nothing dropped on validation


def test_guard_ships_identity_for_a_harmful_refiner(planted):
    """Labels shuffled among training rows: what it learns cannot beat raw on true validation labels."""
    rng = np.random.default_rng(0)
    train_rows = planted.split_rows("train")
    bad = planted.labels.copy()
    bad[train_rows] = rng.permutation(bad[train_rows])
    # validation sees the true labels; training sees noise (fit hides non-train labels from training)
    data = dataclasses.replace(planted, labels=np.where(planted.corpus_split == 0, bad, planted.labels))
    unguarded = fit(data, TrainConfig(epochs=4, unsupervised_weight=0, label_weight=1, guard=False, **BASE))
    worse = unguarded.guard.candidates[0]["metrics"]
    assert worse["labels:map@100"] < unguarded.guard.raw["labels:map@100"]  # it really hurts
    res = fit(data, TrainConfig(epochs=4, unsupervised_weight=0, label_weight=1, **BASE))
    assert res.guard.alpha == 0.0 and "identity" in res.guard.reason
    x = torch.from_numpy(planted.corpus[:50])
    with torch.no_grad():
        np.testing.assert_allclose(res.model(x).numpy(), planted.corpus[:50], atol=1e-6)


def test_alpha_is_baked_into_the_onnx(tmp_path, planted):
    res = fit(planted, TrainConfig(epochs=1, guard=False, **BASE))
    model = res.model
    torch.nn.init.normal_(model.f[-1].weight, std=0.2)  # make f(x) clearly non-zero
    model.alpha.fill_(0.3)
    meta = export(model, tmp_path / "a.onnx", res.metadata())
    ref = Refiner.load(tmp_path / "a.onnx")
    x = planted.corpus[:64]
    with torch.no_grad():
        fx = model.f(torch.from_numpy(x)).numpy()
    y = x + 0.3 * fx
    want = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(ref.transform(x), want, atol=1e-5)
    assert meta["alpha"] == pytest.approx(0.3) and ref.metadata["alpha"] == pytest.approx(0.3)


def test_guard_report_is_in_the_metadata(tmp_path, planted):
    res = fit(planted, TrainConfig(epochs=2, **BASE))
    export(res.model, tmp_path / "g.onnx", res.metadata())
    g = Refiner.load(tmp_path / "g.onnx").metadata["guard"]
    assert g["alpha"] == res.guard.alpha and len(g["candidates"]) == len(TrainConfig().alphas)
    assert {"labels:map@100", "pairs:ndcg@10"} <= set(g["raw"])


def test_guard_tasks_and_agreement_proxy(planted):
    res = fit(planted, TrainConfig(epochs=1, guard_tasks=("pairs",), **BASE))
    assert set(res.guard.raw) == {"pairs:ndcg@10", "pairs:recall@10", "pairs:recall@100", "pairs:mrr@10"}
    corpus_only = dataclasses.replace(planted, labels=None, label_names=None, queries=None, query_split=None, qrels=None,
                                      query_text=None)
    res = fit(corpus_only, TrainConfig(epochs=1, min_agreement=0.95, **BASE))
    chosen = next(c for c in res.guard.candidates if c["alpha"] == res.guard.alpha)
    assert chosen["metrics"]["agreement@10"] >= 0.95 and "not measured" in res.guard.reason
    with pytest.raises(ValueError, match="guard_tasks"):
        fit(corpus_only, TrainConfig(epochs=1, guard_tasks=("labels",), **BASE))


def test_similarity_kl_is_zero_only_when_neighbourhoods_agree():
    from simskip_faiss.training import similarity_kl

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    assert float(similarity_kl(x, x, 0.1)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_kl(x, 3 * x, 0.1)) == pytest.approx(0.0, abs=1e-6)  # scale-free (cosine)
    assert float(similarity_kl(x, torch.randn(32, 8, generator=g), 0.1)) > 0.1


def test_guard_metrics_limit_the_no_drop_rule_to_the_named_metrics(planted):
    cfg = TrainConfig(epochs=2, unsupervised_weight=0, label_weight=1, pair_weight=1,
                      guard_metrics=("labels:map@100",), **BASE)
    g = fit(planted, cfg).guard
    assert "labels:map@100" in g.criterion and set(g.raw) > {"labels:map@100"}  # every metric still scored
    # independently: the best objective among alpha > 0 whose protected metric did not drop, else identity
    ok = [c for c in g.candidates if c["alpha"] > 0 and c["metrics"]["labels:map@100"] >= g.raw["labels:map@100"]]
    best = max(ok, key=lambda c: c["objective"], default=None)
    assert g.alpha == (best["alpha"] if best and best["objective"] > 0 else 0.0)
    assert all(c["feasible"] == (c["metrics"]["labels:map@100"] >= g.raw["labels:map@100"]) for c in g.candidates)
    with pytest.raises(ValueError, match="task:metric"):
        TrainConfig(guard_metrics=("ndcg@10",))
    with pytest.raises(ValueError, match="not measured on validation"):
        fit(planted, dataclasses.replace(cfg, guard_metrics=("pairs:bogus@3",)))
