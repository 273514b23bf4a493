"""Ensembles of runs and baseline scorers, with weights fitted on OOF predictions (Tasks 1-3).

Every prediction artifact is keyed by ``example_id`` (``runs/<id>/oof.parquet`` and
``test.parquet``, see :func:`core.scoring.report.read_predictions`), so members join exactly. A member is

* a **run** (its id or a unique prefix): class probabilities ``p_E..p_I`` (each run already
  averages its folds on the test set) and a Task 1 ranking score, the run's final ``score``
  column (``RUN:ce`` takes ``ce_score``, the expected gain of its own probabilities);
* a **scorer** with no class probabilities, such as ``bm25`` or ``dense``: its OOF score is the
  column of that name in a run member's ``oof.parquet`` (the zero-shot/BM25 members of the run's
  blend), its test score the same column of ``test.parquet`` or, when absent, recomputed on the
  test examples with :func:`core.scoring.baselines.bm25_scores` / :func:`core.scoring.dense.dense_scores` (BM25's
  IDF then comes from the test products only; per-query standardisation makes the scale moot).
  Scorers join Task 1 only; Tasks 2 and 3 need class probabilities.

Combination (weights ``w`` non-negative, summing to 1):

* Task 1, ``method="zscore"`` (default): ``sum_m w_m z_m`` with ``z_m`` the member's ranking score
  standardised within each query (:func:`core.scoring.blend.standardize_per_query`), so scorers of any
  scale mix; ``method="rank"``: the weighted mean of per-query percentile ranks (rank average);
  ``method="prob"``: the expected gain of the weighted mean probabilities (runs only).
* Tasks 2 and 3: the weighted mean of class probabilities. Task 2 predicts the argmax, optionally
  after a per-class log-prior adjustment tuned on OOF; Task 3 predicts *substitute* iff the
  mean p(S) >= a threshold tuned on OOF for micro-F1.

Weights: ``equal``, manual, or ``auto``: Caruana et al. 2004 ("Ensemble selection from libraries
of models", ICML) greedy forward selection with replacement, maximising the task metric on OOF
(nDCG for Task 1, micro-F1 for Tasks 2/3); the weights are the selection counts / their sum.
Optionally the weights of highly correlated members are shrunk (:func:`shrink_correlated`), as
the KDD Cup 2022 Task 1 winner did when weighting several backbones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import DataError, WorkbenchError
from core.scoring.blend import standardize_per_query
from core.scoring.metrics import ESCI_LABELS, GAIN_VECTOR
from core.scoring.report import PROB_COLUMNS, read_predictions

__all__ = [
    "SCORERS",
    "Member",
    "MemberSet",
    "EnsembleResult",
    "load_members",
    "align_members",
    "per_query_rank",
    "correlation_matrix",
    "shrink_correlated",
    "NdcgEvaluator",
    "caruana_weights",
    "parse_weights",
    "tune_task3_threshold",
    "tune_task2_bias",
    "build_ensemble",
    "compare_with_best_member",
    "record_ensemble",
    "write_ensemble",
    "file_sha256",
]

SCORERS: tuple[str, ...] = ("bm25", "dense")
"""Baseline scorer names that can be ensemble members (Task 1 only)."""
METHODS = ("zscore", "rank", "prob")
_SHOW = 5


# --------------------------------------------------------------------------- members
@dataclass
class Member:
    """One ensemble member, rows in the order of :class:`MemberSet` keys (by example_id).

    Attributes:
        name: run id (``RUN`` or ``RUN:ce``) or scorer name.
        kind: ``"run"`` or ``"scorer"``.
        oof_score: (N,) float64 Task 1 ranking score on the OOF rows.
        oof_probs: (N, 4) float64 class probabilities (E, S, C, I) or None for a scorer.
        test_score, test_probs: the same on the test rows (None when there is no test split).
        source: the file the OOF values come from.
    """

    name: str
    kind: str
    oof_score: np.ndarray
    oof_probs: np.ndarray | None
    test_score: np.ndarray | None = None
    test_probs: np.ndarray | None = None
    source: str = ""
    run_id: str | None = None

    @property
    def has_probs(self) -> bool:
        return self.oof_probs is not None


@dataclass
class MemberSet:
    """Members aligned on example_id.

    Attributes:
        members: the members, in the order given.
        oof: (N rows) ``example_id, query_id, esci_label, fold`` sorted by example_id.
        test: (T rows) ``example_id, query_id, product_id`` (and ``esci_label`` when the test
            rows carry labels, e.g. a held-out split) sorted by example_id, or None.
    """

    members: list[Member]
    oof: pd.DataFrame
    test: pd.DataFrame | None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


def _id_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.setdiff1d(a, b), np.setdiff1d(b, a)


def _mismatch_message(what: str, name_a: str, ids_a: np.ndarray, name_b: str, ids_b: np.ndarray) -> str:
    only_a, only_b = _id_diff(ids_a, ids_b)
    parts = [f"{what} rows of {name_a!r} ({len(ids_a)}) and {name_b!r} ({len(ids_b)}) cover different example_ids"]
    if len(only_a):
        parts.append(f"{len(only_a)} only in {name_a!r} (e.g. {', '.join(map(str, only_a[:_SHOW]))})")
    if len(only_b):
        parts.append(f"{len(only_b)} only in {name_b!r} (e.g. {', '.join(map(str, only_b[:_SHOW]))})")
    return "; ".join(parts) + "; members must be trained on the same examples to be combined"


def align_members(
    frames: list[tuple[str, pd.DataFrame, pd.DataFrame | None]],
) -> tuple[pd.DataFrame, pd.DataFrame | None, list]:
    """Check that members cover the same example_ids and sort them by example_id.

    Args:
        frames: ``(name, oof, test)`` per member; ``oof``/``test`` with an ``example_id`` column
            (``test`` may be None).

    Returns:
        (oof keys, test keys or None, [(oof sorted, test sorted or None), ...]).

    Raises:
        WorkbenchError: two members' OOF (or test) example_id sets differ (the message lists the
            counts and the first ids only in each), or some members have a test split and others
            not.
    """
    sorted_frames = []
    for name, oof, test in frames:
        oof = oof.sort_values("example_id", kind="stable").reset_index(drop=True)
        test = None if test is None else test.sort_values("example_id", kind="stable").reset_index(drop=True)
        sorted_frames.append((name, oof, test))
    ref_name, ref_oof, ref_test = sorted_frames[0]
    ref_ids = ref_oof["example_id"].to_numpy()
    for name, oof, _test in sorted_frames[1:]:
        ids = oof["example_id"].to_numpy()
        if len(ids) != len(ref_ids) or not np.array_equal(ids, ref_ids):
            raise WorkbenchError(_mismatch_message("OOF", ref_name, ref_ids, name, ids))
    with_test = [n for n, _, t in sorted_frames if t is not None]
    if with_test and len(with_test) != len(sorted_frames):
        without = [n for n, _, t in sorted_frames if t is None]
        raise WorkbenchError(
            f"members {', '.join(map(repr, with_test))} have test predictions but "
            f"{', '.join(map(repr, without))} have none; all or none must"
        )
    if ref_test is not None:
        ref_t = ref_test["example_id"].to_numpy()
        for name, _, test in sorted_frames[1:]:
            ids = test["example_id"].to_numpy()
            if len(ids) != len(ref_t) or not np.array_equal(ids, ref_t):
                raise WorkbenchError(_mismatch_message("test", ref_name, ref_t, name, ids))
    keys = ref_oof[["example_id", "query_id", "esci_label", "fold"]].copy()
    test_keys = None
    if ref_test is not None:
        cols = [c for c in ("example_id", "query_id", "product_id", "esci_label") if c in ref_test.columns]
        test_keys = ref_test[cols].copy()
    return keys, test_keys, [(o, t) for _, o, t in sorted_frames]


def _probs(df: pd.DataFrame | None) -> np.ndarray | None:
    if df is None:
        return None
    return df[PROB_COLUMNS].to_numpy(dtype=np.float64)


def _scorer_test_scores(name: str, test: pd.DataFrame, data_dir: str | None) -> np.ndarray:
    """Recompute a baseline scorer on the test examples (BM25 / zero-shot dense)."""
    from core.data.esci import load_esci

    if not data_dir:
        raise WorkbenchError(f"scorer {name!r}: no test column {name!r} and no data dir to recompute it")
    if name == "bm25":
        from core.scoring.baselines import DEFAULT_BM25_FIELDS as fields
        from core.scoring.baselines import bm25_scores as score
    else:
        from core.scoring.dense import DENSE_FIELDS as fields
        from core.scoring.dense import dense_scores as score
    # only the product text the scorer reads (a third of the memory of all five fields)
    df = load_esci(data_dir, split="test", text_columns=fields)
    df = df.set_index("example_id").loc[test["example_id"].to_numpy()].reset_index()
    return score(df).astype(np.float64)


def load_members(store, specs: list[str]) -> MemberSet:
    """Load ensemble members from runs.db and their prediction files.

    Args:
        store: a :class:`core.runs.store.RunStore`.
        specs: run ids (or unique prefixes), ``RUN:ce`` for a run's cross-encoder score, or scorer
            names from :data:`SCORERS` (their OOF/test scores come from the first run member that
            has that column; a scorer needs at least one run member).

    Returns:
        MemberSet aligned on example_id.

    Raises:
        WorkbenchError: fewer than 1 member, a duplicate member, an unknown run, a scorer with no
            run member carrying its column, mismatched example_ids (see :func:`align_members`).
        DataError: a prediction file missing or malformed (:func:`core.scoring.report.read_predictions`).
    """
    if not specs:
        raise WorkbenchError("no ensemble members given")
    if len(set(specs)) != len(specs):
        dup = sorted({s for s in specs if specs.count(s) > 1})
        raise WorkbenchError(f"member(s) given twice: {', '.join(dup)}")
    loaded: dict[str, tuple] = {}  # run spec -> (run record, oof, test, run_dir)
    for spec in specs:
        if spec in SCORERS:
            continue
        run_id, _, col = spec.partition(":")
        if col not in ("", "ce"):
            raise WorkbenchError(f"member {spec!r}: unknown score {col!r} (use RUN or RUN:ce)")
        run = store.get_record(run_id)
        run_dir = run.run_dir  # absolute (older relative ones: from the db's folder)
        if run_dir is None:
            raise WorkbenchError(f"run {run.id} has no run directory")
        oof = read_predictions(run_dir / "oof.parquet")
        test = read_predictions(run_dir / "test.parquet") if (run_dir / "test.parquet").is_file() else None
        loaded[spec] = (run, oof, test, run_dir)
    if any(s in SCORERS for s in specs) and not loaded:
        raise WorkbenchError(
            f"scorer member(s) {', '.join(s for s in specs if s in SCORERS)} need at least one "
            "run member: their OOF scores are columns of a run's oof.parquet"
        )

    frames = []
    for spec in specs:
        if spec in SCORERS:
            owner = next((v for v in loaded.values() if spec in v[1].columns), None)
            if owner is None:
                raise WorkbenchError(
                    f"scorer {spec!r}: no run member's oof.parquet has a {spec!r} column "
                    f"(runs whose blend.members include {spec!r} have it)"
                )
            run, oof, test, run_dir = owner
            frames.append((spec, oof, test))
        else:
            run, oof, test, run_dir = loaded[spec]
            frames.append((spec, oof, test))
    keys, test_keys, aligned = align_members(frames)

    members = []
    for spec, (oof, test) in zip(specs, aligned):
        if spec in SCORERS:
            owner = next(v for v in loaded.values() if spec in v[1].columns)
            run, _, _, run_dir = owner
            t_score = None
            if test is not None:
                if spec in test.columns:
                    t_score = test[spec].to_numpy(np.float64)
                else:
                    t_score = _scorer_test_scores(spec, test, run.data.get("dir"))
            members.append(
                Member(
                    spec, "scorer", oof[spec].to_numpy(np.float64), None, t_score, None, str(run_dir / "oof.parquet")
                )
            )
        else:
            col = "ce_score" if spec.endswith(":ce") else "score"
            run, _, _, run_dir = loaded[spec]
            if col not in oof.columns:
                raise DataError(run_dir / "oof.parquet", f"missing column {col}")
            members.append(
                Member(
                    spec,
                    "run",
                    oof[col].to_numpy(np.float64),
                    _probs(oof),
                    None if test is None else test[col].to_numpy(np.float64),
                    _probs(test),
                    str(run_dir / "oof.parquet"),
                    run.id,
                )
            )
    return MemberSet(members, keys, test_keys)


# --------------------------------------------------------------------------- scores
def per_query_rank(query_ids, scores) -> np.ndarray:
    """Percentile rank of each score within its query: float64 (N,) in (0, 1], ties averaged.

    Rank averaging (a weighted mean of these) ignores the scale of each member's scores.
    """
    s = pd.Series(np.asarray(scores, dtype=np.float64))
    return s.groupby(np.asarray(query_ids), sort=False).rank(method="average", pct=True).to_numpy()


def _transform(query_ids, scores: np.ndarray, method: str) -> np.ndarray:
    if method == "rank":
        return per_query_rank(query_ids, scores)
    return standardize_per_query(query_ids, scores)


def correlation_matrix(query_ids, scores: np.ndarray, names: list[str], z: np.ndarray | None = None) -> pd.DataFrame:
    """Pairwise Pearson correlation of members' per-query standardised OOF ranking scores.

    Standardising within each query first removes between-query level differences, so the figure
    measures how alike two members *rank* products within a query (pooled within-query
    correlation).

    Args:
        query_ids: (N,); scores: (N, M) raw ranking scores; names: M member names.
        z: the (N, M) per-query standardised scores when already computed (skips that step).

    Returns:
        (M, M) DataFrame indexed and columned by ``names``; 1.0 on the diagonal; a constant member
        has correlation 0 with others.
    """
    if z is None:
        z = np.column_stack([standardize_per_query(query_ids, scores[:, j]) for j in range(scores.shape[1])])
    norm = np.sqrt((z * z).sum(0))
    norm[norm == 0] = np.inf
    c = (z.T @ z) / np.outer(norm, norm)
    np.fill_diagonal(c, 1.0)
    return pd.DataFrame(c, index=names, columns=names)


def shrink_correlated(weights: np.ndarray, corr: np.ndarray, threshold: float = 0.95) -> np.ndarray:
    """Lower the weights of members that are highly correlated with other weighted members.

    ``w_i' ∝ w_i / (1 + sum_{j != i, w_j > 0, corr_ij >= threshold} corr_ij)``, renormalised to
    sum 1: a cluster of k near-duplicate members ends up with about the weight one of them would
    have, so the ensemble is not dominated by one family of models (the KDD Cup 2022 Task 1
    winner lowered the weights of highly correlated backbones).

    Args:
        weights: (M,) non-negative, summing to 1. corr: (M, M) correlation matrix.
        threshold: correlation at and above which two members count as near-duplicates.

    Returns:
        (M,) float64, non-negative, sums to 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(corr, dtype=np.float64).copy()
    np.fill_diagonal(c, 0.0)
    close = (c >= threshold) & (w[None, :] > 0)
    out = w / (1.0 + (c * close).sum(1))
    return out / out.sum()


