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

from .checks import as_matrix, check_matrix, load_npy
from .config import ACTIVATION_NAMES, TrainConfig

log = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


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
        corpus = load_npy(corpus, "corpus")
    corpus = check_matrix(corpus, name="corpus")
    if corpus.shape[0] < 4:
        raise ValueError(f"corpus has {corpus.shape[0]} vectors; training needs at least 4")
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

    def __init__(self, cfg: TrainConfig, d: int, augment: _Augment, sup: Supervision | None, doc_bank: torch.Tensor | None):
        super().__init__()
        self.cfg, self.augment, self.sup, self.doc_bank = cfg, augment, sup, doc_bank
        self.head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.head_dim))

    def forward(self, model: SimSkip, x: torch.Tensor, rows: np.ndarray, corpus: np.ndarray,
                gen: torch.Generator, pair_batch: np.ndarray | None) -> dict[str, torch.Tensor]:
        cfg, out = self.cfg, {}
        if cfg.unsupervised_weight > 0:
            z1 = self.head(model(self.augment(x, gen)))
            z2 = self.head(model(self.augment(x, gen)))
            out["unsupervised"] = nt_xent(z1, z2, cfg.unsupervised_temperature)
        if cfg.label_weight > 0:
            out["labels"] = supcon(model(x), torch.from_numpy(self.sup.labels[rows]), cfg.temperature)
        if cfg.pair_weight > 0 and pair_batch is not None and len(pair_batch) > 1:
            qi, di = self.sup.pair_query[pair_batch], self.sup.pair_doc[pair_batch]
            q = model(_rows(self.sup.queries, qi))
            if cfg.pair_mode == "query_only":
                out["pairs"] = info_nce(q, self.doc_bank, cfg.temperature, torch.from_numpy(di))
            else:
                out["pairs"] = info_nce(q, model(_rows(corpus, di)), cfg.temperature)
        if cfg.preserve_weight > 0:
            out["preserve"] = similarity_kl(x, model(x), cfg.temperature)
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self.cfg, WEIGHTS[k]) * v for k, v in parts.items())


