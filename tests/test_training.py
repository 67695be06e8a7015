"""Training and export: identity at init, loss goes down on held-out data, determinism, ONNX parity."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simskip_faiss.training import SimSkip, Supervision, TrainConfig, nt_xent, stay_put, supcon, train  # noqa: E402


def test_untrained_refiner_is_identity(data):
    x, _ = data
    model = SimSkip(x.shape[1], hidden=64, depth=2, normalize=False).eval()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(y, x)
    normed = SimSkip(x.shape[1], normalize=True).eval()
    with torch.no_grad():
        np.testing.assert_allclose(normed(torch.from_numpy(x)).numpy(), x, atol=1e-6)  # x is unit-norm


def test_nt_xent_matches_formula():
    """NT-Xent against a direct per-anchor computation of -log softmax over the 2n-1 others."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = 0.5
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in others)
        total += -torch.log(torch.exp(z[i] @ z[j] / t) / denom)
    assert float(nt_xent(z1, z2, t)) == pytest.approx(float(total / 10), rel=1e-5)


def test_supcon_prefers_label_aligned_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])
    crossed = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]])
    assert float(supcon(aligned, labels, 0.1)) < float(supcon(crossed, labels, 0.1))


def _label_loss_by_loops(z, labels, t, decoupled):
    """The label loss written out per anchor and positive, in numpy."""
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / t
    terms = []
    for i in range(len(z)):
        pos = [j for j in range(len(z)) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(len(z)) if labels[j] != labels[i]]
        if not pos or (decoupled and not neg):
            continue
        per = []
        for p in pos:
            denom = [p] + neg if decoupled else [j for j in range(len(z)) if j != i]
            per.append(-(s[i, p] - np.log(np.exp(s[i, denom]).sum())))
        terms.append(np.mean(per))
    return np.mean(terms)


@pytest.mark.parametrize("decoupled", [True, False])
def test_label_loss_by_brute_force(decoupled):
    """Unlabelled rows (< 0) take no part (before, SupCon treated them as one more class)."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((9, 5))
    labels = np.array([0, 0, 1, 1, 1, 2, -1, -1, -1])  # label 2 has no positive: not an anchor
    got = float(supcon(torch.tensor(z), torch.tensor(labels), 0.2, decoupled=decoupled))
    assert got == pytest.approx(_label_loss_by_loops(z, labels, 0.2, decoupled), rel=1e-9)
    assert got == pytest.approx(float(supcon(torch.tensor(z[:6]), torch.tensor(labels[:6]), 0.2, decoupled=decoupled)), rel=1e-12)


def test_decoupled_label_loss_never_pushes_a_near_same_label_row_away():
    """SupCon (L_out) is lowest when an anchor's positives score alike, so it pays to move a row's nearest
    same-label row away; the decoupled loss only ever rewards a positive for coming closer."""
    labels = torch.tensor([0, 0, 0, 1, 1])
    def rows(near):  # row 1 is the anchor's (row 0's) nearest same-label row, at cosine `near`
        return torch.tensor([[1.0, 0, 0], [near, (1 - near ** 2) ** 0.5, 0], [0.6, 0, 0.8],
                             [-1, 0.2, 0], [-1, 0, 0.2]])
    for decoupled in (True, False):
        near, nearer = (float(supcon(rows(c), labels, 0.1, decoupled=decoupled)) for c in (0.9, 0.99))
        assert (nearer < near) == decoupled, (decoupled, near, nearer)  # closer is better only when decoupled


def test_stay_put_is_how_far_corpus_rows_move():
    """1 - cos for a normalising refiner, ½|y - x|²/|x|² for a raw one, over the temperature; 0 in place."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)) * 3
    y = rng.standard_normal((6, 5))
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    cos = (yn * x).sum(1) / np.linalg.norm(x, axis=1)
    t = 0.05
    got = float(stay_put(torch.tensor(x), torch.tensor(yn), t))
    assert got == pytest.approx((1 - cos).mean() / t, rel=1e-9)
    raw = float(stay_put(torch.tensor(x), torch.tensor(y), t, normalize=False))
    assert raw == pytest.approx((0.5 * ((y - x) ** 2).sum(1) / (x ** 2).sum(1)).mean() / t, rel=1e-9)
    xn = torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True))
    assert float(stay_put(torch.tensor(x), xn, t)) == pytest.approx(0.0, abs=1e-12)


