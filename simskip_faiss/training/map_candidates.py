"""The candidate maps of `mapping.fit_map` and their guard: input checks, the pair split, the closed-form
maps (orthogonal Procrustes, ridge), their ONNX form, the held-out scoring (`MapGuard`) and the learned
cross-space SimSkip's training. See mapping.py for what is fitted, how it ships and the directions."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..refiners import LinearRefiner

log = logging.getLogger(__name__)


DIRECTIONS = ("queries", "documents")
CLOSED_FORM = ("procrustes", "ridge")
ROLE = {"queries": ("new", "old"), "documents": ("old", "new")}  # (source model, target model) per direction
MIN_PAIRS = 40
MIN_RELEVANT = 20


@dataclass(frozen=True)
class MapConfig:
    """Settings of `fit_map` (the defaults were chosen on WordNet MiniLM<->mpnet: bench/results/migration.md)."""

    seed: int = 0                      # the train/validation split of the pairs and the learned map's init
    val_fraction: float = 0.1          # pairs held out for the guard
    max_val: int = 2000                # held-out pairs scored at most
    max_corpus: int = 10000            # target rows searched by the guard at most (held-out ones first)
    ridge_grid: tuple = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # lambda relative to the mean eigenvalue of X^T X
    learned: bool = True               # also train the cross-space SimSkip
    hidden: int = 256                  # width of f's hidden layer
    depth: int = 1
    activation: str = "gelu"
    residual_input: str = "source"     # f reads x ("source") or P x ("projected")
    train_projection: bool = False     # also train P (False: P stays the closed-form map)
    temperature: float = 0.05
    neighbour_weight: float = 1.0      # weight of the in-batch neighbourhood KL against the target's
    relevant_weight: float = 1.0       # weight of the InfoNCE on the relevant pairs, when given
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_steps: int = 1000
    eval_every: int = 50
    patience: int = 5                  # evaluations without a better objective before stopping
    init: str = "procrustes"           # the reference map and the learned map's start: procrustes, ridge or best
    tolerance: float = 0.005           # another map may lose at most this on any guard metric vs the reference
    refit: bool = True                 # refit the closed-form maps on all pairs once scored (the learned map is not)
    min_gain: float = 0.02             # ... and must beat it by this much (mean relative change of the metrics;
                                       # with relevant pairs a paired-bootstrap test replaces it: mapping.py)
    k: int = 10
    threads: int | None = None         # torch threads while training (None: leave as is)


# -- input ------------------------------------------------------------------------------------------------
def check_pairs(source, target, names: tuple[str, str] = ("source", "target"), min_pairs: int = MIN_PAIRS,
                what: str = "pairs") -> tuple[np.ndarray, np.ndarray]:
    """Two (n, d) float32 arrays whose row i embeds the same text, or InputError (one line)."""
    out = []
    for x, name in zip((source, target), names):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] < 1 or x.dtype.kind not in "fiu":
            raise InputError(f"{name} must be a 2-D numeric (n, d) array of embeddings, got shape {x.shape} "
                             f"dtype {x.dtype}")
        out.append(x)
    (s, t), (ns, nt) = out, names
    if len(s) != len(t):
        raise InputError(f"the pair files have different lengths: {ns} has {len(s)} rows, {nt} {len(t)}; "
                         "row i of both must embed the same text")
    if len(s) < min_pairs:
        raise InputError(f"{len(s)} {what} are too few to fit and check a map: give at least {min_pairs}")
    arrays = []
    for x, name, other in ((s, ns, nt), (t, nt, ns)):
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.ascontiguousarray(x, dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise InputError(f"{name} row {int(bad[0])} holds NaN or Inf ({bad.size} such rows): drop those pairs "
                             f"from both files ({name} and {other})")
        zero = np.flatnonzero(~x.any(axis=1))
        if zero.size:
            raise InputError(f"{name} row {int(zero[0])} is all zeros ({zero.size} such rows): a zero embedding has "
                             f"no direction to map; drop those pairs from both files ({name} and {other})")
        arrays.append(x)
    return arrays[0], arrays[1]


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be 'queries' (new-model queries into the old index's space) or "
                         f"'documents' (old stored vectors into the new space), got {direction!r}")
    return direction


def check_relevant(relevant, d_in: int, d_out: int, direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`relevant` = (S, T): S (m, d_in) source-model vectors, T (m, d_out) target-model vectors that each S row
    should find once mapped (or be found by: the documents direction), row for row. Returns float32 S, T and
    the group of each row (rows with the same T, or the same S in the documents direction, share a group: the
    same document, so never an in-batch negative of each other). InputError (one line) otherwise."""
    if not isinstance(relevant, (tuple, list)) or len(relevant) != 2:
        raise InputError("relevant must be a pair (source-model vectors, target-model vectors), row for row")
    src, tgt = ROLE[direction]
    S, T = check_pairs(relevant[0], relevant[1], ("relevant source", "relevant target"), min_pairs=MIN_RELEVANT,
                        what="relevant pairs")
    for x, d, name, model in ((S, d_in, "relevant source", src), (T, d_out, "relevant target", tgt)):
        if x.shape[1] != d:
            raise InputError(f"{name} vectors have dimension {x.shape[1]} but the pairs' {model} model has {d}: "
                             f"give {'new' if model == 'new' else 'old'}-model vectors of width {d}")
    docs = T if direction == "queries" else S
    group = np.unique(docs, axis=0, return_inverse=True)[1].reshape(-1)
    return S, T, group.astype(np.int64)


