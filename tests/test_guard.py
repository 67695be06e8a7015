"""The guard (guard.py): signals follow the supervision, the step budget, alpha and checkpoint
chosen on validation, a harmful refiner ships as identity, bad input fails clearly."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simskip_faiss import Refiner  # noqa: E402
from simskip_faiss.config import TrainConfig  # noqa: E402
from simskip_faiss.datasets import make_synthetic  # noqa: E402
from simskip_faiss.training.export import export  # noqa: E402
from simskip_faiss.training.guard import Guard, _combine, _f, fit, only_supervision as _only  # noqa: E402

# lr and temperature fixed (no search) keeps each fit to a few seconds
BASE = dict(hidden=64, threads=1, progress=False, seed=0, max_val_queries=400, lr=3e-3, temperature=0.1,
            eval_every=25, max_steps=150, patience=3)


@pytest.fixture(scope="module")
def planted():
    return make_synthetic(n=1200, d=24, n_queries=500, seed=3)


@pytest.mark.parametrize("labels, pairs, want, apply_to", [
    (True, False, ["labels"], "both"), (False, True, ["pairs", "preserve"], "queries"),
    (True, True, ["labels", "pairs"], "both"), (False, False, ["unsupervised"], "both"),
])
def test_signals_follow_the_supervision_given(planted, labels, pairs, want, apply_to):
    res = fit(_only(planted, labels, pairs), TrainConfig(**{**BASE, "max_steps": 25}))
    assert res.config.signals() == want and res.guard.signals == want
    assert res.metadata()["signals"] == want and res.metadata()["apply_to"] == apply_to


@pytest.mark.parametrize("given, has_labels, want", [
    ({}, False, ("query_only", 1.0)),                      # pairs alone: documents stay raw, and stay put
    ({}, True, ("symmetric", 0.0)),                        # labels need refined documents
    ({"pair_mode": "symmetric"}, False, ("symmetric", 0.0)),
    ({"preserve_weight": 0.0}, False, ("query_only", 0.0)),
    ({"pair_weight": 1.0, "unsupervised_weight": 1.0}, False, ("symmetric", 0.0)),
])
def test_pair_mode_and_preservation_follow_the_signals(given, has_labels, want):
    cfg = TrainConfig(**given).resolved(has_labels=has_labels, has_pairs=True)
    assert (cfg.pair_mode, cfg.preserve_weight) == want
    assert cfg.apply_to() == ("queries" if want[0] == "query_only" else "both")


def test_explicit_weights_override_the_supervision(planted):
    res = fit(planted, TrainConfig(**{**BASE, "max_steps": 25}, label_weight=1.0))
    assert res.config.signals() == ["labels"]  # pairs given, but the user asked for labels only
    assert res.config.pair_weight == 0 and res.config.unsupervised_weight == 0
    with pytest.raises(ValueError, match="no queries"):
        fit(_only(planted, pairs=False), TrainConfig(**BASE, pair_weight=1.0))


@pytest.mark.parametrize("signal", [
    dict(unsupervised_weight=1.0),
    dict(label_weight=1.0),
    dict(pair_weight=1.0),
    dict(pair_weight=1.0, pair_mode="query_only"),
    dict(unsupervised_weight=0.5, label_weight=1.0, pair_weight=1.0),
])
def test_each_signal_lowers_its_own_loss(planted, signal):
    cfg = TrainConfig(**{**BASE, "max_steps": 200, "patience": 100, "lr": 1e-3, "temperature": 0.05},
                      guard=False, **signal)
    res = fit(planted, cfg)
    losses = [h["loss"] for h in res.history[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.95, losses


def test_labels_improve_label_retrieval_on_validation(planted):
    res = fit(_only(planted, pairs=False), TrainConfig(**BASE))
    g = res.guard
    assert g.alpha > 0 and res.best_step > 0
    chosen = next(c for c in g.candidates if c["alpha"] == g.alpha)
    assert chosen["metrics"]["labels:map@100"] > g.raw["labels:map@100"]
    assert all(chosen["metrics"][k] >= g.raw[k] for k in g.raw)  # nothing dropped on validation


def _brute_force(data, refine_q, refine_d, rows, qids, db=None):
    """Validation p@10 (labels) and nDCG@10/Recall@10/MRR@10 (one relevant document per query),
    by numpy brute force over the whole corpus, or over its rows `db` (then also labels mAP@100,
    relevant rows counted among `db`)."""
    db = np.arange(len(data.corpus)) if db is None else np.asarray(db)
    docs = refine_d(data.corpus[db])
    s = refine_q(data.corpus[rows]) @ docs.T
    s[db[None, :] == np.asarray(rows)[:, None]] = -np.inf  # a label query does not retrieve itself
    top = db[np.argsort(-s, axis=1, kind="stable")[:, :100]]
    same = data.labels[top] == data.labels[rows][:, None]
    out = {"labels:precision@10": float(same[:, :10].mean())}
    if len(db) < len(data.corpus):
        n_rel = np.array([(data.labels[db] == data.labels[r]).sum() - 1 for r in rows])
        prec = np.cumsum(same, axis=1) / np.arange(1, 101)
        ap = (prec * same).sum(1) / np.minimum(np.maximum(n_rel, 1), 100)
        out["labels:map@100"] = float(ap[n_rel > 0].mean())
    top = db[np.argsort(-(refine_q(data.queries[qids]) @ docs.T), axis=1, kind="stable")[:, :10]]
    rel = np.array([data.qrels[i][0] for i in qids])
    hit = top == rel[:, None]
    rank = np.where(hit.any(1), hit.argmax(1), -1)
    out["pairs:ndcg@10"] = float(np.where(rank >= 0, 1 / np.log2(np.maximum(rank, 0) + 2), 0).mean())
    out["pairs:recall@10"] = float((rank >= 0).mean())
    out["pairs:mrr@10"] = float(np.where(rank >= 0, 1 / (np.maximum(rank, 0) + 1), 0).mean())
    return out


def _at(model):
    """at(alpha) -> the model's forward pass with alpha set (numpy in, numpy out)."""
    def at(alpha):
        def refine(x):
            model.alpha.fill_(alpha)
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
        return refine
    return at


