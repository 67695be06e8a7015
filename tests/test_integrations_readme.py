"""The README's framework snippets run as written, with a symmetric and a query-only refiner (no downloads)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from test_integrations import mlp_refiner_bytes

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Integrations"
NEEDS = {"LangChain": ("langchain_core", "langchain_community"), "LlamaIndex": ("llama_index.core",
         "llama_index.vector_stores.faiss"), "Chroma": ("chromadb",), "sentence-transformers": ("sentence_transformers",)}
SHELL_ONLY = ("Spark", "Milvus")  # command lines, parsed by tests/test_cli.py::test_readme_command_lines_parse


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


def test_readme_has_one_section_per_integration():
    assert sorted(subsections()) == sorted([*NEEDS, *SHELL_ONLY])
    assert sorted(snippets()) == sorted(NEEDS)


@pytest.mark.parametrize("apply_to", ["both", "queries"])
@pytest.mark.parametrize("framework", sorted(NEEDS))
def test_snippet_runs(framework, apply_to, tmp_path, monkeypatch):
    for module in NEEDS[framework]:
        pytest.importorskip(module)
    (tmp_path / "refiner.onnx").write_bytes(mlp_refiner_bytes(d=384, apply_to=apply_to))
    monkeypatch.chdir(tmp_path)
    if framework == "Chroma":  # Chroma caches clients by path string; "chroma" is relative, the cwd changes
        from chromadb.api.client import SharedSystemClient

        SharedSystemClient.clear_system_cache()
    env: dict = {}
    exec(compile(snippets()[framework], f"README.md ({framework})", "exec"), env)
    if framework == "LangChain":
        assert len(env["hits"]) == 2 and (tmp_path / "faiss_store" / "simskip_refiner.json").is_file()
        assert env["store"].embeddings.refiner.apply_to == apply_to  # reloaded with the stored refiner
    elif framework == "LlamaIndex":
        assert len(env["hits"]) == 2 and (tmp_path / "storage" / "simskip_refiner.json").is_file()
    elif framework == "Chroma":
        assert len(env["hits"]["ids"][0]) == 2
        assert env["docs"].configuration_json["embedding_function"]["config"]["apply_to"] == apply_to
    else:
        model, docs, queries = env["model"], env["doc_vectors"], env["query_vectors"]
        assert docs.shape == (3, 384) and queries.shape == (1, 384)
        assert np.allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)  # the refiner normalises
        texts = ["a cat sat on the mat", "dogs bark at night", "stock prices fell"]
        np.testing.assert_allclose(model.encode(texts), docs, atol=1e-6)  # plain encode() = the document route
        assert np.allclose(np.linalg.norm(docs, axis=1), 1, atol=1e-5) == (apply_to == "both")