def split_pairs(n: int, val_fraction: float, seed: int, max_val: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of n pairs, seeded; at least 10 held out and 20 for training."""
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    m = min(max(10, int(round(n * val_fraction))), n - 20, max_val)
    return np.sort(perm[m:]), np.sort(perm[:m])


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- closed-form maps -----------------------------------------------------------------------------------
def procrustes(X: np.ndarray, Y: np.ndarray, name: str = "procrustes", apply_to: str = "both") -> LinearRefiner:
    """Orthogonal Procrustes (semi-orthogonal when the dimensions differ): W = U V^T from the SVD of X^T Y,
    the orthonormal map minimising |X W - Y|; y = normalize(x W)."""
    U, _, Vt = np.linalg.svd(X.astype(np.float64).T @ Y.astype(np.float64), full_matrices=False)
    return LinearRefiner((U @ Vt).T, np.zeros(X.shape[1]), True, name, apply_to=apply_to)


def ridge_maps(X: np.ndarray, Y: np.ndarray, grid, apply_to: str = "both") -> dict[float, LinearRefiner]:
    """The centred ridge maps y = normalize((x - mean_x) W + mean_y) for each relative lambda in `grid`
    (lambda times the mean eigenvalue of Xc^T Xc), from one eigendecomposition."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    s, V = np.linalg.eigh(Xc.T @ Xc)
    s = np.maximum(s, 0)
    B = V.T @ (Xc.T @ Yc)
    scale = max(float(s.mean()), 1e-12)
    out = {}
    for lam in grid:
        W = V @ (B / (s + lam * scale)[:, None])
        out[float(lam)] = LinearRefiner(W.T, mx, True, f"ridge(lambda={lam:g})", bias=my, apply_to=apply_to)
    return out


def linear_module(lin: LinearRefiner, apply_to: str = "both"):
    """A `LinearRefiner` as a `MapSkip` without f: P x = A x + (bias - A mean), normalised (what export traces)."""
    from .model import MapSkip

    A, b = lin.affine()
    return MapSkip(lin.d_in, lin.d_out, hidden=0, normalize=lin.normalize, apply_to=apply_to).init_projection(A, b).eval()


def check_linear_module(model, lin: LinearRefiner, tol: float = 1e-5) -> float:
    """Max |torch module - LinearRefiner| on random unit vectors; raises ParityError above `tol`."""
    import torch

    from .export import ParityError

    x = _normalize(np.random.default_rng(0).standard_normal((64, lin.d_in)))
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    worst = float(np.abs(got - lin.transform(x)).max())
    if not worst <= tol:
        raise ParityError(f"the map's torch graph does not match its LinearRefiner: max abs error {worst:.3g} > {tol:g}")
    return worst


# -- the guard --------------------------------------------------------------------------------------------
class MapGuard:
    """Scores mapped held-out sources as queries over the target vectors, against the re-embedded truth."""

    def __init__(self, target: np.ndarray, val_rows: np.ndarray, train_rows: np.ndarray, cfg: MapConfig):
        import faiss

        rng = np.random.default_rng(cfg.seed + 1)
        extra = max(0, cfg.max_corpus - len(val_rows))
        others = train_rows if len(train_rows) <= extra else np.sort(rng.choice(train_rows, extra, replace=False))
        self.rows = np.concatenate([val_rows, others])       # corpus rows; the held-out pair j is corpus row j
        self.k = min(cfg.k, len(self.rows))
        self.index = faiss.IndexFlatIP(target.shape[1])
        self.index.add(_normalize(target[self.rows]))
        self.own = np.arange(len(val_rows))
        self.truth = self.search(_normalize(target[val_rows]))  # the re-embedded queries' top k

    def search(self, q: np.ndarray) -> np.ndarray:
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), self.k)[1]

    def __call__(self, mapped: np.ndarray) -> dict[str, float]:
        from ..metrics.ranking import knn_recall, retrieval_metrics_qrels

        I = self.search(mapped)
        k = self.k
        own = retrieval_metrics_qrels(I, [np.array([j]) for j in self.own], ks=(k,))
        return {f"reembedded@{k}": knn_recall(self.truth, I, ks=(k,))[f"{k}-recall@{k}" if k > 1 else "1-recall@1"],
                f"mrr@{k}": own[f"mrr@{k}"], f"recall@{k}": own[f"recall@{k}"]}