def test_guard_table_matches_metrics_recomputed_from_the_refined_vectors(planted):
    """Independent of the guard's own code: refine with the model at each alpha, search by brute force."""
    cfg = TrainConfig(**BASE, label_weight=1.0, pair_weight=1.0, guard_metrics=("labels:map@100",))
    res = fit(planted, cfg)
    g, model = res.guard, res.model
    rows, qids = planted.split_rows("val"), planted.split_queries("val")
    assert len(rows) <= 400 and len(qids) <= 400  # below max_val_queries: the guard used them all

    at = _at(model)

    shipped = model.alpha.item()
    raw = _brute_force(planted, lambda x: x, lambda x: x, rows, qids)
    for k, v in raw.items():
        assert g.raw[k] == pytest.approx(v, abs=1e-6), k
    for c in g.candidates:
        got = _brute_force(planted, at(c["alpha"]), at(c["alpha"]), rows, qids)
        for k, v in got.items():
            assert c["metrics"][k] == pytest.approx(v, abs=2e-3), (c["alpha"], k)  # ties may order differently
        assert c["feasible"] == (c["metrics"]["labels:map@100"] >= g.raw["labels:map@100"])
    model.alpha.fill_(shipped)
    ok = [c for c in g.candidates if c["feasible"] and c["alpha"] > 0 and c["objective"] > 0]
    assert g.alpha == (max(ok, key=lambda c: c["objective"])["alpha"] if ok else 0.0)
    assert "labels:map@100" in g.criterion and set(g.raw) > {"labels:map@100"}  # every metric still scored


