"""Evaluation metrics of the Amazon KDD Cup 2022 ESCI challenge (Tasks 1, 2 and 3).

Task 1 (query-product ranking)
    nDCG per query over **all** judged products of the query (no cutoff), averaged over
    queries, with gains E=1.0, S=0.1, C=0.01, I=0.0 (KDD Cup 2022 rules; Reddy et al. 2022,
    arXiv:2206.06588; nDCG: Järvelin & Kekäläinen 2002, "Cumulated gain-based evaluation of
    IR techniques", ACM TOIS 20(4)).

    The official baseline script (amazon-science/esci-data) passed trec_eval a label->gain
    mapping that swaps the S and C gains (S=0.01, C=0.1): a known bug acknowledged by the
    organisers. We do not go through trec_eval: the gains are coded directly in
    :data:`ESCI_GAINS` with the values of the rules.

Task 2 (4-class ESCI classification)
    micro-F1 over examples; for single-label multi-class data it equals accuracy.

Task 3 (substitute identification)
    micro-F1 over examples with labels ``substitute`` (S) / ``no_substitute`` (E, C, I);
    equals accuracy of the binary prediction.

Class index order used everywhere in the project: :data:`ESCI_LABELS` = (E, S, C, I), so a
probability matrix has columns ``p_E, p_S, p_C, p_I``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "ESCI_LABELS",
    "ESCI_GAINS",
    "GAIN_VECTOR",
    "TASK2_NAMES",
    "TASK3_NAMES",
    "expected_gain",
    "ndcg_per_query",
    "mean_ndcg",
    "micro_f1_task2",
    "micro_f1_task3",
    "evaluate_predictions",
]

ESCI_LABELS: tuple[str, str, str, str] = ("E", "S", "C", "I")
"""Class index order: 0=E(xact), 1=S(ubstitute), 2=C(omplement), 3=I(rrelevant)."""

ESCI_GAINS: dict[str, float] = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
"""Task 1 nDCG gains of the KDD Cup 2022 rules (not the S/C-swapped trec_eval mapping)."""

GAIN_VECTOR: np.ndarray = np.array([ESCI_GAINS[c] for c in ESCI_LABELS], dtype=np.float64)
GAIN_VECTOR.setflags(write=False)

TASK2_NAMES: dict[str, str] = {"E": "exact", "S": "substitute", "C": "complement", "I": "irrelevant"}
"""Task 2 submission label names (``esci_label`` column of the Task 2 CSV)."""

TASK3_NAMES: tuple[str, str] = ("no_substitute", "substitute")
"""Task 3 submission label names, indexed by the boolean ``is_substitute``."""

# Accepted spellings (compared after str().strip().lower()) -> class index in ESCI_LABELS.
_LABEL_ALIASES: dict[str, int] = {}
for _i, _c in enumerate(ESCI_LABELS):
    _LABEL_ALIASES[_c.lower()] = _i
    _LABEL_ALIASES[TASK2_NAMES[_c]] = _i


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {arr.shape}")
    return arr


def _check_lengths(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(f"inputs must have equal lengths, got {desc}")
    return next(iter(lengths.values()))


def _unknown_error(what: str, unknown: list, accepted: str) -> ValueError:
    shown = ", ".join(repr(u) for u in unknown[:10])
    more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
    return ValueError(f"unknown {what}: {shown}{more}; accepted: {accepted}")


def label_codes(labels, name: str = "labels") -> np.ndarray:
    """Map ESCI labels to class indices 0..3 (E, S, C, I); int8 array of shape (N,).

    Accepts E/S/C/I and exact/substitute/complement/irrelevant, case-insensitive. Work is done on
    the distinct values only (``pd.factorize``), so this is fast for millions of rows.
    """
    arr = _as_1d(labels, name)
    codes, uniques = pd.factorize(arr, use_na_sentinel=False)
    lut = np.empty(len(uniques), dtype=np.int8)
    unknown = []
    for j, u in enumerate(uniques):
        key = u.strip().lower() if isinstance(u, str) else None
        if key in _LABEL_ALIASES:
            lut[j] = _LABEL_ALIASES[key]
        else:
            unknown.append(u)
    if unknown:
        raise _unknown_error(
            f"ESCI label(s) in {name}", unknown, "E, S, C, I or exact, substitute, complement, irrelevant"
        )
    return lut[codes] if len(arr) else np.empty(0, dtype=np.int8)


def _substitute_flags(values, name: str) -> np.ndarray:
    """Map Task 3 labels to booleans (True = substitute); bool array of shape (N,).

    Accepts booleans, ``substitute``/``no_substitute`` and the ESCI labels (S -> True; E, C, I ->
    False), strings case-insensitive.
    """
    arr = _as_1d(values, name)
    codes, uniques = pd.factorize(arr, use_na_sentinel=False)
    lut = np.empty(len(uniques), dtype=bool)
    unknown = []
    for j, u in enumerate(uniques):
        if isinstance(u, (bool, np.bool_)):
            lut[j] = bool(u)
            continue
        key = u.strip().lower() if isinstance(u, str) else None
        if key == "no_substitute":
            lut[j] = False
        elif key in _LABEL_ALIASES:  # includes "substitute" (Task 2 name of S) and "s"
            lut[j] = _LABEL_ALIASES[key] == 1
        else:
            unknown.append(u)
    if unknown:
        raise _unknown_error(
            f"Task 3 label(s) in {name}",
            unknown,
            "substitute, no_substitute, booleans (True = substitute), or ESCI labels E/S/C/I",
        )
    return lut[codes] if len(arr) else np.empty(0, dtype=bool)


def _scores_array(scores, name: str = "scores") -> np.ndarray:
    arr = _as_1d(scores, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == object):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    try:
        out = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from None
    n_nan = int(np.isnan(out).sum())
    if n_nan:
        raise ValueError(f"{name} contain {n_nan} NaN value(s)")
    return out


def expected_gain(probs: np.ndarray) -> np.ndarray:
    """Expected Task 1 gain of each example: ``sum_c p_c * gain_c``, the ranking score for Task 1.

    Ranking by expected gain maximises expected DCG when the per-class probabilities are
    calibrated (gains of the KDD Cup 2022 rules, :data:`ESCI_GAINS`).

    Parameters
    ----------
    probs : array-like, shape (N, 4)
        Class probabilities in :data:`ESCI_LABELS` order (p_E, p_S, p_C, p_I). Rows are not
        renormalised.

    Returns
    -------
    np.ndarray, shape (N,), float64
        Expected gain, in gain units (0..1 for probability rows).

    Raises
    ------
    ValueError
        If ``probs`` is not 2-D with 4 columns, or contains NaN.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(ESCI_LABELS):
        raise ValueError(f"probs must have shape (N, 4) in E, S, C, I order, got {p.shape}")
    if np.isnan(p).any():
        raise ValueError(f"probs contain {int(np.isnan(p).sum())} NaN value(s)")
    return p @ GAIN_VECTOR


