"""Train a SimSkip refiner (refined = x + alpha * f(x)) on existing embeddings, with torch: the loop.

The network is in `model`, the losses in `losses`, the labels and pairs in `supervision`; this module
runs the optimizer and keeps the best checkpoint, and knows nothing about retrieval metrics. f's last
layer starts at zero, so training starts from the identity.

The budget is counted in optimizer steps, not epochs, so a 1k-row corpus trains as long as a
1M-row one (batches shrink for small corpora). Every `eval_every` steps the loop calls
`evaluate(model, step) -> Evaluation`; the checkpoint with the best objective is kept, and
training stops after `patience` evaluations without improvement, at `max_steps`, or at the
deadline. `guard.py` supplies the evaluator from validation retrieval metrics (and chooses alpha);
without one, `train` scores minus the loss on a held-out slice of the corpus.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import LR_GRID, TEMPERATURE_GRID, TrainConfig
from ..errors import InputError
from ..refiners.documents import DocumentUpdates
from .losses import _Augment, _column_std, _Losses, _rows
from .model import SimSkip
from .supervision import Supervision, _check_supervision, _corpus, _held_out_pairs

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One validation of the model at an optimizer step; higher `objective` is better."""

    step: int
    objective: float
    alpha: float = 1.0                       # the alpha this objective was reached at
    detail: dict = field(default_factory=dict)


Evaluator = Callable[["SimSkip", int], Evaluation]