# --------------------------------------------------------------------------- metrics for fitting
class NdcgEvaluator:
    """Task 1 mean nDCG for many score vectors over the same (query, label) rows.

    Same definition as :func:`core.scoring.metrics.mean_ndcg` (gains E=1, S=0.1, C=0.01, I=0, no cutoff,
    tie-averaged discounts, all-Irrelevant queries score 0), with everything that does not depend
    on the scores (query blocks, discounts, ideal DCG) computed once, so each call costs one sort.
    Checked against ``mean_ndcg`` in the tests.

    Speed: one quicksort of the float64 key ``query - 0.5 * (score - min) / (max - min)``, which
    orders rows by query, then by descending score (the key is monotone in the score and stays
    within (query - 0.5, query]); if two different scores of one query round to the same key,
    the call falls back to the exact two-key ``np.lexsort``, so the result is always exact.

    Args:
        query_ids: (N,); labels: (N,) E/S/C/I.
    """

    def __init__(self, query_ids, labels):
        from core.scoring.metrics import label_codes  # the project's one label parser

        code = label_codes(np.asarray(labels)).astype(np.int64)
        q, uniq = pd.factorize(np.asarray(query_ids), sort=True)
        self.q = q.astype(np.int64)
        self.qf = self.q.astype(np.float64)
        self.n_q = len(uniq)
        self.gains = GAIN_VECTOR[code]
        n = len(self.q)
        counts = np.bincount(self.q, minlength=self.n_q)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        # after sorting by (query, -score), position i always belongs to query q_sorted[i]
        self.q_sorted = np.repeat(np.arange(self.n_q), counts)
        rank = np.arange(n) - starts[self.q_sorted] + 1
        self.discount = 1.0 / np.log2(rank + 1.0)
        self.q_break = np.empty(n, dtype=bool)
        if n:
            self.q_break[0] = True
            self.q_break[1:] = self.q_sorted[1:] != self.q_sorted[:-1]
        by_label = np.bincount(self.q * 4 + code, minlength=4 * self.n_q).reshape(self.n_q, 4)
        ends = np.cumsum(by_label, axis=1)
        cum = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(2, max(int(counts.max(initial=1)), 1) + 2)))))
        self.idcg = (cum[ends] - cum[ends - by_label]) @ GAIN_VECTOR
        self.n = n

    def __call__(self, scores) -> float:
        """Mean nDCG over the queries of ``scores`` (N,); NaN for no rows."""
        if self.n == 0:
            return float("nan")
        return float(self.per_query(scores).mean())

    def per_query(self, scores) -> np.ndarray:
        """nDCG of every query for ``scores`` (N,): shape (n_queries,), queries in sorted id order,
        values in [0, 1] (the per-query values :func:`core.scoring.metrics.ndcg_per_query` gives)."""
        s = np.asarray(scores, dtype=np.float64)
        if self.n == 0:
            return np.zeros(0)
        lo, hi = float(s.min()), float(s.max())
        exact = not (np.isfinite(lo) and np.isfinite(hi))  # +-inf scores: no scaled key
        if not exact:
            key = self.qf - 0.5 * ((s - lo) / (hi - lo) if hi > lo else np.zeros_like(s))
            order = np.argsort(key)
            s_sorted = s[order]
            k_sorted = key[order]
            exact = bool(((k_sorted[1:] == k_sorted[:-1]) & (s_sorted[1:] != s_sorted[:-1])).any())  # collision
        if exact:
            order = np.lexsort((-s, self.q))
            s_sorted = s[order]
        new = self.q_break.copy()
        new[1:] |= s_sorted[1:] != s_sorted[:-1]
        start = np.flatnonzero(new)
        gid = np.cumsum(new) - 1
        mean_disc = np.add.reduceat(self.discount, start) / np.diff(np.append(start, self.n))
        dcg = np.bincount(self.q_sorted, weights=self.gains[order] * mean_disc[gid], minlength=self.n_q)
        nd = np.zeros(self.n_q)
        np.divide(dcg, self.idcg, out=nd, where=self.idcg > 0)
        return np.clip(nd, 0.0, 1.0)


