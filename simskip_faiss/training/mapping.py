"""Maps between two encoders' spaces from paired embeddings: change the embedding model without re-indexing.

Row i of `source` and `target` embed the same text with two models. `fit_map` fits three candidate maps
source -> target on seeded training pairs and keeps the one that the held-out pairs say is best:

* procrustes: the (semi-)orthogonal W = U V^T from the SVD of X^T Y (a `LinearRefiner`, no bias): the
  reference, the most constrained map (it keeps the angles between source vectors);
* ridge: the centred least-squares affine map, its lambda chosen on the held-out pairs (a `LinearRefiner`);
* learned: a cross-space SimSkip (`model.MapSkip`), refined = normalize(P x + alpha * f(x)), with P started
  from the reference map (frozen by default) and f trained with in-batch InfoNCE of the mapped source against
  the targets (losses.info_nce) plus a neighbourhood term (KL to the target's in-batch similarity
  distribution, own target left out: what the guard scores). f's last layer starts at zero: step 0 is the
  reference map, and the checkpoint with the best held-out score is kept.

The guard needs no labels. Each held-out pair's mapped source is a query over the target vectors (the held-out
rows and a seeded sample of the training rows, all L2-normalised); "re-embedded" search is the same query
embedded by the target model itself. Scored per candidate: `reembedded@10` (10-recall@10 of the mapped
query's top 10 against the re-embedded query's top 10: the fraction of the re-embedded results the map
reproduces; 1.0 = as if re-embedded), and `mrr@10` / `recall@10` of the pair's own target. The shipping
rule is metrics/scoring.py's `judge` and `ship` against the reference: another map ships only when no judged
metric falls more than `tolerance` below the reference's and the mean relative change exceeds `min_gain`.
Why the margin: the pairs are documents, the mapped vectors at serving time are queries; on WordNet
(bench/results/migration.md, mpnet queries into a MiniLM index) ridge beat Procrustes on held-out pairs by
0.7-1.2% and lost 15% of its nDCG@10 on queries, the learned map by 1.3-1.7% and lost 11%. 0.02 was set after seeing
those WordNet numbers (no other data set with two models' embeddings was at hand to check it on).

Relevance judgements across the two models (`relevant=(S, T)`, `train-map --relevant`), when the user has them
(logged queries and the documents they found, the queries embedded by the new model): the learned map trains on
them too (the same loss as the text pairs, rows of one document never each other's negatives), and every map is
judged on a held-out 10% of them, split by document (`TaskGuard`: `task_mrr@10`, `task_recall@10` of the own
document among the held-out documents and the text-pair guard's corpus) instead of on the text pairs: what
serving sees. The text-pair metrics are still reported. The margin is then a noise test instead of `min_gain`:
the held-out documents are split in two halves, one picks (ridge's lambda, the learned checkpoint, the task
metrics reported), the other decides: another map ships only when the 95% paired-bootstrap interval of its
per-pair reciprocal-rank gain over the reference, on the deciding half, lies above 0 (`task_gain_ci`). Why: with
a tenth of ~900 WordNet judgements held out, shipping on the mean gain sent ridge or the learned map out on some
seeds and they lost to Procrustes on the test queries; a test on the same pairs that picked the candidate still
shipped ridge once (its best-of-five lambda is biased upwards there): bench/results/migration.md.
Once scored, the closed-form maps are refitted on every pair (`refit`; ridge keeps its lambda): the shipped
file uses 100% of the pairs, its guard scores are those of the fit on the training 90%. The learned map is
not refitted (its checkpoint was chosen on the held-out pairs).
`recovered` is the shipped map's `reembedded@10`: the fraction of the re-embedded top 10 it reproduces on
held-out pairs, not a fraction of a task metric (that needs queries with relevance judgements: the bench).

Directions (`DIRECTIONS`, recorded in the file's metadata with the dimensions; `BaseRefiner.map_direction`):

* "queries": source = the NEW model, target = the OLD one. Every vector the new model makes goes through the
  map — queries and newly added documents (apply_to "both") — while the vectors already stored in the old
  index stay as they are. Serve it by wrapping the populated old index: `RefinedIndex(map,
  index=faiss.read_index("old.faiss"))` (`search` takes new-model queries, `add` new-model documents, stored
  mapped), or `simskip-faiss build map.onnx old.npy --corpus-model old`. The framework integrations embed
  queries and documents through it; Spark refine and Milvus ingest map new-model document vectors.
  `map_queries` maps queries for a plain FAISS index.
* "documents": source = the OLD model, target = the NEW one. A one-time migration pass: stored old vectors
  are mapped into the new space (`map_documents`, `Refiner.transform`, or `simskip-faiss spark-refine` at
  scale), then new-model queries search them raw in a plain index. No serving path holds it: `RefinedIndex`
  (and its bundles), Milvus collections and the framework integrations refuse it with one line
  (`BaseRefiner.refuse_migration_map`), since they would map the new-model queries too.
  `map_documents` / `map_queries` refuse a map applied in the wrong direction.

Bad input raises `InputError` with one line: pair files of different lengths, a non-finite or all-zero row,
too few pairs; nothing is written.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import InputError
from ..refiners import BaseRefiner, LinearRefiner

from .map_candidates import (CLOSED_FORM, DIRECTIONS, MIN_PAIRS, ROLE, MapConfig, MapGuard, TaskGuard,  # noqa: F401
                             _score, as_numpy, check_direction, check_linear_module, check_pairs, check_relevant,
                             linear_module, procrustes, ridge_maps, split_pairs, train_learned)

log = logging.getLogger(__name__)


@dataclass
class MapResult:
    """What `fit_map` found: the shipped map, every candidate's held-out scores, and what it recovers."""

    shipped: str                       # "procrustes", "ridge" or "learned"
    direction: str
    d_in: int
    d_out: int
    candidates: dict[str, dict]        # name -> guard metrics, objective, feasible, margin, seconds (+ lambda, steps)
    recovered: float                   # the shipped map's reembedded@10 on the held-out pairs
    n_pairs: int
    n_train: int
    n_val: int
    n_corpus: int
    seconds: float
    config: MapConfig
    linear: dict[str, LinearRefiner] = field(default_factory=dict)  # the closed-form maps (refitted on every pair with config.refit)
    model: object = None               # the learned MapSkip (torch), when trained
    n_relevant: int = 0                # relevant pairs given (0: none; the maps were judged on the text pairs)
    judged: list = field(default_factory=list)  # the guard metrics the shipping rule compared
    _refiner: BaseRefiner | None = None

    @property
    def apply_to(self) -> str:
        """"both" in either direction: every vector handed to the map is the source model's (see the module
        docstring: what is already stored in the target space is not handed to it)."""
        return "both"

    def metadata(self, name: str | None = None) -> dict:
        """What the map's file records: direction, apply_to, the models' roles, the guard's scores, the config."""
        src, tgt = ROLE[self.direction]
        name = name or self.shipped
        return {"kind": "map", "map": name, "shipped": name == self.shipped, "direction": self.direction,
                "apply_to": self.apply_to, "source_model": src, "target_model": tgt,
                "guard": {"metric": f"reembedded@{self.config.k}", "recovered": self.candidates[name][f"reembedded@{self.config.k}"],
                          "candidates": {n: dict(c) for n, c in self.candidates.items()},
                          "n_pairs": self.n_pairs, "n_train": self.n_train, "n_val": self.n_val,
                          "n_corpus": self.n_corpus, "n_relevant": self.n_relevant, "judged": list(self.judged)},
                "map_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}}

    def torch_model(self, name: str | None = None):
        """A candidate (default: the shipped map) as a torch module: a `MapSkip` (a closed-form map is one without f)."""
        name = self._name(name)
        if name == "learned":
            return self.model
        return linear_module(self.linear[name], self.apply_to)

    def _name(self, name: str | None) -> str:
        name = name or self.shipped
        if name not in self.candidates or (name == "learned" and self.model is None):
            raise InputError(f"no candidate map {name!r}; fitted: {', '.join(self.candidates)}")
        return name

    @property
    def refiner(self) -> BaseRefiner:
        """The shipped map as a refiner: the `LinearRefiner` of a closed-form map, the ONNX graph of a learned one."""
        if self._refiner is None:
            self._refiner = self.candidate(self.shipped)
        return self._refiner

    def candidate(self, name: str) -> BaseRefiner:
        """Any fitted candidate as a refiner (as `refiner` makes the shipped one)."""
        name = self._name(name)
        if name == "learned":
            from ..refiners import Refiner
            from .export import to_onnx_proto, verify, with_metadata

            model = self.model.eval()
            data = with_metadata(to_onnx_proto(model, self.d_in), {**self._base_meta(), **self.metadata(name)})
            verify(model, data, self.d_in)
            return Refiner(data)
        lin = self.linear[name]
        return LinearRefiner(lin.A, lin.mean, True, f"map-{name}", lin.bias, self.apply_to, self.metadata(name))

    def _base_meta(self) -> dict:
        from .. import __version__

        return {"format": "simskip-refiner/1", "version": __version__, "d_in": self.d_in, "d_out": self.d_out,
                "normalize": True, "alpha": 1.0, "precision": "fp32"}

    def export(self, path, precision: str = "fp32", name: str | None = None) -> dict:
        """Write the shipped map (or candidate `name`) to one ONNX file (`Refiner.load` reads it), verified against
        torch (export.py); a closed-form map is first checked against its `LinearRefiner` (numpy). Returns the
        metadata written."""
        from .export import export

        name = self._name(name)
        model = self.torch_model(name).eval()
        if name != "learned":
            check_linear_module(model, self.linear[name])
        return export(model, path, self.metadata(name), precision=precision)

    def summary(self) -> list[str]:
        """One line per candidate (held-out scores, fit time), then what shipped and what it recovers."""
        k = self.config.k
        lines = []
        for name, c in self.candidates.items():
            extra = f" lambda={c['lambda']:g}" if "lambda" in c else ""
            extra += f" steps={c['steps']}" if "steps" in c else ""
            task = (f"task_mrr@{k} {c[f'task_mrr@{k}']:.4f}  task_recall@{k} {c[f'task_recall@{k}']:.4f}  "
                    if self.n_relevant else "")
            lines.append(f"{name:<10} {task}reembedded@{k} {c[f'reembedded@{k}']:.4f}  mrr@{k} {c[f'mrr@{k}']:.4f}  "
                         f"recall@{k} {c[f'recall@{k}']:.4f}  objective {c['objective']:+.4f}"
                         f"{'' if c['feasible'] else ' (below the reference)'}{'' if c['margin'] else (' (gain within noise)' if self.n_relevant else ' (gain < min_gain)')}  fit {c['seconds']:.1f}s{extra}")
        src, tgt = ROLE[self.direction]
        lines.append(f"shipped {self.shipped} ({self.direction}: {src} {self.d_in}-d -> {tgt} {self.d_out}-d): reproduces "
                     f"{self.recovered:.1%} of the re-embedded top {k} on {self.n_val} held-out pairs "
                     f"(over {self.n_corpus} target rows)"
                     + (f"; judged on {self.n_relevant} relevant pairs' held-out share" if self.n_relevant else ""))
        return lines

# -- fit ----------------------------------------------------------------------------------------------------
def fit_map(source, target, config: MapConfig | None = None, direction: str = "queries", relevant=None,
            **overrides) -> MapResult:
    """Fit source -> target maps on paired embeddings (row i of both = the same text) and ship the best.

    direction "queries": source = new-model embeddings, target = old-model ones (new queries into the old
    index); "documents": source = old, target = new (stored vectors into the new space). `overrides` set
    MapConfig fields. `relevant` (optional): a pair (S, T) of relevance judgements across the two models, row
    for row: queries direction, S = new-model queries and T = the old-model vectors of their relevant documents;
    documents direction, S = old-model document vectors and T = new-model queries that should find them. With
    it, the learned map also trains on them and the guard judges every map on held-out ones (task metrics:
    what serving sees) instead of on the text pairs. See the module docstring for the rest.
    """
    from ..metrics.scoring import judge, ship

    cfg = replace(config or MapConfig(), **overrides)
    check_direction(direction)
    t0 = time.perf_counter()
    X, Y = check_pairs(source, target)
    apply_to = "both"
    train_rows, val_rows = split_pairs(len(X), cfg.val_fraction, cfg.seed, cfg.max_val)
    guard = MapGuard(Y, val_rows, train_rows, cfg)
    Xt, Yt, Xv = X[train_rows], Y[train_rows], X[val_rows]
    task, decide, rel_train, n_rel = None, None, None, 0
    if relevant is not None:
        S, T, group = check_relevant(relevant, X.shape[1], Y.shape[1], direction)
        g_train, g_val = split_pairs(int(group.max()) + 1, cfg.val_fraction, cfg.seed, cfg.max_val)
        held = np.isin(group, g_val)
        # two halves of the held-out documents: one picks (ridge's lambda, the learned checkpoint, the judge's
        # scores), the other decides whether a map beats the reference: a gain measured where it was picked is
        # biased upwards (the best of several noisy scores)
        g_pick = np.random.default_rng(cfg.seed + 2).permutation(g_val)[: len(g_val) // 2]
        pick = held & np.isin(group, g_pick)
        task = TaskGuard(S[pick], T[pick], group[pick], X, Y, guard.rows, direction, cfg.k)
        decide = TaskGuard(S[held & ~pick], T[held & ~pick], group[held & ~pick], X, Y, guard.rows, direction, cfg.k)
        rel_train, n_rel = (S[~held], T[~held], group[~held]), len(S)
    keys = task_keys(cfg) if task else guard_keys(cfg)   # what the maps are judged on

    def score(f) -> dict[str, float]:
        return {**guard(f(Xv)), **(task(f) if task else {})}

    cands: dict[str, dict] = {}
    linear: dict[str, LinearRefiner] = {}

    t = time.perf_counter()
    linear["procrustes"] = procrustes(Xt, Yt, apply_to=apply_to)
    cands["procrustes"] = {**score(linear["procrustes"].transform), "seconds": time.perf_counter() - t}

    t = time.perf_counter()
    scored = [(lam, lin, score(lin.transform)) for lam, lin in ridge_maps(Xt, Yt, cfg.ridge_grid, apply_to).items()]
    lam, lin, m = max(scored, key=lambda s: _score(s[2], keys))  # the first of equal scores: the smallest lambda given first
    linear["ridge"] = lin
    cands["ridge"] = {**m, "lambda": lam, "seconds": time.perf_counter() - t}

    # the reference is Procrustes unless init says otherwise: the most constrained map (it keeps the angles
    # between source vectors), which carries over best from the pairs (documents) to queries on WordNet
    base = cfg.init if cfg.init in CLOSED_FORM else max(CLOSED_FORM, key=lambda n: _score(cands[n], keys))
    model = None
    if cfg.learned:
        t = time.perf_counter()
        model, m, steps = train_learned(X, Y, train_rows, score, keys, linear[base], cfg, apply_to, rel_train, direction)
        cands["learned"] = {**m, "init": base, "steps": steps, "seconds": time.perf_counter() - t}

    ref = {k: cands[base][k] for k in keys}
    names = list(cands)
    funcs = {n: linear[n].transform for n in CLOSED_FORM}  # the 90% fits the guard scored (before any refit)
    if model is not None:
        funcs["learned"] = as_numpy(model)
    for n in names:
        feasible, objective = judge({k: cands[n][k] for k in keys}, ref, cfg.tolerance)
        cands[n].update(feasible=feasible, objective=objective, margin=n == base or _margin(
            n, base, objective, decide, funcs, cands, cfg))
    order = [base] + [n for n in names if n != base]  # the reference first: it wins ties
    shipped = order[ship([{**cands[n], "feasible": cands[n]["feasible"] and cands[n]["margin"]} for n in order],
                         identity=False)]
    if cfg.refit:  # the closed-form maps, scored on the held-out pairs, are refitted on every pair (ridge: same lambda)
        linear["procrustes"] = procrustes(X, Y, apply_to=apply_to)
        linear["ridge"] = ridge_maps(X, Y, (cands["ridge"]["lambda"],), apply_to)[cands["ridge"]["lambda"]]
    res = MapResult(shipped=shipped, direction=direction, d_in=X.shape[1], d_out=Y.shape[1], candidates=cands,
                    recovered=float(cands[shipped][guard_keys(cfg)[0]]), n_pairs=len(X), n_train=len(train_rows),
                    n_val=len(val_rows), n_corpus=len(guard.rows), seconds=time.perf_counter() - t0, config=cfg,
                    linear=linear, model=model, n_relevant=n_rel, judged=keys)
    log.info("map fitted in %.1fs: %s", res.seconds, "; ".join(res.summary()))
    return res


def _margin(name: str, base: str, objective: float, decide, funcs: dict, cands: dict, cfg: MapConfig) -> bool:
    """Does candidate `name` beat the reference `base` by enough to ship instead of it?

    Without relevant pairs: its mean relative change of the judged metrics exceeds `min_gain` (the text pairs are
    not what serving sees: see the module docstring). With them: the held-out pairs are what serving sees, but few
    (a tenth of the judgements), so the gain must be outside noise: the 95% paired-bootstrap interval of its
    per-pair reciprocal-rank gain over the reference, on the half of the held-out documents (`decide`) that did
    not pick the candidate, lies above 0 (`metrics.ranking.paired_bootstrap`, recorded as `task_gain_ci`)."""
    from ..metrics.ranking import paired_bootstrap

    if decide is None:
        return objective > cfg.min_gain
    pb = paired_bootstrap(decide.reciprocal_ranks(funcs[base]), decide.reciprocal_ranks(funcs[name]), n=2000,
                          seed=cfg.seed)
    cands[name]["task_gain_ci"] = [float(pb["ci_low"]), float(pb["ci_high"])]
    return bool(pb["ci_low"] > 0)


def guard_keys(cfg: MapConfig) -> list[str]:
    """The text-pair guard's metrics: judged when no relevant pairs are given."""
    k = cfg.k
    return [f"reembedded@{k}", f"mrr@{k}", f"recall@{k}"]


def task_keys(cfg: MapConfig) -> list[str]:
    """The relevant pairs' metrics: judged when relevant pairs are given."""
    return [f"task_mrr@{cfg.k}", f"task_recall@{cfg.k}"]


# -- applying a map ---------------------------------------------------------------------------------------------
def _map_meta(refiner: BaseRefiner, want: str) -> None:
    direction = (refiner.metadata or {}).get("direction")
    if direction is None:
        raise InputError("this refiner is not a map between two models (train-map records a direction in its metadata)")
    if direction != want:
        other = "map_documents" if direction == "documents" else "map_queries"
        raise InputError(f"this map was trained for direction {direction!r} ({_what(direction)}), not {want!r}: use "
                         f"{other}, or train a {want} map (train-map --direction {want})")


def _what(direction: str) -> str:
    return ("new-model queries into the old index's space" if direction == "queries"
            else "old stored vectors into the new model's space")


def _check_dims(refiner: BaseRefiner, x, index, what: str, src: str, tgt: str) -> None:
    d = np.shape(x)[1] if np.ndim(x) == 2 else None
    if d != refiner.d_in:
        raise InputError(f"{what} have dimension {d} but this map takes {refiner.d_in}-d {src}-model vectors "
                         f"(and outputs {refiner.d_out}-d {tgt}-model ones): wrong model or wrong direction?")
    if index is not None and getattr(index, "d", refiner.d_out) != refiner.d_out:
        raise InputError(f"the index holds {index.d}-d vectors but this map outputs {refiner.d_out}-d {tgt}-model "
                         "vectors: it was trained for another index")


def map_queries(refiner: BaseRefiner, queries, index=None) -> np.ndarray:
    """New-model `queries` mapped into the old index's space by a "queries" map (refused otherwise), ready to
    search `index` (checked: its dimension must be the map's d_out). Nothing is changed."""
    _map_meta(refiner, "queries")
    _check_dims(refiner, queries, index, "queries", "new", "old")
    return refiner.transform(queries)


def map_documents(refiner: BaseRefiner, vectors, index=None) -> np.ndarray:
    """Old stored `vectors` mapped into the new model's space by a "documents" map (refused otherwise), to add
    to a new `index` (checked: its dimension must be the map's d_out) searched with raw new-model queries."""
    _map_meta(refiner, "documents")
    _check_dims(refiner, vectors, index, "stored vectors", "old", "new")
    return refiner.transform(vectors)
