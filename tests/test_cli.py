"""The command line end to end, its errors, and the torch-free serving path."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from simskip_faiss.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, onnx_path, data):
    d = tmp_path_factory.mktemp("cli")
    x, _ = data
    np.save(d / "corpus.npy", x)
    np.save(d / "queries.npy", x[:25])
    return d


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_build_search_info(files, onnx_path, capsys):
    d = files
    assert run("build", onnx_path[0], d / "corpus.npy", "-o", d / "bundle", "--factory", "HNSW16", "-q") == 0
    assert run("search", d / "bundle", d / "queries.npy", "-k", "4", "-o", d / "res.npz", "--param", "efSearch=64") == 0
    res = np.load(d / "res.npz")
    assert res["I"].shape == (25, 4) and (res["I"][:, 0] == np.arange(25)).all()
    assert run("info", d / "bundle") == 0
    assert '"ntotal": 600' in capsys.readouterr().out


def test_train_from_npy(files, capsys):
    d = files
    assert run("train", d / "corpus.npy", "-o", d / "r.onnx", "--epochs", "1", "--hidden", "16", "--no-guard", "-q") == 0
    out = capsys.readouterr().out
    assert "parity max abs err" in out
    from simskip_faiss import Refiner

    assert Refiner.load(d / "r.onnx").metadata["config"]["hidden"] == 16


@pytest.mark.parametrize("argv, msg", [
    (["search", "{d}/nope", "{d}/queries.npy", "-o", "{d}/x.npz"], "bundle not found"),
    (["search", "{d}/bundle", "{d}/queries.npy", "-k", "0", "-o", "{d}/x.npz"], "k must be positive"),
    (["search", "{d}/bundle", "{d}/missing.npy", "-o", "{d}/x.npz"], "queries file not found"),
    (["build", "{d}/corpus.npy", "{d}/corpus.npy", "-o", "{d}/b2"], "not a valid ONNX model"),
    (["build", "{onnx}", "{d}/queries.npy", "-o", "{d}/b3", "--factory", "Bogus"], "FAISS could not build"),
    (["search", "{d}/bundle", "{onnx}", "-o", "{d}/x.npz"], "not a .npy file"),
])
def test_errors_are_one_line(files, onnx_path, capsys, argv, msg):
    d = files
    if not (d / "bundle").exists():
        run("build", onnx_path[0], d / "corpus.npy", "-o", d / "bundle", "-q")
    capsys.readouterr()
    assert run(*[a.format(d=d, onnx=onnx_path[0]) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simskip-faiss: error:") and msg in err and "\n" not in err


def test_every_command_has_help():
    for cmd in ("train", "build", "search", "info", "eval", "run"):
        out = subprocess.run([sys.executable, "-m", "simskip_faiss.cli", cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, cmd


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, Block())
""")


def test_serving_path_never_imports_torch(files, onnx_path):
    """Refiner, RefinedIndex, bundles, evaluation and the search/eval CLI run where torch cannot be imported."""
    d = files
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        import simskip_faiss as sf
        from simskip_faiss.evaluation import EvalConfig, evaluate
        from simskip_faiss.datasets import make_synthetic
        from simskip_faiss.cli import main
        x = np.load({str(d / 'corpus.npy')!r})
        ref = sf.Refiner.load({str(onnx_path[0])!r})
        idx = sf.RefinedIndex(ref, "HNSW16", "ip"); idx.add(x); idx.save({str(d / 'tf_bundle')!r})
        back = sf.RefinedIndex.load({str(d / 'tf_bundle')!r})
        assert (back.search(x[:5], 3)[1] == idx.search(x[:5], 3)[1]).all()
        evaluate(make_synthetic(n=300, d=16, n_queries=50), {{"r": ref}}, EvalConfig(progress=False, bootstrap=50))
        assert main(["search", {str(d / 'tf_bundle')!r}, {str(d / 'queries.npy')!r}, "-o", {str(d / 'tf.npz')!r}]) == 0
        assert "torch" not in sys.modules
        try:
            import torch
        except ImportError:
            print("blocked-ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "blocked-ok" in out.stdout


def test_train_int8_and_quantize(files, onnx_path, capsys):
    from simskip_faiss import Refiner

    d = files
    assert run("train", d / "corpus.npy", "-o", d / "r8.onnx", "--epochs", "1", "--hidden", "16", "--no-guard",
               "--precision", "int8", "-q") == 0
    assert "int8" in capsys.readouterr().out and Refiner.load(d / "r8.onnx").precision == "int8"
    assert run("quantize", onnx_path[0], "-o", d / "q16.onnx", "--precision", "fp16") == 0
    q, src = Refiner.load(d / "q16.onnx"), Refiner.load(onnx_path[0])
    assert q.precision == "fp16" and q.metadata["quantized_from"] == src.sha256
    x = np.load(d / "corpus.npy")
    assert np.abs(q.transform(x) - src.transform(x)).max() <= q.metadata["parity_tolerance"]
    capsys.readouterr()
    assert run("quantize", d / "r8.onnx", "-o", d / "again.onnx") == 2  # already int8
    err = capsys.readouterr().err
    assert "already int8" in err and len(err.strip().splitlines()) == 1
    assert not (d / "again.onnx").exists()
