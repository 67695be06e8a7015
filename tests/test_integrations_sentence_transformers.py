"""sentence-transformers: refiners appended to a tiny local SentenceTransformer (StaticEmbedding, no hub).

Flow per refiner: encode documents → exact search with refined queries → save → reload in a new
process → encode queries → search; ids must equal `RefinedIndex`'s on the base model's vectors.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("torch")

from helpers import DOCS, K, QUERIES, in_new_process  # noqa: E402
import simskip_faiss as sf  # noqa: E402
from simskip_faiss.integrations.base import MissingRefinerError, RefinerMismatchError  # noqa: E402


def base_model():
    """A deterministic StaticEmbedding model over the test vocabulary (built locally, no download)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted({w for t in DOCS + QUERIES for w in re.findall(r"\w+|[^\w\s]", t)})
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    weights = np.random.default_rng(0).standard_normal((len(words) + 1, 16)).astype(np.float32)
    return SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=weights)], device="cpu")


def reference_ids(refiner, docs: np.ndarray, queries: np.ndarray) -> list[list[int]]:
    index = sf.RefinedIndex(refiner, "Flat", metric="ip")
    index.add(docs)
    return index.search(queries, K)[1].tolist()


def search(doc_vectors: np.ndarray, query_vectors: np.ndarray) -> list[list[int]]:
    import faiss

    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(np.asarray(doc_vectors, dtype=np.float32))
    return index.search(np.asarray(query_vectors, dtype=np.float32), K)[1].tolist()


def reload_and_search(path: str, docs: str) -> list[list[int]]:
    """Runs in a new process: reload the saved model (no trusted code) and search the saved document vectors."""
    from simskip_faiss.integrations.sentence_transformers import load_model

    model = load_model(path, device="cpu")
    return search(np.load(docs), model.encode_query(QUERIES))


def reload_all(cases: list[dict]) -> list:
    return [reload_and_search(**c) for c in cases]


def linear_refiner(raw: np.ndarray, apply_to: str):
    w = sf.LinearRefiner.whitening(raw)
    return sf.LinearRefiner(w.A, w.mean, w.normalize, w.name, w.bias, apply_to=apply_to)


def test_flow_matches_refined_index_and_reloads_in_new_process(refiner_files, tmp_path):
    from simskip_faiss.integrations.sentence_transformers import append_refiner

    raw_docs, raw_queries = base_model().encode(DOCS), base_model().encode(QUERIES)
    cases = {"mlp-both": refiner_files["both"], "mlp-queries": refiner_files["queries"],
             "linear-both": linear_refiner(raw_docs, "both"), "linear-queries": linear_refiner(raw_docs, "queries")}
    wants = {}
    for name, refiner in cases.items():
        r = refiner if isinstance(refiner, sf.BaseRefiner) else sf.Refiner.load(refiner)
        want = reference_ids(r, raw_docs, raw_queries)
        model = append_refiner(base_model(), refiner)
        docs, queries = model.encode_document(DOCS), model.encode_query(QUERIES)
        np.testing.assert_allclose(queries, r.transform(raw_queries), atol=2e-6)
        if r.apply_to == "queries":
            np.testing.assert_array_equal(docs, raw_docs)  # the document route is raw
            with pytest.raises(ValueError, match="Could not determine route"):  # plain encode() names no side
                model.encode(QUERIES)
        else:
            np.testing.assert_allclose(docs, r.transform(raw_docs), atol=2e-6)
        assert search(docs, queries) == want, name
        model.save(str(tmp_path / name))
        np.save(tmp_path / f"{name}.npy", docs)
        wants[name] = want
    assert wants["mlp-both"] != wants["mlp-queries"]
    # linear refiners are built-in modules only: nothing of this package in the saved model
    for name in ("linear-both", "linear-queries"):
        assert "simskip" not in (tmp_path / name / "modules.json").read_text()
    cases = [{"path": str(tmp_path / name), "docs": str(tmp_path / f"{name}.npy")} for name in wants]
    assert in_new_process("test_integrations_sentence_transformers", "reload_all", cases=cases) == list(wants.values())


def test_linear_refiner_reloads_with_plain_sentence_transformer(tmp_path):
    from sentence_transformers import SentenceTransformer

    from simskip_faiss.integrations.sentence_transformers import append_refiner

    raw = base_model().encode(DOCS)
    lin = linear_refiner(raw, "both")
    append_refiner(base_model(), lin).save(str(tmp_path / "m"))
    reloaded = SentenceTransformer(str(tmp_path / "m"), device="cpu")  # no trust_remote_code, no helper
    np.testing.assert_allclose(reloaded.encode(DOCS), lin.transform(raw), atol=2e-6)


def test_reload_refuses_missing_or_different_refiner(refiner_files, tmp_path):
    from sentence_transformers import SentenceTransformer

    from simskip_faiss.integrations.sentence_transformers import append_refiner, load_model

    append_refiner(base_model(), refiner_files["queries"]).save(str(tmp_path / "m"))
    onnx_files = list((tmp_path / "m").rglob("refiner.onnx"))
    assert len(onnx_files) == 1
    config = json.loads((onnx_files[0].parent / "config.json").read_text())
    assert config["sha256"] == sf.Refiner.load(refiner_files["queries"]).sha256 and config["apply_to"] == "queries"
    with pytest.raises(ValueError, match="trust_remote_code"):  # sentence-transformers' own rule, documented
        SentenceTransformer(str(tmp_path / "m"), device="cpu")
    shutil.copy(refiner_files["other"], onnx_files[0])
    with pytest.raises(RefinerMismatchError, match="different refiners are not comparable"):
        load_model(tmp_path / "m", device="cpu")
    onnx_files[0].unlink()
    with pytest.raises(MissingRefinerError, match="refiner.onnx is missing"):
        load_model(tmp_path / "m", device="cpu")
