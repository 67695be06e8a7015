"""Changing the embedding model without re-indexing (issue 31): maps between MiniLM (384-d) and mpnet (768-d)
fitted by `fit_map` from paired embeddings of the WordNet corpus sample, scored on the test queries.

Data: WordNet 5k synsets, corpus = definitions, queries = usage examples (ex->def, qrels = own synset).
Pairs = the train-split corpus rows embedded by both models (no labels); the guard holds out a seeded
10% of them (seed = the pair split). Test = the test-split queries against the whole corpus (disjoint
protocol: no test query's document is a pair). Cells:

* queries, old=X new=Y: new-model test queries mapped into the old index (old corpus vectors untouched);
  quality relative to the old model's own queries on its own index ("index model's own").
* documents, old=X new=Y: the old corpus vectors mapped into the new space, searched with raw new-model
  queries; relative to the new model's own index (full re-embedding).

Per candidate (ridge, procrustes, learned, and what the guard shipped): nDCG@10 and R@10 of the mapped
search, their fraction of the index model's own, 10-recall@10 against the index model's own search
(re-embedded neighbours), fit time, and the paired-bootstrap interval of its nDCG@10 minus Procrustes's;
with --relevant, the learned and shipped maps of a second fit given the train-split judgements (example ->
definition across the models). Then single-query cost of the shipped map (and the bare fp32 product, its
floor), ingest throughput against a same-width SimSkip refiner, and fit time on 20k pairs (synthetic
768->384, timing only). --protocol shared re-splits the queries on their own (a test query's definition may
be among the pairs and judgements).

    python bench/migration.py --seeds 0 1 2 --threads 2 --relevant --no-variant --out bench/results/migration.md
    python bench/migration.py --seeds 0 1 2 --threads 2 --relevant --no-variant --protocol shared \
        --timing-pairs 0 --out bench/results/migration-shared.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MPNET = "sentence-transformers/all-mpnet-base-v2"


class CachedMpnet:
    """mpnet embeddings from the cache only (load_wordnet calls the encoder on a cache miss: refuse)."""

    name = MPNET

    def __call__(self, texts):
        raise SystemExit("mpnet embeddings are not cached for this WordNet subset")


def normalize(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def search(q, corpus, k=10):
    import faiss

    ix = faiss.IndexFlatIP(corpus.shape[1])
    ix.add(np.ascontiguousarray(corpus, np.float32))
    return ix.search(np.ascontiguousarray(q, np.float32), k)[1]


def metrics(I, qrels, own_I=None):
    from simskip_faiss.metrics import retrieval_metrics_qrels
    from simskip_faiss.metrics.ranking import knn_recall

    from simskip_faiss.metrics.ranking import per_query_metrics

    r = retrieval_metrics_qrels(I, qrels, ks=(10,))
    out = {"ndcg@10": r["ndcg@10"], "recall@10": r["recall@10"],
           "per_query": per_query_metrics(I, qrels, ks=(10,))["ndcg@10"]}
    if own_I is not None:
        out["10-recall@10"] = knn_recall(own_I, I, ks=(10,))["10-recall@10"]
    return out


class _Bare:
    """x @ W with nothing else: the floor of any dense map's single-query cost."""

    def __init__(self, W):
        self.W = W

    def transform(self, x):
        return x @ self.W


def single_query_us(refiner, x, reps=2000):
    """Median microseconds of refiner.transform on one (1, d) row, one thread."""
    q = np.ascontiguousarray(x[:1], np.float32)
    for _ in range(50):
        refiner.transform(q)
    t = []
    for i in range(reps):
        row = np.ascontiguousarray(x[i % len(x)][None], np.float32)
        s = time.perf_counter()
        refiner.transform(row)
        t.append(time.perf_counter() - s)
    return float(np.median(t) * 1e6)


INGEST_ROWS = 50_000


def throughput(refiner, x):
    """Rows per second of refiner.transform over x, best of 3."""
    refiner.transform(x[:1000])
    best = min(_timed(refiner.transform, x) for _ in range(3))
    return len(x) / best


def _timed(f, x):
    s = time.perf_counter()
    f(x)
    return time.perf_counter() - s