def _pair_setup(x, cfg, seed):
    """20 random queries paired with distinct corpus rows, a small non-identity refiner and its losses."""
    from simskip_faiss.training.losses import _Augment, _Losses

    n, d = x.shape
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((20, d)).astype(np.float32)
    sup = Supervision(queries=queries, pair_query=np.arange(20), pair_doc=rng.choice(n, 20, replace=False))
    model = SimSkip(d, hidden=8).eval()
    torch.nn.init.normal_(model.f[-1].weight, std=0.5)  # not the identity
    return queries, sup, model, _Losses(cfg, d, _Augment(np.ones(d, np.float32), 0.0, 0.0), sup)


def test_query_only_pair_loss_scores_refined_queries_against_raw_documents_and_negatives(data):
    """InfoNCE of refined queries over raw [positives, sampled corpus rows], computed here in numpy."""
    x, n = data[0], len(data[0])
    cfg = TrainConfig(temperature=0.1, pair_negatives=7).resolved(has_labels=False, has_pairs=True)
    assert cfg.apply_to() == "queries"
    queries, sup, model, losses = _pair_setup(x, cfg, seed=1)
    batch = np.arange(3, 11)
    with torch.no_grad():
        got = float(losses._pairs(model, x, batch, torch.Generator().manual_seed(5), np.arange(4), lambda: 1 / 0))
        qv = model(torch.from_numpy(queries[batch])).numpy().astype(np.float64)
    extra = torch.randint(0, n, (7,), generator=torch.Generator().manual_seed(5)).numpy()
    pos = sup.pair_doc[batch]
    cand_rows = np.concatenate([pos, extra])
    assert got == pytest.approx(_info_nce_np(qv, x[cand_rows], len(pos), cand_rows, pos), rel=1e-5)


def _info_nce_np(qv, cand, n_pos, cand_rows=None, pos_rows=None, t=0.1):
    """InfoNCE of queries over [positives, negatives] in float64; a candidate that is a copy of the
    query's positive (same corpus row: a sampled row, or another query's positive) is not a negative."""
    cand = np.asarray(cand, np.float64)
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
    logits = qv @ cand.T / t
    if cand_rows is not None:
        copy = cand_rows[None, :] == pos_rows[:, None]
        copy[np.arange(n_pos), np.arange(n_pos)] = False  # the query's own positive
        logits[copy] = -np.inf
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(n_pos), np.arange(n_pos)].mean()


@pytest.mark.parametrize("pair_negatives", [0, 7])
def test_pair_loss_does_not_count_a_shared_document_as_a_negative(data, pair_negatives):
    """Two examples of one definition in a batch: each one's positive is not the other's negative."""
    x, n = data[0], len(data[0])
    cfg = TrainConfig(temperature=0.1, pair_negatives=pair_negatives).resolved(has_labels=False, has_pairs=True)
    queries, sup, model, losses = _pair_setup(x, cfg, seed=3)
    sup.pair_doc[[5, 8]] = sup.pair_doc[4]  # queries 4, 5 and 8 share one document
    batch = np.arange(3, 11)
    with torch.no_grad():
        got = float(losses._pairs(model, x, batch, torch.Generator().manual_seed(5), np.arange(4), lambda: 1 / 0))
        qv = model(torch.from_numpy(queries[batch])).numpy().astype(np.float64)
    extra = torch.randint(0, n, (pair_negatives,), generator=torch.Generator().manual_seed(5)).numpy()
    pos = sup.pair_doc[batch]
    rows = np.concatenate([pos, extra])
    want = _info_nce_np(qv, x[rows], len(pos), rows, pos)
    assert got == pytest.approx(want, rel=1e-5)
    counted_as_negatives = _info_nce_np(qv, x[rows], len(pos), np.concatenate([np.arange(-len(pos), 0), extra]), pos)
    assert got < counted_as_negatives - 1e-3  # what the loss was before the fix, and clearly different


