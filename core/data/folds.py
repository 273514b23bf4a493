"""Query-grouped k-fold splits: all products of a query land in the same fold."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold


def assign_folds(query_ids, n_folds: int = 5, seed: int = 42) -> np.ndarray:
    """Assign every example to a fold, grouped by query.

    Uses scikit-learn's ``GroupKFold(shuffle=True, random_state=seed)``: groups (queries) are
    shuffled by the seed and split into folds of (nearly) equal numbers of queries.

    Args:
        query_ids: (N,) the query of each example.
        n_folds: number of folds, >= 2.
        seed: deterministic shuffling of the queries.

    Returns:
        int64 array (N,) with values in ``0..n_folds-1``.

    Raises:
        ValueError: ``n_folds`` < 2 or more folds than distinct queries.
    """
    q = np.asarray(query_ids)
    n_queries = len(np.unique(q))
    if n_folds < 2:
        raise ValueError(f"train.folds={n_folds}: need at least 2 folds")
    if n_queries < n_folds:
        raise ValueError(f"train.folds={n_folds}: only {n_queries} distinct queries to split")
    folds = np.full(len(q), -1, dtype=np.int64)
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(q)), groups=q)):
        folds[val_idx] = k
    return folds
