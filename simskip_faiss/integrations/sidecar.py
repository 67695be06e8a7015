"""The refiner record a framework store keeps beside its files, and reopening a store with the refiner it names.

A store saved through an integration carries a record of the refiner that made its vectors
(`BaseRefiner.record()`: sha256, kind, dimensions, normalisation, apply_to) in a sidecar JSON file, plus a
copy of the refiner itself (`to_bytes()`: the ONNX file, or a linear refiner's arrays), so reopening needs
only the folder and the base embedding model. Reopening checks the record: a missing record, a missing
refiner or a different one raises `RefinerMismatchError` instead of searching raw or mixed vectors.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

from ..persistence import atomic_write_bytes, plain_name
from ..refiners.linear import LinearRefiner
from ..refiners.onnx import Refiner
from ..refiners.registry import refiner_from_bytes
from ..errors import RefinerMismatchError
from .refining import resolve_refiner

SIDECAR = "simskip_refiner.json"
FORMAT = "simskip-faiss-refiner-record"
FORMAT_VERSION = 1
RECORD_KEYS = ("sha256", "kind", "d_in", "d_out", "normalize", "apply_to")


class MissingRefinerError(RefinerMismatchError):
    """A store with no refiner record, or whose refiner is nowhere to be found."""


# -- the refiner record ------------------------------------------------------------------------------
def refiner_record(refiner) -> dict:
    """The fields of `BaseRefiner.record()` a sidecar keeps (RECORD_KEYS: sha256 or an identity's description,
    kind, dimensions, normalize, apply_to); integrations refuse refiners with document updates, so none."""
    record = refiner.record()
    return {k: record[k] for k in RECORD_KEYS}


def identity_from_record(record: dict):
    """The identity refiner a record describes (its "sha256" is a description, not a hash)."""
    return refiner_from_bytes("identity", None, {k: record.get(k) for k in ("d_in", "normalize", "apply_to")})


def describe(record: dict) -> str:
    sha = str(record.get("sha256", "?"))
    return (f"{record.get('kind', '?')} refiner {sha[:16] + '…' if len(sha) == 64 else sha} "
            f"(d {record.get('d_in')}→{record.get('d_out')}, normalize={record.get('normalize')}, "
            f"apply_to={record.get('apply_to')})")


def check_record(stored: dict, refiner, where: str) -> None:
    """Raise `RefinerMismatchError` unless `refiner` is the one `stored` describes."""
    ours = refiner_record(refiner)
    theirs = {k: stored.get(k) for k in RECORD_KEYS}
    if theirs != ours:
        raise RefinerMismatchError(f"{where} holds vectors made by {describe(theirs)}, but this is "
                                   f"{describe(ours)}: vectors from different refiners are not comparable; "
                                   f"use the store's refiner or rebuild the store")


# -- the sidecar record beside a framework's files --------------------------------------------------
def sidecar_path(location: str | os.PathLike, folder: bool | None = None) -> Path:
    """The record's path: inside a store folder, or `<file>.simskip.json` beside a store file.

    folder: whether the store is a folder; None tells by what is on disk.
    """
    p = Path(location)
    return p / SIDECAR if (p.is_dir() if folder is None else folder) else p.with_name(p.name + ".simskip.json")


def _copy_prefix(path: Path) -> str:
    """Stored refiner copies are named after their record, so stores sharing a folder keep their own."""
    return "simskip_refiner-" if path.name == SIDECAR else path.name[:-len(".json")] + "_refiner-"


def _copy_name(path: Path) -> re.Pattern:
    """Exactly the names of the refiner copies `saving` writes beside the record `path`: its prefix (taken
    literally, whatever characters the store's name holds), 16 hex digits of the sha256, a refiner suffix."""
    suffixes = "|".join(re.escape(c.suffix) for c in (Refiner, LinearRefiner))
    return re.compile(re.escape(_copy_prefix(path)) + rf"[0-9a-f]{{16}}(?:{suffixes})")


def store_digest(location: str | os.PathLike, record_path: Path) -> str:
    """sha256 over the store's own files (name and content): every regular file of a store folder but this
    package's record and refiner copies, or the store file itself. Written in the record at save and checked
    at reopen, so a record copied in from another store, or a store changed without its record, is refused."""
    p = Path(location)
    ours = _copy_name(record_path)
    files = ([f for f in sorted(p.iterdir()) if f.is_file() and not f.is_symlink() and f != record_path
              and not ours.fullmatch(f.name) and not f.name.endswith(".simskip.json")]
             if p.is_dir() else [p])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _binding(record: dict) -> str:
    """sha256 binding a record's refiner fields to the store digest it was written with."""
    fields = [record.get(k) for k in ("store_sha256", *RECORD_KEYS)]
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()


@contextmanager
def saving(location: str | os.PathLike, refiner, folder: bool):
    """Wrap a framework's save: the old record is removed first, the new one written after it succeeded.

    A save that fails (or a crash) part-way therefore leaves a store with no record, which reopening
    refuses, never a record of the previous refiner beside the new vectors. Refiner copies the new
    record does not name are deleted once it is in place.
    """
    path = sidecar_path(location, folder)
    path.unlink(missing_ok=True)
    yield
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **refiner_record(refiner),
              "metadata": getattr(refiner, "metadata", {}), "store_sha256": store_digest(location, path)}
    record["binding"] = _binding(record)
    model = refiner.to_bytes()
    if model is not None:
        record["file"] = f"{_copy_prefix(path)}{refiner.sha256[:16]}{refiner.suffix}"
        copy = path.parent / record["file"]
        if not copy.is_file() or hashlib.sha256(copy.read_bytes()).hexdigest() != refiner.sha256:
            atomic_write_bytes(copy, model)
    atomic_write_bytes(path, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    ours = _copy_name(path)
    for stale in path.parent.iterdir():  # only the copies this record's saves wrote, never a user's file
        if stale.name != record.get("file") and ours.fullmatch(stale.name) and stale.is_file() \
                and not stale.is_symlink():
            stale.unlink()


def write_sidecar(location: str | os.PathLike, refiner, folder: bool | None = None) -> Path:
    """Record `refiner` beside an already saved store (and copy its bytes there), atomically."""
    with saving(location, refiner, Path(location).is_dir() if folder is None else folder):
        pass
    return sidecar_path(location, folder)


def read_sidecar(location: str | os.PathLike) -> dict:
    """The refiner record saved with a store; `MissingRefinerError` when there is none."""
    path = sidecar_path(location)
    if not Path(location).exists():
        raise FileNotFoundError(f"store not found: {location}")
    if not path.is_file():
        raise MissingRefinerError(f"{location} has no refiner record ({path.name}): it was not saved through "
                                  f"simskip_faiss.integrations, so which refiner made its vectors is unknown; "
                                  f"refusing to search it with refined queries")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefinerMismatchError(f"{path} is corrupt (not valid JSON: {e})") from None
    version = record.get("format_version") if isinstance(record, dict) else None
    if version is None or record.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise RefinerMismatchError(f"{path} is not a refiner record this package reads ({FORMAT} "
                                   f"up to version {FORMAT_VERSION}; found version {version!r})")
    if "store_sha256" in record and record.get("binding") != _binding(record):
        raise RefinerMismatchError(f"{path}: its refiner record was edited (it no longer matches its 'binding'); "
                                   "save the store through simskip_faiss.integrations again")
    if "store_sha256" in record and record["store_sha256"] != store_digest(location, path):
        raise RefinerMismatchError(f"{path} does not describe the store beside it: the store's files changed since "
                                   "the record was written, or the record was copied from another store; save the "
                                   "store through simskip_faiss.integrations again (or rebuild it)")
    name = record.get("file")
    if name is not None and not (plain_name(name) or (isinstance(name, str) and _copy_name(path).fullmatch(name))):
        raise RefinerMismatchError(f"{path}: the refiner copy it names, {str(name)[:80]!r}, is not a plain "
                                   f"file name in the store's folder; refusing to open a refiner outside the store")
    return record


def _read_copy(copy: Path, where: str) -> bytes:
    """The bytes of a stored refiner copy: a regular file in the store's folder, not through a symbolic link."""
    link = RefinerMismatchError(f"{where}: its refiner copy {copy.name} is a symbolic link; a store's refiner "
                                f"must be a regular file inside it")
    if copy.is_symlink():
        raise link
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(copy, flags)
    except FileNotFoundError:
        raise MissingRefinerError(f"{where}: its refiner {copy.name} is missing and none was given; "
                                  f"pass the refiner that built the store (refiner=...)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # made a symbolic link since the check
            raise link from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RefinerMismatchError(f"{where}: its refiner copy {copy.name} is not a regular file")
        return f.read()


def checked_refiner(location: str | os.PathLike, refiner=None, threads: int | None = 1):
    """The refiner to reopen a store with: `refiner` if given (checked against the record), else the stored copy.

    Raises `MissingRefinerError` when the store has no record, or records a refiner that was
    neither given nor found beside it; `RefinerMismatchError` when the refiner differs.
    """
    record = read_sidecar(location)
    where = f"store {location}"
    if refiner is not None:
        refiner = resolve_refiner(refiner, threads)
    elif record.get("kind") == "identity":
        refiner = identity_from_record(record)
    elif record.get("file"):
        copy = sidecar_path(location).parent / record["file"]
        refiner = refiner_from_bytes(record["kind"], _read_copy(copy, where), threads=threads, source=str(copy))
    else:
        raise MissingRefinerError(f"{where} was built with {describe(record)}, which is not stored with it; "
                                  f"pass that refiner (refiner=...)")
    check_record(record, refiner, where)
    return refiner