class TaskGuard:
    """Scores a map on held-out relevant pairs: does the mapped source find its own target among the corpus
    (queries direction: mapped new-model queries over old-model documents), or is the mapped source found by
    its target (documents direction: new-model queries over mapped old-model documents)? `task_mrr@k` and
    `task_recall@k` of each held-out pair's own document; the corpus is the held-out documents (one row per
    group) and the text-pair guard's corpus rows (copies of a held-out document left out)."""

    def __init__(self, S: np.ndarray, T: np.ndarray, group: np.ndarray, source: np.ndarray, target: np.ndarray,
                 rows: np.ndarray, direction: str, k: int):
        self.direction = direction
        docs, queries = (T, S) if direction == "queries" else (S, T)
        first = np.unique(group, return_index=True)[1]          # one row per held-out document
        self.docs = docs[first]
        held = {r.tobytes() for r in self.docs}
        pool = target if direction == "queries" else source
        self.extra = pool[[r for r in rows if pool[r].tobytes() not in held]]
        # the held-out documents come after the others: a tie (a degenerate map) never favours them
        self.own = [np.array([len(self.extra) + j]) for j in np.searchsorted(group[first], group)]
        self.queries = queries
        self.k = min(k, len(self.docs) + len(self.extra))

    def __call__(self, f) -> dict[str, float]:
        """Task metrics of the map `f` (numpy (n, d_in) -> (n, d_out))."""
        from ..metrics.ranking import retrieval_metrics_qrels

        m = retrieval_metrics_qrels(self._search(f), self.own, ks=(self.k,))
        return {f"task_mrr@{self.k}": m[f"mrr@{self.k}"], f"task_recall@{self.k}": m[f"recall@{self.k}"]}

    def reciprocal_ranks(self, f) -> np.ndarray:
        """Per held-out pair: 1 / rank of its own document in the top k (0 when absent), for paired comparisons."""
        from ..metrics.ranking import per_query_metrics

        return per_query_metrics(self._search(f), self.own, ks=(self.k,))[f"mrr@{self.k}"]

    def _search(self, f) -> np.ndarray:
        import faiss

        if self.direction == "queries":
            corpus, q = _normalize(np.vstack([self.extra, self.docs])), f(self.queries)
        else:
            corpus, q = f(np.vstack([self.extra, self.docs])), _normalize(self.queries)
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(np.ascontiguousarray(corpus, dtype=np.float32))
        return index.search(np.ascontiguousarray(q, dtype=np.float32), self.k)[1]


def _score(m: dict, keys=None) -> float:
    """One number to pick a ridge lambda or a learned checkpoint: mean of the judged guard metrics (`keys`,
    default all)."""
    return float(np.mean([m[k] for k in (keys or m)]))


