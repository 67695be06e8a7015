"""Robustness bench: the guarded refiner with default settings across corpus sizes, data and signals.

WordNet + MiniLM subsets of 1k, 2k, 5k and 20k synsets, and scikit-learn's digits; each seed
re-draws the train/val/test split and the training seed; per signal the refiner is trained with
only that supervision (none, labels, pairs, both; digits has labels only) and TrainConfig's
defaults, and evaluated on the test split with every metric the data has (so a signal's effect on
the other task is visible). Writes bench/results/robustness.json and robustness.md, with the
issue's targets checked.

    python bench/robustness.py                               # everything (~40 min on 2 shared cores)
    python bench/robustness.py --sets wordnet-2000 digits --seeds 0
    python bench/robustness.py --variant labels+preserve:preserve_weight=1 --sets wordnet-20000
    python bench/robustness.py --merge a/robustness.json b/robustness.json   # runs split across processes
    python bench/robustness.py --protocol shared --signals pairs both   # queries split over a shared corpus

Protocols: "disjoint" (default; a query takes its synset's split, so no test query's document was a
training answer) and "shared" (queries split at random over the shared corpus, as logged pairs are and
as BEIR and the adapter papers measure): there the report adds the test queries whose documents have
training queries ("seen") and those without ("unseen"), and the baselines that use the same pairs — the
ridge query map alone and with the answer documents moved (mean and contrastive nudge), chosen on val —
as rows `ridge`, `ridge+mean`, `ridge+nudge`. Writes robustness-shared.json / .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
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
from simskip_faiss.training.guard import fit, only_supervision as only  # noqa: E402
from simskip_faiss.refiners import Refiner  # noqa: E402

SETS = ("wordnet-1000", "wordnet-2000", "wordnet-5000", "wordnet-20000", "digits")
SIGNALS = {"none": (False, False), "labels": (True, False), "pairs": (False, True), "both": (True, True)}
METRICS = [("labels", "precision@10"), ("labels", "map@100"), ("pairs", "ndcg@10"), ("pairs", "recall@100"),
           ("pairs", "mrr@10"), ("seen", "ndcg@10"), ("unseen", "ndcg@10")]
SHARED_BASELINES = ("ridge", "ridge+mean", "ridge+nudge")


def load(name: str, seed: int, protocol: str = "disjoint"):
    """The data set with a split drawn by `seed` (WordNet: the same synset subset for every seed); under the
    shared protocol its queries are split at random over the shared corpus (`datasets.shared_corpus`)."""
    if name == "digits":
        return datasets.load_digits(seed=seed)
    data = datasets.load_wordnet(n_synsets=int(name.split("-")[1]), seed=0, progress=False)
    split = datasets.make_splits(len(data.corpus), seed=seed)
    qs = np.array([split[r[0]] for r in data.qrels], dtype=np.int8)
    data = dataclasses.replace(data, corpus_split=split, query_split=qs, info={**data.info, "split_seed": seed})
    return datasets.shared_corpus(data, seed) if protocol == "shared" else data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    ap.add_argument("--variant", default="defaults",
                    help="NAME[:field=value,...] TrainConfig overrides, to compare a non-default setting")
    ap.add_argument("--protocol", choices=["disjoint", "shared"], default="disjoint",
                    help="how queries are split: by synset (disjoint, default) or at random over the shared corpus")
    ap.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1: shared machine)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine the runs of these result files (e.g. runs split across processes) and write them")
    ap.add_argument("--compare", nargs=2, metavar=("BASE", "OTHER"),
                    help="two result files: per data set and signal, OTHER's mean test metrics and time minus BASE's")
    args = ap.parse_args()
    if args.compare:
        print(compare(*(json.loads(Path(f).read_text()) for f in args.compare)))
        return
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        meta = {"command": " + ".join(p["meta"]["command"] for p in parts), "machine": parts[0]["meta"]["machine"],
                "seconds": sum(p["meta"]["seconds"] for p in parts), "variant": parts[0]["meta"]["variant"]}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(write(Path(args.out), parts[0]["meta"].get("name", "defaults"), [r for p in parts for r in p["runs"]], meta))
        return
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    name, _, spec = args.variant.partition(":")
    if args.protocol == "shared":
        name = "shared" if name == "defaults" else f"shared-{name}"
    overrides = {k: _value(k, v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for set_name in args.sets:
        for seed in args.seeds:
            data = load(set_name, seed, args.protocol)
            if args.protocol == "shared" and data.queries is None:
                continue
            refiners, fits = {}, {}
            with tempfile.TemporaryDirectory() as tmp:
                for sig in args.signals:
                    has_l, has_p = SIGNALS[sig]
                    if (has_p and data.queries is None) or (has_l and data.labels is None):
                        continue
                    t = time.perf_counter()
                    res = fit(only(data, has_l, has_p), TrainConfig(seed=seed, threads=args.threads, progress=False,
                                                                    **overrides))
                    secs = time.perf_counter() - t
                    res.export(Path(tmp) / f"{sig}.onnx")
                    refiners[sig] = Refiner.load(Path(tmp) / f"{sig}.onnx", threads=args.threads)
                    g = res.guard
                    fits[sig] = {"alpha": g.alpha, "step": res.best_step, "stopped": res.stopped, "seconds": round(secs, 1),
                                 "signals": g.signals, "lr": res.config.lr, "temperature": res.config.temperature,
                                 "within_noise": g.within_noise}
                    print(f"{set_name} seed {seed} {sig}: {fits[sig]}", flush=True)
                t = time.perf_counter()
                rep = evaluate(data, refiners, EvalConfig(baselines=("raw", *SHARED_BASELINES) if args.protocol == "shared"
                                                          else ("raw",), ann_factory=None, threads=args.threads,
                                                          progress=False, seed=seed, bootstrap=200))
                for b in rep.methods():  # the baselines that use the same pairs, as rows of their own
                    if b in SHARED_BASELINES:
                        fits[b] = {"alpha": float("nan"), "step": 0, "stopped": "", "seconds": 0.0, "signals": ["pairs"],
                                   "within_noise": False, "baseline": True}
            for sig, f in fits.items():
                vals = {f"{t}:{m}": (rep.value(sig, t, m), rep.value("raw", t, m)) for t, m in METRICS
                        if any(q["task"] == t for q in rep.quality)}
                # the change's paired-bootstrap interval, its test queries, and how many moved up and down
                change = {f"{r['task']}:{r['metric']}": {k: r[k] for k in ("ci_low", "ci_high", "n", "better", "worse")}
                          for r in rep.quality if r["method"] == sig and f"{r['task']}:{r['metric']}" in vals}
                rows.append({"set": set_name, "seed": seed, "signal": sig, "variant": name, **f, "metrics": vals,
                             "change": change})
            md = write(out, name, rows, {"command": "python bench/robustness.py " + " ".join(sys.argv[1:]),
                                         "machine": _machine(args.threads), "seconds": round(time.perf_counter() - t0),
                                         "variant": args.variant, "name": name,
                                         "protocol": args.protocol})  # after every seed: a partial run keeps its results
    print(md)


def _value(field: str, text: str):
    """A --variant value as the type of TrainConfig's default for `field` (None defaults: a float)."""
    default = getattr(TrainConfig(), field)
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false"):
            raise SystemExit(f"--variant {field}: give true or false, not {text!r}")
        return text.lower() in ("1", "true")
    if isinstance(default, tuple):  # e.g. alphas=0/0.5/1 (commas separate the overrides)
        return tuple(type(default[0] if default else "")(v) for v in text.split("/") if v)
    return type(default if default is not None else 1.0)(text)


