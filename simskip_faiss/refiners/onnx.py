"""`Refiner`: an exported ONNX refiner run with onnxruntime (no torch, no onnx package on this path).

Also here: the protobuf walk that refuses ONNX files keeping tensors in external data (onnxruntime
would read those from the working directory, outside any hash check), and the sidecar of document
updates an exported refiner may carry beside its file (`documents_path`, `read_documents`).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import BaseRefiner, check_apply_to
from .documents import DocumentUpdates

METADATA_KEY = "simskip"  # the ONNX custom-metadata entry holding the refiner's JSON record
DEFAULT_BATCH = 1024  # rows per onnxruntime run: the fastest sub-batch for large inputs in bench/speed.py
MIN_PARALLEL_ROWS = 256  # rows per worker below which splitting a call across threads does not pay


# -- ONNX files that would read other files --------------------------------------------------------------
# Field numbers of onnx.proto that can hold a TensorProto, walked without the onnx package (serving has none).
_MESSAGES = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message; value is bytes for length-delimited fields."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = out = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated or malformed protobuf")
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated or malformed protobuf")
            yield field, wire, buf[i:i + size]
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def external_tensors(model: bytes) -> bool:
    """True if an ONNX model keeps any tensor in external data (data_location EXTERNAL or external_data
    entries): onnxruntime would read those files from the loading process's working directory."""
    stack = [("model", memoryview(model))]  # slices of a memoryview: the walk copies no tensor bytes
    while stack:
        kind, buf = stack.pop()
        for field, wire, value in _fields(buf):
            if kind == "tensor":
                if (field == 14 and wire == 0 and value == 1) or field == 13:
                    return True
                continue
            sub = _MESSAGES[kind].get(field)
            if sub and wire == 2:
                stack.append((sub, value))
    return False

