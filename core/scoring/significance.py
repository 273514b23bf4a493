"""Differences between two systems with their uncertainty: a paired bootstrap over queries.

A comparison of two runs (two sweep trials, two ablation steps, an ensemble and its best member, a
run on cleaned labels and its base) is a difference of a per-query metric on the **same** queries.
The queries are the sampling unit (ESCI's examples are grouped by query, and a query's examples
are not independent), so the uncertainty of the difference comes from resampling queries:

1. ``d_q = b_q - a_q`` for every common query ``q`` (e.g. the per-query nDCG of
   :func:`core.scoring.metrics.ndcg_per_query`), observed difference ``mean(d)``;
2. ``R`` times: draw ``n`` queries with replacement (one index vector, used for **both** systems:
   paired) and take the mean of ``d`` over the draw;
3. the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the ``R`` resampled
   means are the interval (percentile bootstrap: Efron & Tibshirani 1993, "An Introduction to the
   Bootstrap", ch. 13; paired over topics/queries for IR evaluation: Sakai 2006, "Evaluating
   evaluation metrics based on the bootstrap", SIGIR; Smucker, Allan & Carterette 2007, "A
   comparison of statistical significance tests for information retrieval evaluation", CIKM).

The difference is **within noise** when the interval covers 0. A pooled metric such as Task 2/3
micro-F1 (= accuracy over all examples) is a ratio of sums over queries; it is resampled the same
way, by queries, and recomputed on each draw (:func:`paired_bootstrap_ratio`).

Random draws: ``np.random.default_rng(seed).integers(0, n, size=(rows, n))``, chunked along the
resamples so that at most ``max_elements`` indices exist at a time (bounded memory for the full
release's 130k queries); the draws are sequential, so every chunk size gives the same result as one
``(n_resamples, n)`` matrix, and the same as ``rng.integers(0, n)`` drawn one index at a time.
Percentiles: ``np.quantile`` with linear interpolation (Hyndman & Fan type 7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from core.errors import WorkbenchError
from core.scoring.metrics import ESCI_LABELS, label_codes, ndcg_per_query

__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "DEFAULT_MAX_ELEMENTS",
    "PairedDiff",
    "resampled_sums",
    "percentile_interval",
    "paired_bootstrap",
    "paired_bootstrap_ratio",
    "common_queries",
    "query_correct",
    "ndcg_diff",
    "f1_diff",
    "describe",
    "method_note",
]

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples of every comparison the workbench prints."""
DEFAULT_SEED = 0
"""Seed of those resamples: the same inputs give the same interval every time."""
DEFAULT_MAX_ELEMENTS = 1 << 20
"""Resampled query indices held at once (int32: 4 MiB, plus 8 MiB of gathered values per column)."""
_PROB_COLUMNS = ["p_E", "p_S", "p_C", "p_I"]


@dataclass(frozen=True)
class PairedDiff:
    """A difference ``b - a`` of a per-query metric and its paired bootstrap interval.

    Attributes:
        a, b: the metric of each system over the common queries (mean over queries, or the pooled
            value for a ratio metric such as micro-F1), in the metric's units.
        diff: ``b - a`` (same units).
        low, high: the percentile interval of the resampled differences (``low <= high``).
        n_queries: common queries resampled.
        n_resamples, confidence, seed: how the interval was drawn.
    """

    a: float
    b: float
    diff: float
    low: float
    high: float
    n_queries: int
    n_resamples: int
    confidence: float
    seed: int

    @property
    def within_noise(self) -> bool:
        """True when the interval covers 0 (the difference is not distinguishable from noise)."""
        return bool(self.low <= 0.0 <= self.high)

    def to_dict(self) -> dict:
        """The fields and ``within_noise`` as a JSON-ready dict."""
        return {**asdict(self), "within_noise": self.within_noise}


def _check_resampling(n_resamples: int, confidence: float, max_elements: int) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(max_elements) < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")