# -- the learned map ------------------------------------------------------------------------------------------
def as_numpy(model):
    """A torch map as a numpy function (n, d_in) float -> (n, d_out) float32, without gradients."""
    import torch

    def f(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return f


def pair_loss(out, tgt, cfg: MapConfig, mask=None):
    """In-batch InfoNCE of the mapped sources `out` against their targets `tgt` (normalised), plus
    `cfg.neighbour_weight` times the KL from the target's in-batch similarity distribution to the mapped
    source's (own target and `mask`ed rows left out): rank the other targets as the target itself does."""
    import torch
    import torch.nn.functional as F

    from .losses import info_nce

    loss = info_nce(out, tgt, cfg.temperature, mask=mask)
    if cfg.neighbour_weight:
        skip = torch.eye(len(out), dtype=torch.bool) if mask is None else mask | torch.eye(len(out), dtype=torch.bool)
        t_logp = F.log_softmax((tgt @ tgt.T / cfg.temperature).masked_fill(skip, float("-inf")), 1).masked_fill(skip, 0)
        m_logp = F.log_softmax((F.normalize(out, dim=-1) @ tgt.T / cfg.temperature).masked_fill(skip, float("-inf")),
                               1).masked_fill(skip, 0)
        loss = loss + cfg.neighbour_weight * (t_logp.exp() * (t_logp - m_logp)).sum(1).mean()
    return loss


class _Cycle:
    """Seeded batches of `rows` without replacement, reshuffled (by `rng`) when fewer than a batch are left; the
    first shuffle is drawn at construction (so the draws from a shared rng keep their order)."""

    def __init__(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator):
        self.rows, self.rng = rows, rng
        self.batch = max(2, min(batch_size, len(rows)))
        self.order, self.pos = rng.permutation(rows), 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(self.rows), 0
        self.pos += self.batch
        return self.order[self.pos - self.batch:self.pos]


def train_learned(X: np.ndarray, Y: np.ndarray, train_rows: np.ndarray, score, keys: list[str],
                  init: LinearRefiner, cfg: MapConfig, apply_to: str = "both", relevant=None, direction: str = "queries"):
    """Train a `MapSkip` from the closed-form map `init`; returns (model at its best held-out score, metrics, steps).

    `score(f)`: the guard's metrics of a numpy map f; the checkpoint kept has the best mean of `keys`.
    `relevant`: None or the training relevant pairs (S, T, group): each step adds `cfg.relevant_weight` times an
    in-batch InfoNCE on a batch of them (mapped S finds its T; documents direction: T finds its mapped S), other
    rows of the same group masked."""
    import torch

    from .loop import torch_threads
    from .losses import info_nce
    from .model import MapSkip

    with torch_threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        A, b = init.affine()
        model = MapSkip(X.shape[1], Y.shape[1], cfg.hidden, cfg.depth, cfg.activation, True, cfg.residual_input,
                        apply_to).init_projection(A, b).freeze_projection(not cfg.train_projection)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        xt, yt = torch.from_numpy(X), torch.from_numpy(_normalize(Y))
        rng = np.random.default_rng(cfg.seed)
        if relevant is not None:
            rs, rt, rg = torch.from_numpy(relevant[0]), torch.from_numpy(_normalize(relevant[1])), relevant[2]
            rbatches = _Cycle(np.arange(len(rg)), cfg.batch_size, rng)

        f = as_numpy(model)

        def evaluate() -> dict:
            model.eval()
            m = score(f)
            model.train()
            return m

        best = evaluate()
        best_state, best_step, bad, step = copy.deepcopy(model.state_dict()), 0, 0, 0
        batches = _Cycle(train_rows, cfg.batch_size, rng)
        model.train()
        while step < cfg.max_steps:
            idx = torch.from_numpy(batches.next())
            loss = pair_loss(model(xt[idx]), yt[idx], cfg)
            if relevant is not None and cfg.relevant_weight:
                ridx = rbatches.next()
                g = torch.from_numpy(rg[ridx])
                same = (g[:, None] == g[None, :]) & ~torch.eye(len(ridx), dtype=torch.bool)
                mapped, other = model(rs[ridx]), rt[ridx]
                if direction == "queries":
                    loss = loss + cfg.relevant_weight * pair_loss(mapped, other, cfg, same)
                else:
                    loss = loss + cfg.relevant_weight * info_nce(other, mapped, cfg.temperature, mask=same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                m = evaluate()
                if _score(m, keys) > _score(best, keys):
                    best, best_state, best_step, bad = m, copy.deepcopy(model.state_dict()), step, 0
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
        model.load_state_dict(best_state)
        model.eval()
    return model, best, best_step
