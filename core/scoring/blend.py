"""Per-query standardised score blending with weights fitted on OOF predictions.

The final ranking score of a run is ``sum_m w_m * z_m`` where ``z_m`` is member m's score
standardised within its query (mean 0, std 1; a constant member scores 0 in that query) and the
weights ``w`` are non-negative and sum to 1. Ranking within a query is all nDCG sees, so
per-query standardisation puts scorers of different scales (expected gain in [0, 1], BM25 in
[0, 30]) on one footing. The weights are found by Caruana's greedy selection with replacement
(``method="caruana"``, the default): it starts from the best single member and only accepts an
addition that raises mean nDCG, so on the rows it is fitted on the blend is never below its best
member; ``method="grid"`` is an exhaustive grid over the simplex (step ``1/resolution``). For an
honest CV figure, the weights that score fold k are fitted on the other folds' OOF rows only
(:func:`nested_blend`).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from core.scoring.metrics import mean_ndcg


def standardize_per_query(query_ids, scores) -> np.ndarray:
    """z-score ``scores`` within each query.

    Args:
        query_ids: (N,) query of each row.
        scores: (N,) float scores.

    Returns:
        float64 (N,); rows of a query whose scores are all equal get 0.
    """
    s = pd.Series(np.asarray(scores, dtype=np.float64))
    g = s.groupby(np.asarray(query_ids), sort=False)
    mean = g.transform("mean")
    std = g.transform("std", ddof=0)
    z = (s - mean) / std.where(std > 1e-12)
    return z.fillna(0.0).to_numpy()


def simplex_grid(n_members: int, resolution: int = 20) -> np.ndarray:
    """All weight vectors with entries in {0, 1/r, ..., 1} summing to 1: (K, n_members)."""
    if n_members == 1:
        return np.ones((1, 1))
    pts = [c for c in itertools.product(range(resolution + 1), repeat=n_members - 1) if sum(c) <= resolution]
    return np.array([[*c, resolution - sum(c)] for c in pts], dtype=np.float64) / resolution


def fit_blend_weights(
    query_ids, labels, z: np.ndarray, resolution: int = 20, method: str = "grid", fallback: bool = False
) -> np.ndarray:
    """Weights (M,) maximising mean nDCG of ``z @ w`` on the given rows.

    Args:
        query_ids: (N,) query of each row; labels: (N,) ESCI labels E/S/C/I.
        z: (N, M) per-query standardised member scores (see :func:`standardize_per_query`).
        resolution: the grid step 1/resolution (``grid``); the most additions (``caruana``).
        method: ``grid`` (exhaustive simplex grid) or ``caruana`` (greedy forward selection with
            replacement, Caruana et al. 2004, ICML: starts from the best single member, so the
            result is never below it on these rows).
        fallback: (``caruana``) keep the blend only where it beats its best single member
            significantly on these rows (:func:`significant_or_best`), else that member alone.

    Returns:
        float64 (M,), non-negative, sums to 1. Grid ties go to the first found (the grid starts
        from the last member's corner; member 0 is the model).

    Raises:
        ValueError: an unknown ``method``.
    """
    if method == "caruana":
        from core.scoring.ensemble import NdcgEvaluator, caruana_weights

        evaluate = NdcgEvaluator(query_ids, labels)
        w = caruana_weights(lambda w: evaluate(z @ w), z.shape[1], max_iter=resolution)[0]
        return significant_or_best(evaluate, z, w) if fallback else w
    if method != "grid":
        raise ValueError(f"blend method {method!r}: expected grid or caruana")
    grid = simplex_grid(z.shape[1], resolution)
    best, best_w = -1.0, grid[0]
    for w in grid:
        v = mean_ndcg(query_ids, z @ w, labels)
        if v > best + 1e-12:
            best, best_w = v, w
    return best_w


def significant_or_best(evaluate, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``w`` if the blend ``z @ w`` beats the best single member (column of ``z``) on these rows
    with a 95% paired bootstrap interval over queries above 0 (:func:`core.scoring.significance.paired_bootstrap`),
    else the one-hot weights of that member: a blend fitted on ~100 queries must earn its place.

    Args:
        evaluate: a :class:`core.scoring.ensemble.NdcgEvaluator` of the rows; z: (N, M); w: (M,).

    Returns:
        float64 (M,) weights.
    """
    from core.scoring.significance import paired_bootstrap

    eye = np.eye(z.shape[1])
    best = max(range(z.shape[1]), key=lambda j: evaluate(z[:, j]))
    if np.allclose(w, eye[best]):
        return w
    diff = paired_bootstrap(evaluate.per_query(z[:, best]), evaluate.per_query(z @ w))
    return w if diff.low > 0 else eye[best]


def nested_blend(
    folds, query_ids, labels, z: np.ndarray, resolution: int = 20, method: str = "grid", fallback: bool = False
):
    """Fold-nested blend: rows of fold k are scored with weights fitted on the other folds.

    Args:
        folds: (N,) fold of each row; query_ids, labels: (N,); z: (N, M).
        resolution, method, fallback: see :func:`fit_blend_weights`.

    Returns:
        (final (N,) float64 blended OOF score, {fold: weights (M,)}, weights (M,) fitted on all rows
        — the ones to apply to test predictions).
    """
    folds = np.asarray(folds)
    query_ids = np.asarray(query_ids)
    labels = np.asarray(labels)
    final = np.zeros(len(folds))
    per_fold = {}
    for k in np.unique(folds):
        train = folds != k
        if not train.any():  # a single fold: nothing to fit on
            w = np.eye(z.shape[1])[0]
        else:
            w = fit_blend_weights(query_ids[train], labels[train], z[train], resolution, method, fallback)
        per_fold[int(k)] = w
        final[~train] = z[~train] @ w
    full = fit_blend_weights(query_ids, labels, z, resolution, method, fallback)
    return final, per_fold, full
