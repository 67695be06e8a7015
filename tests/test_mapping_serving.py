"""Serving a map between two embedding models (training/mapping.py) by its direction.

queries (new -> old, apply_to "both"): every vector the new model makes goes through the map — queries and
newly added documents — while the vectors already stored in the old index stay as they are. A `RefinedIndex`
wraps the populated old FAISS index; the framework integrations embed both sides through the map.

documents (old -> new): a one-time migration pass (`map_documents`, `Refiner.transform`, Spark refine), after
which new-model queries search the migrated vectors raw. Every serving path refuses it with one line
(`BaseRefiner.refuse_migration_map`): a store would map the new-model queries too, silently with equal widths.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import two_encoders as encoders  # noqa: E402

import faiss  # noqa: E402

from simskip_faiss import RefinedIndex, Refiner  # noqa: E402
from simskip_faiss.errors import InputError  # noqa: E402
from simskip_faiss.training.mapping import fit_map, map_documents, map_queries  # noqa: E402

REFUSED = r"cannot serve this map: it is a documents map \(old stored vectors -> the new model's space"


WIDTHS = [(24, 16), (16, 16)]  # (new model, old model): a width-changing map and an equal-width one


def exported(tmp_path, direction: str, d_new: int, d_old: int, n: int = 400):
    """(map loaded from its ONNX file, new-model vectors, old-model vectors) of the same n texts."""
    new, old = encoders(n=n, d_src=d_new, d_tgt=d_old)
    src, tgt = (new, old) if direction == "queries" else (old, new)
    path = tmp_path / f"{direction}-{d_new}-{d_old}.onnx"
    fit_map(src, tgt, direction=direction, learned=False).export(path)
    return Refiner.load(path), new, old


def single_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- queries maps: new-model queries and new documents through the map, the old vectors untouched ---------
@pytest.mark.parametrize("d_new, d_old", WIDTHS)
def test_a_queries_map_serves_an_old_populated_index_and_maps_added_documents(tmp_path, d_new, d_old):
    r, new, old = exported(tmp_path, "queries", d_new, d_old)
    assert (r.d_in, r.d_out, r.apply_to, r.map_direction) == (d_new, d_old, "both", "queries")
    assert (r.document_dim, r.stored_dim) == (d_new, d_old)
    stored_old, added = slice(0, 300), slice(300, 400)
    old_index = faiss.IndexFlatIP(d_old)
    old_index.add(old[stored_old])                     # the index the old model built, as read from disk
    ix = RefinedIndex(r, index=old_index)
    assert ix.ntotal == 300 and ix.d == d_new

    q = new[:40]                                        # new-model queries of texts the old index holds
    _, I = ix.search(q, 10)
    plain = faiss.IndexFlatIP(d_old)
    plain.add(old[stored_old])
    _, want = plain.search(map_queries(r, q, plain), 10)
    np.testing.assert_array_equal(I, want)
    assert np.mean([i in row for i, row in enumerate(I)]) > 0.5  # the text's own old vector is found

    ix.add(new[added])                                  # new documents, embedded by the new model
    assert ix.ntotal == 400
    np.testing.assert_array_equal(ix.reconstruct_n(0, 300), old[stored_old])  # the old vectors untouched
    np.testing.assert_allclose(ix.reconstruct_n(300, 100), r.transform(new[added]), atol=1e-6)
    _, I = ix.search(new[added][:20], 1)
    assert np.mean(I[:, 0] == np.arange(300, 320)) > 0.9  # a new document is its own new-model query's hit

    ix.save(tmp_path / "bundle")
    back = RefinedIndex.load(tmp_path / "bundle")
    assert back.ntotal == 400 and back.refiner.map_direction == "queries"
    np.testing.assert_array_equal(back.search(q, 10)[1], ix.search(q, 10)[1])


def test_a_width_changing_queries_map_refuses_old_model_vectors_nothing_stored(tmp_path):
    r, new, old = exported(tmp_path, "queries", 24, 16)
    old_index = faiss.IndexFlatIP(16)
    old_index.add(old[:100])
    ix = RefinedIndex(r, index=old_index)
    with pytest.raises(InputError, match="24"):
        ix.add(old[100:200])                            # old-model vectors are not what the new model makes
    with pytest.raises(InputError, match="24"):
        ix.search(old[:3], 5)
    assert ix.ntotal == 100
    np.testing.assert_array_equal(ix.reconstruct_n(0, 100), old[:100])


def test_queries_direction_search_the_untouched_old_index():
    """map_queries against a plain FAISS index of old vectors: the index is searched as it is."""
    from simskip_faiss.refiners import LinearRefiner

    new, old = encoders(n=400)
    res = fit_map(new, old, learned=False)
    index = faiss.IndexFlatIP(16)
    index.add(old)
    before = faiss.serialize_index(index)
    _, I = index.search(map_queries(res.refiner, new[:50], index), 10)
    assert np.mean([i in row for i, row in enumerate(I)]) > 0.5
    with pytest.raises(InputError, match="queries have dimension 16 but this map takes 24-d new-model vectors"):
        map_queries(res.refiner, old[:3], index)  # old vectors fed to a new->old map: the wrong way round
    with pytest.raises(InputError, match="not 'documents'"):
        map_documents(res.refiner, new[:3])
    with pytest.raises(InputError, match="index holds 24-d vectors"):
        map_queries(res.refiner, new[:3], faiss.IndexFlatIP(24))
    with pytest.raises(InputError, match="not a map"):
        map_queries(LinearRefiner.centring(new), new[:3])
    assert faiss.serialize_index(index).tobytes() == before.tobytes()


# -- documents maps: a migration pass, refused by every serving path ------------------------------------
def test_documents_direction_maps_stored_vectors_into_the_new_space(tmp_path):
    """documents: old stored vectors (16-d) go to the new 24-d space once; new-model queries search them raw."""
    r, new, old = exported(tmp_path, "documents", 24, 16)
    assert (r.d_in, r.d_out, r.apply_to, r.stored_dim, r.map_direction) == (16, 24, "both", 24, "documents")
    index = faiss.IndexFlatIP(24)
    stored = map_documents(r, old, index)
    np.testing.assert_allclose(stored, r.transform(old), atol=1e-6)
    index.add(stored)
    _, I = index.search(new[:50], 10)
    assert np.mean([i in row for i, row in enumerate(I)]) > 0.5  # the text's own old vector is among the top 10
    with pytest.raises(InputError, match="trained for direction 'documents'.*map_documents"):
        map_queries(r, new[:3])
    with pytest.raises(InputError, match="index holds 16-d vectors but this map outputs 24-d"):
        map_documents(r, old, faiss.IndexFlatIP(16))


@pytest.mark.parametrize("d_new, d_old", WIDTHS)
def test_a_refined_index_refuses_a_documents_map_with_one_line(tmp_path, d_new, d_old):
    """Equal widths is the silent case: the new-model queries would be mapped too and searched wrongly."""
    r, new, old = exported(tmp_path, "documents", d_new, d_old)
    for refiner in (r, tmp_path / f"documents-{d_new}-{d_old}.onnx"):
        with pytest.raises(InputError, match=REFUSED) as e:
            RefinedIndex(refiner)
        msg = single_line(e)
        assert "map_documents" in msg and "spark-refine" in msg and "raw" in msg and "RefinedIndex" in msg
    with pytest.raises(InputError, match=REFUSED):
        RefinedIndex(r, index=faiss.IndexFlatIP(d_new))
    assert Refiner.load(tmp_path / f"documents-{d_new}-{d_old}.onnx").map_direction == "documents"


def test_other_refiners_are_not_maps():
    from simskip_faiss import IdentityRefiner
    from simskip_faiss.refiners import LinearRefiner

    x = encoders(n=100)[0]
    for r in (IdentityRefiner(24), LinearRefiner.centring(x)):
        assert r.map_direction is None
        r.refuse_migration_map("here")              # nothing to refuse
        RefinedIndex(r)


def _bundle_with(refiner, directory):
    """A bundle holding `refiner` as an earlier release could save it (RefinedIndex refuses it now)."""
    from simskip_faiss import IdentityRefiner

    ix = RefinedIndex(IdentityRefiner(refiner.d_out))
    ix.refiner = refiner
    ix.add(np.eye(refiner.d_in, dtype=np.float32))     # stored through the map
    return ix.save(directory)


def test_bundle_build_load_and_search_refuse_a_documents_map(tmp_path, capsys):
    from simskip_faiss.cli import main
    from simskip_faiss.persistence import BundleError

    r, new, old = exported(tmp_path, "documents", 16, 16)
    onnx = tmp_path / "documents-16-16.onnx"
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new[:5])
    assert main(["build", str(onnx), str(tmp_path / "old.npy"), "-o", str(tmp_path / "b"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot serve this map: it is a documents map" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()

    bundle = _bundle_with(r, tmp_path / "old-bundle")
    with pytest.raises(BundleError, match=REFUSED) as e:
        RefinedIndex.load(bundle)
    single_line(e)
    assert main(["search", str(bundle), str(tmp_path / "new.npy"), "-o", str(tmp_path / "res.npz"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot serve this map: it is a documents map" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "res.npz").exists()


@pytest.mark.parametrize("d_new, d_old", WIDTHS)
def test_the_integrations_refuse_a_documents_map(tmp_path, d_new, d_old):
    from simskip_faiss.integrations.refining import resolve_refiner

    r, _, _ = exported(tmp_path, "documents", d_new, d_old)
    for given in (r, tmp_path / f"documents-{d_new}-{d_old}.onnx", str(_bundle_with(r, tmp_path / "bundle"))):
        with pytest.raises(InputError, match=REFUSED) as e:
            resolve_refiner(given)
        single_line(e)
    q, _, _ = exported(tmp_path, "queries", d_new, d_old)
    assert resolve_refiner(q) is q                      # a queries map is served (documents go through it too)


def test_the_framework_wrappers_refuse_a_documents_map(tmp_path):
    r, _, _ = exported(tmp_path, "documents", 16, 16)
    wrappers = []
    try:
        from simskip_faiss.integrations.langchain import RefinedEmbeddings
        from langchain_core.embeddings import FakeEmbeddings
        wrappers.append(lambda: RefinedEmbeddings(FakeEmbeddings(size=16), r))
    except ImportError:
        pass
    try:
        from simskip_faiss.integrations.sentence_transformers import append_refiner, refiner_modules
        wrappers += [lambda: refiner_modules(r), lambda: append_refiner(None, r)]
    except ImportError:
        pass
    if not wrappers:
        pytest.skip("no framework installed")
    for make in wrappers:
        with pytest.raises(InputError, match=REFUSED):
            make()


def test_a_milvus_collection_refuses_a_documents_map_before_touching_the_client(tmp_path):
    from simskip_faiss.scale.milvus import RefinedCollection

    class NoClient:
        def __getattr__(self, name):
            raise AssertionError(f"the client was used ({name}) before the refusal")

    for d_new, d_old in WIDTHS:
        r, _, _ = exported(tmp_path, "documents", d_new, d_old)
        with pytest.raises(InputError, match=REFUSED) as e:
            RefinedCollection(NoClient(), "c", r)
        assert "Milvus" in single_line(e)


def test_spark_build_refuses_and_spark_refine_accepts_a_documents_map(tmp_path):
    """Driver and worker side without a Spark session: spark-build refuses before any Spark work; the spec that
    spark-refine ships accepts the map and its workers' refinement is the map's transform (the migration pass)."""
    pytest.importorskip("pyarrow")
    from simskip_faiss.scale.spark_build import build_index
    from simskip_faiss.scale.spark_refine import _refine, refiner_spec

    r, new, old = exported(tmp_path, "documents", 24, 16)
    with pytest.raises(InputError, match=REFUSED) as e:
        build_index(str(tmp_path / "missing.parquet"), r, tmp_path / "out")
    assert "spark-build" in single_line(e)
    assert not (tmp_path / "out").exists()
    spec = refiner_spec(None, r)                          # no SparkContext: the bytes are held, not broadcast
    assert spec.refines_documents and (spec.d_in, spec.d_out) == (16, 24)
    np.testing.assert_allclose(_refine(spec, old[:50], "documents", None), r.transform(old[:50]), atol=1e-6)
    q, _, _ = exported(tmp_path, "queries", 24, 16)        # a queries map maps new-model documents on Spark
    np.testing.assert_allclose(_refine(refiner_spec(None, q), new[:50], "documents", None), q.transform(new[:50]),
                               atol=1e-6)


# -- a framework round trip with a width-changing queries map ------------------------------------------
def test_langchain_embeds_documents_and_queries_through_a_queries_map_like_refined_index(tmp_path):
    pytest.importorskip("langchain_community")
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from helpers_langchain import TableEmbeddings

    from simskip_faiss.integrations.langchain import RefinedEmbeddings

    r, new, old = exported(tmp_path, "queries", 24, 16)
    docs = [f"text {i}" for i in range(300)]
    queries = [f"text {i}" for i in range(300, 340)]
    rows = {t: i for i, t in enumerate(docs + queries)}

    emb = RefinedEmbeddings(TableEmbeddings(new, rows), tmp_path / "queries-24-16.onnx")  # the fake 24-d new model
    np.testing.assert_allclose(emb.embed_documents(docs[:5]), r.transform(new[:5]), atol=1e-6)
    np.testing.assert_allclose(emb.embed_query(queries[0]), r.transform(new[300:301])[0], atol=1e-6)
    store = FAISS.from_texts(docs, emb, metadatas=[{"i": i} for i in range(300)],
                             distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    assert store.index.d == 16
    got = [[d.metadata["i"] for d in store.similarity_search(q, k=5)] for q in queries]
    ix = RefinedIndex(r)
    ix.add(new[:300])
    _, want = ix.search(new[300:340], 5)
    assert got == want.tolist()


# -- `simskip-faiss build` with a queries map: CORPUS is one model's or the other's, and must be said -------
@pytest.mark.parametrize("d_new, d_old", WIDTHS)
def test_build_with_a_queries_map_needs_corpus_model_and_serves_old_vectors_as_they_are(tmp_path, capsys, d_new, d_old):
    """Without --corpus-model: refused with one line, nothing written (an equal-width map would otherwise map
    the old vectors silently). --corpus-model old: the old vectors are stored bit for bit and the bundle's
    search of new-model queries equals map_queries + a flat index over them. --corpus-model new: the corpus
    goes through the map."""
    from simskip_faiss.cli import main

    r, new, old = exported(tmp_path, "queries", d_new, d_old)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    np.save(tmp_path / "q.npy", new[:25])
    path = str(tmp_path / f"queries-{d_new}-{d_old}.onnx")
    bundle = tmp_path / "b"
    assert main(["build", path, str(tmp_path / "old.npy"), "-o", str(bundle), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--corpus-model old" in err and len(err.strip().splitlines()) == 1 and not bundle.exists()
    if d_new != d_old:  # the width says the corpus is not the new model's
        assert main(["build", path, str(tmp_path / "old.npy"), "-o", str(bundle), "-q", "--corpus-model", "new"]) == 2
        assert f"new-model vectors are {d_new}-d" in capsys.readouterr().err and not bundle.exists()

    assert main(["build", path, str(tmp_path / "old.npy"), "-o", str(bundle), "-q", "--corpus-model", "old"]) == 0
    assert "stored as they are" in capsys.readouterr().out
    ix = RefinedIndex.load(bundle)
    np.testing.assert_array_equal(ix.reconstruct_n(0, ix.ntotal), old)
    assert main(["search", str(bundle), str(tmp_path / "q.npy"), "-k", "5", "-o", str(tmp_path / "r.npz"), "-q"]) == 0
    capsys.readouterr()
    flat = faiss.IndexFlatIP(d_old)
    flat.add(old)
    _, want = flat.search(map_queries(r, new[:25], flat), 5)
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["I"], want)

    b2 = tmp_path / "b2"
    assert main(["build", path, str(tmp_path / "new.npy"), "-o", str(b2), "-q", "--corpus-model", "new"]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(RefinedIndex.load(b2).reconstruct_n(0, len(new)), r.transform(new), atol=1e-6)


def test_corpus_model_is_refused_for_a_refiner_that_is_not_a_queries_map(tmp_path, capsys):
    from simskip_faiss.cli import main

    _, new, old = exported(tmp_path, "documents", 16, 16)
    np.save(tmp_path / "old.npy", old)
    assert main(["build", "identity", str(tmp_path / "old.npy"), "-o", str(tmp_path / "b"), "-q",
                 "--corpus-model", "old"]) == 2
    assert "--corpus-model is for a queries map" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_an_existing_langchain_store_of_old_vectors_serves_new_model_queries_through_a_queries_map(tmp_path):
    """The migration users ask for: a LangChain FAISS store built and saved by LangChain alone with the OLD
    model, reopened with the NEW model behind the map. Nothing is re-embedded (the stored vectors stay bit for
    bit); new-model queries search it through the map, giving map_queries + a flat index's ids; texts added
    afterwards are embedded by the new model and stored mapped."""
    pytest.importorskip("langchain_community")
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from helpers_langchain import TableEmbeddings

    from simskip_faiss.integrations.langchain import RefinedEmbeddings

    r, new, old = exported(tmp_path, "queries", 24, 16)
    texts = [f"text {i}" for i in range(400)]
    rows = {t: i for i, t in enumerate(texts)}

    FAISS.from_texts(texts[:300], TableEmbeddings(old, rows), metadatas=[{"i": i} for i in range(300)],
                     distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT).save_local(str(tmp_path / "store"))
    store = FAISS.load_local(str(tmp_path / "store"), RefinedEmbeddings(TableEmbeddings(new, rows), r),
                             allow_dangerous_deserialization=True,
                             distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    np.testing.assert_array_equal(store.index.reconstruct_n(0, 300), old[:300])
    got = [[d.metadata["i"] for d in store.similarity_search(t, k=5)] for t in texts[300:340]]
    flat = faiss.IndexFlatIP(16)
    flat.add(old[:300])
    _, want = flat.search(map_queries(r, new[300:340], flat), 5)
    assert got == want.tolist()
    store.add_texts(texts[340:400], metadatas=[{"i": i} for i in range(340, 400)])
    np.testing.assert_allclose(store.index.reconstruct_n(300, 60), r.transform(new[340:400]), atol=1e-6)


def test_spark_and_milvus_commands_need_corpus_model_with_a_queries_map(tmp_path, capsys):
    """spark-refine (documents), spark-build and milvus-ingest map the vectors they are given: with a queries map
    they refuse to guess which model embedded them (one line, before Spark or Milvus is touched, nothing written),
    and refuse --corpus-model for a refiner that is not such a map."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from simskip_faiss.cli import main

    r, new, old = exported(tmp_path, "queries", 16, 16)
    path = str(tmp_path / "queries-16-16.onnx")
    pq.write_table(pa.table({"id": np.arange(len(old)), "vector": pa.array([v.tolist() for v in old],
                                                                           pa.list_(pa.float32()))}), tmp_path / "v.parquet")
    np.save(tmp_path / "v.npy", old)
    for argv in (["spark-refine", path, str(tmp_path / "v.parquet"), "-o", str(tmp_path / "out")],
                 ["spark-build", path, str(tmp_path / "v.parquet"), "-o", str(tmp_path / "out")],
                 ["milvus-ingest", path, str(tmp_path / "v.npy"), "--uri", str(tmp_path / "m.db"), "--collection", "c"]):
        assert main(argv + ["-q"]) == 2, argv[0]
        err = capsys.readouterr().err
        assert "--corpus-model new" in err and len(err.strip().splitlines()) == 1, (argv[0], err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()
    assert main(["spark-refine", "identity", str(tmp_path / "v.parquet"), "-o", str(tmp_path / "out"), "-q",
                 "--corpus-model", "new"]) == 2
    assert "--corpus-model is for a queries map" in capsys.readouterr().err


def test_milvus_ingest_with_corpus_model_new_stores_the_mapped_vectors(tmp_path, capsys):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from simskip_faiss.cli import main

    r, new, old = exported(tmp_path, "queries", 24, 16)
    np.save(tmp_path / "new.npy", new[:300])
    np.save(tmp_path / "q.npy", new[300:320])
    common = ["--uri", str(tmp_path / "m.db"), "--collection", "c", "-q"]
    path = str(tmp_path / "queries-24-16.onnx")
    assert main(["milvus-ingest", path, str(tmp_path / "new.npy"), "--index-type", "FLAT", "--corpus-model", "new",
                 *common]) == 0
    capsys.readouterr()
    assert main(["milvus-search", path, str(tmp_path / "q.npy"), "-k", "5", "-o", str(tmp_path / "r.npz"), *common]) == 0
    ix = RefinedIndex(r)
    ix.add(new[:300])
    _, want = ix.search(new[300:320], 5)
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["I"], want)
