"""Bundles on disk: a FAISS index, its ONNX refiner and a manifest, saved atomically.

Layout of a bundle directory:
    manifest.json              format version, dimensions, metric, factory, ntotal, sha256 of each file
    index-<sha16>.faiss        faiss.write_index output
    refiner-<sha16>.onnx       the exported refiner (absent for an identity refiner)
Data files are content-addressed and written before the manifest, which is replaced in one
os.replace: a crash at any point leaves either the old or the new bundle complete and readable.
Files the new manifest no longer names are deleted only after it is in place. No pickles.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .checks import file_sha256 as sha256_file

FORMAT = "simskip-faiss-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _readable(path) -> None:
    """mkstemp makes 0600 files; bundles are ordinary files, readable as the umask allows."""
    os.chmod(path, 0o666 & ~_umask())


class BundleError(ValueError):
    """A bundle that is missing, corrupt, truncated, edited or inconsistent."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        _readable(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _place(tmp: Path, directory: Path, stem: str, suffix: str) -> dict:
    """fsync a finished temporary file and move it to its content-addressed name."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _readable(tmp)
    digest = sha256_file(tmp)
    name = f"{stem}-{digest[:16]}{suffix}"
    os.replace(tmp, directory / name)
    return {"file": name, "sha256": digest, "bytes": (directory / name).stat().st_size}


def save_bundle(directory: str | os.PathLike, index, refiner_bytes: bytes | None, manifest: dict) -> dict:
    """Write a bundle (FAISS index, optional ONNX bytes, manifest fields) atomically; return the manifest."""
    import faiss

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise BundleError(f"{directory} is a non-empty directory that is not a bundle; refusing to write into it")
    directory.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-index-")
        os.close(fd)
        made.append(Path(tmp))
        faiss.write_index(index, tmp)
        files = {"index": _place(Path(tmp), directory, "index", ".faiss")}
        if refiner_bytes is not None:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-refiner-")
            made.append(Path(tmp))
            with os.fdopen(fd, "wb") as f:
                f.write(refiner_bytes)
            files["refiner"] = _place(Path(tmp), directory, "refiner", ".onnx")
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
        atomic_write_bytes(directory / MANIFEST, json.dumps(full, indent=2, sort_keys=True).encode())
    finally:
        for p in made:
            if p.exists():
                p.unlink()
    keep = {MANIFEST} | {f["file"] for f in files.values()}
    for p in directory.iterdir():  # only after the new manifest is in place
        if p.name not in keep and (p.name.startswith((".tmp-", "index-", "refiner-"))):
            p.unlink()
    return full


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and sanity-check a bundle's manifest, naming exactly what is wrong."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"bundle not found: {directory}")
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a bundle directory")
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{directory} is not a simskip-faiss bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is corrupt (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a simskip-faiss manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {version!r} is not supported "
                          f"(this package reads up to {FORMAT_VERSION})")
    for key in ("d", "d_out", "metric", "ntotal", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath} lacks the field '{key}'")
    if "index" not in manifest["files"]:
        raise BundleError(f"{mpath} names no index file")
    return manifest


def verified_path(directory: Path, entry: dict, what: str) -> Path:
    """Path of a bundle file after checking its presence, size and sha256 against the manifest."""
    path = directory / str(entry.get("file", ""))
    if not entry.get("file") or not path.is_file():
        raise BundleError(f"bundle {directory}: the {what} file {entry.get('file')!r} named in the manifest is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise BundleError(f"bundle {directory}: the {what} file {path.name} is truncated or altered "
                          f"({size} bytes, manifest says {entry.get('bytes')})")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise BundleError(f"bundle {directory}: the {what} file {path.name} has been modified "
                          f"(sha256 {digest[:16]}…, manifest says {str(entry.get('sha256'))[:16]}…)")
    return path
