"""Reliability: one input contract on every path, no crash, no silent corruption, thread safety."""
from __future__ import annotations

import numpy as np
import pytest

from simskip_faiss import IdentityRefiner, LinearRefiner, RefinedIndex, Refiner
from simskip_faiss import checks
from simskip_faiss.cli import main


@pytest.fixture()
def refiner(onnx_path):
    return Refiner.load(onnx_path[0])


def _vector_paths():
    """Every entry point that takes vectors, as f(x) -> the float32 array it accepted."""
    from simskip_faiss.datasets import load_user

    def index_add(x, chunk=1):
        idx = RefinedIndex(IdentityRefiner(x.shape[1]), "Flat", "l2", chunk_size=chunk)
        idx.add(x)
        return idx.reconstruct_n()

    paths = {"RefinedIndex.add (chunked)": index_add,
             "RefinedIndex.add (one block)": lambda x: index_add(x, chunk=1 << 20),
             "RefinedIndex.search": lambda x: (RefinedIndex(IdentityRefiner(x.shape[1]), "Flat", "l2"),
                                               None)[0].refine_queries(x),
             "Refiner.transform": lambda x: IdentityRefiner(x.shape[1]).transform(x),
             "load_user": lambda x: load_user(x).corpus}
    try:
        from simskip_faiss.training import _corpus

        paths["training"] = lambda x: np.asarray(_corpus(x), dtype=np.float32)
    except ImportError:  # torch absent
        pass
    try:
        from simskip_faiss.milvus import checked_rows

        paths["milvus (array)"] = lambda x: checked_rows(np.arange(len(x)), x, x.shape[1])[1]
        paths["milvus (rows)"] = lambda x: checked_rows(np.arange(len(x)), [list(r) for r in x], x.shape[1])[1]
    except ImportError:
        pass
    return paths


PATHS = _vector_paths()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_vector_contract_everywhere(path):
    """10.4: integers are accepted (as FAISS does) and cast to float32; bool is refused; same rule on every path."""
    f = PATHS[path]
    x = np.arange(6 * 8, dtype=np.int32).reshape(6, 8) - 20
    np.testing.assert_array_equal(f(x), x.astype(np.float32))
    if "rows" not in path:  # a list of Python rows has no dtype to refuse
        with pytest.raises((TypeError, ValueError), match="dtype bool"):
            f(np.ones((6, 8), bool))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_finite_after_the_float32_cast_on_every_path(path):
    """11.4: 1e39 is a finite float64 but Inf in float32: refused everywhere, naming the row."""
    x = np.ones((6, 8))
    x[4, 3] = 1e39
    with pytest.raises(ValueError, match=r"NaN or Inf") as e:
        PATHS[path](x)
    assert "row 4" in str(e.value) or "4" in str(getattr(e.value, "rows", ""))


def test_cli_build_refuses_values_beyond_float32(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((50, 8))
    x[45, 0] = -3e39
    np.save(tmp_path / "c.npy", x)
    assert main(["build", "identity", str(tmp_path / "c.npy"), "-o", str(tmp_path / "b"), "--metric", "l2", "-q"]) != 0
    assert "row 45" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_load_npy_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        checks.load_npy(tmp_path / "nope.npy", "corpus")
    (tmp_path / "t.npy").write_text("hello")
    with pytest.raises(ValueError, match="not a .npy file"):
        checks.load_npy(tmp_path / "t.npy", "corpus")
    np.savez(tmp_path / "z.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="npz"):
        checks.load_npy(tmp_path / "z.npz", "corpus")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        checks.load_npy(tmp_path / "o.npy", "corpus")
    np.save(tmp_path / "ok.npy", np.ones((3, 2), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-5])
    with pytest.raises(ValueError, match="cut.npy"):
        checks.load_npy(tmp_path / "cut.npy", "corpus", mmap=False)


def test_file_sha256_and_l2_normalize_agree_with_references(tmp_path):
    import hashlib

    data = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "f").write_bytes(data)
    assert checks.file_sha256(tmp_path / "f", chunk=999) == hashlib.sha256(data).hexdigest()
    assert checks.file_sha256(tmp_path / "f", 100, 2000, chunk=7) == hashlib.sha256(data[100:2100]).hexdigest()
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(checks.l2_normalize(x), [[0.6, 0.8], [0, 0]], rtol=1e-7)
    assert checks.l2_normalize(x).dtype == np.float32
