from __future__ import annotations

import numpy as np
import pytest

from core.scoring.blend import fit_blend_weights, nested_blend, simplex_grid, standardize_per_query
from core.scoring.metrics import mean_ndcg


def test_standardize_per_query():
    q = np.array([1, 1, 1, 2, 2, 3])
    z = standardize_per_query(q, [1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
    np.testing.assert_allclose(z[:3], [-1.224744871, 0.0, 1.224744871])
    assert (z[3:] == 0).all()  # constant query and single-row query -> 0


def test_simplex_grid():
    g = simplex_grid(3, 10)
    assert len(g) == 66 and np.allclose(g.sum(1), 1) and (g >= 0).all()
    assert simplex_grid(1).tolist() == [[1.0]]


def _case(seed=0, n_q=60, per=20):
    rng = np.random.default_rng(seed)
    q = np.repeat(np.arange(n_q), per)
    labels = rng.choice(list("ESCI"), size=len(q), p=[0.5, 0.3, 0.05, 0.15])
    gain = np.vectorize({"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}.get)(labels)
    good = gain + rng.normal(0, 0.3, len(q))  # informative
    noise = rng.normal(0, 1, len(q))  # uninformative
    return q, labels, np.column_stack([standardize_per_query(q, good), standardize_per_query(q, noise)])


def test_fit_prefers_the_informative_member():
    q, labels, z = _case()
    w = fit_blend_weights(q, labels, z)
    assert w[0] >= 0.8 and w.sum() == pytest.approx(1.0)
    assert mean_ndcg(q, z @ w, labels) >= mean_ndcg(q, z[:, 1], labels)


def test_nested_blend_scores_each_fold_with_weights_from_the_others():
    q, labels, z = _case(1)
    folds = q % 3
    final, per_fold, full = nested_blend(folds, q, labels, z, resolution=10)
    for k, w in per_fold.items():
        other = folds != k
        np.testing.assert_allclose(w, fit_blend_weights(q[other], labels[other], z[other], 10))
        np.testing.assert_allclose(final[folds == k], z[folds == k] @ w)
    np.testing.assert_allclose(full, fit_blend_weights(q, labels, z, 10))


@pytest.mark.parametrize("seed", range(6))
def test_caruana_blend_is_never_below_its_best_member_on_the_fitted_rows(seed):
    """Caruana selection starts from the best single member and only accepts gains; a third,
    noisier but informative member makes the blend worth fitting."""
    q, labels, z = _case(seed)
    rng = np.random.default_rng(100 + seed)
    gain = np.vectorize({"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}.get)(labels)
    z = np.column_stack([z, standardize_per_query(q, gain + rng.normal(0, 0.6, len(q)))])
    w = fit_blend_weights(q, labels, z, resolution=8, method="caruana")
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    best_single = max(mean_ndcg(q, z[:, j], labels) for j in range(z.shape[1]))
    assert mean_ndcg(q, z @ w, labels) >= best_single - 1e-12
    with pytest.raises(ValueError, match="expected grid or caruana"):
        fit_blend_weights(q, labels, z, method="simplex")


def test_fallback_keeps_a_blend_only_when_it_beats_the_best_member_significantly():
    """A barely informative member that Caruana adds for a small in-sample gain is dropped by the
    fallback (its gain is within the bootstrap noise); a second good member with independent
    errors is kept (its gain is far outside it)."""
    rng = np.random.default_rng(7)
    n_q, per = 120, 12
    q = np.repeat(np.arange(n_q), per)
    labels = rng.choice(list("ESCI"), size=len(q), p=[0.5, 0.3, 0.05, 0.15])
    gain = np.vectorize({"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}.get)(labels)
    a = standardize_per_query(q, gain + rng.normal(0, 0.5, len(q)))
    weak = standardize_per_query(q, gain + rng.normal(0, 3.0, len(q)))
    b = standardize_per_query(q, gain + rng.normal(0, 0.5, len(q)))
    z = np.column_stack([a, weak])
    assert fit_blend_weights(q, labels, z, 10, "caruana")[1] > 0  # Caruana alone takes the weak member
    np.testing.assert_array_equal(fit_blend_weights(q, labels, z, 10, "caruana", fallback=True), [1.0, 0.0])
    both = fit_blend_weights(q, labels, np.column_stack([a, b]), 10, "caruana", fallback=True)
    assert both.min() > 0.2, both  # two independent noisy views of the gain: their mean is much better
