"""`eval` (refiners against raw and the free baselines) and `run` (the main job: train, export, build,
evaluate, report)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..config import EVAL_FACTORY, INDEX_FACTORY, MAX_EVAL_QUERIES, METRICS
from .common import CLIError, add_data_options, add_train_options, data_from_args, train_config


def _with_test_qrels(data, path: str):
    """`data` whose test split is exactly the queries of the qrels file `path` (scored whole); the other
    queries keep their split (train/val pairs for the supervised baselines)."""
    from dataclasses import replace

    from ..datasets.loaders import parse_qrels

    if data.queries is None:
        raise CLIError("--test-qrels needs --corpus and --queries (the held-out queries' vectors)")
    test = parse_qrels(path, len(data.queries), len(data.corpus))
    held = np.array([i for i, r in enumerate(test) if r.size], dtype=np.int64)
    known = data.qrels or [np.zeros(0, np.int64)] * len(data.queries)
    both = [int(i) for i in held if known[i].size]
    if both:
        raise CLIError(f"queries {both[:5]} ({len(both)} in all) have relevant documents in both --qrels and "
                       f"--test-qrels {path}: a held-out query cannot also be a training pair")
    split = np.where(np.isin(np.arange(len(data.queries)), held), 2,
                     np.where(data.query_split == 2, 0, data.query_split)).astype(np.int8)
    qrels = [test[i] if test[i].size else known[i] for i in range(len(data.queries))]
    return replace(data, query_split=split, qrels=qrels, info={**data.info, "test_qrels_file": path})


def cmd_eval(args) -> None:
    from ..evaluation import EvalConfig, evaluate
    from ..refiners import Refiner

    if args.test_qrels and not args.queries:
        raise CLIError("--test-qrels needs --corpus and --queries (the held-out queries' vectors)")
    data = data_from_args(args)
    if args.test_qrels:
        data = _with_test_qrels(data, args.test_qrels)
    refiners = {}
    for spec in args.refiner or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        refiners[name] = Refiner.load(path, threads=args.threads)
    cfg = EvalConfig(factory=args.factory, metric=args.metric, ann_factory=args.ann_factory or None,
                     threads=args.threads, progress=not args.quiet, max_queries=args.max_queries)
    report = evaluate(data, refiners, cfg)
    report.info["command"] = "simskip-faiss " + " ".join(sys.argv[1:])
    print(report.table())
    if args.output:
        report.write(args.output)
        print(f"\nwrote {args.output}/report.md, report.json and plots")


def cmd_run(args) -> None:
    """The main job (`job.run`) on the data's own protocol; for built-in data with queries, on both protocols:
    by synset (disjoint) in OUTPUT and over a shared corpus (logged pairs' regime) in OUTPUT/shared."""
    from ..job import run

    base = train_config(args)
    protocols = [args.protocol] if args.protocol or getattr(args, "corpus", None) else ["disjoint", "shared"]
    out = Path(args.output)
    for i, protocol in enumerate(protocols):
        data = data_from_args(args, protocol=protocol)
        if protocol == "shared" and data.queries is None and len(protocols) > 1:
            break  # a data set without queries has one protocol
        where = out if i == 0 else out / protocol
        if len(protocols) > 1:
            print(f"\n=== protocol: {protocol} ({'queries take their document' + chr(39) + 's split' if protocol == 'disjoint' else 'queries split at random over the shared corpus'}) -> {where}")
        res = run(data, where, base, factory=args.factory, metric=args.metric, threads=args.threads,
                  seed=args.split_seed, command="simskip-faiss " + " ".join(sys.argv[1:]), say=print)
        print(res.report.table())
        print(f"\nreport: {where / 'report.md'} ({res.seconds['total']:.0f}s)")


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register `eval` and `run`."""
    s = sub.add_parser("eval", parents=[common], help="evaluate refiners against raw and baselines",
                       description="Retrieval quality (labels and/or query->document pairs) and ANN recall in the "
                                   "refined space, for raw, mean-centred, PCA-whitened, all-but-the-top and each --refiner.")
    add_data_options(s, default="wordnet")
    s.add_argument("--refiner", action="append", help="NAME=PATH.onnx or PATH.onnx (repeatable)")
    s.add_argument("--factory", default=EVAL_FACTORY, help="index for quality metrics (default: exact %(default)s)")
    s.add_argument("--ann-factory", default=INDEX_FACTORY, help="index for the ANN recall sweep ('' to skip)")
    s.add_argument("--metric", default="ip", choices=list(METRICS),
                   help="index metric: inner product (cosine on normalised vectors) or L2 (default: ip)")
    s.add_argument("--max-queries", type=int, default=MAX_EVAL_QUERIES,
                   help="test queries scored per task at most, a seeded sample above it (default: %(default)s)")
    s.add_argument("--test-qrels", help="held-out qrels (TSV as --qrels): exactly these queries are the test split, "
                                        "scored whole; --qrels, if given, are train/validation pairs for the baselines")
    s.add_argument("-o", "--output", help="directory for report.md, report.json and PNG plots")
    s.set_defaults(func=cmd_eval, output_kind="dir")

    s = sub.add_parser("run", parents=[common], help="the main job: train, export, build, evaluate, report",
                       description="Load a data set (WordNet + MiniLM by default; --data digits or synthetic, or "
                                   "--n-synsets, for a small run), train two guarded refiners on its train split: the "
                                   "paper's unsupervised one and one on every label and pair the data has (the signal "
                                   "weights are set per refiner; the other training options apply to both). Export "
                                   "both, ship the one better on the validation split in refiner.onnx and bundle/, and "
                                   "evaluate both on the test split against raw and the free baselines.")
    add_data_options(s, default="wordnet")
    s.add_argument("-o", "--output", default="runs/wordnet", help="output directory (default: runs/wordnet)")
    s.add_argument("--factory", default=INDEX_FACTORY, help="index of the bundle and of the ANN sweep")
    add_train_options(s)  # includes --metric
    s.set_defaults(func=cmd_run, output_kind="dir")