def _label_index(labels) -> np.ndarray:
    from core.scoring.metrics import label_codes

    return label_codes(np.asarray(labels)).astype(np.int64)


def tune_task3_threshold(p_sub: np.ndarray, is_sub: np.ndarray) -> tuple[float, float]:
    """Threshold on p(S) maximising Task 3 micro-F1 (= accuracy of substitute vs no_substitute).

    Exhaustive over all cut points between distinct p(S) values (one sort): predicting
    *substitute* for the k highest p(S) gives ``TP_k + TN_k`` correct rows.

    Args:
        p_sub: (N,) p(S) of each OOF row. is_sub: (N,) bool, true label is S.

    Returns:
        (threshold, micro-F1 on these rows); predict substitute iff ``p_sub >= threshold``. The
        threshold is the midpoint between the last value predicted substitute and the next one
        (``inf`` when predicting no substitute at all is best).
    """
    p = np.asarray(p_sub, dtype=np.float64)
    y = np.asarray(is_sub, dtype=bool)
    n = len(p)
    order = np.argsort(-p)  # ties are never cut (below), so an unstable sort is fine
    ps, ys = p[order], y[order]
    tp = np.concatenate(([0], np.cumsum(ys)))  # substitutes among the top k
    fp = np.arange(n + 1) - tp
    tn = (n - y.sum()) - fp
    correct = tp + tn
    valid = np.ones(n + 1, dtype=bool)  # cut only between distinct values
    valid[1:n] = ps[1:] != ps[:-1]
    k = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if k == 0:
        thr = float("inf")
    elif k == n:
        thr = float(ps[-1])
    else:
        thr = float((ps[k - 1] + ps[k]) / 2)
    return thr, float(correct[k] / n)