def ndcg_per_query(query_ids, scores, labels) -> pd.Series:
    """Task 1 nDCG of every query (KDD Cup 2022 rules; Järvelin & Kekäläinen 2002).

    For each query, over **all** of its judged products (no cutoff)::

        DCG  = sum_i gain(label_i) / log2(i + 1),  i = 1, 2, ... the rank by descending score
        nDCG = DCG / IDCG,  IDCG = the DCG of the products sorted by descending gain

    with gains E=1.0, S=0.1, C=0.01, I=0.0 coded directly (:data:`ESCI_GAINS`). Note: the official
    baseline script passed trec_eval a mapping that swaps the S and C gains (a known, acknowledged
    bug); we do not reproduce it.

    Conventions
    - Tied scores: the DCG is the expectation over a uniformly random order of the tied products,
      i.e. within a group of equal scores every product gets the mean of the group's discounts.
      This equals ``sklearn.metrics.ndcg_score(..., ignore_ties=False)`` (McSherry & Najork 2008)
      and does not depend on the input row order. Scores are compared exactly (after conversion
      to float64, which is exact for float32 input).
    - A query whose IDCG is 0 (all products Irrelevant) scores 0.0, as in sklearn and trec_eval.
    - A single-product query scores 1.0 if its gain is > 0, else 0.0.
    - Only queries present in the input are scored; when evaluating a submission, a query missing
      from it counts as 0 and must be added by the caller.

    Vectorised: one ``np.lexsort`` (query, -score), the ideal DCG from per-query label counts, and
    ``np.bincount`` aggregations; about 2 s for 2.6M rows / 130k queries on one CPU core.

    Parameters
    ----------
    query_ids : array-like, shape (N,)
        Query id of each (query, product) row; any hashable values.
    scores : array-like, shape (N,)
        Ranking score, higher = ranked earlier; numeric, no NaN (±inf allowed).
    labels : array-like, shape (N,)
        ESCI label: E/S/C/I or exact/substitute/complement/irrelevant (case-insensitive).

    Returns
    -------
    pd.Series
        Float64 nDCG in [0, 1] indexed by query id (sorted, index name ``query_id``), name ``ndcg``.
        Empty input gives an empty Series.

    Raises
    ------
    ValueError
        Unequal lengths, unknown labels (named in the message), NaN or non-numeric scores.
    """
    q = _as_1d(query_ids, "query_ids")
    s = _scores_array(scores)
    n = _check_lengths(query_ids=q, scores=s, labels=_as_1d(labels, "labels"))
    label_code = label_codes(labels).astype(np.int64)
    gains = GAIN_VECTOR[label_code]
    try:
        qcode, quniq = pd.factorize(q, sort=True, use_na_sentinel=False)
    except TypeError:  # mixed types that cannot be ordered
        qcode, quniq = pd.factorize(q, sort=False, use_na_sentinel=False)
    n_q = len(quniq)
    index = pd.Index(quniq, name="query_id")
    if n == 0:
        return pd.Series(np.empty(0), index=index, name="ndcg", dtype=np.float64)

    qcode = qcode.astype(np.int64, copy=False)
    starts = np.zeros(n_q, dtype=np.int64)  # first sorted position of each query
    np.cumsum(np.bincount(qcode, minlength=n_q)[:-1], out=starts[1:])

    # --- DCG with tie-averaged discounts: sort by query, then by descending score.
    order = np.lexsort((-s, qcode))
    q_sorted = qcode[order]
    s_sorted = s[order]
    rank = np.arange(n, dtype=np.int64) - starts[q_sorted] + 1  # 1-based rank within its query
    discount = 1.0 / np.log2(rank + 1.0)
    new_group = np.empty(n, dtype=bool)  # a tie group = consecutive rows, same query, same score
    new_group[0] = True
    new_group[1:] = (q_sorted[1:] != q_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
    group_start = np.flatnonzero(new_group)
    group_id = np.cumsum(new_group) - 1
    group_mean_discount = np.add.reduceat(discount, group_start) / np.diff(np.append(group_start, n))
    dcg = np.bincount(q_sorted, weights=gains[order] * group_mean_discount[group_id], minlength=n_q)

    # --- Ideal DCG from the label counts of each query (no sort needed): the ideal order is all
    # E, then S, then C, then I, and class index order is descending gain order. With
    # cum_discount[k] = sum_{r=1..k} 1/log2(r+1), the k-th class block covers ranks
    # (n_before, n_before + n_k], contributing gain_k * (cum_discount[n_before + n_k] - cum_discount[n_before]).
    counts = np.bincount(qcode * 4 + label_code, minlength=4 * n_q).reshape(n_q, 4)
    ends = np.cumsum(counts, axis=1)
    cum_discount = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(2, ends[:, -1].max() + 2)))))
    block = cum_discount[ends] - cum_discount[ends - counts]
    idcg = block @ GAIN_VECTOR

    ndcg = np.zeros(n_q, dtype=np.float64)
    np.divide(dcg, idcg, out=ndcg, where=idcg > 0)
    np.clip(ndcg, 0.0, 1.0, out=ndcg)  # guard against 1 + 1e-16 rounding
    return pd.Series(ndcg, index=index, name="ndcg")


