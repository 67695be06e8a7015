"""Frontier bench: how each topic-task gain trades against example→definition retrieval as α varies.

The guard picks one α on validation; this shows the whole curve on the held-out test split, so a
user who can accept a small loss on one task sees what it buys on the other. For each seed and
signal, one unguarded model is trained (checkpoint chosen on validation as usual); its residual scale α
in refined = x + α·f(x) is then swept, each α exported to ONNX and evaluated through the same exact
FAISS path as bench/quality.py. Writes bench/results/frontier.{json,md}.

    python bench/frontier.py                  # 3 seeds, 4 signals (~5 min on 2 cores, embeddings cached)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import torch  # noqa: E402
from quality import METRICS, _machine, resplit  # noqa: E402

from simskip_faiss import datasets  # noqa: E402
from simskip_faiss.config import TrainConfig  # noqa: E402
from simskip_faiss.evaluation import EvalConfig, evaluate  # noqa: E402
from simskip_faiss.refiners import Refiner  # noqa: E402
from simskip_faiss.training.guard import fit  # noqa: E402

SIGNALS = {
    "unsup": dict(unsupervised_weight=1),
    "unsup+preserve": dict(unsupervised_weight=1, preserve_weight=1),
    "labels": dict(label_weight=1),
    "labels+preserve": dict(label_weight=1, preserve_weight=1),
}
ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t0, rows = time.perf_counter(), []
    base = datasets.load_wordnet(seed=0, progress=False, fractions=datasets.DEFAULT_FRACTIONS)
    for seed in args.seeds:
        data = resplit(base, seed)
        with tempfile.TemporaryDirectory() as tmp:
            refiners = {}
            for sig in args.signals:
                res = fit(data, TrainConfig(seed=seed, threads=args.threads, progress=False,
                                            guard=False, **SIGNALS[sig]))
                for a in args.alphas:
                    res.model.alpha.fill_(a)
                    path = Path(tmp) / f"{sig}-{a:g}.onnx"
                    res.export(path)
                    refiners[f"{sig}@{a:g}"] = Refiner.load(path, threads=args.threads)
                print(f"seed {seed} {sig}: step {res.best_step}", flush=True)
            rep = evaluate(data, refiners, EvalConfig(ann_factory=None, threads=args.threads, progress=False, seed=seed))
        for q in rep.quality:
            if "@" in q["method"] and (q["task"], q["metric"]) in METRICS:
                sig, a = q["method"].rsplit("@", 1)
                rows.append({"seed": seed, "signal": sig, "alpha": float(a), "task": q["task"], "metric": q["metric"],
                             "value": q["value"], "delta": q["delta"], "raw": q["value"] - q["delta"]})
    summary = summarise(rows)
    meta = {"command": "python bench/frontier.py " + " ".join(sys.argv[1:]), "machine": _machine(),
            "seconds": round(time.perf_counter() - t0), "seeds": args.seeds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    (out / "frontier.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each (signal, α): delta per metric, and the mAP ratio to raw."""
    out = []
    for sig in dict.fromkeys(r["signal"] for r in rows):
        for a in sorted({r["alpha"] for r in rows if r["signal"] == sig}):
            s = {"signal": sig, "alpha": a}
            for task, metric in METRICS:
                sel = [r for r in rows if (r["signal"], r["alpha"], r["task"], r["metric"]) == (sig, a, task, metric)]
                s[f"{task}:{metric}:delta"] = float(np.mean([r["delta"] for r in sel]))
                s[f"{task}:{metric}:ratio"] = float(np.mean([r["value"] / r["raw"] for r in sel]))
            out.append(s)
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [f"Command: `{meta['command']}` — {meta['machine']}, {meta['seconds']} s, seeds {meta['seeds']}.",
             "Unguarded models, α swept on the held-out test split; mean Δ vs raw over seeds "
             "(mAP also as a ratio to raw). α = 0 is raw.", "",
             "| signal | α | topic p@10 Δ | topic mAP@100 Δ (× raw) | ex→def nDCG@10 Δ | ex→def R@10 Δ | ex→def R@100 Δ | ex→def MRR@10 Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['signal']} | {s['alpha']:g} | {s['labels:precision@10:delta']:+.4f} | "
                     f"{s['labels:map@100:delta']:+.4f} ({s['labels:map@100:ratio']:.3f}) | {s['pairs:ndcg@10:delta']:+.4f} | "
                     f"{s['pairs:recall@10:delta']:+.4f} | {s['pairs:recall@100:delta']:+.4f} | {s['pairs:mrr@10:delta']:+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