class Refiner(BaseRefiner):
    """An exported ONNX refiner run by onnxruntime in bounded-size batches.

    `threads` (default 1; None = every core) is how many cores one call may use. The onnxruntime
    session itself is single-threaded; a large input is split into sub-batches that the calling
    thread and `threads - 1` pool workers take in turn (onnxruntime releases the GIL). Measured on
    2 cores: alone, 1.8x one thread's rate at batch 1024 (numpy's matmul roofline); in bench/speed.py
    section 1, above onnxruntime's own intra-op pool at batch >= 4096 and below it at 1024. A single
    vector is not slowed by a pool's wake-up. `batch_size` bounds the rows of one onnxruntime run.
    """

    kind = "onnx"
    suffix = ".onnx"

    def __init__(self, model: bytes, threads: int | None = 1, batch_size: int = DEFAULT_BATCH,
                 source: str = "<bytes>", documents: DocumentUpdates | None = None):
        import onnxruntime as ort

        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.model_bytes = bytes(model)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.batch_size = int(batch_size)
        self.threads = int(threads) if threads is not None else (os.cpu_count() or 1)
        if self.threads <= 0:
            raise InputError(f"threads must be positive (or None for every core), got {threads}")
        self.source = source
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()  # per-thread buffers of the single-vector path (see _run)
        try:
            external = external_tensors(self.model_bytes)
        except ValueError as e:
            raise InputError(f"{source} is not a valid ONNX model: {e}") from None
        if external:
            raise InputError(f"{source} keeps weights in external data files: onnxruntime would read them from "
                             "the working directory, outside any hash check; a refiner must be one self-contained "
                             "file (export with external_data=False)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # parallelism is across sub-batches (see the class docstring)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(self.model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise InputError(f"{source} is not a valid ONNX model: {str(e).splitlines()[0][:200]}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise InputError(f"{source}: a refiner has one input (n, d) and one output, "
                             f"got {len(inputs)} inputs and {len(outputs)} outputs")
        self._in, self._out = inputs[0].name, outputs[0].name
        if inputs[0].type != "tensor(float)":
            raise InputError(f"{source}: refiner input must be float32, model declares {inputs[0].type}")
        raw_meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            self.metadata: dict = json.loads(raw_meta) if raw_meta else {}
        except json.JSONDecodeError:
            raise InputError(f"{source}: the '{METADATA_KEY}' metadata is not valid JSON") from None
        d_in, d_out = inputs[0].shape[-1], outputs[0].shape[-1]
        self.d_in = int(self.metadata.get("d_in", d_in if isinstance(d_in, int) else 0))
        self.d_out = int(self.metadata.get("d_out", d_out if isinstance(d_out, int) else 0))
        if self.d_in <= 0 or self.d_out <= 0 or len(inputs[0].shape) != 2:
            raise InputError(f"{source}: cannot tell the refiner's dimensions: input shape "
                             f"{inputs[0].shape}, output shape {outputs[0].shape}")
        self.normalize = bool(self.metadata.get("normalize", False))
        self.precision = str(self.metadata.get("precision", "fp32"))
        self.apply_to = check_apply_to(self.metadata.get("apply_to", "both"), source)
        declared = self.metadata.get("documents")
        if documents is not None:
            if isinstance(declared, dict) and declared.get("sha256") != documents.sha256:
                raise InputError(f"{source}: the document updates given are not the ones this refiner declares "
                                 f"(sha256 {documents.sha256[:16]}…, the file says "
                                 f"{(declared or {}).get('sha256', 'none')!s:.16})")
            self.with_documents(documents)
        elif isinstance(declared, dict):
            self.documents_missing = f"{declared.get('n', '?')} documents in {declared.get('file', 'a file beside it')}"

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = 1, batch_size: int = DEFAULT_BATCH) -> "Refiner":
        """Load an ONNX refiner file, and its document updates from the file beside it that its metadata
        names (hash-checked); missing, empty and non-ONNX files raise with the path named."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"refiner file not found: {p}")
        data = p.read_bytes()
        if not data:
            raise InputError(f"{p} is empty, not an ONNX model")
        out = cls(data, threads=threads, batch_size=batch_size, source=str(p))
        declared = out.metadata.get("documents")
        if isinstance(declared, dict):
            out.with_documents(read_documents(p, declared))
        return out

    def __getstate__(self) -> dict:
        """Pickle as bytes and settings (the onnxruntime session, pool and locks are rebuilt on load), so a
        refiner crosses process boundaries: multiprocessing, Ray, Spark closures, multi-worker ingestion."""
        return {"model": self.model_bytes, "threads": self.threads, "batch_size": self.batch_size,
                "source": self.source, "documents": None if self.documents is None else self.documents.to_bytes(),
                "documents_missing": self.documents_missing}

    def __setstate__(self, state: dict) -> None:
        docs = state["documents"]
        self.__init__(state["model"], threads=state["threads"], batch_size=state["batch_size"], source=state["source"],
                      documents=None if docs is None else DocumentUpdates.from_bytes(docs))
        if docs is None:
            self.documents_missing = state["documents_missing"]

    @classmethod
    def load_metadata(cls, path: str | os.PathLike) -> dict:
        """The "simskip" metadata of an ONNX refiner file, without loading its document updates."""
        return cls(Path(path).read_bytes(), source=str(path)).metadata

    def to_bytes(self) -> bytes:
        return self.model_bytes

    def apply_unchecked(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        workers = min(self.threads, n // MIN_PARALLEL_ROWS)
        if workers <= 1 and n <= self.batch_size:
            return self._run(x)
        step = min(self.batch_size, -(-n // max(workers, 1)))
        out = np.empty((n, self.d_out), dtype=np.float32)
        starts = iter(range(0, n, step))
        taking = threading.Lock()

        def drain() -> None:  # run sub-batches until none is left; after a failure, none is
            while True:
                with taking:
                    s = next(starts, None)
                if s is None:
                    return
                try:
                    out[s:s + step] = self._run(x[s:s + step])
                except BaseException:
                    with taking:
                        for _ in starts:
                            pass
                    raise

        # the calling thread is one of the `workers` runners: no hand-off for it, and never more
        # runners than cores (measured in bench/speed.py section 1)
        helpers = [self._executor().submit(drain) for _ in range(workers - 1)]
        try:
            drain()
        finally:  # wait for every helper, whatever happened here
            errors = [e for e in (f.exception() for f in helpers) if e is not None]
        if errors:
            raise errors[0]
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:  # a single vector: this thread's IO binding to preallocated buffers
            try:
                binding, x1, y1 = self._local.one
            except AttributeError:
                binding, x1, y1 = self._local.one = self._bind_one()
            x1[...] = x
            self._session.run_with_iobinding(binding)
            return y1.copy()  # the buffer is reused by this thread's next call
        return self._session.run([self._out], {self._in: x})[0]

    def _bind_one(self) -> tuple:
        """An IO binding of one (1, d_in) input and one (1, d_out) output buffer.

        Measured in bench/speed.py: a few microseconds less per single vector than `session.run`,
        which converts the input and allocates the output on every call. Per thread: a binding's
        buffers must not be shared by concurrent calls.
        """
        x1, y1 = np.zeros((1, self.d_in), np.float32), np.empty((1, self.d_out), np.float32)
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._in, x1)
        binding.bind_output(self._out, "cpu", 0, np.float32, list(y1.shape), y1.ctypes.data)
        return binding, x1, y1

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(self.threads - 1, 1), thread_name_prefix="simskip-refine")
            return self._pool

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        a = self.metadata.get("alpha")
        return (f"Refiner({self.source}, d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize}, "
                f"apply_to={self.apply_to}" + (f", alpha={a}" if a is not None else "")
                + (f", precision={self.precision}" if self.precision != "fp32" else "") + ")")


DOCUMENTS_PREFIX = "simskip-documents-"


def documents_path(refiner_path: str | os.PathLike, sha256: str) -> Path:
    """Where an exported refiner's document updates live: beside it, named by their content only, so a
    refiner file copied or renamed next to them still finds them."""
    return Path(refiner_path).with_name(f"{DOCUMENTS_PREFIX}{sha256[:16]}.bin")


def read_documents(refiner_path: Path, declared: dict) -> DocumentUpdates:
    """The document updates a refiner file declares (metadata "documents": file, sha256), hash-checked."""
    from ..persistence import plain_name

    name, sha = declared.get("file"), declared.get("sha256")
    if not plain_name(name) or not isinstance(sha, str):
        raise InputError(f"{refiner_path}: its document-updates record must name a file beside it and a sha256, "
                         f"got {name!r}")
    p = refiner_path.with_name(name)
    if p.is_symlink() or not p.is_file():
        raise FileNotFoundError(f"{refiner_path} carries document updates in {p}, which is missing: copy it with "
                                "the refiner (or retrain)")
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise InputError(f"{p} has been modified or belongs to another refiner (its sha256 differs from the one "
                         f"{refiner_path.name} records)")
    return DocumentUpdates.from_bytes(data, source=str(p))