def write(out: Path, name: str, rows: list[dict], meta: dict) -> str:
    path = out / ("robustness.json" if name == "defaults" else f"robustness-{name}.json")
    path.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    md = markdown(rows, meta)
    if name in ("defaults", "shared"):
        (out / ("robustness.md" if name == "defaults" else "robustness-shared.md")).write_text(md)
    return md


def summary(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (set, signal): raw value, change and ratio per metric, time, alphas."""
    out = []
    for key in dict.fromkeys((r["set"], r["signal"]) for r in rows):
        rs = [r for r in rows if (r["set"], r["signal"]) == key]
        s = {"set": key[0], "signal": key[1], "seconds": float(np.mean([r["seconds"] for r in rs])),
             "max_seconds": max(r["seconds"] for r in rs), "alpha": [r["alpha"] for r in rs],
             "noisy": [bool(r.get("within_noise")) for r in rs], "metrics": {}}
        for m in rs[0]["metrics"]:
            v = np.array([r["metrics"][m][0] for r in rs])
            raw = np.array([r["metrics"][m][1] for r in rs])
            s["metrics"][m] = {"raw": float(raw.mean()), "delta": float((v - raw).mean()), "ratio": float((v / raw).mean())}
            if all(m in r.get("change", {}) for r in rs):  # what the change is made of, per seed
                ch = [r["change"][m] for r in rs]
                s["metrics"][m].update(queries=[c["n"] for c in ch], better=[c["better"] for c in ch],
                                       worse=[c["worse"] for c in ch], gaining_seeds=sum(c["ci_low"] > 0 for c in ch),
                                       losing_seeds=sum(c["ci_high"] < 0 for c in ch))
        out.append(s)
    return out


def _noise(v: dict) -> str:
    """'; per seed: test queries, how many the refiner moved up and down, ...' for a metric with that record, else ''.

    What a mean change is made of: on small test splits one query moves a recall by 1/n.
    """
    if "queries" not in v:
        return ""
    j = lambda k: "/".join(map(str, v[k]))  # noqa: E731
    return (f"; per seed {j('queries')} test queries, {j('better')} up, {j('worse')} down, the 95% paired-bootstrap "
            f"interval above 0 in {v['gaining_seeds']} and below 0 in {v['losing_seeds']} of {len(v['queries'])} seeds")


def shared_targets(summ: list[dict]) -> list[tuple[str, bool, str]]:
    """The shared-corpus targets: WordNet 20k pairs nDCG@10 >= raw + 0.10 with unseen-document queries and topic
    mAP@100 >= raw - 0.005; every size, pairs above ridge+nudge and nothing below raw - 0.005."""
    res = []
    by = {(s["set"], s["signal"]): s for s in summ}
    for (st, sig), s in by.items():
        if sig != "pairs" or not st.startswith("wordnet"):
            continue
        m = s["metrics"]
        nd, unseen = m["pairs:ndcg@10"], m.get("unseen:ndcg@10", {"delta": float("nan")})
        worst_key = min(m, key=lambda k: m[k]["delta"])
        if st == "wordnet-20000":
            topic = m.get("labels:map@100", {"delta": float("nan")})["delta"]
            res.append(("wordnet-20000 pairs (shared corpus): nDCG@10 ≥ raw + 0.10, unseen-document queries ≥ raw − 0.005, "
                        "topic mAP@100 ≥ raw − 0.005", nd["delta"] >= 0.10 and unseen["delta"] >= -0.005 and topic >= -0.005,
                        f"nDCG@10 {nd['delta']:+.4f}{_noise(nd)}, unseen {unseen['delta']:+.4f}, topic mAP {topic:+.4f}"))
        nudge = by.get((st, "ridge+nudge"))
        if nudge is not None:
            gap = nd["delta"] - nudge["metrics"]["pairs:ndcg@10"]["delta"]
            res.append((f"{st} pairs (shared corpus): nDCG@10 above ridge + contrastive nudge, nothing below raw − 0.005",
                        gap > 0 and m[worst_key]["delta"] >= -0.005,
                        f"{gap:+.4f} vs ridge+nudge; worst Δ {m[worst_key]['delta']:+.4f} ({worst_key})"))
    return res


def targets(summ: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's targets, each (what, met, the numbers)."""
    res = []
    by = {(s["set"], s["signal"]): s for s in summ}
    for (st, sig), s in by.items():
        m = s["metrics"]
        if sig == "labels":
            others = {k: v["delta"] for k, v in m.items() if k != "labels:map@100" and k.startswith("labels")}
            ok = m["labels:map@100"]["ratio"] >= 1.25 and all(d >= -0.005 for d in others.values())
            res.append((f"{st} labels: mAP@100 ≥ 1.25× raw, other label metrics ≥ raw − 0.005", ok,
                        f"× {m['labels:map@100']['ratio']:.3f}, " + ", ".join(f"{k} {d:+.4f}" for k, d in others.items())))
        if sig == "none":
            key = min(m, key=lambda k: m[k]["delta"])
            worst = m[key]["delta"]
            res.append((f"{st} no supervision: no metric below raw − 0.005", worst >= -0.005,
                        f"worst Δ {worst:+.4f}" + (f", {key}{_noise(m[key])}" if worst < -0.005 else "")))
        if st == "wordnet-20000" and sig == "pairs":
            nd, topic = m["pairs:ndcg@10"]["delta"], min(v["delta"] for k, v in m.items() if k.startswith("labels"))
            res.append(("wordnet-20000 pairs: nDCG@10 ≥ raw + 0.03, topic ≥ raw − 0.005", nd >= 0.03 and topic >= -0.005,
                        f"nDCG@10 {nd:+.4f}{_noise(m['pairs:ndcg@10'])}, worst topic Δ {topic:+.4f}"))
        if st == "wordnet-20000" and sig == "both":
            r, nd = m["labels:map@100"]["ratio"], m["pairs:ndcg@10"]["delta"]
            res.append(("wordnet-20000 labels+pairs: mAP@100 ≥ 1.35× raw, nDCG@10 ≥ raw + 0.02", r >= 1.35 and nd >= 0.02,
                        f"× {r:.3f}, nDCG@10 {nd:+.4f}{_noise(m['pairs:ndcg@10'])}"))
        if st.startswith("wordnet") and int(st.split("-")[1]) < 5000 or st == "digits":
            res.append((f"{st} {sig}: trained in ≤ 60 s", s["max_seconds"] <= 60, f"max {s['max_seconds']:.0f} s"))
    return res


def markdown(rows: list[dict], meta: dict) -> str:
    summ = summary(rows)
    lines = [f"Command: `{meta['command']}` — {meta['machine']}, {meta['seconds']} s in all.",
             "Defaults only (variant: " + meta["variant"] + "); mean over seeds on the test split; "
             "raw absolute, then the change (Δ) vs raw; topic mAP also as a ratio. Training seconds include "
             "the lr/temperature search and the guard. An α marked * shipped on a validation gain with no 95% "
             "interval (the objective's or a metric's) above 0: the guard report calls it within noise; "
             "confidence=0.95 would ship the identity.", "",
             "| data | signal | α per seed | train s | topic p@10 | topic mAP@100 | ex→def nDCG@10 | ex→def R@100 | ex→def MRR@10 "
             "| nDCG@10, seen docs | nDCG@10, unseen docs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summ:
        cells = []
        for t, mname in METRICS:
            v = s["metrics"].get(f"{t}:{mname}")
            if v is None:
                cells.append("—")
            else:
                cells.append(f"{v['raw']:.4f} {v['delta']:+.4f}" + (f" (×{v['ratio']:.2f})" if mname == "map@100" else ""))
        alphas = ", ".join(f"{a:g}" + "*" * n for a, n in zip(s["alpha"], s["noisy"])) if s["seconds"] else "—"
        lines.append(f"| {s['set']} | {s['signal']} | {alphas} | {s['seconds']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""]
    shared = meta.get("protocol") == "shared"
    if shared:
        lines[1:1] = ["Protocol: shared corpus (queries split at random; seen = test queries whose document has training "
                      "queries). Rows ridge, ridge+mean, ridge+nudge are baselines on the same pairs, chosen on val."]
    for what, ok, nums in (shared_targets(summ) if shared else targets(summ)):
        lines.append(f"- {'met' if ok else '**not met**'}: {what} ({nums})")
    return "\n".join(lines) + "\n"


def compare(base: dict, other: dict) -> str:
    """Markdown: for each (set, signal) in both runs, OTHER − BASE of every mean test metric and of train seconds."""
    sb, so = ({(x["set"], x["signal"]): x for x in summary(r["runs"])} for r in (base, other))
    lines = [f"BASE: `{base['meta']['command']}` (variant {base['meta']['variant']}).",
             f"OTHER: `{other['meta']['command']}` (variant {other['meta']['variant']}).",
             "Mean over seeds on the test split: OTHER − BASE; train s is BASE → OTHER.", "",
             "| data | signal | train s | topic p@10 | topic mAP@100 | ex→def nDCG@10 | ex→def R@100 | ex→def MRR@10 "
             "| nDCG@10, seen docs | nDCG@10, unseen docs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in (k for k in sb if k in so):
        b, o = sb[key], so[key]
        cells = [f"{o['metrics'][m]['delta'] - b['metrics'][m]['delta']:+.4f}" if m in b["metrics"] else "—"
                 for m in (f"{t}:{n}" for t, n in METRICS)]
        lines.append(f"| {key[0]} | {key[1]} | {b['seconds']:.0f} → {o['seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _machine(threads: int) -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, {threads} torch/FAISS thread(s), "
            f"python {platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}")


if __name__ == "__main__":
    main()
