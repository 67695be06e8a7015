"""Bundles under attack: crafted manifests, files outside the bundle, edited fields, concurrent loads and saves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import mlp_refiner_bytes
from simskip_faiss import BundleError, IdentityRefiner, RefinedIndex, Refiner
from simskip_faiss.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bundle(serving_onnx, data, tmp_path) -> Path:
    idx = RefinedIndex(Refiner.load(serving_onnx[0]), "Flat", "ip")
    idx.add(data[0])
    return idx.save(tmp_path / "b")


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write(b: Path, m) -> None:
    (b / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))


def _set(b: Path, field: str, value) -> None:
    """Set (or, with value=DELETE, remove) a dotted manifest field."""
    m = _manifest(b)
    *path, key = field.split(".")
    obj = m
    for k in path:
        obj = obj[k]
    if value is DELETE:
        del obj[key]
    else:
        obj[key] = value
    _write(b, m)


DELETE = object()


# -- 11.9: file names are plain names inside the bundle ----------------------------------------------
def _outside_copy(b: Path, where: Path) -> tuple[Path, dict]:
    """A byte-identical copy of the bundle's index outside it, and the manifest entry describing it."""
    entry = _manifest(b)["files"]["index"]
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes((b / entry["file"]).read_bytes())
    return where, entry


@pytest.mark.parametrize("name", ["../other/index.faiss", "ABS", "sub/index.faiss", "..", ".", "", "index.faiss/",
                                  "..\\other\\index.faiss", ".hidden"])
def test_file_names_outside_the_bundle_are_refused(bundle, tmp_path, name):
    outside, entry = _outside_copy(bundle, tmp_path / "other" / "index.faiss")
    (bundle / "sub").mkdir()
    (bundle / "sub" / "index.faiss").write_bytes(outside.read_bytes())
    _set(bundle, "files.index.file", str(outside) if name == "ABS" else name)
    with pytest.raises(BundleError, match="'files.index.file' must be a plain file name inside the bundle"):
        RefinedIndex.load(bundle)  # the outside copy is valid: loading it would succeed


def test_outside_file_is_neither_read_nor_described(bundle):
    etc = Path("/etc/passwd")
    if not etc.is_file():
        pytest.skip("no /etc/passwd")
    _set(bundle, "files.index.file", str(etc))
    _set(bundle, "files.index.bytes", 1)
    with pytest.raises(BundleError) as e:
        RefinedIndex.load(bundle)
    msg = str(e.value)
    assert "plain file name" in msg and f"{etc.stat().st_size} bytes" not in msg and "sha256 " not in msg


@pytest.mark.parametrize("role", ["index", "refiner"])
def test_symlink_out_of_the_bundle_is_refused(bundle, tmp_path, role):
    entry = _manifest(bundle)["files"][role]
    outside = tmp_path / "elsewhere" / "x"
    outside.parent.mkdir()
    outside.write_bytes((bundle / entry["file"]).read_bytes())  # valid bytes: following the link would load
    (bundle / f"{role}-link").symlink_to(outside)
    _set(bundle, f"files.{role}.file", f"{role}-link")
    with pytest.raises(BundleError, match=f"the {role} file {role}-link is a symbolic link"):
        RefinedIndex.load(bundle)


# -- 11.10: the manifest's schema ----------------------------------------------------------------------
@pytest.mark.parametrize("field, value, named", [
    ("files.index", "index.faiss", "'files.index' must be an object"),
    ("files.index", None, "'files.index' must be an object"),
    ("files", None, "'files' must be an object"),
    ("files", [], "'files' must be an object"),
    ("files.index.file", None, "'files.index.file'"),
    ("files.index.file", DELETE, "lacks the field 'files.index.file'"),
    ("files.index.bytes", "12", "'files.index.bytes' must be a non-negative integer"),
    ("files.index.sha256", 7, "'files.index.sha256'"),
    ("files.extra", {"file": "x"}, "'files.extra'"),
    ("files.refiner", 3, "'files.refiner' must be an object"),
    ("d", "16", "'d' must be a positive integer"),
    ("d", True, "'d' must be a positive integer"),
    ("d", DELETE, "lacks the field 'd'"),
    ("d_out", 0, "'d_out'"),
    ("ntotal", None, "'ntotal'"),
    ("metric", 3, "'metric' must be 'ip' or 'l2'"),
    ("factory", 5, "'factory'"),
    ("refiner", None, "'refiner' must be an object"),
    ("refiner.kind", None, "'refiner.kind'"),
    ("refiner.kind", "magic", "'refiner.kind'"),
    ("refiner.normalize", "yes", "'refiner.normalize'"),
    ("refiner.apply_to", ["both"], "'refiner.apply_to'"),
    ("refiner.metadata", "x", "'refiner.metadata'"),
    ("format_version", "1", "version"),
])
def test_wrong_field_type_names_the_field(bundle, field, value, named):
    _set(bundle, field, value)
    with pytest.raises(BundleError, match=named):
        RefinedIndex.load(bundle)


