"""Tests of core.scoring.metrics: nDCG against sklearn and brute force, micro-F1 against sklearn, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, ndcg_score

from core.scoring.metrics import (
    ESCI_GAINS,
    ESCI_LABELS,
    GAIN_VECTOR,
    TASK2_NAMES,
    evaluate_predictions,
    expected_gain,
    mean_ndcg,
    micro_f1_task2,
    micro_f1_task3,
    ndcg_per_query,
)

LABELS = np.array(ESCI_LABELS)


def _random_table(seed: int, n_queries: int = 300, max_size: int = 12) -> pd.DataFrame:
    """Random queries with 1..max_size products, heavily tied integer scores, all label mixes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, n_queries)
    sizes[:20] = 1  # guarantee single-product queries
    qid = np.repeat(np.arange(n_queries) * 7 + 3, sizes)  # non-contiguous ids
    n = len(qid)
    labels = LABELS[rng.choice(4, n, p=[0.4, 0.3, 0.1, 0.2])]
    labels[qid == qid[-1]] = "I"  # one all-Irrelevant query
    scores = rng.integers(0, 4, n).astype(np.float64)  # many ties
    perm = rng.permutation(n)  # rows of a query are not contiguous
    return pd.DataFrame({"query_id": qid[perm], "score": scores[perm], "esci_label": labels[perm]})


def _sklearn_per_query(df: pd.DataFrame) -> pd.Series:
    out = {}
    for q, g in df.groupby("query_id"):
        gains = g["esci_label"].map(ESCI_GAINS).to_numpy()
        if len(g) == 1:  # sklearn refuses single-document queries
            out[q] = 1.0 if gains[0] > 0 else 0.0
        else:
            out[q] = ndcg_score([gains], [g["score"].to_numpy()], ignore_ties=False)
    return pd.Series(out)


def _dcg(gains_in_rank_order) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_rank_order))


def _brute_force_ndcg(scores, labels) -> float:
    """Average of the nDCG over every order consistent with the scores (all tie-breaks)."""
    gains = [ESCI_GAINS[x] for x in labels]
    ideal = _dcg(sorted(gains, reverse=True))
    if ideal == 0:
        return 0.0
    values = []
    for perm in itertools.permutations(range(len(scores))):
        s = [scores[i] for i in perm]
        if all(s[i] >= s[i + 1] for i in range(len(s) - 1)):
            values.append(_dcg([gains[i] for i in perm]) / ideal)
    return float(np.mean(values))


def test_constants():
    assert ESCI_LABELS == ("E", "S", "C", "I")
    np.testing.assert_array_equal(GAIN_VECTOR, [1.0, 0.1, 0.01, 0.0])
    assert ESCI_GAINS["S"] == 0.1 and ESCI_GAINS["C"] == 0.01  # not the trec_eval S/C swap
    assert TASK2_NAMES == {"E": "exact", "S": "substitute", "C": "complement", "I": "irrelevant"}
    with pytest.raises(ValueError):
        GAIN_VECTOR[0] = 2.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_query_by_query(seed):
    df = _random_table(seed)
    ours = ndcg_per_query(df["query_id"], df["score"], df["esci_label"])
    ref = _sklearn_per_query(df)
    assert list(ours.index) == sorted(ref.index)
    np.testing.assert_allclose(ours.to_numpy(), ref.loc[ours.index].to_numpy(), rtol=0, atol=1e-12)
    assert mean_ndcg(df["query_id"], df["score"], df["esci_label"]) == pytest.approx(ref.mean(), abs=1e-12)
    assert ours.loc[df["query_id"].iloc[np.flatnonzero(df["query_id"] == df["query_id"].max())[0]]] == 0.0


