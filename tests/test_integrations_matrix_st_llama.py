"""No silent loss: every path a user takes to a model or store saved through the package either refines exactly
as `RefinedIndex` does or raises with a one-line message. sentence-transformers and LlamaIndex.

Each cell runs in a new process (`in_new_process`) and comes back as {"ids": ...} (searched with the vectors
that path returns) or {"raises": ..., "lines": ...}. `check_cell` accepts a cell only when its ids equal
`RefinedIndex`'s or it raised with a one-line message; every refiner here searches differently from the raw
vectors, so a silent raw search fails (shown by `test_the_matrix_catches_a_raw_search`).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import (DOCS, K, QUERIES, expected_ids, fake_embed, in_new_process)  # noqa: E402,F401

MODULE = "test_integrations_matrix_st_llama"


def outcome(fn) -> dict:
    try:
        return {"ids": fn()}
    except Exception as e:  # noqa: BLE001 - the cell records what was raised
        msg = str(e).strip()
        return {"raises": f"{type(e).__name__}: {msg}", "lines": len(msg.splitlines())}


def check_cell(name: str, cell: dict, want: list, raw: list) -> None:
    assert want != raw, f"{name}: the refiner searches like the raw vectors; this cell could not catch a raw search"
    if "ids" in cell:
        assert cell["ids"] != raw or want == raw, f"{name}: a silent RAW search"
        assert cell["ids"] == want, f"{name}: ids differ from RefinedIndex's"
    elif not cell["raises"].endswith(ST_TRUST):
        assert cell["lines"] == 1, f"{name}: raised with a message of {cell['lines']} lines: {cell['raises']}"


# sentence-transformers' own refusal to import a class outside its namespace (the package's SimSkipModule) without
# trust_remote_code=True: two lines (where to inspect the model, then this one), the only multi-line refusal here
ST_TRUST = "Please pass the argument `trust_remote_code=True` to allow custom code to be run."


def faiss_ids(docs, queries) -> list[list[int]]:
    import faiss

    docs, queries = np.asarray(docs, dtype=np.float32), np.asarray(queries, dtype=np.float32)
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    return index.search(queries, K)[1].tolist()


# -- sentence-transformers --------------------------------------------------------------------------------
def st_base():
    """The tiny local StaticEmbedding model, with (blank) "query" / "document" prompts so prompt_name= is a path."""
    from test_integrations_sentence_transformers import base_model

    model = base_model()
    model.prompts = {"query": "", "document": ""}
    return model


# each use: (document vectors, query vectors) from one model
ST_USES = {
    "encode()": lambda m: (m.encode(DOCS), m.encode(QUERIES)),
    "encode_document/encode_query": lambda m: (m.encode_document(DOCS), m.encode_query(QUERIES)),
    "encode(task=)": lambda m: (m.encode(DOCS, task="document"), m.encode(QUERIES, task="query")),
    "encode(prompt_name=)": lambda m: (m.encode(DOCS, prompt_name="document"), m.encode(QUERIES, prompt_name="query")),
}


def st_model_cells(model, prefix: str) -> dict:
    return {f"{prefix} | {use}": outcome(lambda u=fn: faiss_ids(*u(model))) for use, fn in ST_USES.items()}


def st_saved_cells(path: str) -> dict:
    """Runs in a new process: every way to open the saved model, and every way to encode with it."""
    from sentence_transformers import SentenceTransformer

    from simskip_faiss.integrations.sentence_transformers import load_model

    cells = {}
    opens = {"load_model(path)": lambda: load_model(path, device="cpu"),
             "SentenceTransformer(path, trust_remote_code=True)":
                 lambda: SentenceTransformer(path, device="cpu", trust_remote_code=True),
             "SentenceTransformer(path)": lambda: SentenceTransformer(path, device="cpu")}
    for name, open_ in opens.items():
        try:
            model = open_()
        except Exception:  # noqa: BLE001
            cells.update({f"{name} | {use}": outcome(open_) for use in ST_USES})
            continue
        cells.update(st_model_cells(model, name))
    for trust in (False, True):
        from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

        def chroma(trust=trust):
            extra = {"trust_remote_code": True} if trust else {}
            SentenceTransformerEmbeddingFunction.models.pop(path, None)  # its model cache is keyed by name only
            ef = SentenceTransformerEmbeddingFunction(model_name=path, device="cpu", **extra)
            return faiss_ids(ef(DOCS), ef(QUERIES))

        def langchain(trust=trust):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # langchain_community's deprecation notices
                from langchain_community.embeddings import HuggingFaceEmbeddings

                emb = HuggingFaceEmbeddings(model_name=path, model_kwargs={"device": "cpu", "trust_remote_code": trust})
            return faiss_ids(emb.embed_documents(DOCS), [emb.embed_query(q) for q in QUERIES])

        flag = ", trust_remote_code=True" if trust else ""
        cells[f"chroma SentenceTransformerEmbeddingFunction(path{flag})"] = outcome(chroma)
        cells[f"langchain HuggingFaceEmbeddings(path{flag})"] = outcome(langchain)
    return cells


def st_all(cases: list[dict]) -> list:
    return [st_saved_cells(**c) for c in cases]


def linear(apply_to: str):
    import simskip_faiss as sf

    raw = st_base().encode(DOCS)
    w = sf.LinearRefiner.whitening(raw)
    return sf.LinearRefiner(w.A, w.mean, w.normalize, w.name, w.bias, apply_to=apply_to)


def st_reference(refiner) -> tuple[list, list]:
    """RefinedIndex's ids on the base model's vectors, and the raw search's."""
    import simskip_faiss as sf

    base = st_base()
    raw_docs, raw_queries = base.encode(DOCS), base.encode(QUERIES)
    index = sf.RefinedIndex(refiner, "Flat", metric="ip")
    index.add(raw_docs)
    return index.search(raw_queries, K)[1].tolist(), faiss_ids(raw_docs, raw_queries)


