"""Bundles on disk: a FAISS index, its refiner and a manifest, saved atomically and loaded consistently.

Layout of a bundle directory:
    manifest.json              format version, dimensions, metric, factory, ntotal, refiner, sha256 of each file
    index-<sha16>.faiss        faiss.write_index output
    refiner-<sha16>.onnx|.npy  the refiner's to_bytes(): ONNX, or a linear map as .npy arrays (absent for the identity)
    .lock                      taken (flock) by a save for its whole duration; readers never take it

What holds, and why:
- A crash never destroys the previous copy: data files are content-addressed and fsync'd before
  the manifest, which is replaced in one os.replace. Files no manifest names (a killed save's) are
  removed by the next save.
- A load sees one whole saved generation, even while another process saves: it reads the manifest,
  opens every file the manifest names at once (an open file outlives its deletion), verifies the
  size and sha256 of what it opened and deserialises from those same open files. If a save replaced
  the bundle between reading the manifest and opening a file, the load starts over (bounded).
- Saves into one directory are serialised by an exclusive lock on `.lock`: each is whole, the last
  to take the lock wins, and under the lock no other save is running, so every leftover temporary
  file is a killed save's and can be deleted. (Without flock, i.e. on Windows, saves are not serialised.)
- The manifest is schema-checked before anything else is read: every field of the wrong type names
  the field; file names must be plain names in the bundle directory, and symbolic links are refused,
  so nothing outside the bundle is ever opened.
No pickles.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from .errors import InputError, faiss_reason

FORMAT = "simskip-faiss-bundle"
FORMAT_VERSION = 2  # 2: the manifest carries `binding` (see `binding`); 1 (no binding) is still read
MANIFEST = "manifest.json"
LOCK = ".lock"
TMP = ".tmp-"
DATA_PREFIXES = ("index-", "refiner-", "documents-")
TMP_PREFIXES = tuple(TMP + p for p in (*DATA_PREFIXES, MANIFEST + "-"))  # what this module's writes leave behind
REFINER_KINDS = ("onnx", "identity", "linear")
MAX_MANIFEST_BYTES = 1 << 24  # a manifest is a few kB; refuse to parse anything this large
MAX_DEPTH = 32  # nesting levels of the manifest's JSON
LOAD_ATTEMPTS = 20  # loads that found the bundle replaced under them before giving up
_CHUNK = 1 << 22


class BundleError(InputError):
    """A bundle that is missing, corrupt, truncated, edited or inconsistent."""


# -- writing ------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _readable(path) -> None:
    """mkstemp makes 0600 files; bundles are ordinary files, readable as the umask allows."""
    os.chmod(path, 0o666 & ~_umask())


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


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def refuse_special(path: Path) -> None:
    """Raise ValueError if `path` exists and is not a regular file: os.replace would put a file in place of
    a symlink, device, FIFO, socket (or fail on a directory), e.g. replace /dev/null when run as root."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise InputError(f"{path} exists and is not a regular file ({what}); refusing to replace it: "
                         f"give the path of a regular file")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and os.replace.

    An existing `path` must be a regular file (`refuse_special`): symlinks, devices, FIFOs, sockets and
    directories are refused with ValueError and left as they are."""
    path = Path(path)
    refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP}{path.name}-")
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


def _write_member(directory: Path, stem: str, suffix: str, write: Callable[[Callable[[bytes], None]], None]) -> dict:
    """Stream a data file into a temporary file, hashing it on the way; fsync; move it to its content-addressed name."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TMP}{stem}-")
    h, size = hashlib.sha256(), 0
    try:
        _readable(tmp)
        with os.fdopen(fd, "wb") as f:
            def put(block: bytes) -> None:
                nonlocal size
                h.update(block)
                f.write(block)
                size += len(block)

            write(put)
            f.flush()
            os.fsync(f.fileno())
        name = f"{stem}-{h.hexdigest()[:16]}{suffix}"
        refuse_special(directory / name)
        os.replace(tmp, directory / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"file": name, "sha256": h.hexdigest(), "bytes": size}


@contextlib.contextmanager
def _save_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on directory/.lock; the OS releases it if the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: saves are not serialised
        yield
        return
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _ours(name: str) -> bool:
    return name in (MANIFEST, LOCK) or name.startswith((*TMP_PREFIXES, *DATA_PREFIXES))


