"""Evaluation: identity == raw exactly, baselines are what they claim, reports are written, ANN recall is sane."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from simskip_faiss import IdentityRefiner
from simskip_faiss.datasets import load_digits, make_synthetic
from simskip_faiss.evaluation import EvalConfig, ann_sweep, evaluate
from simskip_faiss.refiners import LinearRefiner

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
    want = _precision_at_10(data.corpus, data.labels, data.split_rows("test"))
    assert rep.value("raw", "labels", "precision@10") == pytest.approx(want, abs=1e-3)


def _precision_at_10(corpus, labels, rows, queries=None):
    """Label precision@10 of corpus `rows` as queries (or `queries`, their vectors) by numpy brute force, self dropped."""
    sims = (corpus[rows] if queries is None else queries) @ corpus.T
    sims[np.arange(len(rows)), rows] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    return (labels[top] == labels[rows][:, None]).mean()


def _ndcg_at_10(queries, corpus, targets, per_query=False):
    """nDCG@10 with one relevant document per query, by numpy brute force (mean, or per query)."""
    sims = queries @ corpus.T
    rank = (sims > sims[np.arange(len(targets)), targets][:, None]).sum(1)
    ndcg = np.where(rank < 10, 1 / np.log2(rank + 2), 0)
    return ndcg if per_query else ndcg.mean()


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
    assert {r["method"] for r in j["quality"]} == {"raw", "centred", "whitened", "abtt", "ridge", "lda"}
    md = (tmp_path / "report.md").read_text()
    assert "**ridge** baseline: ridge(lambda=" in md and "queries only (documents raw)" in md
    assert "**lda** baseline: lda(shrinkage=" in md and "chosen on val labels:map@100, pairs:ndcg@10 >= raw" in md
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


def test_evaluation_restores_the_callers_faiss_threads(synth):
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        evaluate(synth, None, EvalConfig(**{**FAST, "threads": 2}, baselines=("raw",), ann_factory="Flat"))
        assert faiss.omp_get_max_threads() == 1
        ann_sweep(IdentityRefiner(24), synth.corpus, synth.queries, "Flat", "ip", threads=2)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """Clustered corpus + labels + queries (noisy copies of corpus rows) + qrels, as a user would hand them over."""
    from helpers import clustered

    x, y = clustered(n=500, d=16, n_classes=5, seed=4, spread=0.5)
    rng = np.random.default_rng(5)
    targets = rng.choice(len(x), 250, replace=False)
    q = x[targets] + 0.25 * rng.standard_normal((250, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = tmp_path_factory.mktemp("user")
    np.save(d / "corpus.npy", x)
    np.save(d / "labels.npy", y)
    np.save(d / "queries.npy", q)
    (d / "qrels.tsv").write_text("query\tdoc\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(targets)))
    args = ["--corpus", str(d / "corpus.npy"), "--labels", str(d / "labels.npy"), "--queries", str(d / "queries.npy"),
            "--qrels", str(d / "qrels.tsv")]
    return args, x, y, q, targets


def test_cli_eval_end_to_end(user_files, onnx_path, tmp_path):
    from simskip_faiss.cli import main
    from simskip_faiss.datasets import load_user
    from simskip_faiss.refiners import Refiner

    args, x, y, q, targets = user_files
    path, _ = onnx_path
    assert main(["eval", *args, "--refiner", f"simskip={path}", "--ann-factory", "", "-q", "-o", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {r["method"] for r in rep["quality"]} == {"raw", "centred", "whitened", "abtt", "ridge", "lda", "simskip"}
    value = {(r["method"], r["task"], r["metric"]): r["value"] for r in rep["quality"]}
    data = load_user(x, queries=q, labels=y, qrels=args[-1])
    rows, qt = data.split_rows("test"), data.split_queries("test")
    refined = Refiner.load(path).transform(x)
    assert value["raw", "labels", "precision@10"] == pytest.approx(_precision_at_10(x, y, rows), abs=1e-6)
    assert value["simskip", "labels", "precision@10"] == pytest.approx(_precision_at_10(refined, y, rows), abs=1e-6)
    assert value["raw", "pairs", "ndcg@10"] == pytest.approx(_ndcg_at_10(q[qt], x, targets[qt]), abs=1e-6)
    # the queries each refiner moved up and down, counted from per-query scores computed here
    change = (_ndcg_at_10(Refiner.load(path).transform(q[qt]), refined, targets[qt], per_query=True)
              - _ndcg_at_10(q[qt], x, targets[qt], per_query=True))
    row = next(r for r in rep["quality"] if (r["method"], r["task"], r["metric"]) == ("simskip", "pairs", "ndcg@10"))
    assert (row["better"], row["worse"]) == ((change > 1e-6).sum(), (change < -1e-6).sum())
    assert row["better"] + row["worse"] > 0
    assert rep["info"]["queries"] == {"labels": len(rows), "pairs": len(qt)}
    assert "| simskip |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_cli_run_end_to_end(user_files, tmp_path, capsys):
    """The main job on small user data: both refiners trained and reported, the one shipped chosen on validation."""
    pytest.importorskip("torch")  # the main job trains: the train extra
    from simskip_faiss.cli import main
    from simskip_faiss.datasets import load_user
    from simskip_faiss.index import RefinedIndex
    from simskip_faiss.refiners import Refiner

    args, x, y, q, targets = user_files
    out = tmp_path / "run"
    assert main(["run", *args, "-o", str(out), "-q", "--hidden", "16", "--epochs", "2", "--batch-size", "64",
                 "--alphas", "0", "0.5", "1", "--factory", "HNSW16"]) == 0
    rep = json.loads((out / "report.json").read_text())
    methods = {r["method"] for r in rep["quality"]}
    assert methods == {"raw", "centred", "whitened", "abtt", "ridge", "lda", "unsupervised", "supervised"}
    info = rep["info"]
    assert set(info["guard"]) == {"unsupervised", "supervised"} and info["seconds"]["total"] > 0
    val = info["validation"]
    shipped = info["shipped"].split(":")[0]
    assert shipped == max(("unsupervised", "supervised"), key=lambda n: (val[n]["feasible"], val[n]["objective"]))
    assert (out / "refiner.onnx").read_bytes() == (out / f"refiner-{shipped}.onnx").read_bytes()
    assert RefinedIndex.load(out / "bundle").refiner.sha256 == Refiner.load(out / "refiner.onnx").sha256
    data = load_user(x, queries=q, labels=y, qrels=args[-1])
    # validation and test numbers against numpy brute force, through each exported file
    assert val["raw"]["labels:precision@10"] == pytest.approx(_precision_at_10(x, y, data.split_rows("val")), abs=1e-6)
    rows = data.split_rows("test")
    value = {(r["method"], r["task"], r["metric"]): r["value"] for r in rep["quality"]}
    for name in ("unsupervised", "supervised"):
        refined = Refiner.load(out / f"refiner-{name}.onnx").transform(x)
        assert value[name, "labels", "precision@10"] == pytest.approx(_precision_at_10(refined, y, rows), abs=1e-6)
    assert "shipping " + shipped in capsys.readouterr().out
    assert any(a["method"] == "supervised" and a["factory"] == "HNSW16" for a in rep["ann"])


def test_choose_refiner_looks_only_at_validation(synth, monkeypatch):
    """The shipped refiner is chosen on val queries only, by the guard's rule (whitening hurts here, identity does not)."""
    import simskip_faiss.evaluation.report as ev

    seen = []
    real_score = ev.score

    def spy(index, data, queries, **kw):
        seen.append(queries)
        return real_score(index, data, queries, **kw)

    monkeypatch.setattr(ev, "score", spy)
    x_train = synth.corpus[synth.split_rows("train")]
    refiners = {"whitened": LinearRefiner.whitening(x_train), "same": IdentityRefiner(24)}
    name, table = ev.choose_refiner(synth, refiners, EvalConfig(**FAST))
    assert name == "same" and table["same"]["objective"] == 0.0 and table["same"]["feasible"]
    assert table["whitened"]["objective"] < 0 and not table["whitened"]["feasible"]
    val_rows, val_q = set(synth.split_rows("val")), set(synth.split_queries("val"))
    assert seen and all(set(q["labels"]) <= val_rows and set(q["pairs"]) <= val_q for q in seen)


