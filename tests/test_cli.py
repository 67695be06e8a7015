"""The command line end to end, its errors, and the torch-free serving path."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from simskip_faiss.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("cli")
    x, _ = data
    np.save(d / "corpus.npy", x)
    np.save(d / "queries.npy", x[:25])
    return d


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_build_search_info(files, serving_onnx, capsys):
    d = files
    assert run("build", serving_onnx[0], d / "corpus.npy", "-o", d / "bundle", "--factory", "HNSW16", "-q") == 0
    assert run("search", d / "bundle", d / "queries.npy", "-k", "4", "-o", d / "res.npz", "--param", "efSearch=64") == 0
    res = np.load(d / "res.npz")
    assert res["I"].shape == (25, 4) and (res["I"][:, 0] == np.arange(25)).all()
    capsys.readouterr()
    assert run("info", d / "bundle", "--json") == 0
    assert '"ntotal": 600' in capsys.readouterr().out


def test_info_prints_a_short_summary_and_json_only_when_asked(files, serving_onnx, capsys):
    """`info` says what matters in a few lines; the whole manifest or metadata only with --json."""
    import json

    d = files
    assert run("build", serving_onnx[0], d / "corpus.npy", "-o", d / "bundle-info", "--factory", "Flat", "-q") == 0
    capsys.readouterr()
    assert run("info", d / "bundle-info") == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) <= 15, out
    assert not out.lstrip().startswith("{")
    for want in ("bundle", "d_in 16", "d_out 16", "normalize", "apply_to both", "alpha", "precision fp32",
                 "ntotal 600", "factory Flat", "metric ip"):
        assert want in out, (want, out)
    assert run("info", serving_onnx[0]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) <= 15 and "refiner" in out and "d_in 16" in out, out
    assert run("info", serving_onnx[0], "--json") == 0
    assert json.loads(capsys.readouterr().out)["d_in"] == 16


def test_info_summary_names_the_guard_and_document_updates(tmp_path, capsys, monkeypatch):
    """The guard's alpha and the first sentence of its reason, the signals and the document updates are shown."""
    import simskip_faiss.refiners as refiner_module

    class Fake:
        sha256, d_in, d_out, normalize, apply_to = "ab" * 32, 8, 8, True, "query_only"
        metadata = {"alpha": 0.5, "precision": "int8", "signals": ["labels", "pairs"], "metric": "ip",
                    "guard": {"alpha": 0.5, "reason": "Kept alpha 0.5: it beat raw by 0.03. Details follow here."},
                    "documents": {"sha256": "cd" * 32, "n": 42, "d": 8, "file": "x.bin"}}

    monkeypatch.setattr(refiner_module.Refiner, "load", classmethod(lambda cls, p, **kw: Fake()))
    (tmp_path / "r.onnx").write_bytes(b"x")
    assert main(["info", str(tmp_path / "r.onnx")]) == 0
    out = capsys.readouterr().out
    for want in ("apply_to query_only", "alpha 0.5", "precision int8", "signals labels+pairs",
                 "Kept alpha 0.5: it beat raw by 0.03.", "42 document updates"):
        assert want in out, (want, out)
    assert "Details follow" not in out


def test_search_refuses_an_output_in_a_missing_directory(files, serving_onnx, capsys):
    """search writes one file: a missing parent directory is named, not created."""
    d = files
    assert run("build", serving_onnx[0], d / "corpus.npy", "-o", d / "bundle-s", "--factory", "Flat", "-q") == 0
    capsys.readouterr()
    missing = d / "nonexistent" / "dir"
    assert run("search", d / "bundle-s", d / "queries.npy", "-o", missing / "x.npz") == 2
    err = one_line_error(capsys)
    assert err.startswith("simskip-faiss: error:") and str(missing) in err and "does not exist" in err
    assert not (d / "nonexistent").exists()


