"""The main job as a Python function: what `simskip-faiss run` (and `make demo`) does, callable without the CLI.

data -> the paper's unsupervised refiner and one on every label and pair the data has, each guarded ->
export both -> choose one on the VALIDATION split -> bundle it -> evaluate both on the test split against
raw and every baseline -> report (report.md, report.json, plots) in `output`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import EVAL_FACTORY, INDEX_FACTORY, THREADS, TrainConfig
from .datasets import EmbeddingData

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What the main job made: the shipped refiner's name, the report, the bundle, and the time of each stage."""

    shipped: str
    report: object  # evaluation.EvalReport
    bundle: Path
    seconds: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # what the job said, in order (the CLI prints them)


def signals(data: EmbeddingData) -> dict[str, dict]:
    """The refiners the main job trains: the paper's unsupervised one, and one on all the supervision the data has."""
    out = {"unsupervised": dict(unsupervised_weight=1.0, label_weight=0.0, pair_weight=0.0)}
    labels, pairs = data.labels is not None, data.queries is not None and data.qrels is not None
    if labels or pairs:
        out["supervised"] = dict(unsupervised_weight=0.0, label_weight=float(labels), pair_weight=float(pairs))
    return out


def run(data: EmbeddingData, output: str | Path, config: TrainConfig | None = None, factory: str = INDEX_FACTORY,
        metric: str = "ip", threads: int = THREADS, seed: int = 0, command: str = "",
        say: Callable[[str], None] | None = None) -> JobResult:
    """Train, export, choose on validation, bundle, evaluate and report `data` into `output` (see the module doc).

    `say`: called with each line of what the job does as it goes (the CLI prints them); default: logged."""
    from .evaluation import EvalConfig, build, choose_refiner, evaluate
    from .training.export import replace_refiner
    from .training.guard import fit
    from .refiners import Refiner

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base = config or TrainConfig()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    lines = _Lines(say or log.info)
    lines.append(data.summary())
    refiners, guards = {}, {}
    for name, weights in signals(data).items():
        t = time.perf_counter()
        res = fit(data, dataclasses.replace(base, **weights))
        path = out / f"refiner-{name}.onnx"
        meta = res.export(path, precision="auto")
        seconds[f"train+export {name}"] = round(time.perf_counter() - t, 1)
        refiners[name], guards[name] = Refiner.load(path, threads=threads), meta.get("guard")
        docs = refiners[name].documents
        lines.append(f"\n[{name}] {', '.join(f'{k}={v:g}' for k, v in weights.items())}: exported {path} "
                     f"(alpha={meta['alpha']:g}, {meta['precision']}, {export_checks(meta)}"
                     + (f", {len(docs)} document updates" if docs is not None else "") + ")")
        if res.guard:
            lines.append(res.guard.summary())
        if res.document_choice is not None:
            lines.append(res.document_choice.summary())
    ecfg = EvalConfig(factory=EVAL_FACTORY, metric=metric, ann_factory=factory if factory != EVAL_FACTORY else None,
                      threads=threads, progress=base.progress, seed=seed)
    t = time.perf_counter()
    shipped, val = choose_refiner(data, refiners, ecfg, tolerance=base.tolerance)
    seconds["choose on val"] = round(time.perf_counter() - t, 1)
    why = (f"best validation objective {val[shipped]['objective']:+.4f} (mean relative gain over raw; "
           + ", ".join(f"{n} {val[n]['objective']:+.4f}" for n in refiners) + ")") if val else "the only refiner"
    lines.append(f"\nshipping {shipped}: {why}")
    src = out / f"refiner-{shipped}.onnx"  # its document updates, if any, are beside it already
    replace_refiner(out / "refiner.onnx", src.read_bytes(), refiners[shipped].metadata)
    chosen = refiners[shipped]
    t = time.perf_counter()
    index = build(chosen, data, factory, metric, progress=base.progress)
    bundle = out / "bundle"
    index.save(bundle)
    seconds["bundle"] = round(time.perf_counter() - t, 1)
    lines.append(f"saved bundle {bundle} ({shipped}): {index}")
    t = time.perf_counter()
    report = evaluate(data, refiners, ecfg)
    seconds["evaluate on test"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    report.info.update(command=command, shipped=f"{shipped}: {why}", validation=val, guard=guards, seconds=seconds,
                       protocol=data.info.get("protocol", "disjoint"))
    report.write(out)
    return JobResult(shipped, report, bundle, seconds, list(lines))


class _Lines(list):
    """The job's lines, each also said as it is added."""

    def __init__(self, say: Callable[[str], None]):
        super().__init__()
        self.say = say

    def append(self, line: str) -> None:
        super().append(line)
        self.say(line)


def export_checks(meta: dict) -> str:
    """What export verified: parity, neighbours on the corpus, any fallback."""
    out = f"ONNX parity max abs err {meta['parity_max_abs_err']:.1e}"
    if "sample_recall" in meta:
        out += f", 10-recall@10 vs fp32 on the corpus {meta['sample_recall']:.4f}"
    return out + (f"; {meta['precision_fallback']}" if "precision_fallback" in meta else "")