BIAS_GRID = np.linspace(-2.0, 2.0, 21)  # log-prior offsets tried per class by tune_task2_bias


def tune_task2_bias(probs: np.ndarray, y: np.ndarray, grid=BIAS_GRID, passes: int = 2) -> tuple[np.ndarray, float]:
    """Per-class log-prior adjustment maximising Task 2 micro-F1: ``argmax(log p + b)``.

    Coordinate ascent over ``b_S, b_C, b_I`` (``b_E`` = 0) on ``grid``, ``passes`` sweeps; a change
    is kept only if it strictly raises micro-F1 (so ``b = 0`` when nothing helps). This is the
    class-prior correction of Saerens et al. 2002 with the priors tuned on OOF instead of
    estimated.

    Args:
        probs: (N, 4) class probabilities in E, S, C, I order. y: (N,) int class index 0..3.

    Returns:
        (b (4,) float64, micro-F1 with b).
    """
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))
    y = np.asarray(y)
    b = np.zeros(4)
    best = float(np.mean((logp + b).argmax(1) == y))
    for _ in range(passes):
        for c in (1, 2, 3):
            for v in grid:
                trial = b.copy()
                trial[c] = v
                acc = float(np.mean((logp + trial).argmax(1) == y))
                if acc > best + 1e-12:
                    best, b = acc, trial
    return b, best


def caruana_weights(evaluate, n_members: int, max_iter: int = 12, patience: int = 3) -> tuple[np.ndarray, float]:
    """Greedy forward ensemble selection with replacement (Caruana et al. 2004, ICML).

    Starts from the best single member, then repeatedly adds (with replacement) the member whose
    addition gives the best metric of the equally weighted bag; stops after ``max_iter`` additions
    or ``patience`` additions without a new best, and returns the best bag seen.

    Args:
        evaluate: callable(weights (M,) summing to 1) -> metric, higher is better.
        n_members: M.

    Returns:
        (weights (M,) = selection counts / their sum, metric of those weights).
    """
    eye = np.eye(n_members)
    singles = [evaluate(eye[j]) for j in range(n_members)]
    counts = np.zeros(n_members)
    counts[int(np.argmax(singles))] = 1
    best_w, best = counts / counts.sum(), max(singles)
    if n_members == 1:
        return best_w, best
    stale = 0
    for _ in range(max_iter):
        trials = []
        for j in range(n_members):
            c = counts.copy()
            c[j] += 1
            trials.append((evaluate(c / c.sum()), j))
        value, j = max(trials, key=lambda t: (t[0], -t[1]))
        counts[j] += 1
        if value > best + 1e-12:
            best, best_w, stale = value, counts / counts.sum(), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_w, best


def parse_weights(spec: str, n: int) -> str | np.ndarray:
    """``auto`` / ``equal`` / ``w1,w2,...`` -> "auto", "equal" or (n,) weights normalised to sum 1.

    Raises:
        WorkbenchError: wrong count, non-numeric, negative, or all-zero weights.
    """
    spec = spec.strip().lower()
    if spec in ("auto", "equal"):
        return spec
    try:
        w = np.array([float(x) for x in spec.split(",")], dtype=np.float64)
    except ValueError:
        raise WorkbenchError(f"--weights {spec!r}: expected auto, equal or {n} comma-separated numbers") from None
    if len(w) != n:
        raise WorkbenchError(f"--weights {spec!r}: {len(w)} weight(s) for {n} member(s)")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise WorkbenchError(f"--weights {spec!r}: weights must be finite, non-negative and not all zero")
    return w / w.sum()