def mean_ndcg(query_ids, scores, labels) -> float:
    """Task 1 metric: the mean over queries of :func:`ndcg_per_query` (each query weighs the same).

    Same inputs, conventions (no cutoff, tie-averaged DCG, all-Irrelevant query = 0) and errors as
    :func:`ndcg_per_query`; additionally raises ``ValueError`` on empty input.
    Source: KDD Cup 2022 ESCI rules (gains E=1.0, S=0.1, C=0.01, I=0.0 coded directly; the official
    baseline's trec_eval mapping swapped S and C by mistake), Järvelin & Kekäläinen 2002.

    Returns
    -------
    float
        Mean nDCG in [0, 1].
    """
    per_query = ndcg_per_query(query_ids, scores, labels)
    if per_query.empty:
        raise ValueError("mean_ndcg: no rows to evaluate")
    return float(per_query.mean())


def micro_f1_task2(y_true, y_pred) -> float:
    """Task 2 metric: micro-F1 over examples of the 4-class ESCI label (KDD Cup 2022 rules).

    Each example has exactly one true and one predicted label, so micro-F1 = accuracy.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (N,)
        E/S/C/I or exact/substitute/complement/irrelevant (case-insensitive; may be mixed).

    Returns
    -------
    float
        micro-F1 in [0, 1].

    Raises
    ------
    ValueError
        Unequal lengths, empty input, unknown labels (named in the message).
    """
    t = label_codes(y_true, "y_true")
    p = label_codes(y_pred, "y_pred")
    n = _check_lengths(y_true=t, y_pred=p)
    if n == 0:
        raise ValueError("micro_f1_task2: no examples to evaluate")
    return float(np.mean(t == p))