def test_deep_nesting_is_refused(bundle):
    deep: dict = {}
    for _ in range(40):
        deep = {"a": deep}
    _set(bundle, "refiner.metadata", deep)
    with pytest.raises(BundleError, match="'refiner.metadata' is nested deeper than"):
        RefinedIndex.load(bundle)
    _write(bundle, '{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="nested too deeply"):
        RefinedIndex.load(bundle)


def test_oversized_manifest_is_not_parsed(bundle):
    from simskip_faiss.persistence import MAX_MANIFEST_BYTES

    _write(bundle, json.dumps(_manifest(bundle)) + " " * MAX_MANIFEST_BYTES)  # valid JSON, absurd size
    with pytest.raises(BundleError, match="manifest.json is larger than"):
        RefinedIndex.load(bundle)


def test_cli_reports_a_bad_field_in_one_line(bundle, tmp_path, capsys):
    _set(bundle, "files.index", "index.faiss")
    np.save(tmp_path / "q.npy", np.ones((2, 16), np.float32))
    rc = main(["search", str(bundle), str(tmp_path / "q.npy"), "-o", str(tmp_path / "r.npz"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "'files.index'" in err and "Traceback" not in err


# -- 11.11: manifest fields agree with the files --------------------------------------------------------
def test_kind_edited_to_identity_does_not_drop_the_refiner(bundle):
    _set(bundle, "refiner.kind", "identity")
    with pytest.raises(BundleError, match="'refiner.kind' says 'identity' but the manifest names the refiner file"):
        RefinedIndex.load(bundle)


def test_identity_bundle_edited_to_onnx(data, tmp_path):
    idx = RefinedIndex(IdentityRefiner(16, normalize=True), "Flat", "ip")
    idx.add(data[0])
    b = idx.save(tmp_path / "id")
    _set(b, "refiner.kind", "onnx")
    with pytest.raises(BundleError, match="names no refiner file"):
        RefinedIndex.load(b)


def test_refiner_sha256_is_compared_with_the_file_loaded(bundle, tmp_path):
    """Swap in another valid refiner with a matching files.refiner entry: refiner.sha256 still tells."""
    other = tmp_path / "other.onnx"
    other.write_bytes(mlp_refiner_bytes(d=16, hidden=32, seed=0, metadata={"metric": "ip", "note": "another refiner"}))
    m = _manifest(bundle)
    (bundle / m["files"]["refiner"]["file"]).unlink()
    new = Refiner.load(other)
    assert new.sha256 != m["refiner"]["sha256"]
    (bundle / "refiner-other.onnx").write_bytes(other.read_bytes())
    m["files"]["refiner"] = {"file": "refiner-other.onnx", "sha256": new.sha256, "bytes": other.stat().st_size}
    _write(bundle, m)
    with pytest.raises(BundleError, match=r"refiner file refiner-other.onnx has sha256 .* manifest field 'refiner.sha256'"):
        RefinedIndex.load(bundle)


@pytest.mark.parametrize("field, value, named", [
    ("metric", "l2", r"the index file index-\w+\.faiss has metric 'ip' but the manifest field 'metric' says 'l2'"),
    ("refiner.normalize", False, r"the refiner file refiner-\w+\.onnx has normalize True .* 'refiner.normalize'"),
    ("refiner.apply_to", "queries", r"refiner file .* 'refiner.apply_to'"),
    ("refiner.sha256", "0" * 64, r"refiner file .* 'refiner.sha256' says 0000000000000000…"),
    ("d", 17, r"refiner file .* has d 16 but the manifest field 'd' says 17"),
    ("d_out", 8, r"refiner file .* has d_out 16 but the manifest field 'd_out' says 8"),
])
def test_edited_field_names_file_and_field(bundle, field, value, named):
    _set(bundle, field, value)
    with pytest.raises(BundleError, match=named):
        RefinedIndex.load(bundle)


# -- 11.12: concurrent saves and loads, stale temporary files --------------------------------------------
SAVER = textwrap.dedent("""
    import sys, numpy as np
    from simskip_faiss import IdentityRefiner, RefinedIndex, Refiner
    onnx, xs, bundle, which, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    x = np.load(xs)
    states = []
    for i, n in enumerate((len(x) // 3, 2 * len(x) // 3, len(x))):
        if which != "all" and int(which) != i:
            continue
        refiner = Refiner.load(onnx) if i % 2 == 0 else IdentityRefiner(x.shape[1], normalize=True)
        idx = RefinedIndex(refiner, "Flat", "ip")
        idx.add(x[:n])
        states.append(idx)
    print("ready", flush=True)
    i = 0
    while rounds < 0 or i < rounds:
        states[i % len(states)].save(bundle)
        i += 1
""")


def _saver(tmp_path, onnx, x, bundle, which="all", rounds=-1) -> subprocess.Popen:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    if not (tmp_path / "x.npy").exists():
        np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(script), str(onnx), str(tmp_path / "x.npy"), str(bundle), which,
                             str(rounds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _big(data) -> np.ndarray:
    x = np.tile(data[0], (40, 1))  # 24000 x 16: saves of ~1.5 MB take long enough to be overlapped
    return x + np.float32(1e-3) * np.random.default_rng(0).standard_normal(x.shape, dtype=np.float32)


def test_load_while_another_process_saves(serving_onnx, data, tmp_path):
    x = _big(data)
    sha = Refiner.load(serving_onnx[0]).sha256
    states = {(sha, len(x) // 3), (None, 2 * len(x) // 3), (sha, len(x))}
    bundle = tmp_path / "b"
    saver = _saver(tmp_path, serving_onnx[0], x, bundle)
    try:
        assert saver.stdout.readline().strip() == b"ready"
        while not (bundle / "manifest.json").exists():
            time.sleep(0.01)
        seen, failures, n, t0 = set(), [], 0, time.perf_counter()
        while time.perf_counter() - t0 < 4 and n < 400:
            n += 1
            try:
                idx = RefinedIndex.load(bundle, mmap=n % 2 == 0)
            except Exception as e:  # noqa: BLE001 - counted, reported below
                failures.append(f"{type(e).__name__}: {e}")
                continue
            state = (idx.refiner.sha256, idx.ntotal)
            assert state in states
            assert idx.search(x[:1], 1)[1][0, 0] == 0  # a whole, searchable index
            seen.add(state)
    finally:
        saver.kill()
        saver.wait()
    assert not failures, f"{len(failures)} of {n} loads failed, e.g. {failures[0]}"
    assert len(seen) >= 2 and n >= 20  # the saver really replaced the bundle under the loads


def test_two_processes_saving_into_one_directory(serving_onnx, data, tmp_path):
    x = _big(data)
    bundle = tmp_path / "b"
    savers = [_saver(tmp_path, serving_onnx[0], x, bundle, which, rounds=15) for which in ("0", "1")]
    for p in savers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    idx = RefinedIndex.load(bundle)
    assert idx.ntotal in (len(x) // 3, 2 * len(x) // 3)
    named = {e["file"] for e in _manifest(bundle)["files"].values()}
    assert {p.name for p in bundle.iterdir()} == named | {"manifest.json", ".lock"}  # no leftovers


def test_next_save_removes_a_killed_saves_leftovers(bundle, serving_onnx, data):
    (bundle / ".tmp-index-killed").write_bytes(b"\0" * 100_000)
    (bundle / "index-0123456789abcdef.faiss").write_bytes(b"\0" * 1000)  # placed, never named by a manifest
    idx = RefinedIndex.load(bundle)
    idx.save(bundle)
    named = {e["file"] for e in _manifest(bundle)["files"].values()}
    assert {p.name for p in bundle.iterdir()} == named | {"manifest.json", ".lock"}
    assert RefinedIndex.load(bundle).ntotal == len(data[0])


HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    open(os.path.join(sys.argv[1], ".tmp-index-running"), "wb").write(b"half an index")
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin; then exit as a killed save would, leaving its temp file
""")


def test_save_waits_for_a_running_save_and_keeps_its_temp_file(bundle, tmp_path):
    pytest.importorskip("fcntl")
    (tmp_path / "holder.py").write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(bundle)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    idx = RefinedIndex.load(bundle)
    saver = threading.Thread(target=idx.save, args=(bundle,))
    saver.start()
    saver.join(0.5)
    running = saver.is_alive()
    still_there = (bundle / ".tmp-index-running").exists()
    holder.stdin.close()
    holder.wait()
    saver.join(30)
    assert running and still_there  # the other save's temporary file survived while that save ran
    assert not saver.is_alive() and not (bundle / ".tmp-index-running").exists()  # then: stale, removed
    assert RefinedIndex.load(bundle).ntotal == idx.ntotal


def test_mmap_load_equals_a_plain_load_and_outlives_a_later_save(bundle, data):
    x, _ = data
    mapped, plain = RefinedIndex.load(bundle, mmap=True), RefinedIndex.load(bundle)
    want = plain.search(x[:20], 5)
    for a, b in zip(mapped.search(x[:20], 5), want):
        np.testing.assert_array_equal(a, b)
    smaller = RefinedIndex(plain.refiner, "Flat", "ip")
    smaller.add(x[:50])
    smaller.save(bundle)  # replaces and deletes the index file the mapped index was read from
    assert RefinedIndex.load(bundle).ntotal == 50
    for a, b in zip(mapped.search(x[:20], 5), want):
        np.testing.assert_array_equal(a, b)
