"""The training objective: the five losses and the weighted bundle a training step takes (`_Losses`).

Signals: the paper's unsupervised SimSkip (two augmented views, NT-Xent through a projection head),
supervised contrastive on labels, query->document InfoNCE on pairs (symmetric: queries and documents
refined; or query-only: documents stay raw) with extra corpus rows as negatives, and neighbourhood
preservation (for a query-only refiner: documents fed to it as queries stay where they are).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig
from .model import SimSkip
from .supervision import Supervision


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