# --------------------------------------------------------------------------- build
@dataclass
class EnsembleResult:
    """What :func:`build_ensemble` computed.

    Attributes:
        tasks: {task: {"members": [...], "weights": [...], "oof_member": {name: metric},
            "oof_ensemble": metric, "metric": name, ...}} for the tasks built; when the test rows
            carry labels (a held-out split), also ``test_member`` and ``test_ensemble``.
        corr: (M, M) correlation matrix of the members' OOF ranking scores.
        oof: OOF keys with the ensemble's columns (``score`` Task 1, ``p_E..p_I``, ``esci_pred``,
            ``is_substitute`` where built).
        test: test keys with the same columns, or None.
        notes: human-readable remarks (e.g. scorers left out of Tasks 2/3).
    """

    tasks: dict[int, dict] = field(default_factory=dict)
    corr: pd.DataFrame | None = None
    oof: pd.DataFrame | None = None
    test: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def _fit_subset(q: np.ndarray, max_queries: int | None, seed: int) -> np.ndarray:
    """Row mask of at most ``max_queries`` queries (seeded draw), for fitting weights fast."""
    uniq = pd.unique(q)
    if not max_queries or len(uniq) <= max_queries:
        return np.ones(len(q), dtype=bool)
    keep = np.random.default_rng(seed).choice(uniq, size=max_queries, replace=False)
    return np.isin(q, keep)


def _weights_for(mode, n: int, evaluate, corr_sub: np.ndarray | None, shrink: float | None) -> np.ndarray:
    if isinstance(mode, np.ndarray):
        w = mode
    elif mode == "equal":
        w = np.full(n, 1.0 / n)
    else:
        w, _ = caruana_weights(evaluate, n)
    if shrink is not None and corr_sub is not None and n > 1:
        w = shrink_correlated(w, corr_sub, shrink)
    return w


def build_ensemble(
    ms: MemberSet,
    tasks=(1, 2, 3),
    weights: str | np.ndarray = "auto",
    method: str = "zscore",
    shrink: float | None = None,
    prior_adjust: bool = False,
    max_fit_queries: int | None = 10_000,
    seed: int = 0,
) -> EnsembleResult:
    """Combine the members of ``ms`` for the given tasks; weights fitted or given, metrics on OOF.

    Args:
        ms: aligned members (:func:`load_members`).
        tasks: subset of (1, 2, 3).
        weights: "auto" (Caruana selection on OOF, per task), "equal", or (M,) weights for the
            members in order (for Tasks 2/3 the run members' weights are renormalised).
        method: Task 1 combination, "zscore" | "rank" | "prob" (see the module docstring).
        shrink: if set, a correlation threshold for :func:`shrink_correlated`.
        prior_adjust: Task 2 per-class log-prior adjustment tuned on OOF (:func:`tune_task2_bias`).
        max_fit_queries: weights are fitted on the OOF rows of at most this many queries (seeded
            draw; None = all), which keeps Caruana selection fast on the full release (2M OOF
            rows); thresholds, the Task 2 bias and all reported figures use all OOF rows.
        seed: seed of that draw.

    Returns:
        EnsembleResult. The OOF ensemble figures are in-sample for the fitted weights, threshold
        and bias (fitted on the same OOF rows), so slightly optimistic.

    Raises:
        WorkbenchError: unknown task or method; Task 2/3 or ``method="prob"`` with no run member;
            manual weights of the wrong length.
    """
    tasks = _checked_tasks(ms, tasks, weights, method)
    oof = _oof_arrays(ms, max_fit_queries, seed)
    res = EnsembleResult(oof=ms.oof.copy(), test=None if ms.test is None else ms.test.copy())
    res.corr = correlation_matrix(oof.q, oof.scores, ms.names, z=oof.z)
    if 1 in tasks:
        _build_task1(res, ms, oof, weights, method, shrink)
    if {2, 3} & set(tasks):
        _build_tasks23(res, ms, oof, tasks, weights, shrink, prior_adjust)
    if _test_labelled(ms.test):
        _held_out_figures(res, ms, tasks)
    return res


def _checked_tasks(ms: MemberSet, tasks, weights: str | np.ndarray, method: str) -> tuple[int, ...]:
    """``tasks`` sorted and deduplicated, after checking them, the method and the weights' length."""
    tasks = tuple(sorted(set(int(t) for t in tasks)))
    if not tasks or any(t not in (1, 2, 3) for t in tasks):
        raise WorkbenchError(f"tasks must be among 1, 2, 3, got {tasks}")
    if method not in METHODS:
        raise WorkbenchError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    M = len(ms.members)
    if isinstance(weights, np.ndarray) and len(weights) != M:
        raise WorkbenchError(f"{len(weights)} weight(s) for {M} member(s)")
    return tasks


@dataclass
class _OofArrays:
    """The OOF arrays every task is fitted on.

    Attributes:
        q, labels, y: query ids, ESCI labels and their class index (0..3) per OOF row.
        scores: (N, M) the members' ranking scores; z: the same standardised per query.
        sub: rows of the queries the weights are fitted on (:func:`_fit_subset`).
    """

    q: np.ndarray
    labels: np.ndarray
    y: np.ndarray
    scores: np.ndarray
    z: np.ndarray
    sub: np.ndarray


def _oof_arrays(ms: MemberSet, max_fit_queries: int | None, seed: int) -> _OofArrays:
    q = ms.oof["query_id"].to_numpy()
    labels = ms.oof["esci_label"].to_numpy()
    scores = np.column_stack([m.oof_score for m in ms.members])
    z = np.column_stack([standardize_per_query(q, scores[:, j]) for j in range(len(ms.members))])
    return _OofArrays(q, labels, _label_index(labels), scores, z, _fit_subset(q, max_fit_queries, seed))


