"""Document updates (documents.py, nudge.py): the stored vectors of documents that training queries found.

Checked against numpy computed here: how an update moves a stored vector, which ids it touches under
add and add_with_ids, the refusal of a vector that is not the one an update was learned for, bundles
and refiner files that carry them (and refuse when edited or parted), the contrastive path's loss, and
the choice on validation (gains where training queries were, no loss below raw elsewhere).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from simskip_faiss import RefinedIndex
from simskip_faiss.datasets import EmbeddingData, answered_rows, make_splits, shared_corpus
from simskip_faiss.refiners.documents import DocumentMismatchError, DocumentUpdates, sketch
from simskip_faiss.training.nudge import answer_pairs, contrastive_path, learn, make_updates
from simskip_faiss.persistence import BundleError
from simskip_faiss.refiners import IdentityRefiner, LinearRefiner


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def shared_data(n=400, d=16, answered=80, per_doc=5, seed=0) -> EmbeddingData:
    """A corpus where each of `answered` documents has `per_doc` queries that share a direction of their
    own (so moving the document toward its queries helps), split at random over the shared corpus."""
    rng = np.random.default_rng(seed)
    corpus = unit(rng.standard_normal((n, d)))
    docs = rng.choice(n, answered, replace=False)
    shift = unit(rng.standard_normal((answered, d)))
    q = np.repeat(corpus[docs] + 0.9 * shift, per_doc, axis=0) + 0.25 * rng.standard_normal((answered * per_doc, d))
    qrels = [np.array([r]) for r in np.repeat(docs, per_doc)]
    data = EmbeddingData("toy", corpus, make_splits(n, seed=seed), queries=unit(q),
                         query_split=np.zeros(len(q), np.int8), qrels=qrels)
    return shared_corpus(data, seed)


def test_update_moves_listed_ids_keeps_norms_and_round_trips():
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((6, 5)).astype(np.float32)
    stored = raw * 2  # any document transform
    moved = stored[[1, 4]] + rng.standard_normal((2, 5)).astype(np.float32)
    upd = make_updates(raw, stored, np.array([1, 4]), moved, {"method": "test"})
    again = DocumentUpdates.from_bytes(upd.to_bytes())
    assert again.sha256 == upd.sha256 and again.meta == {"method": "test"}
    out = again.apply(raw, stored, np.arange(6))
    expect = stored.copy()
    for i, m in zip((1, 4), moved):  # the moved direction, at the stored norm
        expect[i] = m / np.linalg.norm(m) * np.linalg.norm(stored[i])
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    assert again.apply(raw[[0, 2]], stored[[0, 2]], np.array([0, 2])) is not None  # untouched ids pass through
    np.testing.assert_array_equal(again.apply(raw[[0, 2]], stored[[0, 2]], np.array([0, 2])), stored[[0, 2]])
    # keyed by other ids: the same offsets, found under the new keys
    renamed = upd.renamed(np.array([50, 40, 30, 20, 10, 0]), "test ids")
    assert renamed.ids.tolist() == [10, 40] and renamed.meta["keys"] == "test ids"
    np.testing.assert_allclose(renamed.apply(raw[[4, 1]], stored[[4, 1]], np.array([10, 40])), expect[[4, 1]], atol=1e-6)


def test_a_vector_that_is_not_the_trained_one_is_refused_and_nothing_is_stored():
    rng = np.random.default_rng(2)
    raw = unit(rng.standard_normal((8, 6)))
    upd = make_updates(raw, raw, np.array([3]), unit(rng.standard_normal((1, 6))), {})
    other = raw.copy()
    other[3] = unit(rng.standard_normal((1, 6)))[0]
    index = RefinedIndex(IdentityRefiner(6).with_documents(upd), "Flat")
    with pytest.raises(DocumentMismatchError, match="document id 3 .*another vector"):
        index.add(other)
    assert index.ntotal == 0
    jitter = raw + np.float32(1e-5)  # re-encoding noise is not a different document
    index.add(jitter)
    assert index.ntotal == 8
    assert sketch(raw).shape == (8, 9)


def test_refined_index_applies_updates_by_position_and_by_id_and_after_remove():
    rng = np.random.default_rng(3)
    raw = unit(rng.standard_normal((10, 8)))
    target = unit(rng.standard_normal((3, 8)))
    upd = make_updates(raw, raw, np.array([2, 5, 9]), target, {})
    expect = raw.copy()
    expect[[2, 5, 9]] = target
    # add(): ids are positions, counted from what the index already holds
    index = RefinedIndex(IdentityRefiner(8).with_documents(upd), "Flat")
    index.add(raw[:4])
    index.add(raw[4:])
    np.testing.assert_allclose(index.reconstruct_n(), expect, atol=1e-6)
    # add_with_ids in another order; remove and add back: the same stored vectors
    idmap = RefinedIndex(IdentityRefiner(8).with_documents(upd), "IDMap,Flat")
    order = rng.permutation(10)
    idmap.add_with_ids(raw[order], order)
    D, I = idmap.search(target, 1)
    assert I[:, 0].tolist() == [2, 5, 9]
    assert idmap.remove_ids(np.array([5])) == 1
    idmap.add_with_ids(raw[[5]], [5])
    assert idmap.search(target, 1)[1][:, 0].tolist() == [2, 5, 9]
    # a document added under an id with no update is stored as the refiner makes it
    plain = RefinedIndex(IdentityRefiner(8).with_documents(upd), "IDMap,Flat")
    plain.add_with_ids(raw[[5]], [77])
    np.testing.assert_allclose(plain.reconstruct_n(), raw[[5]])


def test_bundle_carries_updates_and_refuses_an_edited_record(tmp_path):
    rng = np.random.default_rng(4)
    raw = unit(rng.standard_normal((20, 8)))
    upd = make_updates(raw, raw, np.array([1, 7]), unit(rng.standard_normal((2, 8))), {})
    ref = LinearRefiner(np.eye(8), np.zeros(8), apply_to="queries").with_documents(upd)
    index = RefinedIndex(ref, "Flat")
    index.add(raw)
    index.save(tmp_path / "b")
    back = RefinedIndex.load(tmp_path / "b")
    assert back.refiner.documents.sha256 == upd.sha256
    q = unit(rng.standard_normal((5, 8)))
    np.testing.assert_array_equal(back.search(q, 5)[1], index.search(q, 5)[1])
    manifest = tmp_path / "b" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["refiner"]["documents"]["n"] == 2
    dropped = dict(m, refiner={k: v for k, v in m["refiner"].items() if k != "documents"})
    manifest.write_text(json.dumps(dropped))
    with pytest.raises(BundleError, match="files.documents' and 'refiner.documents' must come together"):
        RefinedIndex.load(tmp_path / "b")
    dfile = tmp_path / "b" / m["files"]["documents"]["file"]
    manifest.write_text(json.dumps(m))
    dfile.write_bytes(dfile.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="documents file .* modified"):
        RefinedIndex.load(tmp_path / "b")


def test_contrastive_path_lowers_the_training_loss():
    data = shared_data()
    pq, pd = answer_pairs(data.qrels, data.split_queries("train"))
    Q, Y0 = data.queries[pq], data.corpus

    def loss(Y):  # mean over pairs of -log softmax over every document, temperature 0.05 (numpy, float64)
        S = (Q.astype(np.float64) @ Y.T) / 0.05
        return float(np.mean(np.log(np.exp(S - S.max(1, keepdims=True)).sum(1)) + S.max(1) - S[np.arange(len(pq)), pd]))

    losses = [loss(Y0)]
    for t, docs, moved in contrastive_path(Y0, Q, pd, steps=3):
        Y = Y0.copy()
        Y[docs] = moved
        losses.append(loss(Y))
        np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-5)
    assert losses[1] < losses[0] and losses[3] < losses[1], losses
    assert set(docs.tolist()) == set(pd.tolist())


def test_learn_gains_where_training_queries_were_and_protects_the_rest():
    data = shared_data()
    ident = lambda x: np.ascontiguousarray(x, np.float32)  # noqa: E731
    upd, choice = learn(data, ident, ident)
    assert upd is not None and choice.step > 0
    assert set(upd.ids.tolist()) <= set(np.flatnonzero(answered_rows(data)).tolist())
    best = next(c for c in choice.candidates if c["step"] == choice.step)
    assert best["metrics"]["pairs:ndcg@10"] > choice.base["pairs:ndcg@10"]
    assert all(best["metrics"][k] >= min(choice.base[k], 0) for k in best["metrics"] if k.startswith("unseen"))
    # on test queries: the index with the updates beats raw, through the production path
    test = data.split_queries("test")
    seen = np.array([answered_rows(data)[data.qrels[i]].any() for i in test])
    assert seen.any()

    def hits(refiner):
        index = RefinedIndex(refiner, "Flat")
        index.add(data.corpus)
        I = index.search(data.queries[test], 1)[1][:, 0]
        return np.array([data.qrels[i][0] for i in test]) == I

    moved, raw = hits(IdentityRefiner(16).with_documents(upd)), hits(IdentityRefiner(16))
    assert moved[seen].mean() > raw[seen].mean()


def test_no_updates_under_the_disjoint_protocol():
    """Queries that take their document's split: no validation query's document was a training answer."""
    from dataclasses import replace

    data = shared_data()
    disjoint = replace(data, query_split=np.array([data.corpus_split[r[0]] for r in data.qrels], np.int8))
    ident = lambda x: np.ascontiguousarray(x, np.float32)  # noqa: E731
    upd, choice = learn(disjoint, ident, ident)
    assert upd is None and "nothing to gain" in choice.reason


def test_frameworks_refuse_a_refiner_with_updates():
    from simskip_faiss.integrations.base import refine_documents

    raw = unit(np.random.default_rng(5).standard_normal((4, 8)))
    ref = IdentityRefiner(8).with_documents(make_updates(raw, raw, np.array([0]), raw[[1]], {}))
    with pytest.raises(ValueError, match="document updates .* embedding function .*cannot apply"):
        refine_documents(ref, raw)
    assert refine_documents(IdentityRefiner(8), raw).shape == (4, 8)


@pytest.mark.slow
def test_cli_train_then_build_delivers_the_updates_and_refuses_what_does_not_match(tmp_path, capsys):
    """train --queries --qrels writes the updates beside the refiner; build applies them by row with no flag,
    exactly as RefinedIndex over Refiner.load does; a missing file, other ids or another corpus are refused."""
    pytest.importorskip("torch")
    from simskip_faiss import Refiner
    from simskip_faiss.cli import main

    data = shared_data(n=300, answered=60, per_doc=6)
    np.save(tmp_path / "c.npy", data.corpus)
    np.save(tmp_path / "q.npy", data.queries)
    (tmp_path / "t.tsv").write_text("".join(f"{i}\t{r[0]}\n" for i, r in enumerate(data.qrels)))
    args = ["train", tmp_path / "c.npy", "--queries", tmp_path / "q.npy", "--qrels", tmp_path / "t.tsv",
            "-o", tmp_path / "r.onnx", "--hidden", "32", "--max-steps", "100", "--eval-every", "25", "--precision", "fp32",
            "--threads", "1", "-q"]
    assert main([str(a) for a in args]) == 0
    err = capsys.readouterr().err
    assert "pairs split (shared corpus)" in err and "document updates (contrastive)" in err
    refiner = Refiner.load(tmp_path / "r.onnx")
    assert refiner.documents is not None and len(refiner.documents) > 0, err
    sidecar = tmp_path / refiner.metadata["documents"]["file"]
    assert sidecar.is_file()
    assert main(["build", str(tmp_path / "r.onnx"), str(tmp_path / "c.npy"), "-o", str(tmp_path / "b"), "-q"]) == 0
    assert "document updates applied" in capsys.readouterr().out
    python = RefinedIndex(refiner, "Flat")
    python.add(data.corpus)
    q = data.queries[data.split_queries("test")]
    np.testing.assert_array_equal(RefinedIndex.load(tmp_path / "b").search(q, 10)[1], python.search(q, 10)[1])
    moved = refiner.documents.ids[0]
    assert not np.allclose(python.reconstruct_n(int(moved), 1)[0], data.corpus[moved])  # the update is in the index
    # other ids at build: refused, and no bundle written
    np.save(tmp_path / "ids.npy", np.arange(300, dtype=np.int64) + 1000)
    assert main(["build", str(tmp_path / "r.onnx"), str(tmp_path / "c.npy"), "--ids", str(tmp_path / "ids.npy"),
                 "--factory", "IDMap,Flat", "-o", str(tmp_path / "b2")]) == 2
    assert "are not among the ids" in capsys.readouterr().err and not (tmp_path / "b2").exists()
    # another corpus of the same size and dimension: refused by the vectors' sketches
    np.save(tmp_path / "other.npy", unit(np.random.default_rng(9).standard_normal((300, 16))))
    assert main(["build", str(tmp_path / "r.onnx"), str(tmp_path / "other.npy"), "-o", str(tmp_path / "b3")]) == 2
    assert "another vector than the one its document update was learned for" in capsys.readouterr().err
    # a copy under another name beside it finds the same updates; retraining the original without updates
    # deletes the file it named once no refiner beside it names it
    (tmp_path / "copy.onnx").write_bytes((tmp_path / "r.onnx").read_bytes())
    assert Refiner.load(tmp_path / "copy.onnx").documents.sha256 == refiner.documents.sha256
    (tmp_path / "copy.onnx").unlink()
    assert main([str(a) for a in args] + ["--documents", "none"]) == 0
    assert Refiner.load(tmp_path / "r.onnx").documents is None and not sidecar.exists()
    capsys.readouterr()
    # a refiner without its updates file: refused, not a silent raw build
    assert main([str(a) for a in args]) == 0
    sidecar = tmp_path / Refiner.load(tmp_path / "r.onnx").metadata["documents"]["file"]
    sidecar.unlink()
    assert main(["build", str(tmp_path / "r.onnx"), str(tmp_path / "c.npy"), "-o", str(tmp_path / "b4")]) == 2
    assert "which is missing" in capsys.readouterr().err


def test_a_spent_time_budget_skips_the_document_step_and_says_so():
    pytest.importorskip("torch")
    from simskip_faiss.config import TrainConfig
    from simskip_faiss.training.guard import fit

    res = fit(shared_data(n=200, answered=40), TrainConfig(hidden=8, time_budget=1e-9, progress=False, threads=1))
    assert res.documents is None and "time budget" in res.document_choice.reason
    assert res.metadata()["document_choice"]["step"] == 0.0


@pytest.mark.slow
def test_cli_train_with_ids_keys_the_updates_by_them(tmp_path, capsys):
    """train --ids: the updates are keyed by the user's document ids; build with the same --ids applies them,
    exactly as RefinedIndex.add_with_ids over the refiner does; duplicated ids are refused at train."""
    pytest.importorskip("torch")
    from simskip_faiss import Refiner
    from simskip_faiss.cli import main

    data = shared_data(n=300, answered=60, per_doc=6, seed=1)
    ids = np.arange(300, dtype=np.int64) * 7 + 1000
    np.save(tmp_path / "c.npy", data.corpus)
    np.save(tmp_path / "q.npy", data.queries)
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "t.tsv").write_text("".join(f"{i}\t{r[0]}\n" for i, r in enumerate(data.qrels)))
    args = ["train", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy"), "--qrels", str(tmp_path / "t.tsv"),
            "-o", str(tmp_path / "r.onnx"), "--hidden", "32", "--max-steps", "100", "--eval-every", "25",
            "--precision", "fp32", "--threads", "1", "-q"]
    assert main(args + ["--ids", str(tmp_path / "ids.npy")]) == 0
    refiner = Refiner.load(tmp_path / "r.onnx")
    assert refiner.documents is not None and set(refiner.documents.ids) <= set(ids.tolist())
    assert main(["build", str(tmp_path / "r.onnx"), str(tmp_path / "c.npy"), "--ids", str(tmp_path / "ids.npy"),
                 "--factory", "IDMap,Flat", "-o", str(tmp_path / "b"), "-q"]) == 0
    python = RefinedIndex(refiner, "IDMap,Flat")
    python.add_with_ids(data.corpus, ids)
    q = data.queries[data.split_queries("test")]
    np.testing.assert_array_equal(RefinedIndex.load(tmp_path / "b").search(q, 10)[1], python.search(q, 10)[1])
    np.save(tmp_path / "dup.npy", np.zeros(300, dtype=np.int64))
    capsys.readouterr()
    assert main(args + ["--ids", str(tmp_path / "dup.npy")]) == 2
    assert "duplicated" in capsys.readouterr().err