def ingest_table(results, threads):
    """The shipped map of each width pair against a same-input-width SimSkip refiner, rows/s."""
    import tempfile

    from simskip_faiss import Refiner
    from simskip_faiss.config import DEFAULT_PRECISION
    from simskip_faiss.training.export import export
    from simskip_faiss.training.model import SimSkip

    out = ["| map | d_in -> d_out | map rows/s | same-width SimSkip fp32 rows/s | ratio | SimSkip "
           f"{DEFAULT_PRECISION} rows/s | ratio |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for res in results:
        if (res.d_in, res.d_out, res.shipped) in seen:
            continue
        seen.add((res.d_in, res.d_out, res.shipped))
        x = normalize(np.random.default_rng(0).standard_normal((INGEST_ROWS, res.d_in)))
        with tempfile.TemporaryDirectory() as tmp:
            res.export(Path(tmp) / "map.onnx")
            mapped = throughput(Refiner.load(Path(tmp) / "map.onnx", threads=threads), x)
            base = {}
            for precision in ("fp32", DEFAULT_PRECISION):
                export(SimSkip(res.d_in).eval(), Path(tmp) / f"r-{precision}.onnx", precision=precision)
                base[precision] = throughput(Refiner.load(Path(tmp) / f"r-{precision}.onnx", threads=threads), x)
        out.append(f"| {res.shipped} | {res.d_in} -> {res.d_out} | {mapped:,.0f} | {base['fp32']:,.0f} | "
                   f"{mapped / base['fp32']:.2f} | {base[DEFAULT_PRECISION]:,.0f} | {mapped / base[DEFAULT_PRECISION]:.2f} |")
    return out


def cell(data, direction, old, new, seed, overrides, variant=False, relevant=False):
    """One (direction, old model, new model, seed): every candidate's test metrics; with `relevant`, also the
    learned and shipped maps of a second fit given the train-split judgements (query -> its definition)."""
    from simskip_faiss.training.mapping import fit_map

    emb = {"MiniLM": data["MiniLM"], "mpnet": data["mpnet"]}
    O, N = emb[old], emb[new]
    train, test, qrels = data["train"], data["test"], data["qrels"]
    if direction == "queries":   # new queries -> old index
        src, tgt = N.corpus[train], O.corpus[train]
        index_own = search(O.queries[test], O.corpus)
        corpus = normalize(O.corpus)
    else:                        # old documents -> new space, new queries raw
        src, tgt = O.corpus[train], N.corpus[train]
        index_own = search(N.queries[test], N.corpus)
    res = fit_map(src, tgt, direction=direction, seed=seed, **overrides)
    rows = {}
    for name in res.candidates:
        ref = res.candidate(name)
        if direction == "queries":
            I = search(ref.transform(N.queries[test]), corpus)
        else:
            I = search(N.queries[test], ref.transform(O.corpus))
        rows[name] = {**metrics(I, qrels, index_own), "fit_s": res.candidates[name]["seconds"],
                      "guard": res.candidates[name][f"reembedded@{res.config.k}"],
                      "steps": res.candidates[name].get("steps")}
    rows["shipped"] = {**rows[res.shipped], "name": res.shipped}
    if relevant:
        q, d = data["rel_queries"], data["rel_docs"]
        rel = (N.queries[q], O.corpus[d]) if direction == "queries" else (O.corpus[d], N.queries[q])
        r2 = fit_map(src, tgt, direction=direction, seed=seed, relevant=rel, **overrides)
        for name, label in (("learned", "learned +relevant"), (r2.shipped, "shipped +relevant")):
            ref = r2.candidate(name)
            I = search(ref.transform(N.queries[test]), corpus) if direction == "queries" else \
                search(N.queries[test], ref.transform(O.corpus))
            rows[label] = {**metrics(I, qrels, index_own), "fit_s": r2.candidates[name]["seconds"],
                           "guard": r2.candidates[name][f"reembedded@{r2.config.k}"],
                           "steps": r2.candidates[name].get("steps"), "name": r2.shipped}
    if variant:  # the learned map with P trained too (seed 0 only: the measurement asked for P frozen vs trained)
        v = fit_map(src, tgt, direction=direction, seed=seed, **{**overrides, "train_projection": True})
        ref = v.candidate("learned")
        I = search(ref.transform(N.queries[test]), corpus) if direction == "queries" else \
            search(N.queries[test], ref.transform(O.corpus))
        rows["learned, P trained (seed 0)"] = {**metrics(I, qrels, index_own), "fit_s": v.candidates["learned"]["seconds"],
                                               "guard": v.candidates["learned"][f"reembedded@{v.config.k}"]}
    return res, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="WordNet synsets (2000 or 5000 have mpnet cached)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the pair split")
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    ap.add_argument("--cells", nargs="+", default=["queries:MiniLM:mpnet", "queries:mpnet:MiniLM",
                                                    "documents:MiniLM:mpnet", "documents:mpnet:MiniLM"],
                    help="direction:old:new")
    ap.add_argument("--set", nargs="*", default=[], help="MapConfig overrides key=value (exploration)")
    ap.add_argument("--timing-pairs", type=int, default=20000, help="synthetic pairs for the fit-time check (0: skip)")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--protocol", choices=["disjoint", "shared"], default="disjoint",
                    help="disjoint: queries inherit their synset's split; shared: queries split on their own "
                         "(a test query's definition may be among the pairs and the judgements)")
    ap.add_argument("--relevant", action="store_true",
                    help="also fit each cell with the train-split queries' judgements (fit_map(relevant=...))")
    ap.add_argument("--no-variant", dest="variant", action="store_false",
                    help="skip the learned map with P trained (first seed of each cell)")
    args = ap.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    from simskip_faiss import __version__
    from simskip_faiss.datasets import load_wordnet
    from simskip_faiss.metrics.ranking import paired_bootstrap

    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = {"true": True, "false": False}.get(v.lower(), v)
        for cast in (int, float):
            try:
                overrides[k] = cast(v)
                break
            except ValueError:
                pass
    old = load_wordnet(args.n, progress=False)
    new = load_wordnet(args.n, encoder=CachedMpnet(), progress=False)
    if args.protocol == "shared":
        from simskip_faiss.datasets.container import shared_corpus

        old, new = shared_corpus(old), shared_corpus(new)
    assert (old.query_split == new.query_split).all() and (old.corpus_split == new.corpus_split).all()
    test = np.flatnonzero(old.query_split == 2)
    trq = np.flatnonzero(old.query_split == 0)
    data = {"MiniLM": old, "mpnet": new, "train": np.flatnonzero(old.corpus_split == 0), "test": test,
            "qrels": [old.qrels[i] for i in test],
            "rel_queries": np.array([i for i in trq for _ in old.qrels[i]], dtype=np.int64),
            "rel_docs": np.array([j for i in trq for j in old.qrels[i]], dtype=np.int64)}
    own = {m: metrics(search(e.queries[test], e.corpus), data["qrels"]) for m, e in (("MiniLM", old), ("mpnet", new))}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    lines = [f"Command: `python bench/migration.py {' '.join(sys.argv[1:])}`",
             f"Machine: {os.cpu_count()} cores ({cpu}), shared with other jobs; torch and FAISS {args.threads} threads; "
             f"simskip_faiss {__version__}, torch {torch.__version__}, faiss {faiss.__version__}; {time.strftime('%Y-%m-%d')}.",
             "", f"WordNet {args.n} synsets, ex->def, {args.protocol} protocol: {len(test)} test queries over {len(old.corpus)} definitions; "
             f"pairs = {len(data['train'])} train-split definitions embedded by both models (guard: 10% held out, "
             f"seeded); seeds {args.seeds}" + (f"; MapConfig overrides {overrides}" if overrides else "") + ".", "",
             "Each model's own queries on its own index: " + ", ".join(
                 f"{m} nDCG@10 {v['ndcg@10']:.4f} R@10 {v['recall@10']:.4f}" for m, v in own.items()), ""]
    print("\n".join(lines), flush=True)
    table = ["| cell | map | nDCG@10 | R@10 | nDCG / own | R@10 / own | 10-recall@10 vs own | guard reembedded@10 | fit s "
             "| Δ nDCG@10 vs Procrustes [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    shipped_refs = []
    for spec in args.cells:
        direction, o, n = spec.split(":")
        idx_model = o if direction == "queries" else n
        ref_own = own[idx_model]
        per = {}
        for seed in args.seeds:
            res, rows = cell(data, direction, o, n, seed, overrides, variant=seed == args.seeds[0] and args.variant,
                             relevant=args.relevant)
            print(f"[{spec} seed {seed}] " + " | ".join(res.summary()), flush=True)
            for name, r in rows.items():
                per.setdefault(name, []).append(r)
            shipped_refs.append((spec, res))
        label = (f"queries: {n} queries -> {o} index" if direction == "queries"
                 else f"documents: {o} docs -> {n} space")
        for name, rs in per.items():
            m = {k: np.mean([r[k] for r in rs]) for k in ("ndcg@10", "recall@10", "10-recall@10", "fit_s", "guard")}
            sd = np.std([r["ndcg@10"] for r in rs])
            shown = name if name != "shipped" else "shipped (" + ", ".join(r["name"] for r in rs) + ")"
            if name.startswith("shipped "):
                shown = name + " (" + ", ".join(r["name"] for r in rs) + ")"
            if name.startswith("learned"):
                shown += " (kept step " + ", ".join(str(r["steps"]) for r in rs) + ")"
            # paired bootstrap over the test queries of the seed-mean per-query nDCG@10, against Procrustes
            a = np.mean([r["per_query"] for r in per["procrustes"]], axis=0)
            b = np.mean([r["per_query"] for r in rs], axis=0)
            pb = paired_bootstrap(a, b, n=2000, seed=0)
            ci = "" if name == "procrustes" else f"{pb['diff']:+.4f} [{pb['ci_low']:+.4f}, {pb['ci_high']:+.4f}]"
            table.append(f"| {label} | {shown} | {m['ndcg@10']:.4f} ± {sd:.4f} | {m['recall@10']:.4f} | "
                         f"{m['ndcg@10'] / ref_own['ndcg@10']:.1%} | {m['recall@10'] / ref_own['recall@10']:.1%} | "
                         f"{m['10-recall@10']:.4f} | {m['guard']:.4f} | {m['fit_s']:.1f} | {ci} |")
        table.append(f"| {label} | {idx_model}'s own (re-embedded) | {ref_own['ndcg@10']:.4f} | "
                     f"{ref_own['recall@10']:.4f} | 100% | 100% | 1.0000 | | | |")
        other = n if direction == "queries" else o
        what = "full re-embedding with the new model" if direction == "queries" else "no migration"
        table.append(f"| {label} | {other}'s own ({what}) | {own[other]['ndcg@10']:.4f} | {own[other]['recall@10']:.4f} | "
                     f"{own[other]['ndcg@10'] / ref_own['ndcg@10']:.1%} | {own[other]['recall@10'] / ref_own['recall@10']:.1%} | | | | |")
        print("\n".join(table[-len(per) - 2:]), flush=True)
    lines += table + [""]
    # cost: single query through the shipped map of each cell (seed 0), one thread
    from threadpoolctl import threadpool_limits

    cost = ["| cell | map | d_in -> d_out | µs per single query (median, 1 thread) |", "|---|---|---|---|"]
    one_thread = threadpool_limits(1)  # numpy's BLAS too (onnxruntime: Refiner.load(threads=1))
    seen = set()
    for spec, res in shipped_refs:
        if spec in seen:
            continue
        seen.add(spec)
        import tempfile

        from simskip_faiss import Refiner

        x = np.random.default_rng(0).standard_normal((256, res.d_in)).astype(np.float32)
        names = [res.shipped] + (["learned"] if res.model is not None and res.shipped != "learned" else [])
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                res.export(Path(tmp) / "map.onnx", name=name)
                served = Refiner.load(Path(tmp) / "map.onnx", threads=1)
            cost.append(f"| {spec} | {name}{' (shipped)' if name == res.shipped else ''}: the ONNX file | "
                        f"{res.d_in} -> {res.d_out} | {single_query_us(served, x):.1f} |")
            if name != "learned":
                lin = res.candidate(name)
                cost.append(f"| {spec} | {name}: as a LinearRefiner (numpy) | {res.d_in} -> {res.d_out} | "
                            f"{single_query_us(lin, x):.1f} |")
                W = np.ascontiguousarray(lin.A.T, dtype=np.float32)  # the floor: the fp32 matrix-vector product alone
                cost.append(f"| {spec} | {name}: numpy `x @ W` alone (no bias, no normalisation, no checks) | "
                            f"{res.d_in} -> {res.d_out} | {single_query_us(_Bare(W), x):.1f} |")
    one_thread.restore_original_limits()
    lines += ["Single-query cost of the maps (the search itself excluded):", ""] + cost + [""]
    print("\n".join(cost), flush=True)
    ingest = ingest_table([res for _, res in shipped_refs], args.threads)
    lines += [f"Ingest throughput (Refiner.transform of {INGEST_ROWS} rows, {args.threads} threads, best of 3): the "
              "shipped map's ONNX file against a product refiner of the same input width (SimSkip, default "
              "hidden width, exported by training.export at fp32 and at the default precision):", ""] + ingest + [""]
    print("\n".join(ingest), flush=True)
    if args.timing_pairs:
        from simskip_faiss.training.mapping import fit_map

        rng = np.random.default_rng(0)
        S = normalize(rng.standard_normal((args.timing_pairs, 768)))
        T = normalize(np.tanh(S @ rng.standard_normal((768, 384)) / 4) + 0.05 * rng.standard_normal((args.timing_pairs, 384)))
        t = time.perf_counter()
        res = fit_map(S, T, direction="queries", **overrides)
        line = (f"Fit time on {args.timing_pairs} synthetic pairs 768 -> 384 (timing only, the data is random): "
                f"{time.perf_counter() - t:.1f} s in all (" + ", ".join(
                    f"{n} {c['seconds']:.1f} s" + (f" / {c['steps']} steps" if "steps" in c else "")
                    for n, c in res.candidates.items()) + ").")
        lines += [line, ""]
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
