"""The paired bootstrap of every printed comparison (core.scoring.significance): a hand computation
on 4 queries, plain-loop references, analytic cases, seeds and memory-bounded chunking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import WorkbenchError
from core.scoring.metrics import mean_ndcg, micro_f1_task2, micro_f1_task3, ndcg_per_query
from core.scoring.significance import (
    PairedDiff,
    describe,
    f1_diff,
    ndcg_diff,
    paired_bootstrap,
    paired_bootstrap_ratio,
    percentile_interval,
    resampled_sums,
)

# 4 queries, 5 draws, seed 0: default_rng(0).integers(0, 4, size=(5, 4)) draws these query indices
DRAWS_SEED0 = [[3, 2, 2, 1], [1, 0, 0, 0], [0, 3, 2, 3], [2, 2, 3, 2], [2, 2, 2, 3]]


def _type7(values, p):
    """Percentile with linear interpolation between order statistics, by hand."""
    s = sorted(values)
    h = p * (len(s) - 1)
    lo = int(h)
    return s[lo] if lo + 1 >= len(s) else s[lo] + (h - lo) * (s[lo + 1] - s[lo])


def _loop_bootstrap(a, b, n_resamples, seed, confidence):
    """The paired bootstrap as a plain Python loop: one index at a time from the same generator."""
    rng = np.random.default_rng(seed)
    n = len(a)
    means = []
    for _ in range(n_resamples):
        idx = [int(rng.integers(0, n)) for _ in range(n)]
        means.append(sum(b[i] - a[i] for i in idx) / n)
    alpha = (1 - confidence) / 2
    return _type7(means, alpha), _type7(means, 1 - alpha)


def test_the_draws_are_the_ones_written_down():
    assert np.random.default_rng(0).integers(0, 4, size=(5, 4)).tolist() == DRAWS_SEED0


def test_hand_computation_on_four_queries():
    a = [0.5, 0.25, 0.75, 1.0]
    b = [0.75, 0.5, 0.5, 1.0]  # d = b - a = [+0.25, +0.25, -0.25, 0], mean +0.0625
    # draw means of d: [3,2,2,1] -> (0 - .25 - .25 + .25)/4 = -0.0625; [1,0,0,0] -> 1/4 = 0.25;
    # [0,3,2,3] -> 0; [2,2,3,2] -> -0.75/4 = -0.1875; [2,2,2,3] -> -0.1875
    # sorted: -0.1875, -0.1875, -0.0625, 0, 0.25; 95%: h = 0.025*4 = 0.1 -> -0.1875,
    # h = 0.975*4 = 3.9 -> 0 + 0.9 * 0.25 = 0.225
    d = paired_bootstrap(a, b, n_resamples=5, seed=0)
    assert (d.a, d.b, d.diff) == (0.625, 0.6875, 0.0625)
    assert d.low == -0.1875 and d.high == pytest.approx(0.225, abs=1e-15)
    assert d.within_noise and d.n_queries == 4 and d.n_resamples == 5 and d.seed == 0
    # 50%: h = 1 -> -0.1875, h = 3 -> 0 (the interval touches 0: still within noise)
    d50 = paired_bootstrap(a, b, n_resamples=5, seed=0, confidence=0.5)
    assert (d50.low, d50.high) == (-0.1875, 0.0) and d50.within_noise
    assert describe(d) == "+0.0625 [-0.1875, +0.2250] within noise"


def test_hand_computation_of_a_pooled_micro_f1():
    ca, cb, n = [1, 0, 2, 1], [2, 1, 1, 1], [2, 1, 2, 3]  # correct examples of A, B; examples
    # draws (same as above): num = sum (cb - ca) = [1, 1, -1, 0] over the draw, den = sum n
    # [3,2,2,1]: -1/8; [1,0,0,0]: 4/7; [0,3,2,3]: 0/10; [2,2,3,2]: -3/9; [2,2,2,3]: -3/9
    # sorted -1/3, -1/3, -1/8, 0, 4/7; 95%: -1/3 and 0 + 0.9 * 4/7
    d = paired_bootstrap_ratio(ca, n, cb, n, n_resamples=5, seed=0)
    assert (d.a, d.b, d.diff) == (0.5, 0.625, 0.125)
    assert d.low == pytest.approx(-1 / 3, abs=1e-15) and d.high == pytest.approx(0.9 * 4 / 7, abs=1e-15)
    # different example counts per query: each side's own pooled ratio on the same draw
    d2 = paired_bootstrap_ratio(ca, n, cb, [2, 2, 2, 3], n_resamples=5, seed=0)
    draws = [cb_ / nb_ - ca_ / na_ for ca_, na_, cb_, nb_ in _ratio_draws(ca, n, cb, [2, 2, 2, 3])]
    assert (d2.low, d2.high) == pytest.approx((_type7(draws, 0.025), _type7(draws, 0.975)), abs=1e-15)


def _ratio_draws(ca, na, cb, nb):
    for idx in DRAWS_SEED0:
        yield sum(ca[i] for i in idx), sum(na[i] for i in idx), sum(cb[i] for i in idx), sum(nb[i] for i in idx)


def test_analytic_cases():
    a = np.array([0.5, 0.25, 0.75, 0.125, 1.0, 0.0])
    same = paired_bootstrap(a, a.copy())
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0) and same.within_noise
    assert describe(same) == "+0.0000 [+0.0000, +0.0000] within noise"
    for c in (0.125, -0.25):  # exactly representable: a constant shift c gives exactly [c, c]
        s = paired_bootstrap(a, a + c)
        assert (s.diff, s.low, s.high) == (c, c, c) and not s.within_noise
    assert describe(paired_bootstrap(a, a + 0.125), digits=3) == "+0.125 [+0.125, +0.125]"
    r = paired_bootstrap_ratio([1, 2], [2, 4], [1, 2], [2, 4])
    assert (r.diff, r.low, r.high) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.5])
def test_vectorised_equals_the_plain_loop(confidence):
    rng = np.random.default_rng(3)
    a = rng.random(23)
    b = np.clip(a + rng.normal(0.02, 0.1, 23), 0, 1)
    d = paired_bootstrap(a, b, n_resamples=300, seed=11, confidence=confidence)
    low, high = _loop_bootstrap(a, b, 300, 11, confidence)
    assert d.low == pytest.approx(low, abs=1e-12) and d.high == pytest.approx(high, abs=1e-12)
    assert d.diff == pytest.approx(np.mean(b - a), abs=1e-15)


def test_seeded_and_chunked_results_are_reproducible():
    rng = np.random.default_rng(5)
    cols = rng.random((3, 37))
    full = resampled_sums(cols, 1000, seed=7, max_elements=10**9)  # one (1000, 37) matrix
    for max_elements in (1, 37, 100, 37 * 64 + 5):  # one draw per chunk, ..., uneven chunks
        assert np.array_equal(resampled_sums(cols, 1000, seed=7, max_elements=max_elements), full)
    assert np.array_equal(resampled_sums(cols, 1000, seed=7), full)
    assert not np.array_equal(resampled_sums(cols, 1000, seed=8), full)
    one = resampled_sums(cols[1], 1000, seed=7)
    assert one.shape == (1000,) and np.array_equal(one, full[:, 1])  # the same draws for every column
    a, b = cols[0], cols[1]
    assert paired_bootstrap(a, b, seed=4) == paired_bootstrap(a, b, seed=4)
    assert paired_bootstrap(a, b, seed=4, max_elements=50) == paired_bootstrap(a, b, seed=4)
    assert paired_bootstrap(a, b, seed=4) != paired_bootstrap(a, b, seed=5)


def test_percentile_interval_is_numpys_type_7():
    v = np.random.default_rng(0).normal(size=101)
    assert percentile_interval(v, 0.9) == tuple(np.quantile(v, [0.05, 0.95]))
    assert percentile_interval(v, 0.9) == (_type7(v, 0.05), pytest.approx(_type7(v, 0.95), abs=1e-15))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="no query"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1, 2], [1, 2], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap([1, 2], [1, 2], n_resamples=0)
    with pytest.raises(ValueError, match="denominator"):
        paired_bootstrap_ratio([1], [0], [1], [1])


def _frame(rng, queries, per_query=5):
    rows = []
    for q in queries:
        for _ in range(per_query):
            p = rng.dirichlet(np.ones(4))
            rows.append(
                {
                    "query_id": q,
                    "esci_label": "ESCI"[rng.integers(0, 4)],
                    "score": rng.random(),
                    "p_E": p[0],
                    "p_S": p[1],
                    "p_C": p[2],
                    "p_I": p[3],
                }
            )
    return pd.DataFrame(rows)


def _pred(rows, task):
    arg = np.asarray(list("ESCI"))[rows[["p_E", "p_S", "p_C", "p_I"]].to_numpy().argmax(1)]
    return arg if task == 2 else arg == "S"


def test_frame_helpers_against_the_metrics_on_resampled_rows():
    rng = np.random.default_rng(0)
    fa = _frame(rng, range(8))
    fb = fa.copy()
    fb["score"] = rng.random(len(fb))
    fb[["p_E", "p_S", "p_C", "p_I"]] = rng.dirichlet(np.ones(4), len(fb))
    extra = _frame(rng, [100, 101])  # queries only B has: left out
    fb2 = pd.concat([fb, extra], ignore_index=True)
    d = ndcg_diff(fa, fb2, n_resamples=200, seed=1)
    assert d.n_queries == 8
    assert d.a == pytest.approx(mean_ndcg(fa["query_id"], fa["score"], fa["esci_label"]))
    assert d.b == pytest.approx(mean_ndcg(fb["query_id"], fb["score"], fb["esci_label"]))
    want = paired_bootstrap(
        ndcg_per_query(fa["query_id"], fa["score"], fa["esci_label"]).to_numpy(),
        ndcg_per_query(fb["query_id"], fb["score"], fb["esci_label"]).to_numpy(),
        n_resamples=200,
        seed=1,
    )
    assert d == want
    # micro-F1: resample queries (rows of a drawn query, as often as drawn), recompute micro-F1 of both
    qs = np.array(sorted(fa["query_id"].unique()))
    for task, metric in ((2, micro_f1_task2), (3, micro_f1_task3)):
        f = f1_diff(fa, fb2, task=task, n_resamples=60, seed=2)
        rng2 = np.random.default_rng(2)
        draws = []
        for _ in range(60):
            idx = [int(rng2.integers(0, len(qs))) for _ in range(len(qs))]
            ra = pd.concat([fa[fa["query_id"] == qs[i]] for i in idx])
            rb = pd.concat([fb[fb["query_id"] == qs[i]] for i in idx])

            draws.append(metric(rb["esci_label"], _pred(rb, task)) - metric(ra["esci_label"], _pred(ra, task)))
        assert (f.low, f.high) == pytest.approx((_type7(draws, 0.025), _type7(draws, 0.975)), abs=1e-12)
        assert f.a == pytest.approx(metric(fa["esci_label"], _pred(fa, task)))
    # given predictions instead of the argmax
    f = f1_diff(fa, fa, task=2, pred_a=["E"] * len(fa), pred_b=fa["esci_label"].to_numpy())
    assert f.b == 1.0 and f.a == pytest.approx(np.mean(fa["esci_label"] == "E"))


def test_no_common_query_is_refused_in_one_line():
    rng = np.random.default_rng(0)
    with pytest.raises(WorkbenchError, match=r"^run a and run b share no query \(3 and 2 queries\)") as info:
        ndcg_diff(_frame(rng, [1, 2, 3]), _frame(rng, [7, 8]), what="run a and run b")
    assert "\n" not in str(info.value)
    with pytest.raises(WorkbenchError, match="share no query"):
        f1_diff(_frame(rng, [1]), _frame(rng, [2]))
    with pytest.raises(WorkbenchError, match="missing column"):
        ndcg_diff(_frame(rng, [1]).drop(columns="score"), _frame(rng, [1]))


def test_describe_and_to_dict():
    d = PairedDiff(0.5, 0.5123, 0.0123, -0.004, 0.029, 10, 2000, 0.95, 0)
    assert describe(d) == "+0.0123 [-0.0040, +0.0290] within noise"
    assert describe(d, 3, compact=True) == "+0.012 [-0.004,+0.029] noise"
    e = PairedDiff(0.5, 0.53, 0.03, 0.01, 0.05, 10, 2000, 0.95, 0)
    assert describe(e) == "+0.0300 [+0.0100, +0.0500]" and describe(e, 3, compact=True) == "+0.030 [+0.010,+0.050]"
    assert d.to_dict()["within_noise"] is True and e.to_dict()["within_noise"] is False


def test_full_release_size_is_fast_enough_and_bounded():
    """130k queries x 2,000 resamples: chunked (4 MiB of indices at a time), seconds not minutes."""
    import time

    rng = np.random.default_rng(0)
    a = rng.random(130_000)
    b = np.clip(a + rng.normal(0.001, 0.05, a.size), 0, 1)
    t = time.perf_counter()
    d = paired_bootstrap(a, b)
    assert time.perf_counter() - t < 30
    assert d.low < d.diff < d.high and d.high - d.low < 0.002