def test_row_order_does_not_matter():
    df = _random_table(5)
    a = ndcg_per_query(df["query_id"], df["score"], df["esci_label"])
    df2 = df.sample(frac=1.0, random_state=1)
    b = ndcg_per_query(df2["query_id"], df2["score"], df2["esci_label"])
    pd.testing.assert_series_equal(a, b, atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "scores,labels",
    [
        ([3, 2, 2, 2, 1, 1], ["S", "E", "I", "C", "E", "S"]),
        ([1, 1, 1, 1, 1], ["E", "S", "C", "I", "E"]),
        ([5, 4, 4, 0, 0, 0, 9], ["I", "E", "C", "S", "E", "I", "C"]),
    ],
)
def test_ties_equal_brute_force_over_permutations(scores, labels):
    qid = ["q"] * len(scores)
    assert mean_ndcg(qid, scores, labels) == pytest.approx(_brute_force_ndcg(scores, labels), abs=1e-12)


def test_hand_computed_example():
    # Ranked: S (rank 1), E (rank 2), I (rank 3), C (rank 4).
    # DCG  = 0.1/log2(2) + 1/log2(3) + 0/log2(4) + 0.01/log2(5)
    # IDCG = 1/log2(2) + 0.1/log2(3) + 0.01/log2(4) + 0
    dcg = 0.1 + 1 / math.log2(3) + 0.01 / math.log2(5)
    idcg = 1.0 + 0.1 / math.log2(3) + 0.01 / 2
    got = ndcg_per_query(["a"] * 4, [0.9, 0.8, 0.7, 0.6], ["S", "E", "I", "C"])
    assert got.loc["a"] == pytest.approx(dcg / idcg, abs=1e-15)
    assert got.loc["a"] == pytest.approx(0.735237 / 1.068093, abs=1e-6)  # = 0.68836
    # Second query: E and S tied on top, then I -> mean discount (1 + 1/log2 3)/2 for both.
    d = (1 + 1 / math.log2(3)) / 2
    expected_b = (1.0 * d + 0.1 * d) / (1.0 + 0.1 / math.log2(3))
    got = ndcg_per_query(["b", "b", "b", "a"], [1, 1, 0, 0], ["S", "E", "I", "E"])
    assert got.loc["b"] == pytest.approx(expected_b, abs=1e-15)
    assert got.loc["a"] == 1.0  # single product with gain > 0


def test_perfect_and_special_queries():
    labels = ["I", "E", "C", "S", "E", "I"]
    scores = [ESCI_GAINS[x] for x in labels]  # score = gain: a perfect ranking (ties only among equal gains)
    assert mean_ndcg(["q"] * 6, scores, labels) == pytest.approx(1.0, abs=1e-15)
    assert mean_ndcg(["q"] * 6, [-x for x in scores], labels) < 0.6
    res = ndcg_per_query(["i", "i", "one", "zero"], [1.0, 2.0, 0.3, 0.3], ["I", "I", "C", "I"])
    assert res.to_dict() == {"i": 0.0, "one": 1.0, "zero": 0.0}
    assert res.index.name == "query_id"


def test_accepts_full_names_float32_and_inf():
    s32 = np.array([0.5, 0.25, 0.125, -np.inf], dtype=np.float32)
    a = mean_ndcg([1, 1, 1, 1], s32, ["exact", "Substitute", "complement", "IRRELEVANT"])
    b = mean_ndcg([1, 1, 1, 1], s32.astype(np.float64), ["E", "S", "C", "I"])
    assert a == b == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal lengths"):
        mean_ndcg([1, 1, 2], [0.1, 0.2], ["E", "S"])
    with pytest.raises(ValueError, match="'X'.*'bad'|'bad'.*'X'"):
        mean_ndcg([1, 1, 2], [0.1, 0.2, 0.3], ["E", "X", "bad"])
    with pytest.raises(ValueError, match="NaN"):
        mean_ndcg([1, 1], [0.1, np.nan], ["E", "S"])
    with pytest.raises(ValueError, match="unknown"):
        mean_ndcg([1, 1], [0.1, 0.2], ["E", None])
    with pytest.raises(ValueError, match="numeric"):
        mean_ndcg([1, 1], ["a", "b"], ["E", "S"])
    with pytest.raises(ValueError, match="no rows"):
        mean_ndcg([], [], [])
    assert ndcg_per_query([], [], []).empty