def test_train_from_npy(files, capsys):
    pytest.importorskip("torch")  # trains
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
    (["train", "{d}/corpus.npy", "--queries", "{d}/queries.npy", "-o", "{d}/t.onnx"], "--queries without --qrels"),
])
def test_errors_are_one_line(files, serving_onnx, capsys, argv, msg):
    d = files
    if argv[0] == "train":
        pytest.importorskip("torch")  # the train command loads the train extra before it reads its arguments
    if not (d / "bundle").exists():
        run("build", serving_onnx[0], d / "corpus.npy", "-o", d / "bundle", "-q")
    capsys.readouterr()
    assert run(*[a.format(d=d, onnx=serving_onnx[0]) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simskip-faiss: error:") and msg in err and "\n" not in err


def test_every_command_has_help():
    """Every subcommand the parser defines (not a chosen six of eleven), and every option of each has help."""
    import argparse

    from simskip_faiss.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "build", "search", "info", "eval", "run", "quantize", "spark-refine", "spark-build",
            "milvus-ingest", "milvus-search"} <= set(sub.choices)
    for cmd, parser in sub.choices.items():
        out = subprocess.run([sys.executable, "-m", "simskip_faiss.cli", cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, cmd
        assert sub._choices_actions and any(a.dest == cmd and a.help for a in sub._choices_actions), cmd


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, Block())
""")


def test_serving_path_never_imports_torch(files, serving_onnx):
    """Refiner, RefinedIndex, bundles, evaluation and the search/eval CLI run where torch cannot be imported."""
    d = files
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        import simskip_faiss as sf
        from simskip_faiss.evaluation import EvalConfig, evaluate
        from simskip_faiss.datasets import make_synthetic
        from simskip_faiss.cli import main
        x = np.load({str(d / 'corpus.npy')!r})
        ref = sf.Refiner.load({str(serving_onnx[0])!r})
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


SERVING_TEST_FILES = ("test_index.py", "test_batching.py", "test_bundles.py", "test_refiner_interface.py",
                      "test_reliability.py", "test_cli.py")
# the tests of those files that train or export with torch; every other one must pass without it
NEED_TORCH = {"test_cli.py::test_train_from_npy", "test_cli.py::test_errors_are_one_line",
              "test_cli.py::test_train_checks_int8_on_the_corpus_and_falls_back_when_it_reorders_it",
              "test_cli.py::test_train_default_precision_falls_back_to_fp32_and_says_so",
              "test_cli.py::test_train_int8_and_quantize",
              "test_refiner_interface.py::test_moved_modules_keep_their_old_path_for_one_release",
              "test_reliability.py::test_train_takes_sparse_integer_labels_without_counting_every_value"}


@pytest.mark.slow
def test_serving_tests_run_without_torch(tmp_path):
    """The serving test files run where torch cannot be imported: only the tests in NEED_TORCH skip (cleanly,
    as a missing module), none fails or errors, and torch is never imported (~40 s: marked slow)."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = BLOCK_TORCH.replace('raise ImportError("torch is blocked in this test")',
                               'raise ModuleNotFoundError("No module named \'torch\' (blocked)", name=name)')
    assert "ModuleNotFoundError" in code  # what pytest.importorskip treats as a missing module
    code += textwrap.dedent(f"""
        import json, pytest
        class Record:
            seen = {{}}
            def pytest_runtest_logreport(self, report):
                if report.when == "call" or report.outcome != "passed":
                    self.seen.setdefault(report.outcome, []).append([report.nodeid, str(report.longrepr)[-300:]])
        rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", "--basetemp", {str(tmp_path / "t")!r},
                          *[{str(tests)!r} + "/" + f for f in {list(SERVING_TEST_FILES)!r}]], plugins=[Record()])
        print("RESULT " + json.dumps({{"rc": int(rc), "torch": "torch" in sys.modules, **Record.seen}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests.parent, timeout=900)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads(line[-1][len("RESULT "):])
    assert not res.get("failed") and res["rc"] == 0 and not res["torch"], res
    skipped = {}
    for node, why in res.get("skipped", []):
        file, _, name = node.partition("::")
        skipped[file.rsplit("/", 1)[-1] + "::" + name.split("[")[0]] = why
    assert set(skipped) <= NEED_TORCH, skipped
    assert all("No module named 'torch'" in why for why in skipped.values()), skipped
    assert len(res["passed"]) > 200


def test_train_checks_int8_on_the_corpus_and_falls_back_when_it_reorders_it(files, capsys, monkeypatch):
    """The CLI hands the corpus to export: int8 ships stamped with its neighbours' recall on it, and
    a recall below the bar ships fp32 with the reason printed."""
    pytest.importorskip("torch")  # trains
    from simskip_faiss import Refiner
    from simskip_faiss.training import export as export_module

    d = files
    n = len(np.load(d / "corpus.npy"))
    assert run("train", d / "corpus.npy", "-o", d / "a.onnx", "--epochs", "1", "--hidden", "16", "--no-guard", "-q") == 0
    m = Refiner.load(d / "a.onnx").metadata
    assert m["precision"] == "int8" and 0.99 <= m["sample_recall"] <= 1
    assert f"10-recall@10 vs fp32 on the corpus {m['sample_recall']:.4f}" in capsys.readouterr().out
    assert m["sample_queries"] + m["sample_corpus"] == min(n, export_module.SAMPLE_QUERIES + export_module.SAMPLE_CORPUS)
    monkeypatch.setattr(export_module, "SAMPLE_RECALL", 1.01)  # no file can keep more than all of its neighbours
    assert run("train", d / "corpus.npy", "-o", d / "b.onnx", "--epochs", "1", "--hidden", "16", "--no-guard", "-q") == 0
    out = capsys.readouterr().out
    assert "int8 kept 10-recall@10" in out and "exported fp32" in out
    assert Refiner.load(d / "b.onnx").precision == "fp32"


def test_train_default_precision_falls_back_to_fp32_and_says_so(files, capsys, monkeypatch):
    pytest.importorskip("torch")  # trains
    from simskip_faiss import Refiner
    from simskip_faiss.training.export import PARITY_TOLERANCE

    d = files
    monkeypatch.setitem(PARITY_TOLERANCE, "int8", 0.0)  # int8 cannot pass: the default must not fail after training
    assert run("train", d / "corpus.npy", "-o", d / "auto.onnx", "--epochs", "1", "--hidden", "16", "--no-guard", "-q") == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "int8 exceeded its parity tolerance" in out
    assert Refiner.load(d / "auto.onnx").precision == "fp32"
    assert run("train", d / "corpus.npy", "-o", d / "i8.onnx", "--epochs", "1", "--hidden", "16", "--no-guard",
               "--precision", "int8", "-q") == 2  # asked for explicitly: a one-line error, nothing written
    err = capsys.readouterr().err
    assert "export it at another precision" in err and len(err.strip().splitlines()) == 1
    assert not (d / "i8.onnx").exists()


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
    assert run("quantize", onnx_path[0], "-o", d / "q8.onnx", "--sample", d / "corpus.npy") == 0
    recall = Refiner.load(d / "q8.onnx").metadata["sample_recall"]
    assert f"10-recall@10 vs it on {d / 'corpus.npy'} {recall:.4f}" in capsys.readouterr().out
    assert run("quantize", d / "r8.onnx", "-o", d / "again.onnx") == 2  # already int8
    err = capsys.readouterr().err
    assert "already int8" in err and len(err.strip().splitlines()) == 1
    assert not (d / "again.onnx").exists()


# --------------------------------------------------------------------------- errors: one line, bugs not disguised
# These use the identity refiner, so they run without the train extra.


@pytest.fixture()
def small(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    return tmp_path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, msg", [
    ([], "required: command"),
    (["search"], "required: bundle, queries, -o/--output"),
    (["search", "b", "q.npy", "-o", "x.npz", "-k", "ten"], "argument -k: invalid int value: 'ten'"),
    (["build", "identity", "c.npy", "-o", "b", "--metric", "cosine"], "invalid choice: 'cosine'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_usage_errors_are_one_line(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith("simskip-faiss: error:") and msg in err and "--help" in err


@pytest.mark.parametrize("argv, msg", [
    (["train", "{d}/c.npy", "-o", "/proc/x.onnx"], "cannot write /proc/x.onnx"),
    (["train", "{d}/c.npy", "-o", "{d}"], "is a directory"),
    (["train", "{d}/c.npy", "-o", "{d}/c.npy/r.onnx"], "is not a directory"),
    (["build", "identity", "{d}/c.npy", "-o", "/proc/bundle"], "cannot write /proc/bundle"),
    (["build", "identity", "{d}/c.npy", "-o", "{d}/c.npy"], "is an existing file"),
    (["build", "identity", "{d}/c.npy", "-o", "/proc/self/nope/bundle"], "cannot write"),
])
def test_outputs_are_checked_before_the_work(small, capsys, monkeypatch, argv, msg):
    """An unwritable -o fails at once: the command (training, adding) never starts."""
    from simskip_faiss.cli import serve, train

    def never(args):
        raise AssertionError("the command ran although its output cannot be written")

    monkeypatch.setattr(train, "cmd_train", never)  # the parser dispatches to each command module's function
    monkeypatch.setattr(serve, "cmd_build", never)
    assert main([a.format(d=small) for a in argv]) == 2
    err = one_line_error(capsys)
    assert err.startswith("simskip-faiss: error:") and msg in err
    assert not [p for p in small.iterdir() if p.name.startswith(".simskip-write-check")]  # probe removed


def test_missing_output_parents_are_created(small, capsys):
    assert main(["build", "identity", str(small / "c.npy"), "-o", str(small / "new" / "deeper" / "bundle"),
                 "--factory", "Flat", "-q"]) == 0
    assert (small / "new" / "deeper" / "bundle" / "manifest.json").is_file()


def test_faiss_messages_have_no_cpp_signatures(small, capsys):
    assert main(["build", "identity", str(small / "c.npy"), "-o", str(small / "b"), "--factory", "Bogus"]) == 2
    err = one_line_error(capsys)
    assert "could not parse index string Bogus" in err
    assert "::" not in err and ".cpp" not in err and "Error in" not in err


def test_plain_message_strips_faiss_locations():
    import faiss

    from simskip_faiss.cli.main import plain_message

    with pytest.raises(RuntimeError) as e:
        faiss.ParameterSpace().set_index_parameter(faiss.IndexFlatL2(4), "efSearch", 3)
    assert "faiss::" in str(e.value)  # what FAISS says ...
    assert plain_message(e.value) == "could not set parameter efSearch"  # ... and what the user reads
    assert plain_message(RuntimeError("Error in void faiss::f(int) at /x/y.cpp:12: Error: 'k > 0' failed")) \
        == "FAISS check failed: k > 0"
    with pytest.raises(RuntimeError) as e:
        faiss.index_factory(8, "IVF4,PQ3")
    assert plain_message(e.value).startswith("The dimension of the vector (d) should be a multiple of")


def test_bad_input_is_exit_2_and_a_bug_is_not_disguised(small, capsys, monkeypatch):
    from simskip_faiss import RefinedIndex

    d = small
    assert main(["build", "identity", str(d / "c.npy"), "-o", str(d / "b"), "--factory", "Flat", "-q"]) == 0
    np.save(d / "q4.npy", np.zeros((3, 4), np.float32))
    capsys.readouterr()
    # bad input (our validation): one line, exit 2
    assert main(["search", str(d / "b"), str(d / "q4.npy"), "-o", str(d / "r.npz")]) == 2
    err = one_line_error(capsys)
    assert err.startswith("simskip-faiss: error:") and "internal" not in err
    # a bug (a TypeError/KeyError not raised by our validation): exit 1, called internal, never "error: <text>"
    for bug in (TypeError("'NoneType' object is not subscriptable"), KeyError("D"), RuntimeError("boom")):
        def broken(self, x, k, params=None, bug=bug):
            raise bug

        monkeypatch.setattr(RefinedIndex, "search", broken)
        np.save(d / "q.npy", np.zeros((3, 8), np.float32))
        assert main(["search", str(d / "b"), str(d / "q.npy"), "-o", str(d / "r.npz")]) == 1
        err = one_line_error(capsys)
        assert "internal error" in err and type(bug).__name__ in err and "re-run with -v" in err
        # -v: the full traceback, ending in the failing function
        assert main(["search", str(d / "b"), str(d / "q.npy"), "-o", str(d / "r.npz"), "-v"]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "in broken" in err
        assert err.strip().splitlines()[-1].startswith("simskip-faiss: internal error")


def test_user_error_classification():
    """Exit 2 only for errors our validation raised (or CLIError / file errors); the rest are bugs."""
    from simskip_faiss import IdentityRefiner, RefinedIndex
    from simskip_faiss.cli.main import CLIError, _is_user_error, plain_message

    def caught(f):
        try:
            f()
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("no exception")

    class BadStr(Exception):
        def __str__(self):
            return 1  # str() of it raises a TypeError inside the package's own code, not at a `raise`

    index = RefinedIndex(IdentityRefiner(8), "Flat", "l2")
    assert _is_user_error(caught(lambda: index.add(np.zeros((2, 5), np.float32))))  # our ValueError
    assert _is_user_error(caught(lambda: index.search(np.zeros((2, 8), np.float32), "3")))  # our TypeError
    assert _is_user_error(CLIError("x")) and _is_user_error(caught(lambda: open("/nonexistent/x")))
    assert not _is_user_error(caught(lambda: plain_message(BadStr())))  # a TypeError in our code, not ours to raise
    assert not _is_user_error(caught(lambda: np.zeros(3).reshape(2)))  # numpy's ValueError
    assert not _is_user_error(caught(lambda: {}["k"])) and not _is_user_error(RuntimeError("x"))


def test_missing_extra_names_the_extra(capsys, monkeypatch):
    from simskip_faiss.cli import evaluate

    def needs_wn(args):
        raise ModuleNotFoundError("No module named 'sentence_transformers'", name="sentence_transformers")

    monkeypatch.setattr(evaluate, "cmd_eval", needs_wn)
    assert main(["eval", "--data", "synthetic"]) == 2
    assert "pip install 'simskip-faiss[data]'" in one_line_error(capsys)


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "simskip_faiss", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("simskip-faiss ")


def test_readme_command_lines_parse():
    """Every `simskip-faiss ...` line in the README's shell blocks is a valid command line."""
    import re
    import shlex
    from pathlib import Path

    from simskip_faiss.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln.split(" #")[0] for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for ln in block.splitlines() if ln.startswith("simskip-faiss ")]
    assert len(lines) >= 8
    for ln in lines:
        args = build_parser().parse_args(shlex.split(ln)[1:])
        assert callable(args.func), ln


def _subcommands() -> dict:
    import argparse

    from simskip_faiss.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", list(_subcommands()))
def test_every_option_of_every_command_has_help(command, capsys):
    """`simskip-faiss CMD --help` prints for every command, and no argument or option goes without help."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: simskip-faiss {command} ")
    undocumented = [a.option_strings[-1] if a.option_strings else a.dest
                    for a in _subcommands()[command]._actions if not (a.help or "").strip()]
    assert not undocumented, f"{command}: no help for {undocumented}"


def test_train_flags_read_help_choices_and_defaults_from_the_config_fields():
    """Each TrainConfig field's flag shows the field's own help sentence, choices and default."""
    import dataclasses

    from simskip_faiss.config import TrainConfig

    flags = {a.dest: a for a in _subcommands()["train"]._actions}
    assert len(_subcommands()) == 12
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("progress", "threads"):  # the common --quiet and --threads
            continue
        a = flags[f.name]
        assert a.help.startswith(f.metadata["help"].rstrip(".").replace("%", "%%")), f.name
        assert a.default == (list(f.default) if isinstance(f.default, tuple) else f.default), f.name
        assert a.choices == (list(f.metadata["choices"]) if "choices" in f.metadata else None), f.name
