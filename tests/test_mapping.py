"""Maps between two embedding models' spaces (training/mapping.py, `simskip-faiss train-map`): closed-form and
learned maps from paired embeddings, the guard's choice, the ONNX export with d_in != d_out, the directions,
and the refusals of bad pairs and of a map applied the wrong way."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import two_encoders as encoders, unit  # noqa: E402

from simskip_faiss import Refiner  # noqa: E402
from simskip_faiss.errors import InputError  # noqa: E402
from simskip_faiss.refiners import LinearRefiner  # noqa: E402
from simskip_faiss.training.mapping import (MapConfig, check_pairs, fit_map,  # noqa: E402
                                            procrustes, ridge_maps)

FAST = dict(max_steps=40, eval_every=20, patience=1, hidden=16, threads=1)


def test_an_exactly_linear_relation_is_recovered_by_procrustes_and_ridge():
    """Target = source @ Q, Q the known matrix: ridge at a small lambda returns Q (semi-orthogonal 20 -> 12),
    Procrustes returns an orthogonal Q (20 -> 20) from any full-rank sample, and the guard then reproduces the
    re-embedded neighbours exactly."""
    rng = np.random.default_rng(1)
    X = unit(rng.standard_normal((400, 20)))
    Q, _ = np.linalg.qr(rng.standard_normal((20, 12)))  # (20, 12), orthonormal columns
    lin = ridge_maps(X, (X @ Q).astype(np.float32), (1e-7,))[1e-7]
    np.testing.assert_allclose(lin.A.T, Q, atol=1e-4)
    np.testing.assert_allclose(lin.transform(X), unit(X @ Q), atol=1e-4)
    Q2, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    Y = (X @ Q2).astype(np.float32)
    np.testing.assert_allclose(procrustes(X, Y).A.T, Q2, atol=1e-4)
    res = fit_map(X, Y, learned=False)
    assert res.shipped == "procrustes" and res.recovered == pytest.approx(1.0)
    assert (res.d_in, res.d_out) == (20, 20)
    res = fit_map(X, (X @ Q).astype(np.float32), learned=False)
    assert (res.d_in, res.d_out) == (20, 12) and res.candidates["ridge"]["reembedded@10"] == pytest.approx(1.0)


def test_nonlinear_encoders_the_map_recovers_most_of_the_reembedded_neighbours():
    src, tgt = encoders()
    res = fit_map(src, tgt, **FAST)
    assert set(res.candidates) == {"procrustes", "ridge", "learned"}
    for c in res.candidates.values():
        assert {"reembedded@10", "mrr@10", "recall@10", "objective", "feasible", "seconds"} <= set(c)
    # a random map reproduces ~10/600 of a top 10; these recover most of it
    assert res.recovered > 0.5
    assert res.recovered == res.candidates[res.shipped]["reembedded@10"]
    assert res.candidates["procrustes"]["objective"] == 0.0  # the reference
    lines = res.summary()
    assert len(lines) == 4 and lines[-1].startswith(f"shipped {res.shipped}")
    # the learned map starts from the reference: never below it on the guard's score at its kept checkpoint
    learned, ref = res.candidates["learned"], res.candidates["procrustes"]
    assert np.mean([learned[k] for k in ("reembedded@10", "mrr@10", "recall@10")]) >= \
        np.mean([ref[k] for k in ("reembedded@10", "mrr@10", "recall@10")]) - 1e-9


def test_the_split_is_seeded_and_the_fit_deterministic():
    src, tgt = encoders(n=300)
    a, b = fit_map(src, tgt, learned=False, seed=3), fit_map(src, tgt, learned=False, seed=3)
    assert a.candidates["ridge"]["reembedded@10"] == b.candidates["ridge"]["reembedded@10"]
    np.testing.assert_array_equal(a.refiner.transform(src[:5]), b.refiner.transform(src[:5]))


@pytest.fixture(scope="module")
def fitted():
    src, tgt = encoders(n=300)
    return src, fit_map(src, tgt, **FAST)


@pytest.mark.parametrize("name", ["learned", "procrustes", "ridge"])
def test_every_candidate_exports_to_one_onnx_file_with_parity_and_d_in_ne_d_out(tmp_path, name, fitted):
    src, res = fitted
    meta = res.export(tmp_path / "map.onnx", name=name)
    r = Refiner.load(tmp_path / "map.onnx")
    assert (r.d_in, r.d_out) == (24, 16) and r.apply_to == "both" and r.normalize
    assert meta["parity_max_abs_err"] <= 1e-5
    assert r.metadata["direction"] == "queries" and r.metadata["map"] == name
    assert set(r.metadata["guard"]["candidates"]) == {"procrustes", "ridge", "learned"}
    expect = res.candidate(name).transform(src[:50])
    np.testing.assert_allclose(r.transform(src[:50]), expect, atol=1e-5)
    if name != "learned":  # the closed-form file equals its LinearRefiner (numpy), the independent reference
        lin = res.linear[name]
        assert isinstance(res.candidate(name), LinearRefiner)
        np.testing.assert_allclose(r.transform(src[:50]), lin.transform(src[:50]), atol=1e-5)


def test_a_learned_map_that_widens_exports_with_parity(tmp_path):
    """d_in < d_out (16 -> 24) through the learned map's graph, checked against torch by export."""
    new, old = encoders(n=300)
    res = fit_map(old, new, direction="documents", **FAST)
    meta = res.export(tmp_path / "w.onnx", name="learned")
    r = Refiner.load(tmp_path / "w.onnx")
    assert (r.d_in, r.d_out, r.apply_to) == (16, 24, "both") and meta["parity_max_abs_err"] <= 1e-5
    np.testing.assert_allclose(r.transform(old[:20]), res.candidate("learned").transform(old[:20]), atol=1e-5)


