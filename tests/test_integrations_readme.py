"""The README's framework snippets run (no downloads): LangChain, LlamaIndex and Chroma start from an existing
store, train on it and wrap it; sentence-transformers runs with a symmetric and a query-only refiner.

The store snippets run as written except for training length: `sf.TrainConfig` gets 20 steps with a fixed lr and
temperature added (the README's own settings kept), so the three trainings take seconds. They train with document
updates (the default with pairs) and write them into the store (`stores.apply_updates`). The stand-in models' query
and document vectors are unrelated hashes, so the guard learns no updates from them: `sf.fit` is wrapped to attach
known ones (UPDATED rows) to its result, which the snippet exports, applies and saves as written. The stored vectors
are checked against `RefinedIndex`'s rule with the exported refiner (updates by row id), every other row kept."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from helpers import mlp_refiner_bytes

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Integrations"
TRAIN = ("torch", "onnx")  # sf.fit and export
NEEDS = {"LangChain": ("langchain_core", "langchain_community", *TRAIN), "LlamaIndex": ("llama_index.core",
         "llama_index.vector_stores.faiss", *TRAIN), "Chroma": ("chromadb", *TRAIN),
         "sentence-transformers": ("sentence_transformers",)}
STORES = ("LangChain", "LlamaIndex", "Chroma")  # the snippet trains its own refiner from the store
FAST = dict(max_steps=20, eval_every=10, lr=1e-3, temperature=0.05, progress=False, threads=1)
CASES = [(f, None) for f in STORES] + [("sentence-transformers", a) for a in ("both", "queries")]
UPDATED = np.array([2, 7, 30, 41])  # corpus rows given an update when fit learns none
SHELL_ONLY = ("Spark and Milvus",)  # command lines, parsed by tests/test_cli.py::test_readme_command_lines_parse


def subsections() -> dict[str, str]:
    text = README.read_text()
    assert f"\n{SECTION}\n" in text, "README lost its integrations section"
    section = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    return {part.splitlines()[0].strip(): part for part in section.split("\n### ")[1:]}


def snippets() -> dict[str, str]:
    out = {}
    for title, part in subsections().items():
        blocks = re.findall(r"```python\n(.*?)```", part, re.S)
        if title in SHELL_ONLY:
            assert not blocks and re.search(r"```bash\n", part), f"README {title}: expected shell commands only"
            continue
        assert len(blocks) == 1, f"README {title}: expected one runnable snippet, found {len(blocks)}"
        out[title] = blocks[0]
    return out


def with_updates(fit):
    """`fit`, its result given document updates of the UPDATED rows when it learned none (bound to those rows)."""
    from simskip_faiss.refiners import DocumentUpdates
    from simskip_faiss.refiners.documents import sketch

    def fitted(data, config=None):
        result = fit(data, config)
        if result.documents is None:
            x = data.corpus[UPDATED]
            delta = 0.5 * np.random.default_rng(0).standard_normal(x.shape) * np.linalg.norm(x, axis=1, keepdims=True)
            result.documents = DocumentUpdates(UPDATED, delta.astype(np.float32), sketch(x), {"n_corpus": len(data.corpus)})
        return result
    return fitted


def stored_vectors(framework: str, env: dict) -> np.ndarray:
    """The vectors the snippet's store holds now, in its corpus's row order (read back by the framework)."""
    if framework == "LangChain":
        return env["store"].index.reconstruct_n(0, 50)
    if framework == "LlamaIndex":
        return env["index"].vector_store.client.reconstruct_n(0, 50)
    got = env["coll"].get(ids=env["corpus"].ids, include=["embeddings"])
    return np.asarray(got["embeddings"], np.float32)


def test_readme_has_one_section_per_integration():
    assert sorted(subsections()) == sorted([*NEEDS, *SHELL_ONLY])
    assert sorted(snippets()) == sorted(NEEDS)


@pytest.mark.parametrize("framework, apply_to", CASES)
def test_snippet_runs(framework, apply_to, tmp_path, monkeypatch):
    for module in NEEDS[framework]:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    if framework in STORES:
        import simskip_faiss as sf

        configs = []

        def fast_config(**given):
            configs.append(given)
            return sf.TrainConfig.__wrapped__(**{**given, **FAST})

        fast_config.__wrapped__ = sf.TrainConfig
        monkeypatch.setattr(sf, "TrainConfig", fast_config)
        monkeypatch.setattr(sf, "fit", with_updates(sf.fit))
    else:
        (tmp_path / "refiner.onnx").write_bytes(mlp_refiner_bytes(d=384, apply_to=apply_to))
    if framework == "Chroma":  # Chroma caches clients by path string; "chroma" is relative, the cwd changes
        from chromadb.api.client import SharedSystemClient

        SharedSystemClient.clear_system_cache()
    exec(compile(snippets()[framework], f"README.md ({framework})", "exec"), env)
    if framework in STORES:
        assert configs and all("documents" not in c and c.get("metric") in ("ip", "l2") for c in configs)
        corpus = env["corpus"]
        assert corpus.vectors.shape == (50, 384) and len(env["pairs"]) == 50
        full = sf.Refiner.load(tmp_path / "refiner.onnx")  # with the updates the snippet wrote into the store
        assert env["refiner"].documents is None and env["refiner"].sha256 == full.sha256
        stored = stored_vectors(framework, env)
        want = full.refine_documents(corpus.vectors, ids=np.arange(50))  # RefinedIndex's rule: raw + update by id
        np.testing.assert_allclose(stored, want, atol=2e-6)
        moved = full.documents.ids
        assert len(moved)
        keep = np.setdiff1d(np.arange(50), moved)
        np.testing.assert_array_equal(stored[keep], corpus.vectors[keep])  # the other rows bit for bit
        np.testing.assert_array_equal(np.flatnonzero(np.any(stored != corpus.vectors, axis=1)), moved)
    if framework == "LangChain":
        store = env["store"]
        assert len(env["hits"]) == 2 and (tmp_path / "faiss_store" / "simskip_refiner.json").is_file()
        assert store.embeddings.refiner.apply_to == "queries"  # reloaded with the trained, stored refiner
        assert corpus.ids == [f"doc{i}" for i in range(50)] and corpus.metric == "l2"  # LangChain's default
        raw = np.asarray(env["model"].embed_documents([f"note {i}" for i in range(50)]), np.float32)
        np.testing.assert_array_equal(corpus.vectors, raw)  # read before the updates were written
    elif framework == "LlamaIndex":
        assert len(env["hits"]) == 2 and (tmp_path / "storage" / "simskip_refiner.json").is_file()
        assert env["index"]._embed_model.refiner.apply_to == "queries"
        assert corpus.ids == [f"node{i}" for i in range(50)] and corpus.metric == "ip"  # IndexFlatIP
    elif framework == "Chroma":
        docs = env["docs"]
        assert len(env["hits"]["ids"][0]) == 2 and docs.count() == 50
        assert docs.configuration_json["embedding_function"]["config"]["apply_to"] == "queries"
        copied = docs.get(ids=corpus.ids, include=["embeddings"])  # the copy holds the updated vectors
        np.testing.assert_array_equal(np.asarray(copied["embeddings"], np.float32), stored_vectors(framework, env))
    elif framework == "sentence-transformers":
        model, docs, queries = env["model"], env["doc_vectors"], env["query_vectors"]
        assert docs.shape == (3, 384) and queries.shape == (1, 384)
        assert np.allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)  # the refiner normalises
        texts = ["a cat sat on the mat", "dogs bark at night", "stock prices fell"]
        if apply_to == "both":
            np.testing.assert_allclose(model.encode(texts), docs, atol=1e-6)  # plain encode() = the document route
        else:
            with pytest.raises(ValueError, match="route"):  # query-only: no default route, not raw query vectors
                model.encode(texts)
        assert np.allclose(np.linalg.norm(docs, axis=1), 1, atol=1e-5) == (apply_to == "both")
