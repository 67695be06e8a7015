"""`train` (a guarded refiner, exported to ONNX), `train-map` (a map between two embedding models' spaces, from
paired embeddings) and `quantize` (an fp32 refiner to int8 or fp16)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DEFAULT_PRECISION
from ..job import export_checks
from .common import CLIError, add_data_options, add_train_options, data_from_args, load_npy, train_config

TRAIN_FRACTIONS = (0.9, 0.1, 0.0)  # `train` uses every labelled row and pair: train + validation, no test


def cmd_train(args) -> None:
    """Train (guarded by default) and export. Supervision given (labels, pairs) is all used for
    training and validation: the data is split 90/10 with no test slice (evaluation is `eval`)."""
    from ..training.loop import train

    if args.queries and not args.qrels:  # nothing would use them: pairs need their relevant documents
        raise CLIError("--queries without --qrels: training learns from queries only as query->document pairs; "
                       "give --qrels (TSV: query_row<TAB>doc_row) or leave out --queries")
    cfg = train_config(args)
    if args.corpus_npy and not (args.labels or args.qrels) and not cfg.guard:
        res = train(args.corpus_npy, cfg)  # streamed from the memory-mapped file
    else:
        from ..training.guard import fit

        if args.corpus_npy:
            args.corpus = args.corpus_npy
        data = data_from_args(args, fractions=TRAIN_FRACTIONS)
        ids = None
        if args.ids:  # checked before training: one unique int64 id per corpus row
            from ..checks import as_ids

            ids = as_ids(load_npy(args.ids, "ids", mmap=False), len(data.corpus), name=f"ids {args.ids}")
        if data.queries is not None and data.qrels is not None:
            print(_pair_split(data), file=sys.stderr)
        res = fit(data, cfg)
        if ids is not None and res.documents is not None:  # updates keyed by the user's document ids, not rows
            res.documents = res.documents.renamed(ids, f"the ids in {args.ids}")
        print(res.guard.summary(), file=sys.stderr)
        if res.document_choice is not None:
            print(res.document_choice.summary(), file=sys.stderr)
    meta = res.export(args.output, precision=args.precision)  # a reduced precision is checked on the corpus too
    print(f"wrote {args.output}: d={meta['d_in']}, alpha={meta['alpha']:g}, signals {'+'.join(meta['signals'])}, "
          f"apply_to={meta['apply_to']}, {meta['precision']}, trained in {res.seconds:.1f}s (best step "
          f"{res.best_step}, stopped: {res.stopped}), {export_checks(meta)}")


def _pair_split(data) -> str:
    """One line on how the pairs were split: queries per split, and validation queries whose documents
    have training queries (the ones document updates can help) and those whose documents have none."""
    from ..metrics.scoring import seen_queries

    val = data.split_queries("val")
    seen = int(seen_queries(data, val).sum())
    counts = "/".join(str(len(data.split_queries(s))) for s in ("train", "val", "test"))
    return (f"pairs split ({data.info.get('protocol', 'disjoint')} corpus): queries train/val/test {counts}; "
            f"{seen} of {len(val)} validation queries have a document with training queries, {len(val) - seen} do not")


def cmd_train_map(args) -> None:
    """Fit ridge, Procrustes and a learned map between OLD and NEW on the pairs (NEW -> OLD for queries, OLD -> NEW
    for documents), ship the best on held-out pairs, export it to one ONNX file. Bad pairs are refused before
    anything is fitted or written."""
    from ..training.mapping import check_pairs, fit_map

    old, new = (load_npy(p, what, mmap=False) for p, what in ((args.old, "old-model"), (args.new, "new-model")))
    if args.direction == "queries":
        source, target, names = new, old, (args.new, args.old)
    else:
        source, target, names = old, new, (args.old, args.new)
    source, target = check_pairs(source, target, names=names)
    relevant = None
    if args.relevant:
        relevant = tuple(load_npy(p, what, mmap=False) for p, what in zip(args.relevant, ("relevant source",
                                                                                        "relevant target")))
    res = fit_map(source, target, direction=args.direction, seed=args.seed, learned=not args.no_learned,
                  threads=args.threads, relevant=relevant)
    for line in res.summary():
        print(line, file=sys.stderr)
    meta = res.export(args.output)
    print(f"wrote {args.output}: {res.shipped} map, direction {res.direction}, {meta['d_in']}-d -> {meta['d_out']}-d, "
          f"apply_to={meta['apply_to']}, reproduces {res.recovered:.1%} of the re-embedded top {res.config.k} on "
          f"{res.n_val} held-out pairs, fitted in {res.seconds:.1f}s, parity max abs err {meta['parity_max_abs_err']:.1e}")


def cmd_quantize(args) -> None:
    from ..training.export import quantize

    if not Path(args.refiner).is_file():
        raise CLIError(f"refiner file not found: {args.refiner}")
    sample = load_npy(args.sample, "sample") if args.sample else None
    meta = quantize(args.refiner, args.output, precision=args.precision, sample=sample)
    print(f"wrote {args.output}: {meta['precision']} refiner, max abs err {meta['parity_max_abs_err']:.2e} "
          f"vs {args.refiner} (tolerance {meta['parity_tolerance']:g})"
          + (f", 10-recall@10 vs it on {args.sample} {meta['sample_recall']:.4f}" if "sample_recall" in meta else ""))


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register `train`, `train-map` and `quantize`."""
    s = sub.add_parser("train", parents=[common], help="train a refiner and export it to ONNX",
                       description="Train a SimSkip refiner on CORPUS.npy (or a data set) and export it to one ONNX file.")
    s.add_argument("corpus_npy", nargs="?", help="corpus embeddings .npy (n, d); omit to use --data")
    s.add_argument("-o", "--output", required=True, help="refiner .onnx to write")
    s.add_argument("--ids", help="int64 document ids .npy, one per corpus row: document updates are keyed by them "
                                 "(give the same file to build --ids); default: corpus row numbers")
    add_data_options(s, default="wordnet")
    add_train_options(s)
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
                   help=f"weights of the exported file: auto (default) is {DEFAULT_PRECISION} when it passes its parity check "
                        "against torch and keeps 10-recall@10 >= 0.99 against fp32 on the corpus, and fp32 when it "
                        "does not (said in the output and the file); int8 (dynamic "
                        "quantisation: about half the single-query latency at the same quality; see "
                        "bench/results/speed.md), fp32 or fp16 (half the file)")
    s.set_defaults(func=cmd_train, output_kind="file")

    s = sub.add_parser("train-map", parents=[common], help="fit a map between two embedding models from paired embeddings",
                       description="Change the embedding model without re-indexing: fit a map between the old and the "
                                   "new model's spaces from paired embeddings (row i of both files embeds the same text; "
                                   "no labels), choose ridge, Procrustes or a learned map on held-out pairs, and export "
                                   "it to one ONNX file.")
    s.add_argument("old", help="old-model embeddings .npy (n, d_old): what the index holds today")
    s.add_argument("new", help="new-model embeddings .npy (n, d_new) of the same texts, row for row")
    s.add_argument("-o", "--output", required=True, help="map .onnx to write")
    s.add_argument("--direction", default="queries", choices=["queries", "documents"],
                   help="queries (default): new-model queries (and new documents) are mapped into the old index's "
                        "space, the vectors it holds stay as they are; documents: old stored vectors are mapped into the new model's "
                        "space once, new-model queries search them raw")
    s.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split of the pairs (default: 0)")
    s.add_argument("--no-learned", action="store_true", help="fit only the closed-form maps (ridge, Procrustes)")
    s.add_argument("--relevant", nargs=2, metavar=("SOURCE.npy", "TARGET.npy"),
                   help="relevance judgements across the models, row for row (optional): queries direction, new-model "
                        "queries and the old-model vectors of their relevant documents; documents direction, "
                        "old-model document vectors and new-model queries that should find them. The learned map "
                        "trains on them and the guard judges every map on a held-out 10%% of them")
    s.set_defaults(func=cmd_train_map, output_kind="file")

    s = sub.add_parser("quantize", parents=[common], help="convert an fp32 refiner to int8 or fp16",
                       description="Convert an exported fp32 refiner to int8 (dynamic quantisation) or fp16 weights, "
                                   "verified against the fp32 file; no torch needed.")
    s.add_argument("refiner", help="fp32 refiner .onnx")
    s.add_argument("-o", "--output", required=True, help="refiner .onnx to write")
    s.add_argument("--precision", default="int8", choices=["int8", "fp16"],
                   help="weights of the converted file: int8 (dynamic quantisation; the default) or fp16")
    s.add_argument("--sample", metavar="CORPUS.npy",
                   help="your vectors (e.g. the corpus): report the converted file's 10-recall@10 against the fp32 "
                        "file on them, and warn below 0.99")
    s.set_defaults(func=cmd_quantize, output_kind="file")