def test_interval_of_the_gain_from_per_query_metrics_by_brute_force(planted):
    """Guard.interval against per-query ranks computed here: the pooled per-query objective terms,
    bootstrapped by metrics.paired_bootstrap, give the same objective and interval."""
    from simskip_faiss.metrics import paired_bootstrap

    data = _only(planted, labels=False)
    res = fit(data, TrainConfig(**BASE, guard=False))  # unguarded: a trained query refiner at alpha = 1
    guard = Guard(data, res.config)
    iv = guard.interval(res.model, 1.0)
    qids = data.split_queries("val")
    assert iv["queries"] == {"pairs": len(qids)} and iv["level"] == 0.95

    def ranks(refine):  # rank of each query's one relevant document (documents stay raw: query-only)
        s = refine(data.queries[qids]) @ data.corpus.T
        rel = np.array([data.qrels[i][0] for i in qids])
        return (s > s[np.arange(len(qids)), rel][:, None]).sum(1)

    def per_query(r):
        return {"ndcg@10": np.where(r < 10, 1 / np.log2(r + 2), 0), "recall@10": (r < 10) * 1.0,
                "recall@100": (r < 100) * 1.0, "mrr@10": np.where(r < 10, 1 / (r + 1), 0)}

    raw, got = per_query(ranks(lambda x: x)), per_query(ranks(_at(res.model)(1.0)))
    terms = sum((got[m] - raw[m]) / raw[m].mean() for m in raw) / len(raw)
    want = paired_bootstrap(np.zeros_like(terms), terms, seed=res.config.seed)
    assert iv["objective"] == pytest.approx(terms.mean(), abs=1e-9)
    assert iv["objective"] == pytest.approx(res.guard.candidates[-1]["objective"], abs=1e-9)  # the table's alpha=1
    assert (iv["ci_low"], iv["ci_high"]) == pytest.approx((want["ci_low"], want["ci_high"]), abs=1e-9)
    for m in raw:  # each metric's own interval, and the list of those above 0
        one = paired_bootstrap(raw[m], got[m], seed=res.config.seed)
        assert iv["metrics"][f"pairs:{m}"] == pytest.approx({k: one[k] for k in ("diff", "ci_low", "ci_high")}, abs=1e-9)
    assert iv["gains"] == [f"pairs:{m}" for m in raw if paired_bootstrap(raw[m], got[m], seed=0)["ci_low"] > 0]


def test_interval_skips_label_queries_without_a_relevant_row(planted):
    """A validation row whose label no other row carries is not scored (no relevant item): the
    interval counts the scored queries, as the metrics do (it raised a shape error before)."""
    labels = planted.labels.copy()
    lone = planted.split_rows("val")[0]
    labels[lone] = labels.max() + 1
    data = _only(dataclasses.replace(planted, labels=labels, label_names=[*planted.label_names, "lone"]), pairs=False)
    res = fit(data, TrainConfig(**BASE, guard=False))
    iv = Guard(data, res.config).interval(res.model, 1.0)
    assert iv["queries"] == {"labels": len(planted.split_rows("val")) - 1}
    assert iv["objective"] == pytest.approx(res.guard.candidates[-1]["objective"], abs=1e-9)