# -- Task 1: a ranking score per row --------------------------------------------------------------
def _build_task1(
    res: EnsembleResult, ms: MemberSet, oof: _OofArrays, weights, method: str, shrink: float | None
) -> None:
    """Task 1: weights over the members' (transformed) scores, fitted on nDCG; ``score`` columns."""
    members = _task1_members(ms, method, res.notes)
    combine = _task1_combiner(ms, oof, members, method)
    ev_all = NdcgEvaluator(oof.q, oof.labels)
    ev_fit = ev_all if oof.sub.all() else NdcgEvaluator(oof.q[oof.sub], oof.labels[oof.sub])
    mode = weights if not isinstance(weights, np.ndarray) else _renorm(weights[members], "Task 1")
    w1 = _weights_for(
        mode, len(members), lambda w: ev_fit(combine(w, oof.sub)), res.corr.to_numpy()[np.ix_(members, members)], shrink
    )
    s_oof = combine(w1)
    res.oof["score"] = s_oof
    per = {ms.names[j]: ev_all(oof.scores[:, j]) for j in range(len(ms.members))}
    res.tasks[1] = {
        "metric": "ndcg",
        "method": method,
        "members": [ms.names[j] for j in members],
        "weights": [float(x) for x in w1],
        "oof_member": per,
        "oof_ensemble": ev_all(s_oof),
        "fit_queries": int(pd.unique(oof.q[oof.sub]).size),
    }
    if ms.test is not None:
        res.test["score"] = _task1_test_scores(ms, members, method, w1)


def _task1_members(ms: MemberSet, method: str, notes: list[str]) -> list[int]:
    """Indices of the Task 1 members: all, or for ``method="prob"`` those with class
    probabilities (a note names the others)."""
    if method != "prob":
        return list(range(len(ms.members)))
    members = [j for j, m in enumerate(ms.members) if m.has_probs]
    if not members:
        raise WorkbenchError("method 'prob' needs run members with class probabilities")
    dropped = [ms.names[j] for j in range(len(ms.members)) if j not in members]
    if dropped:
        notes.append(f"Task 1 (method prob): {', '.join(dropped)} left out (no class probabilities)")
    return members


def _task1_combiner(ms: MemberSet, oof: _OofArrays, members: list[int], method: str):
    """``combine(w, rows=slice(None))``: the ensemble's OOF ranking score of ``rows`` for weights
    ``w`` (the expected gain of the mixed probabilities, or the weighted transformed scores)."""
    if method == "prob":
        P = np.stack([ms.members[j].oof_probs for j in members])  # (K, N, 4)

        def combine(w, rows=slice(None)):
            return np.tensordot(w, P[:, rows], axes=1) @ GAIN_VECTOR

        return combine
    if method == "zscore":
        X = oof.z
    else:
        X = np.column_stack([_transform(oof.q, oof.scores[:, j], method) for j in members])

    def combine(w, rows=slice(None)):
        return X[rows] @ w

    return combine


def _task1_test_scores(ms: MemberSet, members: list[int], method: str, w: np.ndarray) -> np.ndarray:
    """The ensemble's Task 1 score of the test rows for weights ``w``."""
    if method == "prob":
        Pt = np.stack([ms.members[j].test_probs for j in members])
        return np.tensordot(w, Pt, axes=1) @ GAIN_VECTOR
    tq = ms.test["query_id"].to_numpy()
    Xt = np.column_stack([_transform(tq, ms.members[j].test_score, method) for j in members])
    return Xt @ w