def test_symmetric_pair_loss_takes_refined_negatives_from_the_training_batch_first(data):
    """Symmetric: refined [positives, the step's refined batch rows, sampled rows up to pair_negatives]."""
    from simskip_faiss.training.losses import _Losses

    x, n, d = data[0], *data[0].shape
    cfg = TrainConfig(temperature=0.1, pair_negatives=9, pair_mode="symmetric").resolved(False, True)
    queries, sup, model, losses = _pair_setup(x, cfg, seed=2)
    batch, rows = np.arange(3, 11), np.array([sup.pair_doc[4], 7, 50, 2, 9, 11])  # row 0 copies a positive

    def ref(v):
        return model(torch.from_numpy(np.ascontiguousarray(v, np.float32))).numpy()

    with torch.no_grad():
        got = float(losses._pairs(model, x, batch, torch.Generator().manual_seed(5), rows, lambda: model(torch.from_numpy(x[rows]))))
        qv = ref(queries[batch])
        extra = torch.randint(0, n, (3,), generator=torch.Generator().manual_seed(5)).numpy()
        pos = sup.pair_doc[batch]
        cand_rows = np.concatenate([pos, rows, extra])
        want = _info_nce_np(qv, ref(x[cand_rows]), len(pos), cand_rows, pos)
    assert got == pytest.approx(want, rel=1e-5)
    many = TrainConfig(temperature=0.1, pair_negatives=4, pair_mode="symmetric").resolved(False, True)
    with torch.no_grad():  # fewer negatives than batch rows: the first pair_negatives rows, nothing sampled
        got = float(_Losses(many, d, losses.augment, sup)._pairs(model, x, batch, torch.Generator(), rows,
                                                                 lambda: model(torch.from_numpy(x[rows]))))
        cand_rows = np.concatenate([pos, rows[:4]])
        assert got == pytest.approx(_info_nce_np(qv, ref(x[cand_rows]), len(pos), cand_rows, pos), rel=1e-5)


def test_training_lowers_heldout_loss(trained):
    hist = trained.history
    assert hist[0]["step"] == 0 and len(hist) >= 2
    # val is minus the held-out contrastive loss: it must rise above the identity's value
    assert max(h["val"] for h in hist[1:]) > hist[0]["val"] + 0.05
    assert trained.best_step >= 1


def test_same_seed_same_weights(data):
    x, _ = data
    cfg = TrainConfig(hidden=16, epochs=1, batch_size=100, seed=3, threads=1, progress=False)
    a, b = train(x, cfg), train(x, cfg)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = train(x, TrainConfig(hidden=16, epochs=1, batch_size=100, seed=4, threads=1, progress=False))
    assert not torch.equal(a.model.f[0].weight, c.model.f[0].weight)


def test_trains_from_memmapped_npy(tmp_path, data):
    x, _ = data
    path = tmp_path / "corpus.npy"
    np.save(path, x)
    cfg = TrainConfig(hidden=16, epochs=1, batch_size=100, seed=0, threads=1, progress=False)
    from_file, from_array = train(path, cfg), train(x, cfg)
    assert torch.equal(from_file.model.f[0].weight, from_array.model.f[0].weight)


@pytest.mark.parametrize("bad, err", [
    (dict(activation="swish"), "activation"), (dict(metric="cosine"), "metric"),
    (dict(batch_size=1), "batch_size"), (dict(temperature=0), "temperature"), (dict(label_loss="triplet"), "label_loss"),
    (dict(unsupervised_weight=0, label_weight=0, pair_weight=0), "weight"), (dict(metric="ip", normalize=False), "normalize"),
])
def test_config_rejects_bad_values(bad, err):
    with pytest.raises(ValueError, match=err):
        TrainConfig(**bad)


