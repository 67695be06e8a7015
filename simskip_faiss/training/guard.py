"""The guard: train on an `EmbeddingData`, and choose the checkpoint and alpha on its validation split.

Candidates (each alpha of the two best checkpoints) are scored by `validation.Guard` and the one that
ships is chosen by the shipping rule in `metrics.scoring`: the best feasible mean relative gain over raw.
If no feasible alpha > 0 gains, or (with `confidence`) the gain's interval cannot tell it from noise,
the identity (alpha = 0) ships and the report says so. `fit` also races the lr/temperature candidates
and learns the document updates (nudge.py) against the shipped refiner.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..config import LR_GRID, TEMPERATURE_GRID, TrainConfig
from ..errors import InputError
from ..metrics.scoring import within_noise
from .loop import Evaluation, Run, TrainResult, torch_threads
from .nudge import UpdateChoice, learn
from .supervision import Supervision, _check_supervision
from .validation import Guard, _combine, _f

log = logging.getLogger(__name__)


@dataclass
class GuardReport:
    """What the guard saw and chose; stored in the ONNX metadata and printed."""

    alpha: float
    step: int
    criterion: str
    raw: dict[str, float]
    candidates: list[dict]
    reason: str
    signals: list[str] = field(default_factory=list)
    search: list[dict] = field(default_factory=list)  # lr/temperature candidates and their best objective
    # the best candidate's objective and each metric's change with paired-bootstrap intervals over the validation
    # queries (Guard.interval); empty when no candidate gained or nothing measures quality (unguarded, proxy)
    interval: dict = field(default_factory=dict)

    @property
    def within_noise(self) -> bool:
        """True when neither the best candidate's objective nor any of its validation metrics has a gain
        whose interval lies above 0 (`Guard.interval`)."""
        return within_noise(self.interval)

    def summary(self) -> str:
        lines = [f"guard: alpha={self.alpha:g} (step {self.step}), signals: {', '.join(self.signals) or '-'}",
                 f"  criterion: {self.criterion}", f"  {self.reason}"]
        if self.interval:
            iv = self.interval
            lines.append(f"  best validation gain {iv['objective']:+.4f} ({iv['level']:.0%} interval {iv['ci_low']:+.4f} to "
                         f"{iv['ci_high']:+.4f}) over " + ", ".join(f"{n} {t} queries" for t, n in iv["queries"].items())
                         + (": within noise, no interval above 0" if self.within_noise
                            else "; beyond noise: " + ", ".join(["objective"] * (iv["ci_low"] > 0) + iv["gains"])))
        for s in self.search:
            lines.append(f"  search: lr={s['lr']:g} temperature={s['temperature']:g}: best objective "
                         f"{s['objective']:+.4f} by step {s['step']}{' <' if s.get('chosen') else ''}")
        keys = list(self.raw)
        lines.append("  alpha  " + "  ".join(f"{k:>16}" for k in keys) + "  objective")
        lines.append("  raw    " + "  ".join(f"{self.raw[k]:16.4f}" for k in keys))
        for c in self.candidates:
            mark = " <" if c["alpha"] == self.alpha and self.alpha > 0 else ""
            lines.append(f"  {c['alpha']:<5g}  " + "  ".join(f"{c['metrics'][k]:16.4f}" for k in keys)
                         + f"  {c['objective']:+.4f}{'' if c['feasible'] else ' (drops)'}{mark}")
        return "\n".join(lines)


@dataclass
class FitResult(TrainResult):
    guard: GuardReport | None = None
    document_choice: UpdateChoice | None = None  # what the document-update step saw and chose (nudge.py)
    trained_on: dict | None = None  # fingerprints of the training and validation queries and rows (fingerprint.py)

    def metadata(self) -> dict:
        """What `export` stamps into the ONNX file: the training record plus the guard report."""
        meta = super().metadata()
        if self.guard is not None:
            meta["guard"] = asdict(self.guard)
        if self.document_choice is not None:
            meta["document_choice"] = asdict(self.document_choice)
        if self.trained_on is not None:
            meta["trained_on"] = self.trained_on
        return meta


def only_supervision(data, labels: bool = True, pairs: bool = True):
    """A copy of `data` keeping only the named supervision: what a user handing over just that would give."""
    kw = {}
    if not labels:
        kw.update(labels=None, label_names=None)
    if not pairs:
        kw.update(queries=None, query_split=None, qrels=None, query_text=None)
    return replace(data, **kw)


def supervision(data, rows: np.ndarray) -> Supervision:
    """The training signal of `data`: labels of `rows` (others hidden as -1) and pairs of queries in the train split."""
    labels = None
    if data.labels is not None:
        keep = np.zeros(len(data.labels), bool)
        keep[rows] = True
        labels = np.where(keep, data.labels, -1).astype(np.int64)
    return Supervision.from_qrels(data.queries, data.qrels, labels, data.split_queries("train"))


def fit(data, config: TrainConfig | None = None) -> FitResult:
    """Train on an `EmbeddingData`'s train split; the guard picks the checkpoint and alpha on its val split.

    Signals follow the data's supervision unless the config sets weights; lr and temperature left
    None are searched (each candidate trains `search_evals` validations, the best continues).
    Labels of non-train rows and pairs of non-train queries are hidden from training. If no alpha
    beats raw on validation, the result is the identity (alpha = 0) and the guard report says so.
    torch's thread count is restored on return.
    """
    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    deadline = t0 + cfg.time_budget if cfg.time_budget else None
    train_rows = data.split_rows("train")
    sup = supervision(data, train_rows)
    cfg = cfg.resolved(sup.has_labels, sup.has_pairs)
    sup = _check_supervision(cfg, sup, *data.corpus.shape)
    if len(train_rows) < 2:
        raise InputError(f"the train split has {len(train_rows)} rows; training needs at least 2")
    log.info("signals: %s", ", ".join(cfg.signals()))
    with torch_threads(cfg.threads):
        guard = Guard(data, cfg)
        if guard.proxy:  # no quality signal: checkpoints follow the held-out loss, alpha is chosen at the end
            run = Run(data.corpus, replace(cfg, lr=cfg.lr or LR_GRID[0]), sup, train_rows,
                      val_rows=data.split_rows("val"), deadline=deadline,
                      initial=None if cfg.guard else Evaluation(0, float("-inf"))).advance()
            search = []
        else:
            run, search = _search(data, cfg, sup, train_rows, guard, deadline)
        out = _finish(run, guard, search, t0, deadline)
        out.trained_on = _trained_on(data, cfg)
        if cfg.documents != "none" and cfg.guard and cfg.pair_weight and sup.has_pairs and "pairs" in guard.queries:
            if deadline is not None and time.perf_counter() > deadline:
                out.document_choice = UpdateChoice(cfg.documents, 0.0, 0.0, f"the time budget ({cfg.time_budget:g} s) "
                                                   "was spent in training: no document updates learned")
            else:
                _learn_documents(out, data, cfg)
            out.seconds = time.perf_counter() - t0
    log.info("%s", out.guard.summary())
    if out.document_choice is not None:
        log.info("%s", out.document_choice.summary())
    return out


def _trained_on(data, cfg: TrainConfig) -> dict:
    """The record of what this fit trained and validated on: query vectors of pairs it used, label rows it used."""
    from ..datasets.fingerprint import record

    parts = []
    if cfg.pair_weight and data.queries is not None and data.qrels is not None:
        used = [i for i in np.concatenate([data.split_queries("train"), data.split_queries("val")]) if data.qrels[i].size]
        parts.append(data.queries[np.asarray(used, dtype=np.int64)])
    if cfg.label_weight and data.labels is not None:
        parts.append(np.asarray(data.corpus[np.concatenate([data.split_rows("train"), data.split_rows("val")])]))
    return record(np.concatenate(parts) if parts else np.zeros((0, data.corpus.shape[1]), np.float32), cfg.seed)


def _learn_documents(out: FitResult, data, cfg: TrainConfig) -> None:
    """Document updates against the shipped refiner's queries (nudge.learn), chosen on the val split."""
    model = out.model
    alpha = float(model.alpha)

    def queries(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return _combine(x, _f(model, x), alpha, model.normalize)

    def documents(x: np.ndarray) -> np.ndarray:
        return queries(x) if model.apply_to == "both" else np.ascontiguousarray(x, dtype=np.float32)

    out.documents, out.document_choice = learn(data, queries, documents, method=cfg.documents, tolerance=cfg.tolerance,
                                               metric=cfg.metric, max_val_queries=cfg.max_val_queries, seed=cfg.seed)


def _search(data, cfg: TrainConfig, sup: Supervision, train_rows, guard: Guard, deadline):
    """Race the lr/temperature candidates for `search_evals` validations each; continue the best."""
    lrs = (cfg.lr,) if cfg.lr else LR_GRID
    temps = (cfg.temperature,) if cfg.temperature or not (cfg.label_weight or cfg.pair_weight or cfg.preserve_weight) \
        else TEMPERATURE_GRID
    grid = [(lr, t) for t in temps for lr in lrs]
    identity = Evaluation(0, 0.0 if cfg.guard else float("-inf"), 0.0)  # untrained f = 0: exactly raw
    runs, search = [], []
    for i, (lr, t) in enumerate(grid):
        if deadline is not None and runs and time.perf_counter() > deadline:
            log.warning("time budget reached during the lr/temperature search: %d of %d candidates tried", i, len(grid))
            break
        run = Run(data.corpus, replace(cfg, lr=lr, temperature=t or TEMPERATURE_GRID[0]), sup, train_rows,
                  guard.evaluator(f"lr={lr:g},t={t or TEMPERATURE_GRID[0]:g}"), initial=identity, deadline=deadline)
        runs.append(run.advance(cfg.search_evals if len(grid) > 1 else None))
        search.append({"lr": run.cfg.lr, "temperature": run.cfg.temperature, "objective": run.best.objective,
                       "step": run.best.step})
    best = max(range(len(runs)), key=lambda i: (runs[i].best.objective, -i))
    if len(grid) > 1:
        search[best]["chosen"] = True
        runs[best].advance()
        search[best].update(objective=runs[best].best.objective, step=runs[best].best.step)
    return runs[best], search


def _finish(run: Run, guard: Guard, search: list[dict], t0: float, deadline) -> FitResult:
    """The full alpha grid on the run's two best checkpoints; the better one ships, with its report."""
    res = run.result()
    model, cfg = res.model, res.config
    tried = []
    for step, state in run.checkpoints() if not guard.proxy else [(res.best_step, run.best_state)]:
        if step == 0 and cfg.guard:  # the untrained model is exactly raw: no need to search it
            same = [{"alpha": a, "metrics": dict(guard.raw), "feasible": True, "objective": 0.0} for a in guard.grid(True)]
            tried.append(((0.0, 0.0), 0, state, same))
            continue
        model.load_state_dict(state)
        cands = guard.sweep(model, guard.grid(final=True))
        tried.append((guard.choose(cands), step, state, cands))
    (obj, alpha), step, state, cands = max(tried, key=lambda t: (t[0][0], -t[1]))
    model.load_state_dict(state)
    model.alpha.fill_(alpha)
    model.eval()
    interval: dict = {}
    if not cfg.guard:
        reason = f"unguarded: alpha=1 at the checkpoint with the best validation objective (step {step})"
    elif alpha == 0:
        reason = "no alpha > 0 beat the raw vectors on validation without a drop: shipping the identity"
        if not guard.proxy and step == 0:  # show the trained checkpoint that came closest
            trained = [t for t in tried if t[1] > 0]
            if trained:
                cands, step = trained[0][3], trained[0][1]
                reason += f"; the table shows step {step}, the trained checkpoint that came closest"
    else:
        reason = f"alpha={alpha:g} at step {step} gave the best validation result with no metric dropping"
        if not guard.proxy:
            interval = guard.interval(model, alpha, ci=cfg.confidence or 0.95)
            if within_noise(interval) and cfg.confidence:
                reason = (f"alpha={alpha:g} at step {step} gained {interval['objective']:+.4f} on validation with no "
                          f"metric dropping, but neither its nor any metric's {interval['level']:.0%} interval lies "
                          "above 0: within noise, shipping the identity (confidence > 0). More validation labels or "
                          "pairs would tell")
                alpha = 0.0
                model.alpha.fill_(0.0)
            elif within_noise(interval):
                reason += ("; but the gain is within validation noise (no 95% interval lies above 0): more "
                           "validation labels or pairs would tell whether it is real (confidence=0.95, on the command "
                           "line --confidence 0.95, ships the identity instead)")
    if guard.proxy:
        reason += " (no labels or pairs to validate on: quality was not measured, only closeness to raw)"
    if run.stopped == "time_budget":
        reason += f"; training stopped at the time budget ({cfg.time_budget:g} s) after step {run.step}"
        if len(run.history) > 1 and run.history[1]["step"] < cfg.eval_every:
            reason += " (the budget ran out before the first scheduled validation: validated there instead)"
    if within_noise(interval):
        log.warning("the best validation gain %+.4f is within noise: neither its nor any metric's %.0f%% interval "
                    "lies above 0%s",
                    interval["objective"], 100 * interval["level"], "; shipping the identity" if alpha == 0 else "")
    out = FitResult(model=model, config=cfg, history=res.history, best_step=step, seconds=time.perf_counter() - t0,
                    n_train=res.n_train, stopped=res.stopped, corpus=res.corpus)
    out.guard = GuardReport(alpha=alpha, step=step, criterion=guard.criterion, raw=guard.raw, candidates=cands,
                            reason=reason, signals=cfg.signals(), search=search, interval=interval)
    return out
