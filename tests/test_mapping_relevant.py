"""Maps trained with relevance judgements across two models (`fit_map(..., relevant=(S, T))`,
`train-map --relevant`): the learned map trains on them, the guard judges on held-out ones, and bad
judgements are refused with one line."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import unit  # noqa: E402

from simskip_faiss import Refiner  # noqa: E402
from simskip_faiss.errors import InputError  # noqa: E402
from simskip_faiss.training.mapping import fit_map  # noqa: E402

FAST = dict(max_steps=300, eval_every=50, patience=3, hidden=32, threads=1)


def world(n_docs=600, n_queries=900, d_new=24, d_old=16, shift=1.5, seed=0):
    """Two fake encoders of documents and queries. Each query is written from one document (its relevant one);
    the new model puts every query `shift` along a fixed direction u that documents never show, so pairs of
    documents embedded by both models cannot reveal u; (new-model query, old-model document) judgements can."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((15, d_new))
    z = centres[rng.integers(0, 15, n_docs)] + 0.6 * rng.standard_normal((n_docs, d_new))
    R = rng.standard_normal((d_new, d_old)) / np.sqrt(d_new)
    old = lambda v: unit(np.tanh(2 * unit(v) @ R))  # noqa: E731
    u = unit(rng.standard_normal((1, d_new)))[0]
    rel = rng.integers(0, n_docs, n_queries)
    zq = z[rel] + 0.25 * rng.standard_normal((n_queries, d_new))
    return {"new_docs": unit(z), "old_docs": old(z), "new_queries": unit(unit(zq) + shift * u), "rel": rel}


def recall10(mapped_queries, old_docs, rel):
    import faiss

    ix = faiss.IndexFlatIP(old_docs.shape[1])
    ix.add(old_docs)
    I = ix.search(np.ascontiguousarray(mapped_queries, np.float32), 10)[1]
    return float(np.mean([r in row for r, row in zip(rel, I)]))


def test_relevant_pairs_teach_the_map_what_document_pairs_cannot_and_the_guard_ships_it():
    """The query shift is invisible in document pairs: Procrustes (document pairs only) finds fewer of the
    held-out-from-everything queries' documents than the learned map trained with the judgements; the guard,
    judging on held-out judgements, ships the learned map; its file records what it was judged on."""
    w = world()
    train, test = slice(0, 600), slice(600, 900)
    res = fit_map(w["new_docs"], w["old_docs"], relevant=(w["new_queries"][train], w["old_docs"][w["rel"][train]]),
                  **FAST)
    assert res.judged == ["task_mrr@10", "task_recall@10"] and res.n_relevant == 600
    for c in res.candidates.values():
        assert {"task_mrr@10", "task_recall@10", "reembedded@10"} <= set(c)
    got = {n: recall10(res.candidate(n).transform(w["new_queries"][test]), w["old_docs"], w["rel"][test])
           for n in res.candidates}
    assert got["learned"] > got["procrustes"] + 0.1, got
    assert res.candidates["learned"]["task_recall@10"] > res.candidates["procrustes"]["task_recall@10"]
    assert res.shipped == "learned"
    # with judgements, the margin is a paired-bootstrap test on the held-out ones: recorded, and what decided
    for name in ("ridge", "learned"):
        lo, hi = res.candidates[name]["task_gain_ci"]
        assert lo <= hi and res.candidates[name]["margin"] == (lo > 0)
    assert res.candidates["learned"]["task_gain_ci"][0] > 0
    meta = res.metadata()
    assert meta["guard"]["judged"] == ["task_mrr@10", "task_recall@10"] and meta["guard"]["n_relevant"] == 600
    assert "task_mrr@10" in res.summary()[0] and "relevant pairs" in res.summary()[-1]


def test_without_relevant_pairs_the_text_pair_guard_judges_as_before():
    w = world(n_queries=60)
    res = fit_map(w["new_docs"], w["old_docs"], learned=False)
    assert res.judged == ["reembedded@10", "mrr@10", "recall@10"] and res.n_relevant == 0
    assert "task_mrr@10" not in res.candidates["procrustes"]


def test_documents_direction_relevant_pairs_queries_find_the_mapped_documents():
    """Old documents -> new space, judged by new-model queries finding their mapped documents: the metrics
    are computed the right way round (a map that sends every document to one point scores near zero)."""
    w = world(n_queries=300, shift=0.0)
    rel = (w["old_docs"][w["rel"]], w["new_queries"])
    res = fit_map(w["old_docs"], w["new_docs"], direction="documents", relevant=rel, learned=False)
    good = res.candidates["procrustes"]["task_recall@10"]
    from simskip_faiss.training.map_candidates import TaskGuard, check_relevant

    S, T, g = check_relevant(rel, 16, 24, "documents")
    assert len(np.unique(g)) == len(np.unique(w["rel"]))  # a group per document
    guard = TaskGuard(S[:40], T[:40], g[:40], w["old_docs"], w["new_docs"], np.arange(600), "documents", 10)
    collapse = guard(lambda x: np.tile(unit(np.ones((1, 24))), (len(x), 1)))["task_recall@10"]
    assert good > 0.5 and collapse < 0.1 and good > collapse


@pytest.mark.parametrize("relevant, message", [
    (lambda w: (w["new_queries"][:50], w["old_docs"][:49]), "different lengths: relevant source has 50 rows"),
    (lambda w: (w["new_queries"][:50, :20], w["old_docs"][:50]), "relevant source vectors have dimension 20"),
    (lambda w: (w["new_queries"][:50], w["new_docs"][:50]), "relevant target vectors have dimension 24"),
    (lambda w: (w["new_queries"][:10], w["old_docs"][:10]), "10 relevant pairs are too few"),
    (lambda w: (w["new_queries"][:50],), "relevant must be a pair"),
])
def test_bad_relevant_pairs_are_refused_with_one_line(relevant, message):
    w = world(n_queries=60)
    with pytest.raises(InputError, match=message) as e:
        fit_map(w["new_docs"], w["old_docs"], relevant=relevant(w), learned=False)
    assert "\n" not in str(e.value)


def test_cli_train_map_with_relevant_pairs(tmp_path, capsys):
    from simskip_faiss.cli import main

    w = world(n_queries=200)
    for name in ("new_docs", "old_docs", "new_queries"):
        np.save(tmp_path / f"{name}.npy", w[name])
    np.save(tmp_path / "rel_docs.npy", w["old_docs"][w["rel"]])
    out = tmp_path / "map.onnx"
    args = ["train-map", str(tmp_path / "old_docs.npy"), str(tmp_path / "new_docs.npy"), "-o", str(out), "-q",
            "--no-learned", "--relevant", str(tmp_path / "new_queries.npy"), str(tmp_path / "rel_docs.npy")]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "task_mrr@10" in cap.err
    assert Refiner.load(out).metadata["guard"]["n_relevant"] == 200
    np.save(tmp_path / "short.npy", w["old_docs"][w["rel"]][:-1])
    bad = tmp_path / "bad.onnx"
    assert main(args[:4] + [str(bad)] + args[5:-1] + [str(tmp_path / "short.npy")]) == 2
    err = capsys.readouterr().err
    assert "different lengths" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
