from __future__ import annotations

import numpy as np
import pytest

from core.data.folds import assign_folds


def test_folds_grouped_balanced_deterministic():
    rng = np.random.default_rng(0)
    qids = np.repeat(np.arange(150), rng.integers(20, 80, size=150))
    f = assign_folds(qids, 5, seed=3)
    assert set(f) == {0, 1, 2, 3, 4}
    # no query split across folds
    for q in np.unique(qids):
        assert len(set(f[qids == q])) == 1
    queries_per_fold = [len(np.unique(qids[f == k])) for k in range(5)]
    assert max(queries_per_fold) - min(queries_per_fold) <= 1
    np.testing.assert_array_equal(f, assign_folds(qids, 5, seed=3))
    assert not np.array_equal(f, assign_folds(qids, 5, seed=4))


def test_fold_errors():
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds([1, 2, 3], 1)
    with pytest.raises(ValueError, match="only 2 distinct queries"):
        assign_folds([1, 1, 2], 3)
