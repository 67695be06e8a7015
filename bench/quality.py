"""Quality bench: raw vs free baselines vs SimSkip variants (guarded and not) on the WordNet default.

Every method is evaluated on the held-out test split through the same exact FAISS path, over
several seeds (each seed re-draws the train/val/test split and the training seed). Writes
bench/results/quality.json and bench/results/quality.md.

    python bench/quality.py                      # 3 seeds, every variant (~25 min on 2 cores, embeddings cached)
    python bench/quality.py --seeds 0 --variants unsup-guarded labels-guarded
    python bench/quality.py --update --variants labels-guard-ndcg   # re-run some variants, keep the others' results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import faiss  # noqa: E402
import torch  # noqa: E402

from simskip_faiss import datasets  # noqa: E402
from simskip_faiss.config import TrainConfig  # noqa: E402
from simskip_faiss.evaluation import EvalConfig, evaluate  # noqa: E402
from simskip_faiss.refiners import Refiner  # noqa: E402
from simskip_faiss.training.guard import fit  # noqa: E402

# explicit weights: the others are 0 (the defaults, signals following the supervision, are in robustness.py)
VARIANTS = {
    "unsup-unguarded": dict(unsupervised_weight=1, guard=False),
    "unsup-guarded": dict(unsupervised_weight=1),
    "labels-unguarded": dict(label_weight=1, guard=False),
    "labels-guarded": dict(label_weight=1),
    "labels-guarded-tol0.003": dict(label_weight=1, tolerance=0.003),
    "pairs-sym-guarded": dict(pair_weight=1, pair_mode="symmetric"),
    # query-only without the stay-put term (preserve_weight=0), as first measured; the default adds it
    "pairs-query-only-unguarded": dict(pair_weight=1, pair_mode="query_only", preserve_weight=0, guard=False),
    "pairs-query-only-guarded": dict(pair_weight=1, pair_mode="query_only", preserve_weight=0),
    "pairs-query-only-guard-pairs": dict(pair_weight=1, pair_mode="query_only", preserve_weight=0,
                                         guard_tasks=("pairs",)),
    "pairs-default": dict(pair_weight=1),  # query-only with stay-put (preserve_weight 1)
    # the guard protecting only the metric the target names: topic gain at no nDCG@10 loss
    "labels-guard-ndcg": dict(label_weight=1, guard_metrics=("pairs:ndcg@10",)),
    "labels-guard-ndcg-tol0.003": dict(label_weight=1, guard_metrics=("pairs:ndcg@10",), tolerance=0.003),
    "labels+pairs-guarded": dict(label_weight=1, pair_weight=1),
    # neighbourhood preservation (similarity-distribution KL) instead of / besides the alpha guard
    "labels+preserve-unguarded": dict(label_weight=1, preserve_weight=1, guard=False),
    "labels+preserve-guarded": dict(label_weight=1, preserve_weight=1),
}
METRICS = [("labels", "precision@10"), ("labels", "map@100"), ("pairs", "ndcg@10"), ("pairs", "recall@10"),
           ("pairs", "recall@100"), ("pairs", "mrr@10")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n-synsets", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--update", action="store_true",
                    help="merge these variants into the existing quality.json (same seeds) instead of replacing it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, t0 = [], time.perf_counter()
    for seed in args.seeds:
        data = datasets.load_wordnet(n_synsets=args.n_synsets, seed=0, progress=False,
                                     fractions=datasets.DEFAULT_FRACTIONS)
        data = resplit(data, seed)
        refiners, guards = {}, {}
        for name in args.variants:
            cfg = TrainConfig(seed=seed, threads=args.threads, progress=False, **VARIANTS[name])
            t = time.perf_counter()
            res = fit(data, cfg)
            path = out / "refiners" / f"{name}-seed{seed}.onnx"
            meta = res.export(path)
            refiners[name] = Refiner.load(path, threads=args.threads)
            guards[name] = {"alpha": meta["alpha"], "step": res.best_step, "train_seconds": round(time.perf_counter() - t, 1)}
            print(f"seed {seed} {name}: alpha={meta['alpha']:g} step={res.best_step} ({guards[name]['train_seconds']}s)", flush=True)
        rep = evaluate(data, refiners, EvalConfig(ann_factory=None, threads=args.threads, progress=False, seed=seed))
        print(rep.table(), flush=True)
        runs.append({"seed": seed, "quality": rep.quality, "guards": guards, "info": rep.info})
    meta = {"command": "python bench/quality.py " + " ".join(sys.argv[1:]), "machine": _machine(),
            "seconds": round(time.perf_counter() - t0), "seeds": args.seeds, "n_synsets": args.n_synsets}
    if args.update:
        runs, meta = merged(out / "quality.json", runs, meta)
    summary = summarise(runs)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1, default=float))
    (out / "quality.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))


def merged(path: Path, new: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """The runs in `path` with the variants of `new` replaced or added, seed by seed.

    Baseline rows (raw, centred, ...) are kept from the old runs: the same seed gives the same
    split, so they are the same numbers (checked on raw, which must agree exactly).
    """
    old = json.loads(path.read_text())
    by_seed = {r["seed"]: r for r in old["runs"]}
    if set(by_seed) != {r["seed"] for r in new}:
        raise SystemExit(f"--update needs the same seeds as {path}: {sorted(by_seed)}")
    for run in new:
        prev, names = by_seed[run["seed"]], set(run["guards"])
        raw = lambda rows: sorted((q["task"], q["metric"], q["value"]) for q in rows if q["method"] == "raw")  # noqa: E731
        if raw(prev["quality"]) != raw(run["quality"]):
            raise SystemExit(f"seed {run['seed']}: raw results differ from {path}; re-run every variant instead")
        prev["quality"] = [q for q in prev["quality"] if q["method"] not in names] + \
                          [q for q in run["quality"] if q["method"] in names]
        prev["guards"].update(run["guards"])
    meta = {**old["meta"], "updated": old["meta"].get("updated", []) + [{k: meta[k] for k in ("command", "machine", "seconds")}]}
    return [by_seed[s] for s in sorted(by_seed)], meta


def resplit(data, seed: int):
    """Same corpus, a new seeded train/val/test split; each usage example follows its synset."""
    split = datasets.make_splits(len(data.corpus), seed=seed)
    qs = np.array([split[r[0]] for r in data.qrels], dtype=np.int8)
    return dataclasses.replace(data, corpus_split=split, query_split=qs, info={**data.info, "split_seed": seed})


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in runs[0]["quality"]))
    for m in methods:
        row = {"method": m}
        for task, metric in METRICS:
            vals = [q["value"] for run in runs for q in run["quality"] if (q["method"], q["task"], q["metric"]) == (m, task, metric)]
            deltas = [q["delta"] for run in runs for q in run["quality"] if (q["method"], q["task"], q["metric"]) == (m, task, metric)]
            raw = [q["value"] for run in runs for q in run["quality"] if (q["method"], q["task"], q["metric"]) == ("raw", task, metric)]
            row[f"{task}:{metric}"] = (float(np.mean(vals)), float(np.std(vals)))
            row[f"{task}:{metric}:delta"] = (float(np.mean(deltas)), float(np.std(deltas)))
            row[f"{task}:{metric}:ratio"] = float(np.mean(np.array(vals) / np.array(raw)))
        alphas = [run["guards"][m]["alpha"] for run in runs if m in run["guards"]]
        row["alpha"] = alphas
        rows.append(row)
    return rows


def markdown(summary: list[dict], meta: dict) -> str:
    head = "| method | α per seed | " + " | ".join(f"{t} {m}" for t, m in METRICS) + " |"
    lines = [f"Command: `{meta['command']}` — {meta['machine']}, {meta['seconds']} s, seeds {meta['seeds']}.",
             "Mean ± std over seeds on held-out test queries; Δ = mean change vs raw."]
    for u in meta.get("updated", []):
        lines.append(f"Variants re-run with `{u['command']}` ({u['seconds']} s), merged with the rest.")
    lines += ["", head,
             "|---" * (len(METRICS) + 2) + "|"]
    for r in summary:
        cells = []
        for t, m in METRICS:
            v, s = r[f"{t}:{m}"]
            dv, _ = r[f"{t}:{m}:delta"]
            cells.append(f"{v:.4f} ± {s:.4f}" + ("" if r["method"] == "raw" else f" (Δ {dv:+.4f})"))
        alphas = ", ".join(f"{a:g}" for a in r["alpha"]) if r["alpha"] else "—"
        lines.append(f"| {r['method']} | {alphas} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}"


if __name__ == "__main__":
    main()
