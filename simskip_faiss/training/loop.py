"""Train a SimSkip refiner (refined = x + alpha * f(x)) on existing embeddings, with torch.

This is the torch layer: the network, the losses and the training loop; it knows nothing about
retrieval metrics. Signals (any weighted mix, see `TrainConfig.resolved`): the paper's
unsupervised SimSkip (two augmented views, NT-Xent through a projection head), supervised
contrastive on labels, query->document InfoNCE on pairs (symmetric: queries and documents
refined; or query-only: documents stay raw), with extra corpus rows as negatives, and neighbourhood
preservation (for a query-only refiner: documents fed to it as queries stay where they are). f's
last layer starts at zero, so training starts from the identity.

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
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import as_matrix, check_matrix, load_npy
from ..config import ACTIVATION_NAMES, LR_GRID, TEMPERATURE_GRID, TrainConfig
from ..datasets.core import answer_pairs
from ..refiners.documents import DocumentUpdates
from ..errors import InputError

log = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


class SimSkip(nn.Module):
    """refined = normalize?(x + alpha * f(x)); f's last layer is zero-initialised so the untrained net is the identity."""

    def __init__(self, d: int, hidden: int = TrainConfig.hidden, depth: int = 1, activation: str = "gelu",
                 normalize: bool = True, apply_to: str = "both"):
        super().__init__()
        self.apply_to = apply_to  # "queries": trained to refine queries only (documents stay raw)
        layers: list[nn.Module] = []
        width = d
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        last = nn.Linear(width, d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.f = nn.Sequential(*layers, last)
        self.normalize = normalize
        self.register_buffer("alpha", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.alpha * self.f(x)
        return F.normalize(y, dim=-1, eps=1e-12) if self.normalize else y


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of the same row, all else in the batch is negative."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float, decoupled: bool = True) -> torch.Tensor:
    """Supervised contrastive loss over a batch: same-label rows are positives, other-label rows negatives.

    decoupled=False is SupCon (Khosla et al. 2020, L_out): each positive's softmax runs over every other
    row, the other positives included, so the loss is lowest when all of an anchor's positives score
    alike, and it pushes the anchor's *nearest* same-label rows away until they do. That erases the
    ranking inside a label, which is what a pair query needs to find its one document. decoupled=True
    leaves the other positives out of each positive's denominator (as Decoupled Contrastive Learning,
    Yeh et al. 2022, does for the unsupervised loss): every positive is scored against the negatives
    only, never pushed down, and stops pulling once it outranks them. Rows labelled < 0 (unlabelled) are
    neither anchors, positives nor negatives.
    """
    z = F.normalize(z, dim=-1)
    known = labels >= 0
    z, labels = z[known], labels[known]
    sim = z @ z.T / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~eye, ~same
    keep = pos.any(1) & neg.any(1) if decoupled else pos.any(1)
    if not keep.any():
        return z.sum() * 0.0
    sim, pos, neg = sim[keep], pos[keep], neg[keep]
    if decoupled:  # -log(e^s_p / (e^s_p + sum_n e^s_n)) = softplus(logsumexp_n s_n - s_p)
        per_pos = F.softplus(torch.logsumexp(sim.masked_fill(~neg, float("-inf")), 1, keepdim=True) - sim)
    else:
        others = sim.masked_fill(eye[keep], float("-inf"))
        per_pos = torch.logsumexp(others, 1, keepdim=True) - sim
    return (per_pos.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)).mean()


def similarity_kl(raw: torch.Tensor, refined: torch.Tensor, temperature: float) -> torch.Tensor:
    """Neighbourhood preservation: KL(raw || refined) between each row's in-batch similarity distributions.

    Zero when the refined space ranks the batch exactly as the raw space does (up to the softmax).
    """
    eye = torch.eye(raw.shape[0], dtype=torch.bool)
    def logp(z):
        z = F.normalize(z, dim=-1)
        return F.log_softmax((z @ z.T / temperature).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)
    p_raw = logp(raw)
    return (p_raw.exp() * (p_raw - logp(refined))).sum(1).mean()


def stay_put(raw: torch.Tensor, refined: torch.Tensor, temperature: float, normalize: bool = True) -> torch.Tensor:
    """Preservation for a query-only refiner: how far it moves corpus rows, mean ½|refined - raw|² / |raw|²
    (= 1 - cos for a normalising refiner, whose target is the normalised raw row), over `temperature`.

    Its queries are searched against raw documents, so a document fed to it as a query keeps its
    raw neighbours exactly when it is left in place; dividing by the temperature puts the term on
    the scale of the InfoNCE logits it competes with.
    """
    target = F.normalize(raw, dim=-1) if normalize else raw
    return (0.5 * (refined - target).pow(2).sum(1) / target.pow(2).sum(1).clamp_min(1e-12)).mean() / temperature


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float, target: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Query->document InfoNCE: d holds the positives (row i for query i, or `target`) and the negatives;
    `mask` (bool, like the logits) removes candidates that are copies of a query's positive."""
    logits = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    if target is None:
        target = torch.arange(q.shape[0])
    return F.cross_entropy(logits, target)


@dataclass
class Supervision:
    """Optional training signals besides the corpus itself (all row ids index the corpus)."""

    labels: np.ndarray | None = None        # (n,) int64 per corpus row; < 0 = unlabelled
    queries: np.ndarray | None = None       # (m, d) float32
    pair_query: np.ndarray | None = None    # (p,) query row of each positive pair
    pair_doc: np.ndarray | None = None      # (p,) corpus row of each positive pair

    @classmethod
    def from_qrels(cls, queries: np.ndarray | None, qrels: list[np.ndarray] | None, labels: np.ndarray | None = None,
                   query_ids: np.ndarray | None = None) -> "Supervision":
        """Pairs (query, relevant document) of `query_ids` (default: every query) and the labels as given."""
        if queries is None or qrels is None:
            return cls(labels=labels)
        ids = np.arange(len(qrels)) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
        q, d = answer_pairs(qrels, ids)
        return cls(labels=labels, queries=queries, pair_query=q, pair_doc=d)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((np.asarray(self.labels) >= 0).any())

    @property
    def has_pairs(self) -> bool:
        return self.queries is not None and self.pair_query is not None and len(self.pair_query) > 0


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


def _held_out_pairs(pair_query: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) pair ids: every pair of a seeded `fraction` of the queries is held out
    (at least one query, and never all of them); with one query, nothing is held out."""
    queries = np.unique(pair_query)
    if len(queries) < 2:
        return np.arange(len(pair_query)), np.zeros(0, np.int64)
    n_val = min(len(queries) - 1, max(1, int(round(fraction * len(queries)))))
    held = np.isin(pair_query, np.random.default_rng(seed).permutation(queries)[:n_val])
    return np.flatnonzero(~held), np.flatnonzero(held)


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


def _corpus(corpus) -> np.ndarray:
    """Accept an array or a .npy path (memory-mapped: never copied whole into memory)."""
    if isinstance(corpus, (str, os.PathLike)):
        corpus = load_npy(corpus, "corpus")
    corpus = check_matrix(corpus, name="corpus")
    if corpus.shape[0] < 4:
        raise InputError(f"corpus has {corpus.shape[0]} vectors; training needs at least 4")
    return corpus


def _rows(corpus: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Gather rows (sorted reads keep memmaps sequential) and return them in idx order as a float32 tensor."""
    order = np.argsort(idx, kind="stable")
    block = np.empty((len(idx), corpus.shape[1]), dtype=np.float32)
    block[order] = corpus[idx[order]]
    return torch.from_numpy(block)


def _column_std(corpus: np.ndarray, rng: np.random.Generator, max_rows: int = 100_000) -> np.ndarray:
    idx = rng.choice(corpus.shape[0], size=min(max_rows, corpus.shape[0]), replace=False)
    return np.asarray(_rows(corpus, idx).numpy().std(axis=0), dtype=np.float32)


class _Augment:
    """Random feature masking and Gaussian noise scaled to the corpus's per-dimension spread."""

    def __init__(self, std: np.ndarray, mask_prob: float, noise_scale: float):
        self.std = torch.from_numpy(std) * noise_scale
        self.mask_prob = mask_prob

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keep = (torch.rand(x.shape, generator=gen) >= self.mask_prob).to(x.dtype)
        return x * keep + torch.randn(x.shape, generator=gen) * self.std


WEIGHTS = {"unsupervised": "unsupervised_weight", "labels": "label_weight", "pairs": "pair_weight",
           "preserve": "preserve_weight"}


class _Losses(nn.Module):
    """The weighted training objective; holds the projection head so it is dropped with this object."""

    def __init__(self, cfg: TrainConfig, d: int, augment: _Augment, sup: Supervision):
        super().__init__()
        self.cfg, self.augment, self.sup = cfg, augment, sup
        self.head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.head_dim))

    def forward(self, model: SimSkip, x: torch.Tensor, rows: np.ndarray, corpus: np.ndarray,
                gen: torch.Generator, pair_batch: np.ndarray | None) -> dict[str, torch.Tensor]:
        cfg, out = self.cfg, {}
        fx = None

        def refined_x() -> torch.Tensor:  # model(x), computed once per step and shared by the terms
            nonlocal fx
            if fx is None:
                fx = model(x)
            return fx

        if cfg.unsupervised_weight > 0:
            z1 = self.head(model(self.augment(x, gen)))
            z2 = self.head(model(self.augment(x, gen)))
            out["unsupervised"] = nt_xent(z1, z2, cfg.unsupervised_temperature)
        if cfg.label_weight > 0:
            out["labels"] = supcon(refined_x(), torch.from_numpy(self.sup.labels[rows]), cfg.temperature,
                                   decoupled=cfg.label_loss == "decoupled")
        if cfg.pair_weight > 0 and pair_batch is not None and len(pair_batch) > 1:
            out["pairs"] = self._pairs(model, corpus, pair_batch, gen, rows, refined_x)
        if cfg.preserve_weight > 0:
            out["preserve"] = (stay_put(x, refined_x(), cfg.temperature, cfg.normalize) if cfg.apply_to() == "queries"
                               else similarity_kl(x, refined_x(), cfg.temperature))
        return out

    def _pairs(self, model: SimSkip, corpus: np.ndarray, pair_batch: np.ndarray, gen: torch.Generator,
               rows: np.ndarray, refined_x: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Query -> document InfoNCE: in-batch documents plus `pair_negatives` corpus rows as negatives.

        Query-only, the negatives are raw sampled rows (a lookup). Symmetric, they are refined, so the
        step's training batch (already refined for the other terms) serves first and only the rest
        is sampled: the same number of negatives for fewer rows through the refiner.
        """
        cfg = self.cfg
        qi, di = self.sup.pair_query[pair_batch], self.sup.pair_doc[pair_batch]
        q = model(_rows(self.sup.queries, qi))
        symmetric = cfg.apply_to() == "both"
        docs = _rows(corpus, di)
        if symmetric:
            docs = model(docs)
        # queries that share a document (several examples of one definition) are in-batch copies of
        # each other's positive, not negatives
        shared_doc = torch.from_numpy((di[:, None] == di[None, :]) & ~np.eye(len(di), dtype=bool))
        if not cfg.pair_negatives:
            return info_nce(q, docs, cfg.temperature, mask=shared_doc)
        shared = rows[: cfg.pair_negatives] if symmetric else rows[:0]
        extra = torch.randint(0, corpus.shape[0], (cfg.pair_negatives - len(shared),), generator=gen).numpy()
        negs = [docs]
        if len(shared):
            negs.append(refined_x()[: len(shared)])
        if len(extra):
            ex = _rows(corpus, extra)
            negs.append(model(ex) if symmetric else ex)
        neg_rows = np.concatenate([shared, extra])
        mask = torch.cat([shared_doc, torch.from_numpy(neg_rows[None, :] == di[:, None])], 1)
        return info_nce(q, torch.cat(negs), cfg.temperature, mask=mask)

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self.cfg, WEIGHTS[k]) * v for k, v in parts.items())


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_supervision(cfg: TrainConfig, sup: Supervision, n: int, d: int) -> Supervision:
    if cfg.label_weight > 0:
        labels = np.asarray(sup.labels)
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise InputError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        sup.labels = labels.astype(np.int64)
        classes, counts = np.unique(sup.labels[sup.labels >= 0], return_counts=True)  # any ids: no bincount
        if len(classes) < 2:
            raise InputError(f"labels have {len(classes)} class{'es' if len(classes) != 1 else ''} among the "
                             "training rows; label training needs at least 2 (pass label_weight=0, on the command "
                             "line --label-weight 0, to train without them)")
        if counts.max() < 2:
            raise InputError(f"no label is shared by two training rows ({len(classes)} labels, one row each): label "
                             "training learns from rows of the same label (pass label_weight=0, on the command line "
                             "--label-weight 0, to train without them)")
    if cfg.pair_weight > 0:
        sup.queries = as_matrix(sup.queries, d, "queries")
        sup.pair_query = np.asarray(sup.pair_query, dtype=np.int64)
        sup.pair_doc = np.asarray(sup.pair_doc, dtype=np.int64)
        if len(sup.pair_query) != len(sup.pair_doc):
            raise InputError("pair_query and pair_doc differ in length")
        if len(sup.pair_query) < 2:
            raise InputError(f"need at least 2 query->document pairs for training, got {len(sup.pair_query)}")
        if sup.pair_doc.min() < 0 or sup.pair_doc.max() >= n:
            raise InputError(f"pair documents must be corpus rows in [0, {n})")
        if sup.pair_query.min() < 0 or sup.pair_query.max() >= len(sup.queries):
            raise InputError(f"pair queries must be rows in [0, {len(sup.queries)})")
    return sup