def _prune(directory: Path) -> None:
    """Delete data files the manifest on disk does not name. Only under the save lock."""
    try:
        keep = {e["file"] for e in parse_manifest(_manifest_bytes(directory), directory / MANIFEST)["files"].values()}
    except (BundleError, OSError):
        return  # no readable manifest: delete nothing
    for p in directory.iterdir():
        if p.name.startswith(DATA_PREFIXES) and p.name not in keep:
            p.unlink(missing_ok=True)


def save_bundle(directory: str | os.PathLike, index, refiner_bytes: bytes | None, manifest: dict,
                refiner_suffix: str = ".onnx", documents_bytes: bytes | None = None) -> dict:
    """Write a bundle (FAISS index, optional refiner bytes and document updates, manifest fields) atomically;
    return the manifest."""
    import faiss

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory} exists and is not a directory")
    if (directory.is_dir() and not (directory / MANIFEST).is_file()
            and any(not _ours(p.name) for p in directory.iterdir())):
        raise BundleError(f"{directory} is a non-empty directory that is not a bundle; refusing to write into it")
    directory.mkdir(parents=True, exist_ok=True)
    with _save_lock(directory):
        for p in directory.iterdir():  # under the lock no other save runs: these are killed saves' leftovers
            if p.name.startswith(TMP_PREFIXES):
                p.unlink(missing_ok=True)
        try:
            files = {"index": _write_member(directory, "index", ".faiss",
                                            lambda put: faiss.write_index(index, faiss.PyCallbackIOWriter(put)))}
            if refiner_bytes is not None:
                files["refiner"] = _write_member(directory, "refiner", refiner_suffix, lambda put: put(refiner_bytes))
            if documents_bytes is not None:
                files["documents"] = _write_member(directory, "documents", ".bin", lambda put: put(documents_bytes))
            full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
            full["binding"] = binding(full)
            atomic_write_bytes(directory / MANIFEST, json.dumps(full, indent=2, sort_keys=True).encode())
        finally:
            _prune(directory)  # the superseded generation, or this save's files if it failed
    return full


# -- reading ------------------------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_SHA = re.compile(r"[0-9a-f]{64}")


def plain_name(v) -> bool:
    """A file name with no directory part, not hidden, '..'-free: it can only name a file in the bundle directory."""
    return isinstance(v, str) and _NAME.fullmatch(v) is not None and ".." not in v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sha(v) -> bool:
    return isinstance(v, str) and _SHA.fullmatch(v) is not None


# (field, what it must be, test) — a fault names the field
_TOP = (("d", "a positive integer", lambda v: _int(v) and v > 0),
        ("d_out", "a positive integer", lambda v: _int(v) and v > 0),
        ("metric", "'ip' or 'l2'", lambda v: isinstance(v, str) and v in ("ip", "l2")),
        ("ntotal", "a non-negative integer", lambda v: _int(v) and v >= 0),
        ("files", "an object", lambda v: isinstance(v, dict)),
        ("refiner", "an object", lambda v: isinstance(v, dict)))
_ENTRY = (("file", "a plain file name inside the bundle directory", plain_name),
          ("sha256", "64 lowercase hex digits", _sha),
          ("bytes", "a non-negative integer", lambda v: _int(v) and v >= 0))
_REFINER = (("kind", " or ".join(map(repr, REFINER_KINDS)), lambda v: isinstance(v, str) and v in REFINER_KINDS),
            ("sha256", "64 lowercase hex digits or null", lambda v: v is None or _sha(v)),
            ("normalize", "true or false", lambda v: isinstance(v, bool)),
            ("apply_to", "'both' or 'queries'", lambda v: isinstance(v, str) and v in ("both", "queries")))
_OPTIONAL = (("factory", "a string or null", lambda v: v is None or isinstance(v, str)),
             ("refiner.metadata", "an object", lambda v: isinstance(v, dict)))