# -- Tasks 2 and 3: mixed class probabilities -----------------------------------------------------
def _mix(arr: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(N, 4, K) @ (K,) -> (N, 4)."""
    return np.einsum("nck,k->nc", arr, w)  # einsum: faster than BLAS gemv for tiny K


def _prob_members(ms: MemberSet, notes: list[str]) -> list[int]:
    """Indices of the Tasks 2/3 members: run members with class probabilities, one per run
    (``RUN`` and ``RUN:ce`` share one run's probabilities: the first is kept); notes name the rest.

    Raises:
        WorkbenchError: no member has class probabilities.
    """
    members, seen = [], set()
    for j, m in enumerate(ms.members):
        if m.has_probs and m.run_id not in seen:
            members.append(j)
            seen.add(m.run_id)
    M = len(ms.members)
    scorers = [ms.names[j] for j in range(M) if not ms.members[j].has_probs]
    if not members:
        raise WorkbenchError(
            f"Tasks 2/3 need class probabilities: members {', '.join(ms.names)} are scorers "
            "(bm25/dense rank products but do not classify them); add a run"
        )
    if scorers:
        notes.append(f"Tasks 2/3: {', '.join(scorers)} left out (scorers have no class probabilities)")
    twins = [ms.names[j] for j in range(M) if ms.members[j].has_probs and j not in members]
    if twins:
        notes.append(f"Tasks 2/3: {', '.join(twins)} left out (same run's probabilities as another member)")
    return members


def _build_tasks23(
    res: EnsembleResult, ms: MemberSet, oof: _OofArrays, tasks, weights, shrink: float | None, prior_adjust: bool
) -> None:
    """Tasks 2 and 3: weights over the run members' class probabilities, fitted on micro-F1;
    ``p_E..p_I``/``esci_pred`` (Task 2) and ``p_sub``/``is_substitute`` (Task 3) columns."""
    members = _prob_members(ms, res.notes)
    P = np.stack([ms.members[j].oof_probs for j in members], axis=-1)  # (N, 4, K)
    Pt = None if ms.test is None else np.stack([ms.members[j].test_probs for j in members], axis=-1)
    sub = oof.sub
    P_fit, y_fit = (P, oof.y) if sub.all() else (np.ascontiguousarray(P[sub]), oof.y[sub])
    for task in [t for t in (2, 3) if t in tasks]:
        ev, per, member_thr = _task23_objective(task, ms, members, oof.y, P_fit, y_fit)
        mode = weights if not isinstance(weights, np.ndarray) else _renorm(weights[members], f"Task {task}")
        corr = res.corr.to_numpy()[np.ix_(members, members)]
        w = _weights_for(mode, len(members), ev, corr, shrink)
        p_oof = _mix(P, w)
        info = {
            "metric": "micro_f1",
            "members": [ms.names[j] for j in members],
            "weights": [float(x) for x in w],
            "oof_member": per,
        }
        if task == 2:
            b = np.zeros(4)
            if prior_adjust:  # tuned on the fit rows, like the weights
                b, _ = tune_task2_bias(p_oof if sub.all() else p_oof[sub], y_fit)
            _set_task2(res, info, p_oof, None if Pt is None else _mix(Pt, w), b, oof.y)
        else:
            _set_task3(res, info, p_oof, None if Pt is None else Pt[:, 1, :] @ w, member_thr, oof.y == 1)
        res.tasks[task] = info


def _task23_objective(
    task: int, ms: MemberSet, members: list[int], y: np.ndarray, P_fit: np.ndarray, y_fit: np.ndarray
):
    """``(evaluate(w) on the fit rows, {member: its own OOF micro-F1}, {member: (threshold, F1)}
    for Task 3 else None)``."""
    if task == 2:

        def ev(w):
            return float(np.mean(_mix(P_fit, w).argmax(1) == y_fit))

        return ev, {ms.names[j]: float(np.mean(ms.members[j].oof_probs.argmax(1) == y)) for j in members}, None
    PS_fit = np.ascontiguousarray(P_fit[:, 1, :])  # (n, K) p(S) of each member

    def ev(w):
        return tune_task3_threshold(np.einsum("nk,k->n", PS_fit, w), y_fit == 1)[1]

    member_thr = {ms.names[j]: tune_task3_threshold(ms.members[j].oof_probs[:, 1], y == 1) for j in members}
    return ev, {n: v[1] for n, v in member_thr.items()}, member_thr


def _set_task2(
    res: EnsembleResult, info: dict, p_oof: np.ndarray, p_test: np.ndarray | None, b: np.ndarray, y: np.ndarray
) -> None:
    """Task 2 predictions: argmax of the log-probabilities plus the bias ``b``."""
    pred = (np.log(np.clip(p_oof, 1e-12, None)) + b).argmax(1)
    info.update(
        oof_ensemble=float(np.mean(pred == y)),
        oof_argmax=float(np.mean(p_oof.argmax(1) == y)),
        log_prior_bias=dict(zip(ESCI_LABELS, map(float, b))),
    )
    res.oof[PROB_COLUMNS] = p_oof
    res.oof["esci_pred"] = np.asarray(ESCI_LABELS)[pred]
    if p_test is not None:
        res.test[PROB_COLUMNS] = p_test
        res.test["esci_pred"] = np.asarray(ESCI_LABELS)[(np.log(np.clip(p_test, 1e-12, None)) + b).argmax(1)]


def _set_task3(
    res: EnsembleResult, info: dict, p_oof: np.ndarray, ps_test: np.ndarray | None, member_thr: dict, is_sub: np.ndarray
) -> None:
    """Task 3 predictions: p(S) at or above the threshold tuned on all OOF rows."""
    thr, f1 = tune_task3_threshold(p_oof[:, 1], is_sub)
    info.update(
        oof_ensemble=f1,
        threshold=thr,
        member_threshold={n: v[0] for n, v in member_thr.items()},
        oof_argmax=float(np.mean((p_oof.argmax(1) == 1) == is_sub)),
    )
    res.oof["p_sub"] = p_oof[:, 1]
    res.oof["is_substitute"] = p_oof[:, 1] >= thr
    if ps_test is not None:
        res.test["p_sub"] = ps_test
        res.test["is_substitute"] = ps_test >= thr


def _test_labelled(test: pd.DataFrame | None) -> bool:
    """True when the test rows carry real ESCI labels (a held-out split, not the official test)."""
    return (
        test is not None
        and "esci_label" in test.columns
        and len(test) > 0
        and bool(test["esci_label"].isin(list(ESCI_LABELS)).all())
    )


def _held_out_figures(res: EnsembleResult, ms: MemberSet, tasks) -> None:
    """Add ``test_member`` / ``test_ensemble`` (metrics on labelled test rows) to ``res.tasks``.

    Nothing is fitted on these rows: weights, the Task 3 thresholds (the ensemble's and each
    member's own) and the Task 2 bias all come from OOF, so these are honest held-out figures.
    """
    t = res.test
    tq, tl = t["query_id"].to_numpy(), t["esci_label"].to_numpy()
    ty = _label_index(tl)
    if 1 in res.tasks:
        info = res.tasks[1]
        ev = NdcgEvaluator(tq, tl)
        info["test_member"] = {m.name: ev(m.test_score) for m in ms.members}
        info["test_ensemble"] = ev(t["score"].to_numpy())
    if 2 in res.tasks:
        info = res.tasks[2]
        byname = {m.name: m for m in ms.members}
        info["test_member"] = {n: float(np.mean(byname[n].test_probs.argmax(1) == ty)) for n in info["members"]}
        info["test_ensemble"] = float(np.mean(_label_index(t["esci_pred"].to_numpy()) == ty))
    if 3 in res.tasks:
        info = res.tasks[3]
        byname = {m.name: m for m in ms.members}
        member = {}
        for n in info["members"]:
            thr = info["member_threshold"][n]  # each member's own OOF-tuned threshold
            member[n] = float(np.mean((byname[n].test_probs[:, 1] >= thr) == (ty == 1)))
        info["test_member"] = member
        info["test_ensemble"] = float(np.mean(t["is_substitute"].to_numpy() == (ty == 1)))


def compare_with_best_member(
    res: EnsembleResult, ms: MemberSet, n_resamples: int = 2000, seed: int = 0
) -> dict[int, dict]:
    """The ensemble against its best member on the OOF rows, per built task, with the paired
    bootstrap 95% interval of the difference over queries (:mod:`core.scoring.significance`).

    The best member of a task is the one with the highest own OOF figure (``oof_member``); it is
    compared as it stands alone: Task 1 its ranking score (per-query nDCG, the queries resampled,
    :func:`~core.scoring.significance.paired_bootstrap`), Task 2 the argmax of its probabilities,
    Task 3 its own OOF-tuned threshold (micro-F1 pooled over the examples of the drawn queries,
    :func:`~core.scoring.significance.paired_bootstrap_ratio`). The ensemble's figures are
    in-sample for fitted weights/thresholds, so the interval is about noise in the queries, not
    about that optimism. Each result is also stored in ``res.tasks[task]["vs_best"]`` (and so in the
    manifest when written afterwards).

    Args:
        res: :func:`build_ensemble`'s result; ms: its members.
        n_resamples, seed: bootstrap draws of queries and their seed (the same draws for every task).

    Returns:
        {task: {"member": name, "a": best member's figure, "b": the ensemble's, "diff": b - a,
        "low", "high", "within_noise", "n_queries", "n_resamples", "confidence", "seed"}}.
    """
    from core.scoring.significance import paired_bootstrap, paired_bootstrap_ratio, query_correct

    out: dict[int, dict] = {}
    oof = res.oof
    byname = {m.name: m for m in ms.members}
    kw = {"n_resamples": n_resamples, "seed": seed}
    for task, info in sorted(res.tasks.items()):
        best = max(info["oof_member"], key=lambda n: info["oof_member"][n])
        member = byname[best]
        if task == 1:
            ev = NdcgEvaluator(oof["query_id"].to_numpy(), oof["esci_label"].to_numpy())
            d = paired_bootstrap(ev.per_query(member.oof_score), ev.per_query(oof["score"].to_numpy()), **kw)
        else:
            if task == 2:
                pred_m = np.asarray(ESCI_LABELS)[member.oof_probs.argmax(1)]
                pred_e = oof["esci_pred"].to_numpy()
            else:
                pred_m = member.oof_probs[:, 1] >= info["member_threshold"][best]
                pred_e = oof["is_substitute"].to_numpy()
            a, b = query_correct(oof, task, pred_m), query_correct(oof, task, pred_e)
            d = paired_bootstrap_ratio(a["correct"], a["n"], b["correct"], b["n"], **kw)
        info["vs_best"] = out[task] = {"member": best, **d.to_dict()}
    return out


def _renorm(w: np.ndarray, what: str) -> np.ndarray:
    if w.sum() <= 0:
        raise WorkbenchError(f"{what}: the given weights of its members are all zero")
    return w / w.sum()


# --------------------------------------------------------------------------- record
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_ensemble(store, name: str, manifest: dict, out_dir: str | Path) -> None:
    """Record the ensemble in runs.db table ``ensembles`` (:meth:`core.runs.store.RunStore.put_ensemble`).

    Columns: name (primary key; a rebuild under the same name replaces the row), created, tasks,
    members (JSON), manifest (JSON), dir. One short ``BEGIN IMMEDIATE`` transaction.
    """
    store.put_ensemble(
        name,
        ",".join(str(t) for t in manifest.get("tasks", {})),
        json.dumps(manifest.get("members", [])),
        json.dumps(manifest, default=float),
        str(out_dir),
    )


def write_ensemble(
    res: EnsembleResult,
    ms: MemberSet,
    out_dir: str | Path,
    name: str,
    store=None,
    examples=None,
    extra: dict | None = None,
) -> dict:
    """Write the submission files of the built tasks, validate them, write ``manifest.json``.

    Files (:data:`core.scoring.submission.TASK_FILES`) go under ``out_dir``, each written atomically and
    then checked by :func:`core.scoring.submission.validate_submission` against ``examples`` (a path
    for :func:`core.scoring.submission.load_test_examples`) or, when None, against the members' test
    rows. The manifest (inputs, weights, OOF figures, correlation matrix, thresholds, file
    SHA-256) is written last, atomically; the ensemble is then recorded in runs.db
    (:func:`record_ensemble`) when ``store`` is given.

    Returns:
        the manifest dict (``files``: {task: {"path", "sha256", "rows"}}).

    Raises:
        WorkbenchError: the members have no test predictions.
        DataError: a written file fails validation (nothing is moved into ``out_dir`` then).
    """
    from core.runs.store import now_iso
    from core.scoring.submission import (
        TASK_FILES,
        atomic_write,
        validate_submission,
        write_task1,
        write_task2,
        write_task3,
    )

    if res.test is None or ms.test is None:
        raise WorkbenchError(
            "the members have no test predictions (no split == 'test' rows in their data): nothing to submit"
        )
    out = Path(out_dir)
    test = res.test
    if 1 in res.tasks and "product_id" not in test.columns:
        raise WorkbenchError("Task 1 needs product_id in the members' test.parquet")
    files = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:  # write + validate everything in a staging folder; move into place only when all pass
        for task in sorted(res.tasks):
            path = stage / TASK_FILES[task]
            if task == 1:
                write_task1(path, test)
            elif task == 2:
                write_task2(path, test["example_id"].to_numpy(), test["esci_pred"].to_numpy())
            else:
                write_task3(path, test["example_id"].to_numpy(), test["is_substitute"].to_numpy())
            ref = examples if examples is not None else test[["example_id", "query_id", "product_id"]]
            summary = validate_submission(path, task, ref)
            files[task] = {"path": str(out / TASK_FILES[task]), "sha256": file_sha256(path), "rows": summary["rows"]}
        manifest = {
            "name": name,
            "created": now_iso(),
            "members": [{"name": m.name, "kind": m.kind, "source": m.source} for m in ms.members],
            "tasks": {t: info for t, info in res.tasks.items()},
            "correlation": res.corr.round(6).to_dict() if res.corr is not None else None,
            "notes": res.notes,
            "files": files,
            "oof_rows": int(len(ms.oof)),
            "test_rows": int(len(ms.test)),
            **(extra or {}),
        }
        text = json.dumps(manifest, indent=1, default=float)
        atomic_write(stage / "manifest.json", lambda tmp: Path(tmp).write_text(text))
        out.mkdir(parents=True, exist_ok=True)
        stale = out / "manifest.json"
        stale.unlink(missing_ok=True)  # a rebuild: no old manifest next to new files, even briefly
        for task in sorted(res.tasks):
            os.replace(stage / TASK_FILES[task], out / TASK_FILES[task])
        os.replace(stage / "manifest.json", out / "manifest.json")  # last: its presence = complete
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if store is not None:
        record_ensemble(store, name, manifest, out)
    return manifest
