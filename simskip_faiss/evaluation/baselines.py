"""Closed-form supervised baselines: the cheapest things that use the same supervision as a trained refiner.

A refiner trained on pairs or labels is only worth shipping if it beats what ten lines of linear
algebra get from the same pairs or labels. Both maps here are fitted on the training split and
returned as `LinearRefiner`s (renormalised, so they serve inner-product indexes):

- `ridge_query_map`: W = argmin ||QW - D||^2 + lam ||W - I||^2 over training (query, document)
  pairs, applied to queries only (documents stay raw, so an existing index is unchanged). lam -> inf
  gives the identity, lam -> 0 the least-squares map.
- `lda_map`: the centred vector with its (shrunk) LDA discriminant coordinates appended, applied to
  queries and documents. The appended part carries the labels; the kept identity part keeps the
  map full-rank, so label emphasis is a blend (`weight`) rather than a projection that would
  collapse the distinctions another task (pairs) relies on.

Which lam, shrinkage and weight to use is a validation question; `evaluation.baselines` answers it.
"""
from __future__ import annotations

import numpy as np

from ..checks import as_matrix
from ..refiners import LinearRefiner
from ..errors import InputError

RIDGE_SCALES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # lam / (tr(Q^T Q) / d)
LDA_SHRINKAGES = (0.3, 0.03)
LDA_WEIGHTS = (0.25, 0.5, 1.0, 2.0)


def ridge_solutions(Q: np.ndarray, D: np.ndarray, lams) -> list[np.ndarray]:
    """W(lam) = (Q^T Q + lam I)^-1 (Q^T D + lam I) for each lam (row vectors: y = x @ W), float64.

    One eigendecomposition of Q^T Q serves every lam; lam = 0 with a singular Q^T Q gives the
    minimum-norm least-squares solution on the range of Q^T Q.
    """
    Q = np.asarray(Q, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    if Q.shape != D.shape or Q.ndim != 2:
        raise InputError(f"queries and documents must be paired (n, d) arrays, got {Q.shape} and {D.shape}")
    evals, V = np.linalg.eigh(Q.T @ Q)
    QtD = Q.T @ D
    out = []
    for lam in lams:
        if lam < 0:
            raise InputError(f"ridge lambda must be >= 0, got {lam}")
        denom = evals + lam
        inv = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > 1e-10 * max(evals.max(), 1e-30))
        out.append(V @ (inv[:, None] * (V.T @ (QtD + lam * np.eye(len(evals))))))
    return out


def ridge_query_map(Q: np.ndarray, D: np.ndarray, lam: float) -> LinearRefiner:
    """The ridge-to-identity map of queries toward their documents, as a query-only `LinearRefiner`."""
    return _ridge_refiner(ridge_solutions(Q, D, [lam])[0], lam, len(Q))


def _ridge_refiner(W: np.ndarray, lam: float, n_pairs: int) -> LinearRefiner:
    return LinearRefiner(W.T, np.zeros(W.shape[0], np.float32), normalize=True, name=f"ridge(lambda={lam:.4g})",
                         apply_to="queries", metadata={"lam": float(lam), "n_pairs": int(n_pairs)})


def ridge_candidates(Q: np.ndarray, D: np.ndarray, scales=RIDGE_SCALES) -> list[LinearRefiner]:
    """The identity (lam = inf) first, then one query-only ridge map per lam = scale * tr(Q^T Q) / d
    (the mean eigenvalue of Q^T Q), largest lam first: ordered from most to least regularised."""
    Q = as_matrix(Q, name="queries")
    D = as_matrix(D, Q.shape[1], "documents")
    unit = float(np.einsum("ij,ij->", Q, Q, dtype=np.float64)) / Q.shape[1]
    lams = sorted((s * unit for s in scales), reverse=True)
    return [_ridge_refiner(np.eye(Q.shape[1]), float("inf"), len(Q))] + [
        _ridge_refiner(W, lam, len(Q)) for W, lam in zip(ridge_solutions(Q, D, lams), lams)]


def lda_map(x: np.ndarray, labels: np.ndarray, shrinkage: float, weight: float) -> LinearRefiner:
    """The centred vector with its LDA discriminant coordinates appended: [x - m ; weight * c * V^T (x - m)].

    V holds the C - 1 leading solutions of S_b v = l S v, S = (1 - g) S_w + g (tr S_w / d) I
    (g = `shrinkage`), scaled so V^T S V = I: within-class spread is 1 along each, between-class
    spread is l. c makes the appended part's mean squared norm equal the centred vectors' on the
    training rows, so `weight` is the share of the similarity that comes from the labels:
    weight = 0 is mean-centring; the identity part keeps the map full-rank.
    """
    x = as_matrix(x)
    y = np.asarray(labels).reshape(-1)
    if y.shape != (x.shape[0],):
        raise InputError(f"labels must have one entry per row ({x.shape[0]}), got shape {y.shape}")
    if not 0 < shrinkage <= 1 or weight < 0:
        raise InputError(f"need shrinkage in (0, 1] and weight >= 0, got {shrinkage} and {weight}")
    classes, inv = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"an LDA baseline needs at least 2 classes, got {len(classes)}")
    x64 = x.astype(np.float64)
    mean, counts = x64.mean(0), np.bincount(inv)
    centres = np.zeros((len(classes), x.shape[1]))
    np.add.at(centres, inv, x64)
    centres /= counts[:, None]
    within = x64 - centres[inv]
    between = (centres - mean) * np.sqrt(counts / len(x64))[:, None]
    d = x.shape[1]
    Sw = within.T @ within / len(x64)
    S = (1 - shrinkage) * Sw + shrinkage * (np.trace(Sw) / d) * np.eye(d)
    evals, U = np.linalg.eigh(S)
    R = (U / np.sqrt(np.maximum(evals, 1e-12 * evals.max()))) @ U.T  # S^(-1/2)
    _, E = np.linalg.eigh(R @ (between.T @ between) @ R)
    V = R @ E[:, ::-1][:, : len(classes) - 1]  # V^T S V = I, largest between-class spread first
    xc = x64 - mean
    c = np.sqrt((xc ** 2).sum(1).mean() / max(((xc @ V) ** 2).sum(1).mean(), 1e-30))
    A = np.eye(d) if weight == 0 else np.vstack([np.eye(d), weight * c * V.T])
    return LinearRefiner(A, mean, normalize=True, name=f"lda(shrinkage={shrinkage:g}, weight={weight:g})",
                         metadata={"shrinkage": float(shrinkage), "weight": float(weight),
                                   "n_classes": int(len(classes)), "n_train": int(len(x))})


def lda_candidates(x: np.ndarray, labels: np.ndarray, shrinkages=LDA_SHRINKAGES,
                   weights=LDA_WEIGHTS) -> list[LinearRefiner]:
    """Weight 0 (mean-centring) first, then every (shrinkage, weight > 0) pair."""
    return [lda_map(x, labels, shrinkages[0], 0.0)] + [lda_map(x, labels, g, w) for g in shrinkages
                                                       for w in weights if w > 0]