@pytest.mark.parametrize("fix, message", [
    (lambda s, t: (s[:-1], t), "different lengths: source has 299 rows, target 300"),
    (lambda s, t: (s, _set(t, 7, np.nan)), "target row 7 holds NaN or Inf"),
    (lambda s, t: (_set(s, 4, 0.0), t), "source row 4 is all zeros"),
    (lambda s, t: (s[:30], t[:30]), "30 pairs are too few"),
    (lambda s, t: (s[:, 0], t), "source must be a 2-D"),
])
def test_bad_pairs_are_refused_with_one_line(fix, message):
    src, tgt = encoders(n=300)
    s, t = fix(src.copy(), tgt.copy())
    with pytest.raises(InputError, match=message) as e:
        fit_map(s, t)
    assert "\n" not in str(e.value)


def _set(x, row, v):
    x[row] = v
    return x


def test_a_direction_other_than_queries_or_documents_is_refused():
    src, tgt = encoders(n=100)
    with pytest.raises(InputError, match="direction must be 'queries'"):
        fit_map(src, tgt, direction="both")
    assert check_pairs(src, tgt)[0].dtype == np.float32
    assert MapConfig().init == "procrustes"


def test_cli_train_map_round_trip_and_refusals(tmp_path, capsys):
    from simskip_faiss.cli import main

    src, tgt = encoders(n=300)
    np.save(tmp_path / "new.npy", src)
    np.save(tmp_path / "old.npy", tgt)
    out = tmp_path / "map.onnx"
    assert main(["train-map", str(tmp_path / "old.npy"), str(tmp_path / "new.npy"), "-o", str(out), "-q",
                 "--no-learned", "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith(f"wrote {out}: ") and "24-d -> 16-d" in cap.out and "re-embedded top 10" in cap.out
    assert "procrustes" in cap.err and "ridge" in cap.err and "shipped" in cap.err
    r = Refiner.load(out)
    assert (r.d_in, r.d_out, r.metadata["direction"]) == (24, 16, "queries")
    assert r.metadata["map_config"]["seed"] == 1
    docs = tmp_path / "docs.onnx"  # the other direction reads the same two files: old -> new
    assert main(["train-map", str(tmp_path / "old.npy"), str(tmp_path / "new.npy"), "-o", str(docs), "-q",
                 "--no-learned", "--direction", "documents"]) == 0
    capsys.readouterr()
    assert (Refiner.load(docs).d_in, Refiner.load(docs).d_out) == (16, 24)

    np.save(tmp_path / "short.npy", tgt[:-5])
    np.save(tmp_path / "nan.npy", _set(tgt.copy(), 3, np.inf))
    for bad, what in (("short.npy", "different lengths"), ("nan.npy", "row 3 holds NaN or Inf")):
        o = tmp_path / f"x-{bad}.onnx"
        assert main(["train-map", str(tmp_path / bad), str(tmp_path / "new.npy"), "-o", str(o), "-q"]) == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1 and not o.exists()