def test_a_gain_within_validation_noise_is_reported_or_refused(planted, monkeypatch):
    """The best candidate's interval is in the report; one reaching 0 ships with a note (by default)
    or, with confidence > 0, the identity ships."""
    res = fit(planted, TrainConfig(**BASE))
    g = res.guard
    assert g.alpha > 0 and 0 < g.interval["ci_low"] <= g.interval["objective"] <= g.interval["ci_high"]
    shipped = next(c for c in g.candidates if c["alpha"] == g.alpha)
    assert g.interval["objective"] == pytest.approx(shipped["objective"], abs=1e-9)
    assert not g.within_noise and "interval above 0" not in g.criterion and "best validation gain" in g.summary()
    assert "interval above 0" in fit(planted, TrainConfig(**BASE, confidence=0.95)).guard.criterion
    ident = fit(_only(planted, labels=False), TrainConfig(**BASE))  # no candidate gains (see the table)
    assert ident.guard.alpha == 0 and ident.guard.interval == {} and not ident.guard.within_noise

    seen = []

    def noisy(self, model, alpha, n=1000, ci=0.95):
        seen.append((alpha, ci))
        return {"objective": 0.01, "ci_low": -0.002, "ci_high": 0.03, "level": ci, "queries": {"labels": 9},
                "metrics": {}, "gains": []}

    monkeypatch.setattr(Guard, "interval", noisy)
    res = fit(planted, TrainConfig(**BASE, confidence=0.9))
    g = res.guard
    assert seen == [(shipped["alpha"], 0.9)] and g.within_noise and g.alpha == 0 and res.model.alpha.item() == 0
    assert "within noise, shipping the identity" in g.reason
    x = torch.from_numpy(planted.corpus[:20])
    with torch.no_grad():
        np.testing.assert_allclose(res.model(x).numpy(), planted.corpus[:20], atol=1e-6)
    assert g.summary().splitlines()[3].endswith("over 9 labels queries: within noise, no interval above 0")
    clear = {"objective": 0.01, "ci_low": -0.002, "ci_high": 0.03, "level": 0.95, "queries": {"labels": 9},
             "metrics": {}, "gains": ["labels:map@100"]}  # one metric's gain is beyond noise: that decides
    monkeypatch.setattr(Guard, "interval", lambda self, model, alpha, n=1000, ci=0.95: clear)
    res = fit(planted, TrainConfig(**BASE, confidence=0.9))
    assert res.guard.alpha == shipped["alpha"] and not res.guard.within_noise and "noise" not in res.guard.reason
    assert res.guard.summary().splitlines()[3].endswith("beyond noise: labels:map@100")
    clear = {**clear, "ci_low": 0.001, "gains": []}  # or the objective's own interval: either test counts
    res = fit(planted, TrainConfig(**BASE, confidence=0.9))
    assert res.guard.alpha == shipped["alpha"] and res.guard.summary().splitlines()[3].endswith("beyond noise: objective")
    monkeypatch.setattr(Guard, "interval", noisy)
    res = fit(planted, TrainConfig(**BASE))  # the default: ships it, and says so
    assert seen[-1] == (shipped["alpha"], 0.95) and res.guard.alpha == shipped["alpha"]
    assert "within validation noise" in res.guard.reason and "--confidence 0.95" in res.guard.reason
    with pytest.raises(ValueError, match="confidence"):
        TrainConfig(confidence=1)


def test_in_training_validations_score_a_seeded_subset_and_the_final_sweep_all(planted):
    """The coarse validations rank checkpoints on at most coarse_val_queries per task, recomputed here
    by brute force on exactly those queries; the shipped report scores every validation query."""
    cfg = TrainConfig(**BASE, label_weight=1.0, pair_weight=1.0, coarse_val_queries=30)
    res = fit(planted, cfg)
    guard = Guard(planted, res.config)
    rows, qids = planted.split_rows("val"), planted.split_queries("val")
    assert len(rows) > 30 and len(qids) > 30
    sub_rows, sub_qids = guard._subset(guard.queries, True)["labels"], guard._subset(guard.queries, True)["pairs"]
    assert len(sub_rows) == len(sub_qids) == 30 and set(sub_rows) < set(rows) and set(sub_qids) < set(qids)
    assert Guard(planted, res.config).coarse.keys() == guard.coarse.keys()  # seeded: the same subset
    assert all((Guard(planted, res.config).coarse[t] == guard.coarse[t]).all() for t in guard.coarse)
    model = res.model
    ev = guard.evaluator("t")(model, 1)

    at = _at(model)

    raw = _brute_force(planted, lambda x: x, lambda x: x, sub_rows, sub_qids)
    for c in ev.detail["candidates"]:
        got = _brute_force(planted, at(c["alpha"]), at(c["alpha"]), sub_rows, sub_qids)
        for k, v in got.items():
            assert c["metrics"][k] == pytest.approx(v, abs=1e-6), (c["alpha"], k)
        want = np.mean([(c["metrics"][k] - guard.raw_coarse[k]) / guard.raw_coarse[k] for k in c["metrics"]])
        assert c["objective"] == pytest.approx(want)  # relative to raw on the same subset
    for k, v in raw.items():
        assert guard.raw_coarse[k] == pytest.approx(v, abs=1e-6)
    full = _brute_force(planted, lambda x: x, lambda x: x, rows, qids)
    for k, v in full.items():  # the shipped report: every validation query
        assert res.guard.raw[k] == pytest.approx(v, abs=1e-6)