@pytest.mark.slow
def test_eval_flags_queries_the_refiner_trained_on_and_scores_held_out_qrels_whole(user_files, tmp_path, capsys):
    """train then eval on the same qrels: eval re-split them and scored training queries unflagged. Now the
    refiner's record of what it trained and validated on flags them; --test-qrels scores a held-out file whole."""
    pytest.importorskip("torch")
    from simskip_faiss.cli import main

    args, x, y, q, targets = user_files
    d = tmp_path
    (d / "train.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in enumerate(targets[:200])))
    (d / "held.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in enumerate(targets) if i >= 200))
    data_args = args[:-2] + ["--qrels", str(d / "train.tsv")]
    assert main(["train", *data_args[:2], *data_args[4:], "-o", str(d / "r.onnx"), "-q", "--hidden", "16",
                 "--max-steps", "60", "--eval-every", "20", "--precision", "fp32"]) == 0
    capsys.readouterr()
    common = ["eval", "--refiner", f"r={d / 'r.onnx'}", "--ann-factory", "", "-q"]
    assert main([*common, *data_args, "-o", str(d / "leaky")]) == 0
    out = capsys.readouterr().out
    rep = json.loads((d / "leaky" / "report.json").read_text())
    leak = rep["info"]["not_held_out"]["r"]["pairs"]
    assert leak["trained_or_validated_on"] > 0 and "WARNING: r trained or validated on" in out
    assert main([*common, *data_args, "--test-qrels", str(d / "held.tsv"), "-o", str(d / "held")]) == 0
    rep = json.loads((d / "held" / "report.json").read_text())
    assert rep["info"]["queries"]["pairs"] == 50 and "r" not in rep["info"]["not_held_out"]
    assert main([*common, *args[:-2], "--qrels", str(d / "held.tsv"), "--test-qrels", str(d / "held.tsv")]) == 2
    assert "in both --qrels and --test-qrels" in capsys.readouterr().err


def test_choosing_on_validation_does_not_flag_the_validation_queries(user_files, tmp_path, caplog):
    """choose_refiner evaluates on the val split, which a fit validated on by design: no not-held-out warning."""
    pytest.importorskip("torch")
    from simskip_faiss.config import TrainConfig
    from simskip_faiss.datasets import load_user
    from simskip_faiss.evaluation import EvalConfig, choose_refiner
    from simskip_faiss.training.guard import fit
    from simskip_faiss.refiners import Refiner

    args, x, y, q, targets = user_files
    data = load_user(x, queries=q, qrels=args[-1])
    res = fit(data, TrainConfig(hidden=16, max_steps=40, eval_every=20, progress=False, threads=1))
    res.export(tmp_path / "r.onnx", precision="fp32")
    refiners = {"a": Refiner.load(tmp_path / "r.onnx"), "b": Refiner.load(tmp_path / "r.onnx")}
    assert refiners["a"].metadata["trained_on"]["n"] > 0
    with caplog.at_level("WARNING"):
        choose_refiner(data, refiners, EvalConfig(ann_factory=None, progress=False, baselines=("raw",)))
    assert "not held out" not in caplog.text