# what each cell must be, for the design in sentence_transformers.py's docstring ("ids" or "raises")
def st_expected(kind: str, apply_to: str, cell: str) -> str:
    if cell.startswith(("SentenceTransformer(path) |", "chroma SentenceTransformerEmbeddingFunction(path)",
                        "langchain HuggingFaceEmbeddings(path)")) and kind == "onnx":
        return "raises"  # sentence-transformers imports the package's module class only with trust_remote_code
    if apply_to == "queries" and not any(s in cell for s in ("encode_document/encode_query", "encode(task=)")):
        return "raises"  # a call that does not say whether it encodes queries or documents
    return "ids"


@pytest.fixture(scope="module")
def st_matrix(refiner_files, tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("chromadb")
    pytest.importorskip("langchain_community")
    import simskip_faiss as sf
    from simskip_faiss.integrations.sentence_transformers import append_refiner

    tmp = tmp_path_factory.mktemp("st")
    refiners = {("onnx", "both"): sf.Refiner.load(refiner_files["both"]),
                ("onnx", "queries"): sf.Refiner.load(refiner_files["queries"]),
                ("linear", "both"): linear("both"), ("linear", "queries"): linear("queries")}
    cells, refs = {}, {}
    for (kind, apply_to), refiner in refiners.items():
        model = append_refiner(st_base(), refiner)
        cells[kind, apply_to] = st_model_cells(model, "append_refiner(model) in memory")
        model.save(str(tmp / f"{kind}-{apply_to}"))
        refs[kind, apply_to] = st_reference(refiner)
    saved = in_new_process(MODULE, "st_all", cases=[{"path": str(tmp / f"{k}-{a}")} for k, a in refiners])
    for key, more in zip(refiners, saved):
        cells[key].update(more)
    return cells, refs


def test_sentence_transformers_every_path_refines_or_raises(st_matrix):
    cells, refs = st_matrix
    table = []
    for (kind, apply_to), row in cells.items():
        want, raw = refs[kind, apply_to]
        assert len(row) == 4 * 4 + 4, sorted(row)  # in memory + 3 opens, x 4 encode paths; 4 framework wrappers
        for name, cell in row.items():
            label = f"{kind}/{apply_to}: {name}"
            check_cell(label, cell, want, raw)
            got = "ids" if "ids" in cell else "raises"
            assert got == st_expected(kind, apply_to, name), f"{label}: {cell}"
            table.append(f"{label} -> {got}" + (f" ({cell['raises'][:120]})" if got == "raises" else ""))
    print("\n".join(table))


def test_query_only_model_raises_on_calls_naming_no_side(st_matrix):
    """The refusal is sentence-transformers' Router error: one line, naming the `task` to pass."""
    cells, _ = st_matrix
    for kind in ("onnx", "linear"):
        for name in ("load_model(path) | encode()", "SentenceTransformer(path, trust_remote_code=True) | "
                     "encode(prompt_name=)", "chroma SentenceTransformerEmbeddingFunction(path, trust_remote_code=True)",
                     "langchain HuggingFaceEmbeddings(path, trust_remote_code=True)"):
            msg = cells[kind, "queries"][name]["raises"]
            assert "Could not determine route" in msg and "`task`" in msg, (kind, name, msg)


# -- an old-release model (Router with a raw default route): a raw cell is caught, and refused now -----------
def old_release_cells(path: str, trust: bool) -> dict:
    """Runs in a new process."""
    from sentence_transformers import SentenceTransformer

    from simskip_faiss.integrations.sentence_transformers import load_model

    model = load_model(path, device="cpu")
    model.save(path + "-resaved")
    return {**st_model_cells(SentenceTransformer(path, device="cpu", trust_remote_code=trust), "plain"),
            **st_model_cells(model, "load_model"),
            **st_model_cells(SentenceTransformer(path + "-resaved", device="cpu", trust_remote_code=trust), "resaved")}


@pytest.mark.parametrize("kind", ["onnx", "linear"])
def test_the_matrix_catches_a_raw_search(kind, refiner_files, tmp_path):
    """A model saved as the previous release saved a query-only refiner (Router, default route "document"):
    plain encode() searched raw. `check_cell` fails on such a cell. Reopened now, plain encode() raises: through
    load_model always, and however it is loaded for an ONNX refiner (its module drops the raw default); a linear
    one opened by plain SentenceTransformer runs nothing of this package, so it still searches raw there."""
    pytest.importorskip("sentence_transformers")
    import simskip_faiss as sf
    from sentence_transformers.sentence_transformer.modules import Router

    from simskip_faiss.integrations.sentence_transformers import refiner_modules

    refiner = sf.Refiner.load(refiner_files["queries"]) if kind == "onnx" else linear("queries")
    model = st_base()
    model.append(Router({"query": refiner_modules(refiner), "document": []}, default_route="document"))
    model.save(str(tmp_path / "old"))
    want, raw = st_reference(refiner)
    raw_cell = {"ids": raw}
    with pytest.raises(AssertionError, match="silent RAW search"):
        check_cell("raw", raw_cell, want, raw)
    cells = in_new_process(MODULE, "old_release_cells", path=str(tmp_path / "old"), trust=kind == "onnx")
    assert "Could not determine route" in cells["load_model | encode()"]["raises"]
    assert cells["load_model | encode_document/encode_query"]["ids"] == want
    assert "Could not determine route" in cells["resaved | encode()"]["raises"]  # saved again: fixed on disk
    if kind == "onnx":
        assert "Could not determine route" in cells["plain | encode()"]["raises"]
    else:
        assert cells["plain | encode()"] == raw_cell  # the limit: files of an earlier release, no code of ours
    for name, cell in cells.items():
        if not (kind == "linear" and name.startswith("plain")):
            check_cell(name, cell, want, raw)


# -- LlamaIndex -------------------------------------------------------------------------------------------
def li_cells(path: str, refiner: str) -> dict:
    """Runs in a new process: the package's loader and LlamaIndex's own, on a dir written by `persist`."""
    from llama_index.core import StorageContext, load_index_from_storage
    from llama_index.vector_stores.faiss import FaissVectorStore

    from test_integrations_llama_index import FakeEmbedding, search
    from simskip_faiss.integrations.llama_index import RefinedEmbedding, load_index

    def framework(vector_store: bool, embed):
        store = {"vector_store": FaissVectorStore.from_persist_dir(path)} if vector_store else {}
        return search(load_index_from_storage(StorageContext.from_defaults(persist_dir=path, **store),
                                              embed_model=embed()))

    return {
        "load_index(dir, base)": outcome(lambda: search(load_index(path, FakeEmbedding()))),
        "load_index(dir, RefinedEmbedding)": outcome(
            lambda: search(load_index(path, RefinedEmbedding(FakeEmbedding(), refiner)))),
        "load_index_from_storage(vector_store=FaissVectorStore.from_persist_dir, base)":
            outcome(lambda: framework(True, FakeEmbedding)),
        "load_index_from_storage(vector_store=FaissVectorStore.from_persist_dir, RefinedEmbedding)":
            outcome(lambda: framework(True, lambda: RefinedEmbedding(FakeEmbedding(), refiner))),
        "load_index_from_storage(persist_dir only, base)": outcome(lambda: framework(False, FakeEmbedding)),
    }


def li_all(cases: list[dict]) -> list:
    return [li_cells(**c) for c in cases]


def test_llama_index_every_path_refines_or_raises(refiner_files, tmp_path):
    pytest.importorskip("llama_index.core")
    pytest.importorskip("llama_index.vector_stores.faiss")
    from test_integrations_llama_index import build
    from simskip_faiss.integrations.llama_index import persist

    modes = ("both", "queries")
    for mode in modes:
        persist(build(refiner_files[mode]), tmp_path / mode)
    got = in_new_process(MODULE, "li_all", cases=[{"path": str(tmp_path / m), "refiner": str(refiner_files[m])}
                                                  for m in modes])
    raw = faiss_ids(fake_embed(DOCS), fake_embed(QUERIES))
    table = []
    for mode, row in zip(modes, got):
        want = expected_ids(refiner_files[mode])
        for name, cell in row.items():
            check_cell(f"{mode}: {name}", cell, want, raw)
            assert ("ids" in cell) == name.startswith("load_index("), (mode, name, cell)
            table.append(f"{mode}: {name} -> " + (json.dumps(cell["raises"][:140]) if "raises" in cell else "ids"))
    print("\n".join(table))


def test_llama_index_store_of_an_earlier_release_still_opens_checked(refiner_files, tmp_path):
    """A dir persisted before the vector store was renamed (default__vector_store.json): `load_index` opens it
    with the refiner record checked; LlamaIndex's own loader opens it raw (the catch this matrix makes)."""
    pytest.importorskip("llama_index.vector_stores.faiss")
    from test_integrations_llama_index import build
    from simskip_faiss.integrations.base import write_sidecar

    index = build(refiner_files["queries"])
    index.storage_context.persist(persist_dir=str(tmp_path / "old"))  # the earlier release's layout
    write_sidecar(tmp_path / "old", index._embed_model.refiner, folder=True)
    cells = in_new_process(MODULE, "li_cells", path=str(tmp_path / "old"), refiner=str(refiner_files["queries"]))
    want, raw = expected_ids(refiner_files["queries"]), faiss_ids(fake_embed(DOCS), fake_embed(QUERIES))
    assert cells["load_index(dir, base)"]["ids"] == want
    assert cells["load_index(dir, RefinedEmbedding)"]["ids"] == want
    old = cells["load_index_from_storage(vector_store=FaissVectorStore.from_persist_dir, base)"]
    with pytest.raises(AssertionError, match="silent RAW search"):
        check_cell("old layout, framework loader", old, want, raw)