def test_in_training_validations_on_a_large_corpus_search_a_seeded_corpus_sample(planted):
    """Above coarse_corpus_rows, the coarse validations search a fixed sample of the corpus holding
    every row their queries need; recomputed here by brute force over the sample (relevant rows
    counted in it). The shipped report still searches the whole corpus."""
    cfg = TrainConfig(**BASE, label_weight=1.0, pair_weight=1.0, coarse_val_queries=30, coarse_corpus_rows=400)
    res = fit(planted, cfg)
    guard = Guard(planted, res.config)
    sub = guard._subset(guard.queries, True)
    rows, qids, sample = sub["labels"], sub["pairs"], guard.sample
    need = set(rows.tolist()) | {int(d) for i in qids for d in planted.qrels[i]}
    assert need <= set(sample.tolist()) and len(sample) == 400 == len(set(sample.tolist())) and len(planted.corpus) > 400
    assert (np.diff(sample) > 0).all() and (Guard(planted, res.config).sample == sample).all()  # sorted, seeded
    assert len(guard.coarse_corpus) == 400 and Guard(planted, TrainConfig(**BASE)).sample is None  # 1200 <= 50,000
    ev = guard.evaluator("t")(res.model, 1)
    at = _at(res.model)
    raw = _brute_force(planted, lambda x: x, lambda x: x, rows, qids, db=sample)
    for k, v in raw.items():
        assert guard.raw_coarse[k] == pytest.approx(v, abs=1e-6), k
    for c in ev.detail["candidates"]:
        for k, v in _brute_force(planted, at(c["alpha"]), at(c["alpha"]), rows, qids, db=sample).items():
            assert c["metrics"][k] == pytest.approx(v, abs=1e-6), (c["alpha"], k)
    full = _brute_force(planted, lambda x: x, lambda x: x, planted.split_rows("val"), planted.split_queries("val"))
    for k, v in full.items():  # the shipped report: every validation query over the whole corpus
        assert res.guard.raw[k] == pytest.approx(v, abs=1e-6)


def test_cheap_alpha_sweep_equals_the_models_forward_pass(planted):
    res = fit(_only(planted, pairs=False), TrainConfig(**{**BASE, "max_steps": 50}, guard=False))
    model, x = res.model, planted.corpus[:100]
    fx = _f(model, x)
    for a in (0.1, 0.5, 1.0):
        model.alpha.fill_(a)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_combine(x, fx, a, True), want, atol=1e-6)


def test_guard_ships_identity_for_a_harmful_refiner(planted):
    """Labels shuffled among training rows: what it learns cannot beat raw on true validation labels."""
    rng = np.random.default_rng(0)
    train_rows = planted.split_rows("train")
    bad = planted.labels.copy()
    bad[train_rows] = rng.permutation(bad[train_rows])
    # validation sees the true labels; training sees noise (fit hides non-train labels from training)
    data = _only(dataclasses.replace(planted, labels=np.where(planted.corpus_split == 0, bad, planted.labels)), pairs=False)
    unguarded = fit(data, TrainConfig(**BASE, guard=False))
    worse = unguarded.guard.candidates[0]["metrics"]
    assert worse["labels:map@100"] < unguarded.guard.raw["labels:map@100"]  # it really hurts
    res = fit(data, TrainConfig(**BASE))
    assert res.guard.alpha == 0.0 and "identity" in res.guard.reason
    x = torch.from_numpy(planted.corpus[:50])
    with torch.no_grad():
        np.testing.assert_allclose(res.model(x).numpy(), planted.corpus[:50], atol=1e-6)


def test_small_corpus_gets_small_batches_and_enough_steps(planted):
    from simskip_faiss.training import batch_size

    cfg = TrainConfig()
    assert batch_size(cfg, 100_000) == 512 and batch_size(cfg, 1200) == 150 and batch_size(cfg, 100) == 32
    res = fit(_only(planted, pairs=False), TrainConfig(**{**BASE, "patience": 100, "max_steps": 100}))
    assert [h["step"] for h in res.history] == [0, 25, 50, 75, 100]  # the budget, not the corpus size, sets steps
    assert res.stopped == "max_steps"