def _show(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "an array"
    r = json.dumps(v) if isinstance(v, (str, bool, int, float)) else repr(v)
    return r if len(r) <= 40 else r[:40] + "…"


def _check_fields(obj: dict, prefix: str, spec, mpath: Path) -> None:
    for key, want, ok in spec:
        if key not in obj:
            raise BundleError(f"{mpath} lacks the field '{prefix}{key}'")
        if not ok(obj[key]):
            raise BundleError(f"{mpath}: the field '{prefix}{key}' must be {want}, got {_show(obj[key])}")


def _check_depth(m, mpath: Path) -> None:
    stack = [(m, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BundleError(f"{mpath}: the field '{'.'.join(path.split('.')[:2])}' is nested deeper than "
                              f"{MAX_DEPTH} levels; not a bundle manifest")
        if isinstance(v, dict):
            stack += [(x, f"{path}.{k}" if path else str(k), depth + 1) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(x, path or "[]", depth + 1) for x in v]


def binding(m: dict) -> str:
    """sha256 over what the stored vectors depend on: the index file's hash, the refiner's record (kind,
    sha256, dimensions, normalisation, apply_to, metric) and its document updates. Written at save and
    checked at load, so a manifest edited to another refiner (or to the identity, the refiner dropped)
    no longer matches the index it describes."""
    r = m["refiner"]
    parts = [m["files"]["index"]["sha256"], r.get("kind"), r.get("sha256"), m.get("d"), m.get("d_out"),
             r.get("normalize"), r.get("apply_to"), m.get("metric"), (r.get("documents") or {}).get("sha256")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def validate_manifest(m, mpath: Path) -> dict:
    """Check a parsed manifest's schema and the agreement of its fields; BundleError names the field at fault."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a simskip-faiss manifest")
    version = m.get("format_version")
    if not _int(version) or not 1 <= version <= FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {_show(version)} is not supported "
                          f"(this package reads 1 to {FORMAT_VERSION})")
    _check_fields(m, "", _TOP, mpath)
    for field, want, ok in _OPTIONAL:
        head, _, key = field.rpartition(".")
        obj = m[head] if head else m
        if key in obj and not ok(obj[key]):
            raise BundleError(f"{mpath}: the field '{field}' must be {want}, got {_show(obj[key])}")
    files, refiner = m["files"], m["refiner"]
    for role in files:
        if role not in ("index", "refiner", "documents"):
            raise BundleError(f"{mpath}: the field 'files.{role}' is not a bundle file (index, refiner, documents)")
    if "index" not in files:
        raise BundleError(f"{mpath} lacks the field 'files.index': it names no index file")
    for role, entry in files.items():
        if not isinstance(entry, dict):
            raise BundleError(f"{mpath}: the field 'files.{role}' must be an object with file, sha256 and bytes, "
                              f"got {_show(entry)}")
        _check_fields(entry, f"files.{role}.", _ENTRY, mpath)
    _check_fields(refiner, "refiner.", _REFINER, mpath)
    if refiner["kind"] == "identity":
        if "refiner" in files:
            raise BundleError(f"{mpath}: the field 'refiner.kind' says 'identity' but the manifest names the refiner "
                              f"file {files['refiner']['file']}: the manifest was edited or is inconsistent")
        if refiner["sha256"] is not None or m["d"] != m["d_out"]:
            raise BundleError(f"{mpath}: the field 'refiner.kind' says 'identity' but refiner.sha256, d and d_out "
                              f"describe another refiner")
    elif "refiner" not in files:
        raise BundleError(f"{mpath}: the field 'refiner.kind' says {refiner['kind']!r} but the manifest names "
                          f"no refiner file ('files.refiner')")
    docs = refiner.get("documents")
    if ("documents" in files) != isinstance(docs, dict):
        raise BundleError(f"{mpath}: the fields 'files.documents' and 'refiner.documents' must come together "
                          "(a refiner's document updates and their file): the manifest was edited or is inconsistent")
    if docs is not None and docs.get("sha256") != files["documents"]["sha256"]:
        raise BundleError(f"{mpath}: the field 'refiner.documents.sha256' does not match 'files.documents.sha256'")
    return m


def check_binding(m: dict, directory: Path) -> None:
    """Refuse a version-2 manifest whose `binding` does not match its record (after the field-by-field checks
    against the loaded files, which name the field when they can)."""
    if m["format_version"] >= 2 and m.get("binding") != binding(m):
        raise BundleError(f"{directory / MANIFEST}: the refiner record does not match the index it was saved with "
                          "(field 'binding'): the manifest was edited; rebuild the bundle, or restore its manifest")


def parse_manifest(raw: bytes, mpath: Path) -> dict:
    """Parse and validate manifest bytes: bounded nesting, a valid schema, or BundleError."""
    try:
        m = json.loads(raw)
    except RecursionError:
        raise BundleError(f"{mpath} is nested too deeply to be a bundle manifest") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise BundleError(f"{mpath} is corrupt (not valid JSON: {e})") from None
    _check_depth(m, mpath)
    return validate_manifest(m, mpath)


def _open_member(directory: Path, name: str, what: str) -> BinaryIO:
    """Open a bundle file read-only: a regular file, not through a symbolic link (FileNotFoundError if absent)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(directory / name, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"bundle {directory}: the {what} file {name} is a symbolic link; a bundle holds "
                              f"its own regular files") from None
        raise
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise BundleError(f"bundle {directory}: the {what} file {name} is not a regular file")
    return f


def _manifest_bytes(directory: Path) -> bytes:
    if not directory.exists():
        raise FileNotFoundError(f"bundle not found: {directory}")
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a bundle directory")
    try:
        f = _open_member(directory, MANIFEST, "manifest")
    except FileNotFoundError:
        raise BundleError(f"{directory} is not a simskip-faiss bundle: {MANIFEST} is missing") from None
    with f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{directory / MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes; not a bundle manifest")
    return raw


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and validate a bundle's manifest, naming exactly what is wrong."""
    directory = Path(directory)
    return parse_manifest(_manifest_bytes(directory), directory / MANIFEST)


def _check(directory: Path, entry: dict, what: str, size: int, digest: Callable[[], str]) -> None:
    """Compare a bundle file's size, then (only if the size is right) its sha256, with its manifest entry."""
    if size != entry["bytes"]:
        raise BundleError(f"bundle {directory}: the {what} file {entry['file']} is truncated or altered "
                          f"({size} bytes, manifest says {entry['bytes']})")
    got = digest()
    if got != entry["sha256"]:
        raise BundleError(f"bundle {directory}: the {what} file {entry['file']} has been modified "
                          f"(sha256 {got[:16]}…, manifest says {entry['sha256'][:16]}…)")


def _file_digest(f: BinaryIO) -> str:
    """sha256 of an open file from its start; leaves it at its start again."""
    h = hashlib.sha256()
    while block := f.read(_CHUNK):
        h.update(block)
    f.seek(0)
    return h.hexdigest()


def _read_index(directory: Path, f: BinaryIO, entry: dict, mmap: bool):
    """Deserialise the verified, open index file; memory-mapped through the open descriptor where the OS allows."""
    import faiss

    try:
        if not mmap:
            return faiss.read_index(faiss.PyCallbackIOReader(f.read), 0)
        fd_path = f"/proc/self/fd/{f.fileno()}"  # the very file verified, even if a save has replaced it since
        return faiss.read_index(fd_path if os.path.exists(fd_path) else str(directory / entry["file"]),
                                faiss.IO_FLAG_MMAP)
    except RuntimeError as e:
        raise BundleError(f"bundle {directory}: FAISS cannot read {entry['file']}: "
                          f"{faiss_reason(e)}") from None


def load_bundle(directory: str | os.PathLike, mmap: bool = False, attempts: int = LOAD_ATTEMPTS):
    """(manifest, FAISS index, refiner bytes or None, document-update bytes or None) of one saved
    generation, every file verified.

    The files are opened right after the manifest is read and read only through those open files, so
    a concurrent save cannot mix generations; if one vanished first and the manifest has changed
    since, the load starts over, up to `attempts` times.
    """
    directory = Path(directory)
    for _ in range(attempts):
        raw = _manifest_bytes(directory)
        m = parse_manifest(raw, directory / MANIFEST)
        with contextlib.ExitStack() as stack:
            opened = {}
            for role, entry in m["files"].items():
                try:
                    opened[role] = stack.enter_context(_open_member(directory, entry["file"], role))
                except FileNotFoundError:
                    if _manifest_bytes(directory) != raw:
                        break  # a save replaced the bundle between reading the manifest and opening its files
                    raise BundleError(f"bundle {directory}: the {role} file {entry['file']} named in the manifest "
                                      f"is missing") from None
            else:
                small = {}
                for role in ("refiner", "documents"):  # small: read once, check what was read, build from those bytes
                    if role in opened:
                        small[role] = b = opened[role].read()
                        _check(directory, m["files"][role], role, len(b), lambda b=b: hashlib.sha256(b).hexdigest())
                f = opened["index"]  # large: hashed, then deserialised, through the same open file
                _check(directory, m["files"]["index"], "index", os.fstat(f.fileno()).st_size, lambda: _file_digest(f))
                return (m, _read_index(directory, f, m["files"]["index"], mmap), small.get("refiner"),
                        small.get("documents"))
    raise BundleError(f"bundle {directory} was replaced {attempts} times while being loaded; try again")