def micro_f1_task3(y_true, y_pred) -> float:
    """Task 3 metric: micro-F1 of substitute vs no_substitute (KDD Cup 2022 rules).

    S -> ``substitute``; E, C, I -> ``no_substitute``. Both classes count (micro-averaged over the
    two labels), so for one label per example micro-F1 = accuracy.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        ESCI labels (E/S/C/I or full names) or ``substitute``/``no_substitute`` or booleans.
    y_pred : array-like, shape (N,)
        ``substitute``/``no_substitute`` or booleans (True = substitute); ESCI labels are also
        accepted (S = substitute).

    Returns
    -------
    float
        micro-F1 in [0, 1].

    Raises
    ------
    ValueError
        Unequal lengths, empty input, unknown labels (named in the message).
    """
    t = _substitute_flags(y_true, "y_true")
    p = _substitute_flags(y_pred, "y_pred")
    n = _check_lengths(y_true=t, y_pred=p)
    if n == 0:
        raise ValueError("micro_f1_task3: no examples to evaluate")
    return float(np.mean(t == p))


def evaluate_predictions(
    df: pd.DataFrame,
    score_col: str = "score",
    prob_cols: Sequence[str] = ("p_E", "p_S", "p_C", "p_I"),
) -> dict:
    """All three task metrics from one prediction table (one row per example).

    Parameters
    ----------
    df : pd.DataFrame, N rows
        Columns ``query_id``, ``esci_label`` (true label), and ``score_col`` and/or the four
        ``prob_cols`` (class probabilities in E, S, C, I order).
    score_col : str
        Task 1 ranking score. If the column is absent and the probabilities are present, the score
        is :func:`expected_gain` of the probabilities.
    prob_cols : sequence of 4 str
        Probability columns in E, S, C, I order.

    Returns
    -------
    dict
        ``{"ndcg": float}`` and, when all ``prob_cols`` are present, also
        ``"task2_f1"``: micro-F1 of the argmax class, and
        ``"task3_f1"``: micro-F1 of the rule *substitute iff the argmax class is S*
        (not ``p_S >= 0.5``; with 4 classes, argmax = S can happen with p_S < 0.5).
        Argmax ties go to the first class in E, S, C, I order.

    Raises
    ------
    ValueError
        Missing columns, no score and no probabilities, empty df, or any error of the metric
        functions (unknown labels, NaN).
    """
    missing = [c for c in ("query_id", "esci_label") if c not in df.columns]
    if missing:
        raise ValueError(f"evaluate_predictions: missing column(s) {missing}")
    prob_cols = tuple(prob_cols)
    if len(prob_cols) != len(ESCI_LABELS):
        raise ValueError(f"prob_cols must name 4 columns (E, S, C, I order), got {prob_cols}")
    present = [c for c in prob_cols if c in df.columns]
    if present and len(present) != len(prob_cols):
        absent = [c for c in prob_cols if c not in df.columns]
        raise ValueError(f"evaluate_predictions: probability column(s) {absent} missing")
    probs = df[list(prob_cols)].to_numpy(dtype=np.float64) if present else None

    if score_col in df.columns:
        scores = df[score_col].to_numpy()
    elif probs is not None:
        scores = expected_gain(probs)
    else:
        raise ValueError(
            f"evaluate_predictions: need a score column {score_col!r} or probability columns {list(prob_cols)}"
        )
    result = {"ndcg": mean_ndcg(df["query_id"].to_numpy(), scores, df["esci_label"].to_numpy())}
    if probs is not None:
        if np.isnan(probs).any():
            raise ValueError(f"probability columns contain {int(np.isnan(probs).sum())} NaN value(s)")
        pred = np.asarray(ESCI_LABELS)[probs.argmax(axis=1)]
        result["task2_f1"] = micro_f1_task2(df["esci_label"].to_numpy(), pred)
        result["task3_f1"] = micro_f1_task3(df["esci_label"].to_numpy(), pred == "S")
    return result