def test_lr_and_temperature_are_searched_on_validation(planted):
    cfg = TrainConfig(**{**BASE, "lr": None, "temperature": None, "max_steps": 100}, label_weight=1.0)
    res = fit(_only(planted, pairs=False), cfg)
    search = res.guard.search
    assert {(s["lr"], s["temperature"]) for s in search} == {(1e-3, 0.05), (3e-3, 0.05), (1e-3, 0.1), (3e-3, 0.1)}
    chosen = [s for s in search if s.get("chosen")]
    assert len(chosen) == 1 and (res.config.lr, res.config.temperature) == (chosen[0]["lr"], chosen[0]["temperature"])
    raced = [s for s in search if not s.get("chosen")]
    assert all(s["step"] <= cfg.search_evals * cfg.eval_every for s in raced)  # losers trained search_evals validations only


def test_alpha_is_baked_into_the_onnx(tmp_path, planted):
    res = fit(planted, TrainConfig(**{**BASE, "max_steps": 25}, guard=False))
    model = res.model
    torch.nn.init.normal_(model.f[-1].weight, std=0.2)  # make f(x) clearly non-zero
    model.alpha.fill_(0.3)
    meta = res.export(tmp_path / "a.onnx")
    ref = Refiner.load(tmp_path / "a.onnx")
    x = planted.corpus[:64]
    with torch.no_grad():
        fx = model.f(torch.from_numpy(x)).numpy()
    y = x + 0.3 * fx
    want = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(ref.transform(x), want, atol=1e-5)
    assert meta["alpha"] == pytest.approx(0.3) and ref.metadata["alpha"] == pytest.approx(0.3)


def test_fit_result_exports_itself_with_apply_to_signals_and_guard(tmp_path, planted):
    res = fit(_only(planted, labels=False), TrainConfig(**{**BASE, "max_steps": 50}, pair_weight=1.0,
                                                       pair_mode="query_only"))
    res.export(tmp_path / "q.onnx")
    ref = Refiner.load(tmp_path / "q.onnx")
    assert ref.apply_to == "queries" and ref.metadata["signals"] == ["pairs", "preserve"]
    g = ref.metadata["guard"]
    assert g["alpha"] == res.guard.alpha and len(g["candidates"]) == len(TrainConfig().alphas)
    assert set(g["raw"]) == {"pairs:ndcg@10", "pairs:recall@10", "pairs:recall@100", "pairs:mrr@10"}
    assert "sample_recall" not in ref.metadata  # fp32: nothing to compare
    meta = res.export(tmp_path / "a.onnx", precision="auto")  # checked on the corpus it was fitted on, unasked
    assert meta["sample_queries"] + meta["sample_corpus"] == len(planted.corpus) and 0 <= meta["sample_recall"] <= 1
    assert Refiner.load(tmp_path / "a.onnx").metadata["sample_recall"] == meta["sample_recall"]
    with pytest.raises(ValueError, match="queries only"):  # not silently "both"
        export(res.model, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match="trained for apply_to='queries'"):
        export(res.model, tmp_path / "bad.onnx", {"apply_to": "both"})
    assert not (tmp_path / "bad.onnx").exists()


def test_guard_tasks_and_agreement_proxy(planted):
    res = fit(planted, TrainConfig(**{**BASE, "max_steps": 25}, guard_tasks=("pairs",)))
    assert set(res.guard.raw) == {"pairs:ndcg@10", "pairs:recall@10", "pairs:recall@100", "pairs:mrr@10"}
    corpus_only = _only(planted, labels=False, pairs=False)
    res = fit(corpus_only, TrainConfig(**{**BASE, "max_steps": 50}, min_agreement=0.95))
    chosen = next(c for c in res.guard.candidates if c["alpha"] == res.guard.alpha)
    assert chosen["metrics"]["agreement@100"] >= 0.95 and "not measured" in res.guard.reason
    with pytest.raises(ValueError, match="guard_tasks"):
        fit(corpus_only, TrainConfig(**BASE, guard_tasks=("labels",)))


def test_guard_metrics_must_be_measured(planted):
    with pytest.raises(ValueError, match="task:metric"):
        TrainConfig(guard_metrics=("ndcg@10",))
    with pytest.raises(ValueError, match="not measured on validation"):
        fit(planted, TrainConfig(**BASE, guard_metrics=("pairs:bogus@3",)))


def test_fit_restores_torch_threads(planted):
    before = torch.get_num_threads()
    fit(_only(planted, pairs=False), TrainConfig(**{**BASE, "max_steps": 25, "threads": 1 if before != 1 else 2}))
    assert torch.get_num_threads() == before