def train(corpus, config: TrainConfig | None = None, supervision: Supervision | None = None,
          train_rows: np.ndarray | None = None, val_rows: np.ndarray | None = None,
          val_score=None, keep_initial: bool = True) -> TrainResult:
    """Train a SimSkip refiner on `corpus` (array or .npy path, memory-mapped).

    `train_rows`/`val_rows` choose the corpus rows to learn from and to hold out; by default a
    seeded `val_fraction` slice is held out. Early stopping keeps the epoch with the best held-out
    score: `val_score(model) -> float` (higher is better) when given, else minus the held-out loss.
    `keep_initial=False` excludes the untrained (identity) weights from that choice.
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
    if cfg.label_weight > 0:  # supcon needs labelled rows; unlabelled rows still serve the unsupervised term
        labelled = train_rows[sup.labels[train_rows] >= 0]
        if cfg.unsupervised_weight == 0:
            train_rows = labelled
    pairs_train = np.arange(len(sup.pair_query)) if cfg.pair_weight > 0 else None

    model = SimSkip(d, cfg.hidden, cfg.depth, cfg.activation, cfg.normalize)
    doc_bank = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32)) if cfg.pair_mode == "query_only" and cfg.pair_weight > 0 else None
    losses = _Losses(cfg, d, _Augment(_column_std(corpus, rng), cfg.mask_prob, cfg.noise_scale), sup, doc_bank)
    opt = torch.optim.AdamW(list(model.parameters()) + list(losses.head.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps = max(1, math.ceil((len(pairs_train) if cfg.unsupervised_weight == 0 and cfg.label_weight == 0 else len(train_rows)) / cfg.batch_size))
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
    if not keep_initial:
        best = float("-inf")
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
    if cfg.label_weight > 0:
        if sup.labels is None:
            raise ValueError("labels weight > 0 but no labels were given")
        sup.labels = np.asarray(sup.labels)
        if sup.labels.dtype.kind not in "iu" or sup.labels.shape != (n,):
            raise ValueError(f"labels must be integers of shape ({n},), got {sup.labels.dtype} {sup.labels.shape}")
        sup.labels = sup.labels.astype(np.int64)
    if cfg.pair_weight > 0:
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


# -- the guard: training on an EmbeddingData, alpha and epoch chosen on validation --------------

@dataclass
class GuardReport:
    """What the guard saw and chose; stored in the ONNX metadata and printed."""

    alpha: float
    epoch: int
    criterion: str
    raw: dict[str, float]
    candidates: list[dict]
    reason: str

    def summary(self) -> str:
        lines = [f"guard: alpha={self.alpha:g} (epoch {self.epoch}), criterion: {self.criterion}", f"  {self.reason}"]
        keys = list(self.raw)
        lines.append("  alpha  " + "  ".join(f"{k:>16}" for k in keys) + "  objective")
        lines.append("  raw    " + "  ".join(f"{self.raw[k]:16.4f}" for k in keys))
        for c in self.candidates:
            mark = " <" if c["alpha"] == self.alpha and self.alpha > 0 else ""
            lines.append(f"  {c['alpha']:<5g}  " + "  ".join(f"{c['metrics'][k]:16.4f}" for k in keys)
                         + f"  {c['objective']:+.4f}{'' if c['feasible'] else ' (drops)'}{mark}")
        return "\n".join(lines)


class _Validator:
    """Scores a model on the validation split at every alpha of the grid, with exact FAISS search."""

    def __init__(self, data, cfg: TrainConfig):
        from .evaluation import task_queries

        self.data, self.cfg = data, cfg
        self.alphas = cfg.alphas if cfg.guard else (1.0,)  # unguarded: alpha = 1, only the epoch is chosen
        try:
            self.queries = task_queries(data, "val", cfg.max_val_queries, cfg.seed)
        except ValueError:
            self.queries = {}
        if cfg.guard_tasks:
            unknown = set(cfg.guard_tasks) - set(self.queries)
            if unknown:
                raise ValueError(f"guard_tasks {sorted(unknown)} have no validation data (available: {sorted(self.queries)})")
            self.queries = {t: v for t, v in self.queries.items() if t in cfg.guard_tasks}
        if cfg.label_weight > 0 and "labels" not in self.queries:
            raise ValueError("labels training needs labelled validation rows to guard against")
        if cfg.pair_weight > 0 and "pairs" not in self.queries:
            raise ValueError("pairs training needs validation queries with qrels to guard against")
        if not self.queries:  # unsupervised and nothing to validate on: raw-neighbour agreement proxy
            rows = data.split_rows("val")
            self.queries = {"agreement": rows[: cfg.max_val_queries]}
        self.raw = self._metrics(data.corpus, self._query_vectors(lambda x: x))
        self.protected = list(cfg.guard_metrics or self.raw)
        unknown = set(self.protected) - set(self.raw)
        if unknown:
            raise ValueError(f"guard_metrics {sorted(unknown)} are not measured on validation (measured: {sorted(self.raw)})")
        which = "validation metric" if self.protected == list(self.raw) else "of " + ", ".join(self.protected)
        self.criterion = ("neighbour agreement with raw >= %g" % cfg.min_agreement if "agreement" in self.queries
                          else f"no {which} below raw by more than {cfg.tolerance:g}; maximise mean relative gain")
        self.best: tuple[float, float, list] = (0.0, 0.0, [])

    def _query_vectors(self, refine) -> dict[str, np.ndarray]:
        q = {}
        if "labels" in self.queries or "agreement" in self.queries:
            rows = self.queries.get("labels", self.queries.get("agreement"))
            q["labels"] = refine(np.asarray(self.data.corpus[rows]))
        if "pairs" in self.queries:
            q["pairs"] = refine(self.data.queries[self.queries["pairs"]])
        return q

    def _metrics(self, docs: np.ndarray, q: dict[str, np.ndarray]) -> dict[str, float]:
        import faiss

        from .evaluation import LABEL_METRICS, PAIR_METRICS, score
        from .metrics import drop_self, knn_recall

        index = (faiss.IndexFlatIP if self.cfg.metric == "ip" else faiss.IndexFlatL2)(docs.shape[1])
        index.add(np.ascontiguousarray(docs, dtype=np.float32))
        if "agreement" in self.queries:
            I = drop_self(index.search(q["labels"], 11)[1], self.queries["agreement"], 10)
            if not hasattr(self, "_raw_nn"):
                self._raw_nn = I
            return {"agreement@10": knn_recall(self._raw_nn, I, ks=(10,))["10-recall@10"]}
        per_task = score(index, self.data, self.queries, vectors=q)
        return {f"{t}:{m}": float(pq[m].mean()) for t, pq in per_task.items()
                for m in (LABEL_METRICS if t == "labels" else PAIR_METRICS)}

    def _objective(self, m: dict[str, float]) -> tuple[bool, float]:
        if "agreement@10" in m:
            return m["agreement@10"] >= self.cfg.min_agreement, 0.0
        feasible = all(m[k] >= self.raw[k] - self.cfg.tolerance for k in self.protected)
        return feasible, float(np.mean([(m[k] - self.raw[k]) / max(self.raw[k], 1e-9) for k in m]))

    def sweep(self, model: SimSkip) -> tuple[float, float, list[dict]]:
        """(best objective, its alpha, all candidates) for the model's current weights."""
        saved = model.alpha.clone()
        docs_raw = self.data.corpus
        cands = []
        with torch.no_grad():
            for a in self.alphas:
                model.alpha.fill_(a)
                refine = lambda x: model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()  # noqa: E731
                docs = docs_raw if self.cfg.pair_mode == "query_only" else _refine_all(model, docs_raw)
                m = self._metrics(docs, self._query_vectors(refine))
                feasible, obj = self._objective(m)
                cands.append({"alpha": a, "metrics": m, "feasible": feasible, "objective": obj})
        model.alpha.copy_(saved)
        if not self.cfg.guard:
            return cands[0]["objective"], 1.0, cands
        ok = [c for c in cands if c["feasible"] and c["alpha"] > 0]
        if "agreement" in self.queries:  # proxy: the boldest alpha that keeps the raw neighbourhoods
            best = max(ok, key=lambda c: c["alpha"], default=None)
            return (best["alpha"] if best else 0.0), (best["alpha"] if best else 0.0), cands
        best = max(ok, key=lambda c: c["objective"], default=None)
        if best is None or best["objective"] <= 0:
            return 0.0, 0.0, cands
        return best["objective"], best["alpha"], cands