def resampled_sums(
    columns,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """Sums of per-query columns over bootstrap draws of queries, the same draw for every column.

    Draw ``r`` is ``idx_r = rng.integers(0, n, size=n)`` with ``rng = np.random.default_rng(seed)``
    (draws taken in order); the result's row ``r`` is ``columns[:, idx_r].sum(axis=1)``. Vectorised
    over a chunk of draws at a time, at most ``max_elements`` indices per chunk (memory
    ``max_elements * (4 + 8)`` bytes); the chunk size does not change the result.

    Args:
        columns: array-like, shape (K, n) or (n,): K per-query values of n queries (float64).
        n_resamples: R, the number of draws (>= 1).
        seed: seed of the draws.
        max_elements: indices held at once (>= 1; a chunk always holds at least one draw).

    Returns:
        np.ndarray, shape (R, K) (or (R,) for a 1-D input), float64.

    Raises:
        ValueError: no query, NaN or infinite values, bad ``n_resamples`` / ``max_elements``.
    """
    cols = np.asarray(columns, dtype=np.float64)
    one_d = cols.ndim == 1
    cols = np.atleast_2d(cols)
    if cols.ndim != 2:
        raise ValueError(f"columns must have shape (K, n) or (n,), got {np.shape(columns)}")
    _check_resampling(n_resamples, 0.5, max_elements)
    n = cols.shape[1]
    if n == 0:
        raise ValueError("resampled_sums: no query to resample")
    if not np.isfinite(cols).all():
        raise ValueError(f"resampled_sums: {int((~np.isfinite(cols)).sum())} NaN or infinite value(s)")
    rng = np.random.default_rng(seed)
    dtype = np.int32 if n < 2**31 else np.int64
    per_chunk = max(1, int(max_elements) // n)
    out = np.empty((int(n_resamples), cols.shape[0]), dtype=np.float64)
    for start in range(0, int(n_resamples), per_chunk):
        rows = min(per_chunk, int(n_resamples) - start)
        idx = rng.integers(0, n, size=(rows, n), dtype=dtype)
        for k in range(cols.shape[0]):
            out[start : start + rows, k] = np.take(cols[k], idx).sum(axis=1)
    return out[:, 0] if one_d else out


def percentile_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of resampled values (percentile bootstrap).

    ``np.quantile(values, [(1 - c) / 2, (1 + c) / 2])`` with linear interpolation between order
    statistics (Hyndman & Fan 1996, type 7): for sorted ``s`` of length R and level ``p``,
    ``h = p * (R - 1)``, value ``s[floor(h)] + (h - floor(h)) * (s[floor(h) + 1] - s[floor(h)])``.

    Args:
        values: array-like, shape (R,), R >= 1, the resampled statistic.
        confidence: in (0, 1).

    Returns:
        ``(low, high)`` floats, ``low <= high``.

    Raises:
        ValueError: empty input or a confidence outside (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"percentile_interval: need a non-empty 1-D array, got shape {v.shape}")
    _check_resampling(1, confidence, 1)
    alpha = (1.0 - float(confidence)) / 2.0
    low, high = np.quantile(v, [alpha, 1.0 - alpha])
    return float(low) + 0.0, float(high) + 0.0  # + 0.0: no "-0.0000"


def _aligned_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (one value per query), got shape {arr.shape}")
    return arr


def paired_bootstrap(
    a,
    b,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> PairedDiff:
    """``mean(b) - mean(a)`` of a per-query metric, with a paired percentile bootstrap interval.

    Resamples queries with replacement, the same draw for both systems (paired), ``n_resamples``
    times; each draw's statistic is the mean over the drawn queries of ``d = b - a``; the interval
    is :func:`percentile_interval` of the draws. Identical inputs give ``[0, 0]``; a constant
    difference ``c`` (exactly representable sums, e.g. ``c = 0.125``) gives exactly ``[c, c]``.
    Source: percentile bootstrap (Efron & Tibshirani 1993, ch. 13), paired over queries as in IR
    evaluation (Sakai 2006; Smucker, Allan & Carterette 2007).

    Args:
        a, b: array-like, shape (n,), the per-query metric of the two systems on the same queries,
            aligned (``a[i]`` and ``b[i]`` are one query), e.g. per-query nDCG in [0, 1].
        n_resamples: bootstrap draws (>= 1; 1,000+ for a 95% interval).
        seed: seed of the draws (:func:`resampled_sums`).
        confidence: interval level in (0, 1).
        max_elements: memory bound of the vectorised draws (:func:`resampled_sums`).

    Returns:
        PairedDiff with ``a = mean(a)``, ``b = mean(b)``, ``diff = mean(b - a)``, in the metric's units.

    Raises:
        ValueError: unequal lengths, no query, NaN/infinite values, not 1-D, bad settings.
    """
    x, y = _aligned_1d(a, "a"), _aligned_1d(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired_bootstrap: a and b must be aligned per query, got {len(x)} and {len(y)} values")
    _check_resampling(n_resamples, confidence, max_elements)
    d = y - x
    n = len(d)
    sums = resampled_sums(d, n_resamples, seed, max_elements)
    low, high = percentile_interval(sums / n, confidence)
    return PairedDiff(
        float(x.mean()),
        float(y.mean()),
        float(d.sum() / n) + 0.0,
        low,
        high,
        n,
        int(n_resamples),
        float(confidence),
        int(seed),
    )


def paired_bootstrap_ratio(
    num_a,
    den_a,
    num_b,
    den_b,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> PairedDiff:
    """The difference of two pooled ratio metrics, resampled by queries (paired).

    The metric of a system is ``sum(num) / sum(den)`` over queries, e.g. micro-F1 = accuracy over
    all examples with ``num`` = the query's correctly classified examples and ``den`` = its
    examples. Each bootstrap draw of queries (the same draw for both systems) recomputes both
    pooled values; the statistic is their difference ``b - a``; the interval is
    :func:`percentile_interval` of the draws. Source: percentile bootstrap (Efron & Tibshirani
    1993) over the sampling unit (queries), the pooled metric recomputed on each resample.

    Args:
        num_a, den_a, num_b, den_b: array-like, shape (n,), aligned per query; ``den`` > 0.
        n_resamples, seed, confidence, max_elements: as :func:`paired_bootstrap`.

    Returns:
        PairedDiff with ``a``, ``b`` the pooled values and ``diff = b - a``.

    Raises:
        ValueError: unequal lengths, no query, NaN/infinite values, a denominator <= 0, bad settings.
    """
    cols = [
        _aligned_1d(v, name) for v, name in ((num_a, "num_a"), (den_a, "den_a"), (num_b, "num_b"), (den_b, "den_b"))
    ]
    if len({len(c) for c in cols}) != 1:
        raise ValueError(
            f"paired_bootstrap_ratio: inputs must be aligned per query, got lengths {[len(c) for c in cols]}"
        )
    if (cols[1] <= 0).any() or (cols[3] <= 0).any():
        raise ValueError("paired_bootstrap_ratio: every denominator must be > 0")
    _check_resampling(n_resamples, confidence, max_elements)
    na, da, nb, db = cols
    same_den = bool(np.array_equal(da, db))
    # one column fewer when both systems have the same examples per query (the usual case)
    stacked = np.vstack([nb - na, da] if same_den else [na, da, nb, db])
    sums = resampled_sums(stacked, n_resamples, seed, max_elements)
    if same_den:
        boot = sums[:, 0] / sums[:, 1]
    else:
        boot = sums[:, 2] / sums[:, 3] - sums[:, 0] / sums[:, 1]
    low, high = percentile_interval(boot, confidence)
    va, vb = float(na.sum() / da.sum()), float(nb.sum() / db.sum())
    diff = float((nb - na).sum() / da.sum()) if same_den else vb - va
    return PairedDiff(va, vb, diff + 0.0, low, high, len(na), int(n_resamples), float(confidence), int(seed))


def common_queries(a: pd.Series | pd.DataFrame, b: pd.Series | pd.DataFrame, what: str = "A and B") -> pd.Index:
    """The query ids (index values) present in both per-query tables, sorted.

    Raises:
        WorkbenchError: no query in common (one line with the two counts).
    """
    common = a.index.intersection(b.index)
    if len(common) == 0:
        raise WorkbenchError(
            f"{what} share no query ({len(a.index):,} and {len(b.index):,} queries): nothing to compare"
        )
    try:
        return common.sort_values()
    except TypeError:  # mixed types that cannot be ordered
        return common


def _check_frame(frame: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise WorkbenchError(f"{what}: missing column(s) {', '.join(missing)}")


def query_correct(frame: pd.DataFrame, task: int = 2, pred=None) -> pd.DataFrame:
    """Per query: the examples classified correctly for Task 2 or 3, and the examples.

    Task 2: predicted class = ``pred`` (E/S/C/I or full names) or the argmax of ``p_E..p_I``
    (ties to the first in E, S, C, I order); correct when equal to ``esci_label``. Task 3:
    predicted substitute = ``pred`` (booleans) or argmax = S (the rule of
    :func:`core.scoring.metrics.evaluate_predictions`); correct when it equals ``esci_label == S``.
    Summing ``correct`` and dividing by the summed ``n`` is the micro-F1 (= accuracy) of the KDD
    Cup 2022 rules.

    Args:
        frame: N rows with ``query_id``, ``esci_label`` and (without ``pred``) ``p_E..p_I``.
        task: 2 or 3.
        pred: optional (N,) predictions, see above.

    Returns:
        DataFrame indexed by ``query_id`` (sorted) with float64 columns ``correct`` and ``n``.

    Raises:
        WorkbenchError: missing columns, task not 2 or 3. ValueError: unknown labels, bad lengths.
    """
    if task not in (2, 3):
        raise WorkbenchError(f"task {task}: micro-F1 differences are for Task 2 or 3")
    _check_frame(frame, ["query_id", "esci_label"] + ([] if pred is not None else _PROB_COLUMNS), "F1 difference")
    y = label_codes(frame["esci_label"].to_numpy(), "esci_label")
    if pred is None:
        p = frame[_PROB_COLUMNS].to_numpy(np.float64)
        if np.isnan(p).any():
            raise ValueError(f"probability columns contain {int(np.isnan(p).sum())} NaN value(s)")
        pred_code = p.argmax(axis=1)
        ok = pred_code == y if task == 2 else (pred_code == 1) == (y == 1)
    else:
        pred = np.asarray(pred)
        if len(pred) != len(frame):
            raise ValueError(f"pred has {len(pred)} values for {len(frame)} rows")
        if task == 2:
            ok = label_codes(pred, "pred") == y
        else:
            ok = pred.astype(bool) == (y == ESCI_LABELS.index("S"))
    g = pd.DataFrame({"query_id": frame["query_id"].to_numpy(), "correct": ok.astype(np.float64), "n": 1.0})
    return g.groupby("query_id", sort=True).sum()


def ndcg_diff(
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    score_a: str = "score",
    score_b: str | None = None,
    what: str = "A and B",
    **kwargs,
) -> PairedDiff:
    """Per-query Task 1 nDCG of two prediction tables on their common queries, paired bootstrap.

    Each table's nDCG per query (:func:`core.scoring.metrics.ndcg_per_query`: all judged products,
    gains E=1, S=0.1, C=0.01, I=0) is computed from its own rows; the queries both have are
    compared with :func:`paired_bootstrap` (``diff`` = B - A).

    Args:
        frame_a, frame_b: OOF or labelled test rows with ``query_id``, ``esci_label`` and the score
            columns (``oof.parquet`` / ``test.parquet``).
        score_a: A's ranking score column; ``score_b``: B's (default: the same name).
        what: how the refusal names the two tables.
        **kwargs: ``n_resamples``, ``seed``, ``confidence``, ``max_elements`` of :func:`paired_bootstrap`.

    Returns:
        PairedDiff of mean nDCG (units: nDCG, 0..1) over the common queries.

    Raises:
        WorkbenchError: a missing column; no query in common (one line). ValueError: unknown labels, NaN scores.
    """
    score_b = score_b or score_a
    _check_frame(frame_a, ["query_id", "esci_label", score_a], f"nDCG difference ({what}, first)")
    _check_frame(frame_b, ["query_id", "esci_label", score_b], f"nDCG difference ({what}, second)")
    na = ndcg_per_query(frame_a["query_id"].to_numpy(), frame_a[score_a].to_numpy(), frame_a["esci_label"].to_numpy())
    nb = ndcg_per_query(frame_b["query_id"].to_numpy(), frame_b[score_b].to_numpy(), frame_b["esci_label"].to_numpy())
    q = common_queries(na, nb, what)
    return paired_bootstrap(na.loc[q].to_numpy(), nb.loc[q].to_numpy(), **kwargs)


def f1_diff(
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    task: int = 2,
    pred_a=None,
    pred_b=None,
    what: str = "A and B",
    **kwargs,
) -> PairedDiff:
    """Task 2 or 3 micro-F1 of two prediction tables on their common queries, paired bootstrap.

    micro-F1 over the examples of the common queries (= accuracy, one label per example), from
    :func:`query_correct`; queries are resampled and the pooled micro-F1 of both tables recomputed
    on each draw (:func:`paired_bootstrap_ratio`).

    Args:
        frame_a, frame_b: rows with ``query_id``, ``esci_label`` and ``p_E..p_I`` (or give ``pred_*``).
        task: 2 (4-class) or 3 (substitute or not).
        pred_a, pred_b: optional per-row predictions (see :func:`query_correct`).
        what: how the refusal names the two tables.
        **kwargs: ``n_resamples``, ``seed``, ``confidence``, ``max_elements``.

    Returns:
        PairedDiff of micro-F1 (0..1) over the examples of the common queries.

    Raises:
        WorkbenchError: missing columns, no query in common. ValueError: unknown labels.
    """
    ca, cb = query_correct(frame_a, task, pred_a), query_correct(frame_b, task, pred_b)
    q = common_queries(ca, cb, what)
    ca, cb = ca.loc[q], cb.loc[q]
    return paired_bootstrap_ratio(
        ca["correct"].to_numpy(), ca["n"].to_numpy(), cb["correct"].to_numpy(), cb["n"].to_numpy(), **kwargs
    )


def describe(diff: PairedDiff, digits: int = 4, compact: bool = False) -> str:
    """One line: the difference, its interval and "within noise" when the interval covers 0.

    ``"+0.0123 [-0.0040, +0.0290] within noise"`` / ``"+0.0300 [+0.0100, +0.0500]"``; with
    ``compact=True`` (narrow tables) ``"+0.012 [-0.004,+0.029] noise"`` style (pass ``digits=3``).
    Signs always shown; ASCII minus signs, as every other number the workbench prints.
    """

    def f(v: float) -> str:
        return f"{v + 0.0:+.{digits}f}"

    if compact:
        return f"{f(diff.diff)} [{f(diff.low)},{f(diff.high)}]" + (" noise" if diff.within_noise else "")
    return f"{f(diff.diff)} [{f(diff.low)}, {f(diff.high)}]" + (" within noise" if diff.within_noise else "")


def method_note(n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, confidence: float = 0.95) -> str:
    """The sentence printed under a comparison: what the brackets are."""
    return (
        f"[low, high]: {round(100 * confidence)}% paired bootstrap interval of the difference over the common "
        f"queries ({n_resamples:,} resamples of queries, seed {seed}); within noise = the interval covers 0"
    )