# -- bad input: a clear error, or a fallback that says what it did -------------------------------

def test_single_class_labels_are_refused(planted):
    data = _only(dataclasses.replace(planted, labels=np.zeros(len(planted.corpus), np.int64)), pairs=False)
    with pytest.raises(ValueError, match=r"1 class.*at least 2 \(pass label_weight=0, on the command line --label-weight 0,"):
        fit(data, TrainConfig(**BASE))


def test_labels_no_two_rows_share_are_refused(planted):
    """All-distinct labels give label training no positive and the guard nothing to score: it trained
    with a zero loss and shipped the identity over a table of NaNs before."""
    data = _only(dataclasses.replace(planted, labels=np.arange(len(planted.corpus)), label_names=None), pairs=False)
    with pytest.raises(ValueError, match=r"no label is shared by two training rows \(\d+ labels, one row each\)"):
        fit(data, TrainConfig(**BASE))


def test_label_guard_needs_validation_rows_that_share_a_label(planted):
    """Training rows with classes, validation rows each with a label of its own: nothing to guard on."""
    labels = planted.labels.copy()
    val = planted.split_rows("val")
    labels[val] = labels.max() + 1 + np.arange(len(val))
    data = _only(dataclasses.replace(planted, labels=labels, label_names=None), pairs=False)
    with pytest.raises(ValueError, match=rf"share their label with another row.*has {len(val)} rows, 0 of them such"):
        fit(data, TrainConfig(**BASE))


def test_corpus_too_small_for_a_validation_split():
    tiny = make_synthetic(n=12, d=8, n_queries=4, seed=0, fractions=(0.95, 0.05, 0.0))
    with pytest.raises(ValueError, match="validation"):
        fit(tiny, TrainConfig(**BASE))
    with pytest.raises(ValueError, match=r"too small for the guard.*guard=False \(on the command line --no-guard\)"):
        fit(_only(tiny, labels=False, pairs=False), TrainConfig(**BASE))


def test_time_budget_too_short_for_one_validation_says_what_it_did(planted):
    res = fit(_only(planted, pairs=False), TrainConfig(**{**BASE, "eval_every": 10_000, "max_steps": 10_000},
                                                        time_budget=0.05))
    assert res.stopped == "time_budget" and 0 < res.history[1]["step"] < 10_000
    assert "time budget" in res.guard.reason and "before the first scheduled validation" in res.guard.reason


def _agreement(x: np.ndarray, y: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Brute force: the share of each row's raw k nearest neighbours (inner product, self excluded)
    still among its k nearest after refinement."""
    def top(v):
        s = v[rows] @ v.T
        s[np.arange(len(rows)), rows] = -np.inf
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    a, b = top(x), top(y)
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(a, b)]))


def test_without_supervision_the_guard_holds_raw_neighbour_agreement(planted):
    """No labels or pairs to validate on: an alpha whose agreement@k with the raw k-NN on validation
    rows (computed here with numpy) is below min_agreement is rejected; the boldest other ships."""
    data, threshold = _only(planted, labels=False, pairs=False), 0.97
    cfg = TrainConfig(**{**BASE, "max_steps": 50}, agreement_k=20, min_agreement=threshold)
    res = fit(data, cfg)
    key = "agreement@20"
    assert list(res.guard.raw) == [key] and res.guard.raw[key] == 1.0 and "20-NN agreement" in res.guard.criterion
    x = np.ascontiguousarray(data.corpus, np.float32)
    fx = _f(res.model, x)
    rows = data.split_rows("val")[: cfg.max_val_queries]
    rejected = 0
    for c in res.guard.candidates:
        want = _agreement(x, _combine(x, fx, c["alpha"], True), rows, 20)
        assert c["metrics"][key] == pytest.approx(want, abs=1e-3), c["alpha"]
        assert c["feasible"] == (want >= threshold), c
        rejected += want < threshold
    assert rejected > 0  # the threshold did bite
    ok = [c["alpha"] for c in res.guard.candidates if c["feasible"] and c["alpha"] > 0]
    assert res.guard.alpha == max(ok, default=0.0) and res.guard.alpha > 0