def test_expected_gain():
    probs = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0.5, 0.2, 0.2, 0.1]])
    np.testing.assert_allclose(expected_gain(probs), [1.0, 0.1, 0.01, 0.0, 0.5 + 0.02 + 0.002])
    with pytest.raises(ValueError, match="shape"):
        expected_gain(np.ones((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        expected_gain(np.array([[np.nan, 0, 0, 1]]))


def test_micro_f1_task2_matches_sklearn():
    rng = np.random.default_rng(0)
    t = LABELS[rng.integers(0, 4, 500)]
    p = LABELS[rng.integers(0, 4, 500)]
    ref = f1_score(t, p, average="micro")
    assert micro_f1_task2(t, p) == pytest.approx(ref, abs=1e-15)
    full = np.array([TASK2_NAMES[x] for x in p])  # submission names are accepted too
    assert micro_f1_task2(t, full) == pytest.approx(ref, abs=1e-15)
    with pytest.raises(ValueError, match="equal lengths"):
        micro_f1_task2(t, p[:-1])
    with pytest.raises(ValueError, match="'exactt'"):
        micro_f1_task2(["E"], ["exactt"])
    with pytest.raises(ValueError, match="no examples"):
        micro_f1_task2([], [])


def test_micro_f1_task3_matches_sklearn():
    rng = np.random.default_rng(1)
    t = LABELS[rng.integers(0, 4, 500)]
    pred_bool = rng.random(500) < 0.3
    t_bin = np.where(t == "S", "substitute", "no_substitute")
    p_bin = np.where(pred_bool, "substitute", "no_substitute")
    ref = f1_score(t_bin, p_bin, average="micro")
    assert micro_f1_task3(t, pred_bool) == pytest.approx(ref, abs=1e-15)
    assert micro_f1_task3(t, p_bin) == pytest.approx(ref, abs=1e-15)
    assert micro_f1_task3(t_bin, list(pred_bool)) == pytest.approx(ref, abs=1e-15)
    with pytest.raises(ValueError, match="'maybe'"):
        micro_f1_task3(["S"], ["maybe"])
    with pytest.raises(ValueError, match="equal lengths"):
        micro_f1_task3(["S", "E"], [True])


def test_evaluate_predictions():
    df = pd.DataFrame(
        {
            "query_id": [1, 1, 1, 2, 2],
            "esci_label": ["E", "S", "I", "C", "S"],
            "p_E": [0.7, 0.3, 0.1, 0.2, 0.1],
            "p_S": [0.1, 0.4, 0.1, 0.3, 0.45],
            "p_C": [0.1, 0.1, 0.1, 0.4, 0.05],
            "p_I": [0.1, 0.2, 0.7, 0.1, 0.4],
        }
    )
    res = evaluate_predictions(df)  # no score column -> expected gain
    assert set(res) == {"ndcg", "task2_f1", "task3_f1"}
    eg = expected_gain(df[["p_E", "p_S", "p_C", "p_I"]].to_numpy())
    assert res["ndcg"] == pytest.approx(mean_ndcg(df["query_id"], eg, df["esci_label"]))
    # argmax: E, S, I, C, S -> all 5 correct
    assert res["task2_f1"] == 1.0
    # substitute iff argmax is S: row 2 has p_S=0.4 < 0.5 but argmax S -> predicted substitute
    assert res["task3_f1"] == 1.0
    df["score"] = [0.0, 1.0, 2.0, 0.0, 0.0]
    res2 = evaluate_predictions(df)
    assert res2["ndcg"] == pytest.approx(mean_ndcg(df["query_id"], df["score"], df["esci_label"]))
    only_score = evaluate_predictions(df[["query_id", "esci_label", "score"]])
    assert set(only_score) == {"ndcg"}
    with pytest.raises(ValueError, match="missing"):
        evaluate_predictions(df.drop(columns="esci_label"))
    with pytest.raises(ValueError, match="p_C"):
        evaluate_predictions(df.drop(columns="p_C"))