def _refine_all(model: SimSkip, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    out = np.empty((x.shape[0], x.shape[1]), dtype=np.float32)
    for s in range(0, x.shape[0], batch):
        out[s:s + batch] = model(torch.from_numpy(np.ascontiguousarray(x[s:s + batch], dtype=np.float32))).numpy()
    return out


@dataclass
class FitResult(TrainResult):
    guard: GuardReport | None = None

    def metadata(self) -> dict:
        """What export() stamps into the ONNX file besides dimensions."""
        meta = {"config": config_dict(self.config), "metric": self.config.metric, "best_epoch": self.best_epoch,
                "train_seconds": round(self.seconds, 2), "n_train": self.n_train,
                "apply_to": "queries" if self.config.pair_mode == "query_only" and self.config.pair_weight > 0 else "both"}
        if self.guard is not None:
            meta["guard"] = asdict(self.guard)
        return meta


def fit(data, config: TrainConfig | None = None) -> FitResult:
    """Train on an `EmbeddingData`'s train split; with `config.guard`, pick epoch and alpha on its val split.

    Labels of non-train rows and pairs of non-train queries are hidden from training. If no alpha
    beats raw on validation, the result is the identity (alpha = 0) and the guard report says so.
    """
    cfg = config or TrainConfig()
    labels = None
    if data.labels is not None:
        labels = np.where(data.corpus_split == 0, data.labels, -1).astype(np.int64)
    sup = Supervision(labels=labels)
    if data.queries is not None and data.qrels is not None:
        train_q = data.split_queries("train")
        pq = np.concatenate([np.full(len(data.qrels[i]), i, dtype=np.int64) for i in train_q] or [np.zeros(0, np.int64)])
        pd = np.concatenate([data.qrels[i] for i in train_q] or [np.zeros(0, np.int64)]).astype(np.int64)
        sup = Supervision(labels=labels, queries=data.queries, pair_query=pq, pair_doc=pd)
    validator = _Validator(data, cfg)
    proxy = "agreement" in validator.queries
    if proxy and not cfg.guard:
        validator = None  # nothing to choose: alpha = 1 at the epoch of best held-out loss
    chosen: dict[int, tuple[float, list]] = {}
    epoch_counter = iter(range(10**9))

    def val_score(model):
        obj, alpha, cands = validator.sweep(model)
        chosen[next(epoch_counter)] = (alpha, cands)
        return obj

    # with only the agreement proxy there is no quality signal: epochs follow the held-out loss,
    # and alpha is chosen once, for the best epoch
    res = train(data.corpus, cfg, sup, data.split_rows("train"), data.split_rows("val"),
                val_score=val_score if validator and not proxy else None, keep_initial=cfg.guard)
    out = FitResult(**{k: getattr(res, k) for k in ("model", "config", "history", "best_epoch", "seconds", "n_train")})
    if validator:
        alpha, cands = validator.sweep(out.model)[1:] if proxy else chosen[out.best_epoch]
        out.model.alpha.fill_(alpha)
        if not cfg.guard:
            reason = f"unguarded: alpha=1 at the epoch with the best validation objective ({out.best_epoch})"
        elif alpha == 0:
            reason = "no alpha > 0 beat the raw vectors on validation without a drop: shipping the identity"
            if not proxy and len(chosen) > 1:  # show the trained epoch that came closest, so the trade-off is visible
                closest = max((e for e in chosen if e > 0), key=lambda e: max(c["objective"] for c in chosen[e][1]))
                cands = chosen[closest][1]
                reason += f"; the table shows epoch {closest}, the trained epoch that came closest"
        else:
            reason = f"alpha={alpha:g} at epoch {out.best_epoch} gave the best validation result with no metric dropping"
        if "agreement" in validator.queries:
            reason += " (no labels or pairs to validate on: quality was not measured, only closeness to raw)"
        out.guard = GuardReport(alpha=alpha, epoch=out.best_epoch, criterion=validator.criterion,
                                raw=validator.raw, candidates=cands, reason=reason)
        log.info("%s", out.guard.summary())
    return out
