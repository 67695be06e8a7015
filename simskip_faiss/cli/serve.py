"""`build` (a refined index bundle), `search` (a bundle, results to .npz) and `info` (a bundle or refiner)."""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from ..config import INDEX_FACTORY, INDEX_TRAIN_SIZE, METRICS
from .common import (CLIError, add_corpus_model_option, check_output, corpus_model, load_npy, positive_int,
                     write_results)


def cmd_build(args) -> None:
    from ..checks import check_shape
    from ..index import RefinedIndex
    from ..refiners import load_refiner

    x = load_npy(args.corpus, "corpus")
    check_shape(x, name=f"corpus {args.corpus}")
    refiner = load_refiner(args.refiner, d=x.shape[1], threads=args.threads)
    ids = load_npy(args.ids, "ids", mmap=False) if args.ids else None
    if _old_corpus(refiner, args, x):
        return _build_old(refiner, x, ids, args)
    index = RefinedIndex(refiner, args.factory, args.metric, progress=not args.quiet)
    if not index.is_trained:
        index.train(_train_sample(x, args.train_size))
    docs = refiner.documents
    if docs is not None:  # the whole corpus is added: every updated document must be in it, under its id
        held = np.arange(len(x)) if ids is None else np.asarray(ids).reshape(-1)
        missing = len(docs) - np.isin(docs.ids, held).sum()
        if missing:
            raise CLIError(f"{args.refiner} carries document updates for {len(docs)} documents, keyed by "
                           f"{docs.meta.get('keys', 'corpus row')}; {missing} of them are not among the {'ids in ' + args.ids if args.ids else 'rows of ' + args.corpus}"
                           + ": build from the corpus the refiner was trained on, with the same ids")
    if ids is not None:
        index.add_with_ids(x, ids)
    else:
        index.add(x)
    index.save(args.output)
    print(f"wrote bundle {args.output}: {index}"
          + (f", {len(docs)} document updates applied" if docs is not None else ""))


def _train_sample(x, size: int) -> np.ndarray:
    n = min(len(x), size)
    return np.asarray(x[np.sort(np.random.default_rng(0).choice(len(x), n, replace=False))])


def _old_corpus(refiner, args, x) -> bool:
    """Whether CORPUS holds old-model vectors to store as they are behind a queries map (`--corpus-model old`);
    with such a map its width must be the model's side (common.corpus_model says which side is required)."""
    model = corpus_model(refiner, args, args.corpus, old_ok=True)
    if model is None:
        return False
    want = refiner.d_out if model == "old" else refiner.d_in
    if x.shape[1] != want:
        raise CLIError(f"{args.corpus} holds {x.shape[1]}-d vectors but {model}-model vectors are "
                       f"{want}-d for this map ({refiner.d_in}-d new -> {refiner.d_out}-d old)")
    return model == "old"


def _build_old(refiner, x, ids, args) -> None:
    """A bundle over old-model vectors stored as they are, behind a queries map: the FAISS index is built from the
    raw vectors, then wrapped (`RefinedIndex(map, index=...)` maps the new-model queries and later additions)."""
    from ..errors import faiss_reason
    from ..faiss_utils import build_index
    from ..index import RefinedIndex

    raw = build_index(args.factory, refiner.d_out, args.metric, refiner)
    if not raw.is_trained:
        raw.train(np.ascontiguousarray(_train_sample(x, args.train_size), dtype=np.float32))
    wrapped = RefinedIndex(refiner, raw, args.metric)  # refused (documents map, metric) before anything is added
    rows = np.ascontiguousarray(x, dtype=np.float32)
    try:
        raw.add(rows) if ids is None else raw.add_with_ids(rows, np.ascontiguousarray(ids, dtype=np.int64))
    except RuntimeError as e:
        raise CLIError(f"FAISS could not add {args.corpus}: {faiss_reason(e)}") from None
    wrapped.save(args.output)
    print(f"wrote bundle {args.output}: {wrapped} (old-model vectors stored as they are; new-model queries and "
          "additions go through the map)")


def cmd_search(args) -> None:
    from ..faiss_utils import parse_params, search_parameters
    from ..index import RefinedIndex

    check_output(args.output, "file")  # main checked it too; here it also guards a direct call
    parent = Path(args.output).absolute().parent
    if not parent.is_dir():  # one results file: a typo in its directory is refused, not created
        raise CLIError(f"cannot write {args.output}: directory {parent} does not exist (create it first)")
    index = RefinedIndex.load(args.bundle, threads=args.threads)
    try:
        params = search_parameters(index.index, **parse_params(args.param))
    except ValueError as e:
        raise CLIError(f"--param: {e}") from None
    q = load_npy(args.queries, "queries", mmap=False)
    t0 = time.perf_counter()
    D, I = index.search(q, args.k, params=params)
    dt = time.perf_counter() - t0
    write_results(args.output, D, I)
    print(f"wrote {args.output}: D, I of shape {I.shape} ({len(q) / dt:.0f} queries/s)")


