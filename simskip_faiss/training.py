"""Train a SimSkip refiner (refined = x + alpha * f(x)) on existing embeddings, with torch.

Signals (any weighted mix): the paper's unsupervised SimSkip (two augmented views, NT-Xent through a
projection head), supervised contrastive on labels, and query->document InfoNCE on pairs, either
symmetric (queries and documents refined) or query-only (documents stay raw, so an existing index
need not be rebuilt). f's last layer starts at zero, so training starts from the identity.
Early stopping follows a held-out slice; `guard.py` then picks alpha on validation metrics.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import as_matrix, check_finite

log = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults follow DESIGN.md §2 and the project's measurements."""

    # network: refined = x + alpha * f(x), f = MLP with `depth` hidden layers of width `hidden`
    hidden: int = 512
    depth: int = 1
    activation: str = "gelu"
    normalize: bool = True          # L2-normalise the output (required for inner-product / cosine indexes)
    metric: str = "ip"              # the index metric the refiner is meant for: "ip" or "l2"
    head_dim: int = 128             # projection head width (unsupervised loss only; dropped at export)
    # signals: weights of each loss term; 0 switches it off
    unsupervised: float = 1.0       # SimSkip: two augmented views of the same embedding
    labels: float = 0.0             # supervised contrastive: same label = positive
    pairs: float = 0.0              # query -> document InfoNCE
    pair_mode: str = "symmetric"    # "symmetric" (one refiner for both) or "query_only" (documents stay raw)
    # augmentations (unsupervised signal)
    mask_prob: float = 0.1          # each coordinate zeroed with this probability
    noise_scale: float = 0.1        # Gaussian noise, in units of the corpus's per-dimension std
    # optimisation
    temperature: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 512
    epochs: int = 10
    patience: int = 3               # epochs without held-out improvement before stopping
    val_fraction: float = 0.1       # held-out slice of the corpus for early stopping (unsupervised)
    max_val: int = 4096             # cap on held-out vectors scored each epoch
    seed: int = 0
    threads: int | None = None      # torch intra-op threads; None leaves torch's default
    progress: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.pair_mode not in ("symmetric", "query_only"):
            raise ValueError(f"pair_mode must be 'symmetric' or 'query_only', got {self.pair_mode!r}")
        for name in ("hidden", "depth", "head_dim", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (contrastive losses need negatives)")
        if not 0 <= self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in [0, 1), got {self.mask_prob}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if min(self.unsupervised, self.labels, self.pairs) < 0 or self.unsupervised + self.labels + self.pairs == 0:
            raise ValueError("signal weights must be >= 0 and at least one must be > 0")
        if self.pair_mode == "query_only" and (self.unsupervised > 0 or self.labels > 0):
            raise ValueError("pair_mode='query_only' refines queries only; combine it with no other signal")
        if self.metric == "ip" and not self.normalize:
            raise ValueError("an inner-product refiner must L2-normalise its output (normalize=True): "
                             "after a non-isometric transform raw inner products are not comparable")


class SimSkip(nn.Module):
    """refined = normalize?(x + alpha * f(x)); f's last layer is zero-initialised so the untrained net is the identity."""

    def __init__(self, d: int, hidden: int = 512, depth: int = 1, activation: str = "gelu", normalize: bool = True):
        super().__init__()
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


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out): same-label rows are positives."""
    z = F.normalize(z, dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    npos = pos.sum(1)
    keep = npos > 0
    if not keep.any():
        return z.sum() * 0.0
    mean_logp = (logp.masked_fill(~pos, 0.0).sum(1)[keep]) / npos[keep]
    return -mean_logp.mean()


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """Query->document InfoNCE: d holds the positives (row i for query i, or `target`) and the negatives."""
    logits = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / temperature
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
    def from_qrels(cls, queries: np.ndarray, qrels: list[np.ndarray], labels: np.ndarray | None = None) -> "Supervision":
        q = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(qrels)] or [np.zeros(0, np.int64)])
        d = np.concatenate([np.asarray(r, dtype=np.int64) for r in qrels] or [np.zeros(0, np.int64)])
        return cls(labels=labels, queries=queries, pair_query=q, pair_doc=d)


@dataclass
class TrainResult:
    model: SimSkip
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    n_train: int = 0


def _corpus(corpus) -> np.ndarray:
    """Accept an array or a .npy path (memory-mapped: never copied whole into memory)."""
    if isinstance(corpus, (str, os.PathLike)):
        p = Path(corpus)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
        try:
            corpus = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{p} is not a readable .npy array: {e}") from None
    if not isinstance(corpus, np.ndarray):
        corpus = np.asarray(corpus)
    if corpus.dtype.kind != "f":
        raise TypeError(f"corpus must be a float array (n, d), got dtype {corpus.dtype}")
    if corpus.ndim != 2:
        raise ValueError(f"corpus must be 2-D (n, d), got shape {corpus.shape}")
    if corpus.shape[0] < 4:
        raise ValueError(f"corpus has {corpus.shape[0]} vectors; training needs at least 4")
    check_finite(corpus, "corpus")
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


class _Losses(nn.Module):
    """The weighted training objective; holds the projection head so it is dropped with this object."""

    def __init__(self, cfg: TrainConfig, d: int, augment: _Augment, sup: Supervision | None, doc_bank: torch.Tensor | None):
        super().__init__()
        self.cfg, self.augment, self.sup, self.doc_bank = cfg, augment, sup, doc_bank
        self.head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.head_dim))

    def forward(self, model: SimSkip, x: torch.Tensor, rows: np.ndarray, corpus: np.ndarray,
                gen: torch.Generator, pair_batch: np.ndarray | None) -> dict[str, torch.Tensor]:
        cfg, out = self.cfg, {}
        if cfg.unsupervised > 0:
            z1 = self.head(model(self.augment(x, gen)))
            z2 = self.head(model(self.augment(x, gen)))
            out["unsupervised"] = nt_xent(z1, z2, cfg.temperature)
        if cfg.labels > 0:
            out["labels"] = supcon(model(x), torch.from_numpy(self.sup.labels[rows]), cfg.temperature)
        if cfg.pairs > 0 and pair_batch is not None and len(pair_batch) > 1:
            qi, di = self.sup.pair_query[pair_batch], self.sup.pair_doc[pair_batch]
            q = model(_rows(self.sup.queries, qi))
            if cfg.pair_mode == "query_only":
                out["pairs"] = info_nce(q, self.doc_bank, cfg.temperature, torch.from_numpy(di))
            else:
                out["pairs"] = info_nce(q, model(_rows(corpus, di)), cfg.temperature)
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self.cfg, k) * v for k, v in parts.items())


def train(corpus, config: TrainConfig | None = None, supervision: Supervision | None = None,
          train_rows: np.ndarray | None = None, val_rows: np.ndarray | None = None,
          val_score=None) -> TrainResult:
    """Train a SimSkip refiner on `corpus` (array or .npy path, memory-mapped).

    `train_rows`/`val_rows` choose the corpus rows to learn from and to hold out; by default a
    seeded `val_fraction` slice is held out. Early stopping keeps the epoch with the best held-out
    score: `val_score(model) -> float` (higher is better) when given, else minus the held-out loss.
    """
    cfg = config or TrainConfig()
    corpus = _corpus(corpus)
    n, d = corpus.shape
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    if train_rows is None:
        perm = rng.permutation(n)
        n_val = max(2, int(round(cfg.val_fraction * n))) if cfg.val_fraction > 0 else 0
        val_rows, train_rows = perm[:n_val], perm[n_val:]
    train_rows = np.asarray(train_rows, dtype=np.int64)
    val_rows = np.asarray(val_rows if val_rows is not None else [], dtype=np.int64)
    if len(train_rows) < 2:
        raise ValueError(f"only {len(train_rows)} training vectors; need at least 2")
    sup = _check_supervision(cfg, supervision, n, d)
    if cfg.labels > 0:  # supcon needs labelled rows; unlabelled rows still serve the unsupervised term
        labelled = train_rows[sup.labels[train_rows] >= 0]
        if cfg.unsupervised == 0:
            train_rows = labelled
    pairs_train = np.arange(len(sup.pair_query)) if cfg.pairs > 0 else None

    model = SimSkip(d, cfg.hidden, cfg.depth, cfg.activation, cfg.normalize)
    doc_bank = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32)) if cfg.pair_mode == "query_only" and cfg.pairs > 0 else None
    losses = _Losses(cfg, d, _Augment(_column_std(corpus, rng), cfg.mask_prob, cfg.noise_scale), sup, doc_bank)
    opt = torch.optim.AdamW(list(model.parameters()) + list(losses.head.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps = max(1, math.ceil((len(pairs_train) if cfg.unsupervised == 0 and cfg.labels == 0 else len(train_rows)) / cfg.batch_size))
    val_x = _rows(corpus, val_rows[: cfg.max_val]) if len(val_rows) else None
    val_seed = cfg.seed + 7919

    def held_out() -> float:
        if val_score is not None:
            return float(val_score(model))
        if val_x is None or len(val_x) < 2:
            return float("nan")
        with torch.no_grad():
            g = torch.Generator().manual_seed(val_seed)
            parts = losses(model, val_x, val_rows[: cfg.max_val], corpus, g, None)
            return -float(losses.total(parts)) if parts else float("nan")

    result = TrainResult(model=model, config=cfg, n_train=len(train_rows))
    best, best_state, bad = held_out(), _state(model), 0
    result.history.append({"epoch": 0, "loss": float("nan"), "val": best})
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps, desc="train", unit="batch", disable=not cfg.progress)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(train_rows)
        porder = rng.permutation(len(pairs_train)) if pairs_train is not None else None
        tot, seen = 0.0, 0
        for s in range(steps):
            rows = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if len(rows) < 2:
                rows = rng.choice(train_rows, size=min(cfg.batch_size, len(train_rows)), replace=False)
            pb = None
            if porder is not None:
                pb = pairs_train[porder[(s * cfg.batch_size) % len(porder):][: cfg.batch_size]]
            parts = losses(model, _rows(corpus, rows), rows, corpus, gen, pb)
            if not parts:
                continue
            loss = losses.total(parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(rows)
            seen += len(rows)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4f}", best=f"{best:.4f}")
        model.eval()
        score = held_out()
        result.history.append({"epoch": epoch, "loss": tot / max(seen, 1), "val": score,
                               "seconds": time.perf_counter() - t0})
        log.info("epoch %d: train loss %.4f, held-out score %.4f", epoch, tot / max(seen, 1), score)
        if math.isnan(best) or score > best:
            best, best_state, bad, result.best_epoch = score, _state(model), 0, epoch
        else:
            bad += 1
            if bad >= cfg.patience:
                log.info("early stop after epoch %d (best epoch %d)", epoch, result.best_epoch)
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_supervision(cfg: TrainConfig, sup: Supervision | None, n: int, d: int) -> Supervision:
    sup = sup or Supervision()
    if cfg.labels > 0:
        if sup.labels is None:
            raise ValueError("labels weight > 0 but no labels were given")
        sup.labels = np.asarray(sup.labels)
        if sup.labels.dtype.kind not in "iu" or sup.labels.shape != (n,):
            raise ValueError(f"labels must be integers of shape ({n},), got {sup.labels.dtype} {sup.labels.shape}")
        sup.labels = sup.labels.astype(np.int64)
    if cfg.pairs > 0:
        if sup.queries is None or sup.pair_query is None or sup.pair_doc is None:
            raise ValueError("pairs weight > 0 but no queries and query->document pairs were given")
        sup.queries = as_matrix(sup.queries, d, "queries")
        sup.pair_query = np.asarray(sup.pair_query, dtype=np.int64)
        sup.pair_doc = np.asarray(sup.pair_doc, dtype=np.int64)
        if len(sup.pair_query) != len(sup.pair_doc):
            raise ValueError("pair_query and pair_doc differ in length")
        if len(sup.pair_query) < 2:
            raise ValueError(f"need at least 2 query->document pairs for training, got {len(sup.pair_query)}")
        if len(sup.pair_doc) and (sup.pair_doc.min() < 0 or sup.pair_doc.max() >= n):
            raise ValueError(f"pair documents must be corpus rows in [0, {n})")
        if len(sup.pair_query) and (sup.pair_query.min() < 0 or sup.pair_query.max() >= len(sup.queries)):
            raise ValueError(f"pair queries must be rows in [0, {len(sup.queries)})")
    return sup


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
