"""The closed-form ridge-to-identity query map on bench/robustness.py's own splits, for comparison
with the pairs-alone refiner there (same WordNet subsets, same seeds, same test queries).

The map is the evaluation's `ridge` baseline: fitted on the train split's pairs, lambda chosen on
validation nDCG@10, applied to every query (documents raw), so topic queries move too.

    python bench/ridge_baseline.py --sets wordnet-1000 wordnet-2000 wordnet-5000 wordnet-20000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from robustness import METRICS, load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["wordnet-20000"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import faiss

    from simskip_faiss.evaluation import EvalConfig, evaluate

    faiss.omp_set_num_threads(args.threads)
    names = [f"{t}:{m}" for t, m in METRICS]
    print("| data | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for name in args.sets:
        deltas = {n: [] for n in names}
        for seed in args.seeds:
            data = load(name, seed)
            rep = evaluate(data, {}, EvalConfig(baselines=("raw", "ridge"), ann_factory=None, threads=args.threads,
                                                progress=False, seed=seed, bootstrap=10))
            for t, m in METRICS:
                deltas[f"{t}:{m}"].append(rep.value("ridge", t, m) - rep.value("raw", t, m))
        print(f"| {name} | " + " | ".join(f"{np.mean(deltas[n]):+.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