def cmd_info(args) -> None:
    """A few lines on a bundle or refiner (what matters when choosing or checking one); --json: the whole record."""
    from ..persistence import read_manifest
    from ..refiners import Refiner

    def first_sentence(text: str) -> str:
        m = re.match(r"(.+?[.!?])(\s|$)", " ".join(str(text).split()))
        return m.group(1) if m else " ".join(str(text).split())

    def summary(info: dict) -> list[str]:
        """A few lines saying what a bundle manifest or a refiner record (as `info --json` prints them) holds."""
        bundle = info.get("format") == "simskip-faiss-bundle"
        r = info.get("refiner", {}) if bundle else info
        meta = r.get("metadata") or {}
        kind = r.get("kind", "onnx")
        lines = [f"{'bundle' if bundle else 'refiner'} {info.get('file', '')}".rstrip()
                 + f": kind {kind}" + (f", format {info.get('format_version')}" if bundle else "")]
        d_in = r.get("d_in", info.get("d"))
        lines.append(f"d_in {d_in}, d_out {r.get('d_out', info.get('d_out', d_in))}, normalize {r.get('normalize')}, "
                     f"apply_to {r.get('apply_to')}")
        train = [f"alpha {meta['alpha']:g}" if isinstance(meta.get("alpha"), (int, float)) else None,
                 f"precision {meta['precision']}" if meta.get("precision") else None,
                 f"signals {'+'.join(meta['signals'])}" if meta.get("signals") else None,
                 f"trained for metric {meta['metric']}" if meta.get("metric") else None]
        if any(train):
            lines.append(", ".join(t for t in train if t))
        guard = meta.get("guard")
        if isinstance(guard, dict):
            a = guard.get("alpha")
            lines.append(f"guard: alpha {a:g}" if isinstance(a, (int, float)) else "guard:")
            if guard.get("reason"):
                lines[-1] += f", {first_sentence(guard['reason'])}"
        docs = r.get("documents") or meta.get("documents")
        if isinstance(docs, dict) and docs.get("n") is not None:
            lines.append(f"{docs['n']} document updates" + (f" ({docs['file']})" if docs.get("file") else ""))
        if bundle:
            lines.append(f"ntotal {info.get('ntotal')}, factory {info.get('factory')}, metric {info.get('metric')}"
                         + (f", {info['index_type']}" if info.get("index_type") else ""))
        return lines

    p = Path(args.path)
    if p.is_dir():
        info = read_manifest(p)
    elif p.is_file():
        r = Refiner.load(p)
        info = {"file": str(p), "sha256": r.sha256, "d_in": r.d_in, "d_out": r.d_out, "normalize": r.normalize,
                "apply_to": r.apply_to, "metadata": r.metadata}
    else:
        raise CLIError(f"no bundle or refiner at {p}")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(summary(dict(info, file=info.get("file", str(p))))))
        print("(the whole record: --json)")


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register `build`, `search` and `info`."""
    s = sub.add_parser("build", parents=[common], help="build a refined index bundle",
                       description="Refine CORPUS.npy and add it to a FAISS index; save index + refiner as a bundle.")
    s.add_argument("refiner", help="refiner .onnx, or 'identity'")
    s.add_argument("corpus", help="corpus embeddings .npy (n, d)")
    s.add_argument("-o", "--output", required=True, help="bundle directory to write")
    s.add_argument("--factory", default=INDEX_FACTORY, help="FAISS index factory string (default: %(default)s)")
    s.add_argument("--metric", default="ip", choices=list(METRICS),
                   help="index metric: inner product (cosine on normalised vectors) or L2 (default: ip)")
    s.add_argument("--ids", help="int64 ids .npy, one per vector (use an IDMap factory for HNSW)")
    s.add_argument("--train-size", type=positive_int, default=INDEX_TRAIN_SIZE, help="vectors sampled to train IVF/PQ indexes")
    add_corpus_model_option(s, old=True)
    s.set_defaults(func=cmd_build, output_kind="dir")

    s = sub.add_parser("search", parents=[common], help="search a bundle",
                       description="Refine QUERIES.npy and search the bundle; writes D and I to an .npz file.")
    s.add_argument("bundle", help="bundle directory (written by build)")
    s.add_argument("queries", help="query embeddings .npy (m, d)")
    s.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    s.add_argument("-o", "--output", required=True, help="results .npz (arrays D, I)")
    s.add_argument("--param", action="append", help="index parameter, e.g. efSearch=128 or nprobe=16")
    s.set_defaults(func=cmd_search, output_kind="file")

    s = sub.add_parser("info", parents=[common], help="describe a bundle or refiner",
                       description="Summarise a bundle or a refiner in a few lines; --json prints the whole "
                                   "manifest or metadata.")
    s.add_argument("path", help="bundle directory or refiner file")
    s.add_argument("--json", action="store_true", help="print the whole manifest or metadata as JSON")
    s.set_defaults(func=cmd_info)