def test_train_rejects_bad_corpus(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        train(np.full((10, 4), np.nan, np.float32), TrainConfig(progress=False))
    with pytest.raises(TypeError, match="dtype"):
        train(np.zeros((10, 4), bool), TrainConfig(progress=False))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        train(tmp_path / "missing.npy", TrainConfig(progress=False))
    with pytest.raises(ValueError, match="labels"):
        train(np.eye(8, dtype=np.float32), TrainConfig(label_weight=1.0, progress=False))


def test_export_parity_and_metadata(trained, onnx_path, data):
    from simskip_faiss import Refiner

    path, meta = onnx_path
    assert meta["parity_max_abs_err"] <= 1e-5
    ref = Refiner.load(path)
    assert (ref.d_in, ref.d_out, ref.normalize) == (16, 16, True)
    assert ref.metadata["metric"] == "ip" and ref.metadata["version"]
    x, _ = data
    with torch.no_grad():
        want = trained.model(torch.from_numpy(x)).numpy()
    for n in (1, 7, len(x)):
        np.testing.assert_allclose(ref.transform(x[:n]), want[:n], atol=1e-5)
    assert np.abs(ref.transform(x) - x).max() > 1e-3  # trained: not the identity


def test_export_refuses_mismatch(trained, tmp_path, monkeypatch):
    """verify() must raise when onnxruntime disagrees with torch (simulated by perturbing torch's output)."""
    from simskip_faiss.training import export as ex

    class Off(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.f, self.normalize, self.alpha = m, m.f, m.normalize, m.alpha

        def forward(self, x):
            return self.m(x) + (1e-3 if not torch.onnx.is_in_onnx_export() else 0.0)

    real = ex.to_onnx_proto
    monkeypatch.setattr(ex, "to_onnx_proto", lambda model, d, opset=18: real(model.m, d, opset))
    with pytest.raises(RuntimeError, match="does not match torch"):
        ex.export(Off(trained.model), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_train_restores_torch_threads(data):
    x, _ = data
    before = torch.get_num_threads()
    train(x, TrainConfig(hidden=16, epochs=1, batch_size=100, threads=1 if before != 1 else 2, progress=False))
    assert torch.get_num_threads() == before


def test_train_without_a_guard_learns_pairs_and_scores_them_on_held_out_pairs():
    """train() with pairs alone (a query-only refiner): the default evaluator scores the pair term on
    pairs of held-out queries, so the refiner learns a mapping that generalises instead of stopping at
    the identity (which only the stay-put term would prefer)."""
    from simskip_faiss.training.supervision import _held_out_pairs

    rng = np.random.default_rng(0)
    d = 16
    docs = rng.standard_normal((600, d)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    distort = np.eye(d) + 0.6 * rng.standard_normal((d, d)) / np.sqrt(d)  # queries: a fixed distortion of their documents
    queries = (docs[:400] @ distort.T).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sup = Supervision(queries=queries, pair_query=np.arange(400), pair_doc=np.arange(400))
    res = train(docs, TrainConfig(max_steps=150, hidden=32, threads=1, progress=False), sup)
    assert res.config.apply_to() == "queries" and res.config.signals() == ["pairs", "preserve"]
    assert res.best_step > 0 and float(res.model.f[-1].weight.detach().abs().sum()) > 0
    best = next(h["val"] for h in res.history if h["step"] == res.best_step)
    assert best > res.history[0]["val"] * 0.9  # held-out loss at least 10% below the identity's (values are -loss)

    pair_query = np.repeat(np.arange(50), 3)  # 3 pairs per query: a held-out query takes all of its pairs
    tr, val = _held_out_pairs(pair_query, 0.1, seed=4)
    assert len(np.intersect1d(tr, val)) == 0 and len(tr) + len(val) == 150
    assert len(np.unique(pair_query[val])) == 5 and not np.isin(pair_query[tr], pair_query[val]).any()
    assert len(_held_out_pairs(np.zeros(4, np.int64), 0.1, 0)[1]) == 0  # one query: nothing to hold out


def test_train_follows_the_supervision_and_uses_a_step_budget(data):
    from simskip_faiss.training import Supervision

    x, y = data
    cfg = TrainConfig(hidden=16, max_steps=30, eval_every=10, patience=100, threads=1, progress=False)
    res = train(x, cfg, Supervision(labels=y))
    assert res.config.signals() == ["labels"] and res.config.label_weight == 1 and res.config.unsupervised_weight == 0
    assert [h["step"] for h in res.history] == [0, 10, 20, 30] and res.stopped == "max_steps"
    assert (res.config.lr, res.config.temperature) == (1e-3, 0.05)  # train() without a guard: the grids' first
    assert train(x, cfg).config.signals() == ["unsupervised"]


def _user_files(tmp_path, data, n_pairs=120):
    x, y = data
    np.save(tmp_path / "corpus.npy", x)
    np.save(tmp_path / "labels.npy", y)
    rng = np.random.default_rng(0)
    docs = rng.choice(len(x), n_pairs, replace=False)
    q = x[docs] + 0.05 * rng.standard_normal(x[docs].shape).astype(np.float32)
    np.save(tmp_path / "queries.npy", (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    (tmp_path / "qrels.tsv").write_text("".join(f"{i}\t{d}\n" for i, d in enumerate(docs)))
    return tmp_path


def test_cli_train_default_guarded_end_to_end(tmp_path, data, capsys):
    """`simskip-faiss train corpus.npy --labels --queries --qrels`: guarded by default, signals follow the
    supervision, all of it used for training and validation (90/10, no test slice), metadata complete."""
    from simskip_faiss import Refiner
    from simskip_faiss.cli import main

    d = _user_files(tmp_path, data)
    argv = ["train", str(d / "corpus.npy"), "--labels", str(d / "labels.npy"), "--queries", str(d / "queries.npy"),
            "--qrels", str(d / "qrels.tsv"), "-o", str(d / "r.onnx"), "--threads", "1", "-q",
            "--hidden", "16", "--max-steps", "60", "--eval-every", "20"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "guard: alpha=" in err and "signals: labels, pairs" in err and "search: lr=" in err
    meta = Refiner.load(d / "r.onnx").metadata
    assert meta["signals"] == ["labels", "pairs"] and meta["apply_to"] == "both" and "guard" in meta
    assert meta["n_train"] == round(0.9 * len(data[0]))  # train + validation: no rows held back for a test split
    assert meta["train_seconds"] > 0 and meta["stopped"] in ("patience", "max_steps")


def test_cli_train_no_guard_metadata_comes_from_the_result(tmp_path, data):
    from simskip_faiss import Refiner
    from simskip_faiss.cli import main

    d = _user_files(tmp_path, data)
    assert main(["train", str(d / "corpus.npy"), "-o", str(d / "u.onnx"), "--no-guard", "--threads", "1", "-q",
                 "--hidden", "16", "--max-steps", "20", "--eval-every", "10"]) == 0
    meta = Refiner.load(d / "u.onnx").metadata
    assert meta["signals"] == ["unsupervised"] and meta["apply_to"] == "both" and meta["train_seconds"] > 0
    assert meta["n_train"] == len(data[0]) - round(0.1 * len(data[0])) and meta["best_step"] in (10, 20)


def test_cli_train_refuses_qrels_outside_the_corpus_or_queries(tmp_path, data, capsys):
    from simskip_faiss.cli import main

    d = _user_files(tmp_path, data)
    base = ["train", str(d / "corpus.npy"), "--queries", str(d / "queries.npy"), "-o", str(d / "x.onnx"), "-q"]
    (d / "bad_doc.tsv").write_text("0\t5\n1\t99999\n")
    assert main(base + ["--qrels", str(d / "bad_doc.tsv")]) == 2
    assert "doc id 99999 out of range" in capsys.readouterr().err
    (d / "bad_q.tsv").write_text("0\t5\n500\t3\n")
    assert main(base + ["--qrels", str(d / "bad_q.tsv")]) == 2
    assert "query id 500 out of range" in capsys.readouterr().err
    assert not (d / "x.onnx").exists()


def test_training_names_load_from_their_modules():
    """training's lazy names: each resolves from the module named for what it does (model, losses, supervision, loop)."""
    import importlib

    import simskip_faiss.training as training

    for name, module in training._LAZY.items():
        assert getattr(training, name) is getattr(importlib.import_module(module, training.__name__), name)
    assert training.SimSkip.__module__.endswith(".model") and training.Supervision.__module__.endswith(".supervision")
    with pytest.raises(AttributeError):
        training.not_a_name  # noqa: B018