@dataclass
class TrainResult:
    model: SimSkip
    config: TrainConfig                      # resolved: concrete signal weights, lr and temperature
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    seconds: float = 0.0
    n_train: int = 0
    stopped: str = ""                        # why training ended: patience, max_steps, time_budget
    # the corpus it was trained on (a reference, not a copy): export's default `sample` for the neighbour check
    corpus: np.ndarray | None = field(default=None, repr=False, compare=False)
    # document updates learned from the pairs (nudge.py; `fit` only), exported beside the refiner file
    documents: DocumentUpdates | None = field(default=None, repr=False, compare=False)

    def metadata(self) -> dict:
        """What `export` stamps into the ONNX file besides dimensions."""
        return {"config": asdict(self.config), "metric": self.config.metric, "best_step": self.best_step,
                "train_seconds": round(self.seconds, 2), "n_train": self.n_train, "stopped": self.stopped,
                "apply_to": self.config.apply_to(), "signals": self.config.signals()}

    def export(self, path: str | os.PathLike, precision: str = "fp32", sample=None) -> dict:
        """Export the trained refiner with its metadata (apply_to, signals, guard report); returns it.

        precision: "fp32", "fp16", "int8", or "auto" (int8 unless it fails its parity check, or its
        neighbours on `sample` differ from fp32's: see export). sample: default, the training corpus."""
        from .export import export

        return export(self.model, path, self.metadata(), precision=precision,
                      sample=self.corpus if sample is None else sample, documents=self.documents)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use `n` torch intra-op threads inside the block and restore the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batch_size(cfg: TrainConfig, n_units: int) -> int:
    """`cfg.batch_size`, shrunk for small sets so that one pass is at least 8 steps (never below 32)."""
    return max(2, min(cfg.batch_size, max(32, n_units // 8), n_units))


class Run:
    """One training run that can be advanced a few evaluations at a time (the lr/temperature search
    advances several, then continues the best). `cfg` must be resolved (`TrainConfig.resolved`)."""

    def __init__(self, corpus: np.ndarray, cfg: TrainConfig, sup: Supervision, train_rows: np.ndarray,
                 evaluate: Evaluator | None = None, val_rows: np.ndarray | None = None,
                 initial: Evaluation | None = None, deadline: float | None = None,
                 train_pairs: np.ndarray | None = None, val_pairs: np.ndarray | None = None):
        if not cfg.is_resolved():
            raise InputError("Run needs a resolved TrainConfig (TrainConfig.resolved)")
        self.cfg = cfg = replace(cfg, lr=cfg.lr or LR_GRID[0], temperature=cfg.temperature or TEMPERATURE_GRID[0])
        self.corpus, self.sup, self.evaluate, self.deadline = corpus, sup, evaluate, deadline
        n, d = corpus.shape
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.label_weight > 0 and cfg.unsupervised_weight == 0:  # supcon needs labelled rows
            train_rows = train_rows[sup.labels[train_rows] >= 0]
        self.train_rows = train_rows
        if cfg.pair_weight > 0:  # pair ids to learn from (default: all); val_pairs are held out for HeldOutLoss
            self.pairs = np.arange(len(sup.pair_query)) if train_pairs is None else np.asarray(train_pairs, np.int64)
        else:
            self.pairs = None
        rows_used = cfg.unsupervised_weight > 0 or cfg.label_weight > 0 or cfg.preserve_weight > 0
        n_units = len(train_rows) if rows_used else len(self.pairs)
        self.batch = batch_size(cfg, n_units)
        per_pass = max(1, math.ceil(n_units / self.batch))
        self.max_steps = min(cfg.max_steps, cfg.epochs * per_pass) if cfg.epochs else cfg.max_steps
        self.model = SimSkip(d, cfg.hidden, cfg.depth, cfg.activation, cfg.normalize, cfg.apply_to())
        self.losses = _Losses(cfg, d, _Augment(_column_std(corpus, self.rng), cfg.mask_prob, cfg.noise_scale), sup)
        self.opt = torch.optim.AdamW(list(self.model.parameters()) + list(self.losses.head.parameters()),
                                     lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.evaluate is None:
            self.evaluate = HeldOutLoss(corpus, np.asarray(val_rows if val_rows is not None else [], np.int64)[: cfg.max_val],
                                        cfg, self.losses, None if self.pairs is None or val_pairs is None
                                        else np.asarray(val_pairs, np.int64)[: cfg.max_val])
        self.step, self.bad, self.done, self.stopped, self.seconds = 0, 0, False, "", 0.0
        self.model.eval()
        self.best = initial if initial is not None else self.evaluate(self.model, 0)
        self.best_state = _state(self.model)
        self.top: list[tuple[float, int, dict]] = [(self.best.objective, 0, self.best_state)]
        self.history = [{"step": 0, "loss": float("nan"), "val": self.best.objective, "alpha": self.best.alpha}]
        self._order, self._pos, self._porder, self._ppos = np.zeros(0, np.int64), 0, np.zeros(0, np.int64), 0

    def _next(self, order, pos, pool):
        if pos + self.batch > len(order):
            order, pos = self.rng.permutation(pool), 0
        return order, pos + self.batch, order[pos:pos + self.batch]

    def _train_step(self) -> float:
        self.model.train()
        rows = pb = None
        self._order, self._pos, rows = self._next(self._order, self._pos, self.train_rows)
        if self.pairs is not None:
            self._porder, self._ppos, pb = self._next(self._porder, self._ppos, self.pairs)
        parts = self.losses(self.model, _rows(self.corpus, rows), rows, self.corpus, self.gen, pb)
        loss = self.losses.total(parts)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    def advance(self, evaluations: int | None = None) -> "Run":
        """Train until stopped, or until `evaluations` more validations have happened."""
        t0, done_evals, losses = time.perf_counter(), 0, []
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", disable=not self.cfg.progress)
        while not self.done and (evaluations is None or done_evals < evaluations):
            if self.step > 0 and self.deadline is not None and time.perf_counter() > self.deadline:
                self.done, self.stopped = True, "time_budget"
                break
            losses.append(self._train_step())
            bar.update(1)
            late = self.deadline is not None and time.perf_counter() > self.deadline
            if self.step % self.cfg.eval_every and self.step < self.max_steps and not late:
                continue
            self._validate(float(np.mean(losses)), late)
            losses, done_evals = [], done_evals + 1
            bar.set_postfix(step=self.step, best=f"{self.best.objective:.4f}")
        bar.close()
        self.seconds += time.perf_counter() - t0
        return self

    def _validate(self, loss: float, late: bool) -> None:
        self.model.eval()
        ev = self.evaluate(self.model, self.step)
        self.history.append({"step": self.step, "loss": loss, "val": ev.objective, "alpha": ev.alpha})
        log.info("step %d: train loss %.4f, validation objective %.4f", self.step, loss, ev.objective)
        state = _state(self.model)
        # an evaluator may ask for a relative margin (`min_gain`) before a result counts as progress
        margin = getattr(self.evaluate, "min_gain", 0.0) * abs(self.best.objective) if math.isfinite(self.best.objective) else 0
        if ev.objective > self.best.objective + margin or not math.isfinite(self.best.objective):
            self.best, self.best_state, self.bad = ev, state, 0
        else:
            self.bad += 1
        ranked = [t for t in self.top + [(ev.objective, self.step, state)] if not math.isnan(t[0])]
        self.top = sorted(ranked, key=lambda t: -t[0])[:2]
        if late:
            self.done, self.stopped = True, "time_budget"
        elif self.bad >= self.cfg.patience:
            self.done, self.stopped = True, "patience"
        elif self.step >= self.max_steps:
            self.done, self.stopped = True, "max_steps"

    def result(self) -> TrainResult:
        """The best checkpoint (model in eval mode) and the run's record."""
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(model=self.model, config=self.cfg, history=self.history, best_step=self.best.step,
                           seconds=self.seconds, n_train=len(self.train_rows), stopped=self.stopped or "max_steps",
                           corpus=self.corpus)

    def checkpoints(self) -> list[tuple[int, dict]]:
        """(step, weights) of the best two validations, best first."""
        return [(st, s) for _, st, s in self.top]


def train(corpus, config: TrainConfig | None = None, supervision: Supervision | None = None,
          train_rows: np.ndarray | None = None, val_rows: np.ndarray | None = None,
          evaluate: Evaluator | None = None) -> TrainResult:
    """Train a SimSkip refiner on `corpus` (array or .npy path, memory-mapped).

    Signals follow `supervision` unless the config sets weights; lr and temperature default to
    the first of LR_GRID / TEMPERATURE_GRID (`guard.fit` searches them on validation).
    `train_rows`/`val_rows` choose the rows to learn from and to hold out (default: a seeded
    `val_fraction` slice held out; with pairs, the pairs of a seeded `val_fraction` of the queries
    are held out too, so that the default evaluator scores the pair term on pairs it never trained
    on). `evaluate(model, step) -> Evaluation` scores checkpoints (default: minus the loss on the
    held-out rows and pairs). torch's thread count is restored on return.
    """
    cfg = config or TrainConfig()
    corpus = _corpus(corpus)
    n, d = corpus.shape
    sup = supervision or Supervision()
    cfg = cfg.resolved(sup.has_labels, sup.has_pairs)
    sup = _check_supervision(cfg, sup, n, d)
    if train_rows is None:
        perm = np.random.default_rng(cfg.seed).permutation(n)
        n_val = max(2, int(round(cfg.val_fraction * n))) if cfg.val_fraction > 0 else 0
        val_rows, train_rows = perm[:n_val], perm[n_val:]
    train_pairs = val_pairs = None
    if cfg.pair_weight > 0 and evaluate is None and cfg.val_fraction > 0:
        train_pairs, val_pairs = _held_out_pairs(sup.pair_query, cfg.val_fraction, cfg.seed)
    train_rows = np.asarray(train_rows, dtype=np.int64)
    val_rows = np.asarray(val_rows if val_rows is not None else [], dtype=np.int64)
    if len(train_rows) < 2:
        raise InputError(f"only {len(train_rows)} training vectors; need at least 2")
    with torch_threads(cfg.threads):
        return Run(corpus, cfg, sup, train_rows, evaluate, val_rows, train_pairs=train_pairs,
                   val_pairs=val_pairs).advance().result()


class HeldOutLoss:
    """Evaluator: minus the training objective on held-out corpus rows and held-out pairs (fixed
    augmentation and negative-sampling seed).

    A lower loss is not better retrieval, so an evaluation counts as an improvement only when the
    loss falls by `min_gain` (1%) of its value: without a quality signal, train until the loss levels off.
    """

    min_gain = 0.01

    def __init__(self, corpus: np.ndarray, rows: np.ndarray, cfg: TrainConfig, losses: "_Losses",
                 pairs: np.ndarray | None = None):
        self.corpus, self.rows, self.cfg, self.losses, self.pairs = corpus, rows, cfg, losses, pairs
        self.x = _rows(corpus, rows) if len(rows) >= 2 else None

    def __call__(self, model: SimSkip, step: int) -> Evaluation:
        if self.x is None:
            return Evaluation(step, float("nan"))
        with torch.no_grad():
            g = torch.Generator().manual_seed(self.cfg.seed + 7919)
            parts = self.losses(model, self.x, self.rows, self.corpus, g, self.pairs)
            return Evaluation(step, -float(self.losses.total(parts)) if parts else float("nan"))


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
