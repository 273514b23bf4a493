"""The second-level LightGBM stacker (``workbench stack``): finished runs' OOF probabilities plus
query-group, lexical and zero-shot features into LightGBM.

What the top KDD Cup 2022 ESCI teams did instead of a linear blend (ETS-Lab, "A Semantic Alignment
System for Multilingual Query-Product Retrieval": the min/median/max of the cross-encoders'
probabilities within the query added +0.007 on Task 2; the Task 1 ranking sorts by LightGBM's
output). Models: LambdaRank (Burges 2010, "From RankNet to LambdaRank to LambdaMART") with the
official gains E=1, S=0.1, C=0.01, I=0 as ``label_gain`` for Task 1, grouped by query; multiclass
for Task 2; binary substitute-vs-rest for Task 3 (Ke et al. 2017, LightGBM).

Honest CV: the stacker that scores fold k is fitted on the other folds' OOF rows only (the member
runs' own query-grouped folds, which must be identical across members); early stopping uses an
inner query-grouped split of those training folds, never fold k.

The OOF-vs-test gap: an OOF prediction comes from one fold model (trained on (K-1)/K of the
queries), while a run's ``test.parquet`` averages the K fold models, which is a stronger scorer.
A second level fitted on OOF rows and applied to fold-averaged test features sees a member
stronger than the one it learnt to weigh. With ``test_features: per_fold`` (the default) fold
k's stacker is applied to the test features built from fold k's model alone (the same kind of
input it was fitted on) and the K stacker outputs are averaged; ``mean`` applies every fold
stacker to the fold-averaged test features instead. ``stack_report.json`` gives each member's OOF, one-fold and fold-averaged held-out nDCG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from core.config import StackConfig
from core.data.esci import ESCI_LABELS
from core.data.text import clean_text
from core.errors import ConfigError, DataError, WorkbenchError
from core.scoring.blend import standardize_per_query
from core.scoring.metrics import expected_gain, mean_ndcg, micro_f1_task2, micro_f1_task3
from core.scoring.report import PROB_COLUMNS, argmax_labels, read_predictions

log = logging.getLogger("esci.stack")

#: what each ``stack.features`` group adds (per row)
FEATURE_GROUPS = {
    "members": "each member run's p_E..p_I, expected gain, its per-query z-score and percentile rank",
    "group": "per query, each member's min/median/max/mean of p_E and of the expected gain (ETS-Lab)",
    "query": "the query's words, characters and number of judged products; the locale",
    "lexical": "BM25 (raw, z, rank), query-title token overlap, brand/colour named in the query, empty fields",
    "zero_shot": "the zero-shot bi-encoder cosines (MiniLM, multilingual-e5-small): raw, z, rank",
    "small_share": "share of the query's products in the small (Task 1) list, where both lists exist",
}
#: scorer -> (feature group, dense model or None)
STACK_SCORERS: dict[str, tuple[str, str | None]] = {
    "bm25": ("lexical", None),
    "dense": ("zero_shot", "all-MiniLM-L6-v2"),
    "dense-e5": ("zero_shot", "multilingual-e5-small"),
}
#: Task 1 relevance grades for LambdaRank (label index -> official gain through label_gain)
RANK_GRADE = {"E": 3, "S": 2, "C": 1, "I": 0}
LABEL_GAIN = [0.0, 0.01, 0.1, 1.0]
LABEL_INDEX = {lab: i for i, lab in enumerate(ESCI_LABELS)}
#: a stack run's ``cv/<name>`` metric rows -> the StackResult.cv key they hold (the training run's
#: meaning: ``ndcg`` the expected gain of the class probabilities, ``final_ndcg`` the ranking)
CV_METRICS = {"ndcg": "ndcg_probs", "final_ndcg": "ndcg", "task2_f1": "task2_f1", "task3_f1": "task3_f1"}
TASKS = ("rank", "esci", "substitute")
#: the product text the stacker loads: the scorers' fields (BM25's DEFAULT_BM25_FIELDS, the dense
#: scorers' DENSE_FIELDS) and the lexical features; of the long fields only their length (empty or not)
SHORT_FIELDS = ("product_title", "product_brand", "product_color")
LONG_FIELDS = ("product_bullet_point", "product_description")


# ------------------------------------------------------------------------------------- inputs
@dataclass
class MemberRun:
    """A member run's predictions on the stack's rows.

    Attributes:
        name: short name used in feature names (``m0``, ``m1``, ... in --runs order).
        run_id: the run's id.
        oof: float64 (N_oof, 4) OOF probabilities (E, S, C, I), in the stack's OOF row order.
        test: float64 (N_test, 4) fold-averaged test probabilities, or None.
        test_by_fold: fold -> float64 (N_test, 4): each fold model's own test probabilities.
    """

    name: str
    run_id: str
    oof: np.ndarray
    test: np.ndarray | None
    test_by_fold: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class StackData:
    """Everything the stacker reads, aligned on example_id.

    Attributes:
        oof: the OOF rows (N_oof): example_id, query_id, product_id, esci_label, fold, query and
            product text columns, small/large_version.
        test: the test rows (N_test) with the same columns (esci_label may be empty), or None.
        members: the member runs, in --runs order.
        scorers: scorer -> (oof (N_oof,), test (N_test,) or None) zero-shot / BM25 scores.
        data_dir: the data folder the members were trained on; task: its data.task.
    """

    oof: pd.DataFrame
    test: pd.DataFrame | None
    members: list[MemberRun]
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]]
    data_dir: str
    task: int
    data_config: dict[str, Any] = field(default_factory=dict)  # the first member's ``data`` section

    @property
    def folds(self) -> list[int]:
        """The member runs' folds, sorted."""
        return sorted(int(k) for k in np.unique(self.oof["fold"]))


def _resolve_data_dir(store, record) -> Path:
    """A run's ``data.dir``: as recorded, else relative to the runs.db folder."""
    raw = record.data.get("dir")
    if not raw:
        raise WorkbenchError(f"run {record.id}: its config has no data.dir")
    p = Path(raw)
    if p.is_dir() or p.is_absolute():
        return p
    alt = Path(store.path).resolve().parent / p
    return alt if alt.is_dir() else p


def _member_files(record, folds: list[int]) -> dict[int, Path]:
    """fold -> ``<run>/fold<k>/test.parquet`` of a run with test rows.

    Raises:
        DataError: a fold's file is missing."""
    files = {k: record.run_dir / f"fold{k}" / "test.parquet" for k in folds}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(missing[0], "the fold's test predictions are missing (needed for test_features: per_fold)")
    return files


def load_stack_data(
    store, run_specs: list[str], scorers: list[str], cache_dir: str | Path = ".cache/scores"
) -> StackData:
    """Load the member runs and the data they were trained on; compute (or read cached) scorers.

    Args:
        store: a :class:`core.runs.store.RunStore`.
        run_specs: run ids or unique prefixes of finished training runs (at least one).
        scorers: names from :data:`STACK_SCORERS`; a dense scorer whose model cannot be prepared
            here (e.g. multilingual-e5-small without its wheels) is dropped with a warning.
        cache_dir: where scorer outputs are cached (keyed by scorer and rows).

    Returns:
        StackData aligned on the first run's OOF/test row order.

    Raises:
        WorkbenchError: no runs, a run given twice, a run that is not a finished training run,
            runs with different OOF examples, folds, test examples, data folders or tasks.
        DataError: a prediction or data file missing or malformed (one line naming it).
    """
    from core.data.esci import load_esci

    if not run_specs:
        raise WorkbenchError("stack: no member runs given (--runs RUN [RUN ...])")
    records = [store.get_record(s) for s in run_specs]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise WorkbenchError(f"stack: a run is given twice: {ids}")
    for r in records:
        if r.kind != "train" or r.status != "finished":
            raise WorkbenchError(f"run {r.id}: is a {r.status} {r.kind} run; the stacker needs finished training runs")
        if r.run_dir is None or not (r.run_dir / "oof.parquet").is_file():
            raise DataError(f"{r.run_dir}/oof.parquet", f"run {r.id} has no OOF predictions")
    first = records[0]
    oofs = [read_predictions(r.run_dir / "oof.parquet") for r in records]
    oof0 = oofs[0]
    test0 = read_predictions(first.run_dir / "test.parquet") if (first.run_dir / "test.parquet").is_file() else None
    data_dir = _resolve_data_dir(store, first)
    task = int(first.data.get("task", 1))
    folds = sorted(int(k) for k in oof0["fold"].unique())
    members = []
    for i, (r, oof) in enumerate(zip(records, oofs)):
        if not np.array_equal(oof["example_id"].to_numpy(), oof0["example_id"].to_numpy()):
            raise WorkbenchError(f"run {r.id}: its OOF examples differ from run {first.id}'s (other data or selection)")
        if not np.array_equal(oof["fold"].to_numpy(), oof0["fold"].to_numpy()):
            raise WorkbenchError(f"run {r.id}: its folds differ from run {first.id}'s (train.folds / seed)")
        if _resolve_data_dir(store, r).resolve() != data_dir.resolve() or int(r.data.get("task", 1)) != task:
            raise WorkbenchError(f"run {r.id}: trained on other data or task than run {first.id}")
        test, by_fold = None, {}
        if test0 is not None:
            t = test0 if i == 0 else read_predictions(r.run_dir / "test.parquet")
            if not np.array_equal(t["example_id"].to_numpy(), test0["example_id"].to_numpy()):
                raise WorkbenchError(f"run {r.id}: its test examples differ from run {first.id}'s")
            test = t[PROB_COLUMNS].to_numpy(np.float64)
            for k, p in _member_files(r, folds).items():
                ft = pd.read_parquet(p)
                if not np.array_equal(ft["example_id"].to_numpy(), test0["example_id"].to_numpy()):
                    raise DataError(p, "its examples differ from the run's test.parquet")
                by_fold[k] = ft[PROB_COLUMNS].to_numpy(np.float64)
        members.append(MemberRun(f"m{i}", r.id, oof[PROB_COLUMNS].to_numpy(np.float64), test, by_fold))

    # the scorers and features read the short fields' text and only the length of the long ones
    df = load_esci(data_dir, task=task, text_columns=SHORT_FIELDS, length_columns=LONG_FIELDS).set_index("example_id")
    missing = np.setdiff1d(oof0["example_id"].to_numpy(), df.index.to_numpy())
    if len(missing):
        raise DataError(
            data_dir,
            f"{len(missing)} OOF example_id(s) of run {first.id} are not in the data, first {missing[:3].tolist()}",
        )
    oof_rows = df.loc[oof0["example_id"].to_numpy()].reset_index()
    oof_rows["fold"] = oof0["fold"].to_numpy()
    test_rows = None
    if test0 is not None:
        test_rows = df.loc[test0["example_id"].to_numpy()].reset_index()
        test_rows["fold"] = -1
    scores = _scorer_outputs(oof_rows, test_rows, scorers, Path(cache_dir))
    return StackData(oof_rows, test_rows, members, scores, str(data_dir), task, dict(first.data))


def cached_scores(model: str | None, frame: pd.DataFrame, cache_dir: str | Path = ".cache/scores") -> np.ndarray:
    """BM25 (``model=None``, :func:`core.scoring.baselines.bm25_scores`) or a zero-shot bi-encoder's
    cosine (:func:`core.scoring.dense.dense_scores` with ``model``) of each row of ``frame``: float64 (N,).

    Scores are cached in ``cache_dir`` (``.npy``), keyed by the scorer and the set of rows (their
    example_id, query and product_id, in example_id order), so training's blend, the stacker and
    the held-out protocol compute each scorer once per data selection, in any row order.

    Raises:
        ConfigError / WorkbenchError / DataError: the dense model cannot be resolved or prepared.
    """
    from core.scoring.baselines import bm25_scores
    from core.scoring.dense import dense_scores

    order = np.argsort(frame["example_id"].to_numpy(np.int64), kind="stable")
    rows = frame.iloc[order]
    key = hashlib.sha256(
        json.dumps(["bm25" if model is None else "dense", model]).encode()
        + rows["example_id"].to_numpy(np.int64).tobytes()
        + "\x1f".join(rows["query"].astype(str)).encode()
        + "\x1f".join(rows["product_id"].astype(str)).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir) / f"{'bm25' if model is None else model.replace('/', '_')}-{key}.npy"
    if path.is_file():
        values = np.load(path)
    else:
        t0 = time.time()
        values = np.asarray(bm25_scores(rows) if model is None else dense_scores(rows, model), dtype=np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, values)
        log.info("scorer %s over %d rows in %.1f s (cached in %s)", model or "bm25", len(rows), time.time() - t0, path)
    out = np.empty(len(frame), dtype=np.float64)
    out[order] = values
    return out


def _scorer_outputs(oof: pd.DataFrame, test: pd.DataFrame | None, scorers: list[str], cache_dir: Path):
    """scorer -> (oof scores, test scores): computed over the OOF and test rows together (one BM25
    corpus / one embedding pass, as training computes its blend members), cached; a dense scorer
    whose model cannot be prepared here is dropped with a warning."""
    both = pd.concat([oof, test], ignore_index=True) if test is not None else oof
    out = {}
    for name in scorers:
        if name not in STACK_SCORERS:
            raise ConfigError(f"stack.scorers: unknown scorer {name!r}; known: {list(STACK_SCORERS)}")
        try:
            values = cached_scores(STACK_SCORERS[name][1], both, cache_dir)
        except (ConfigError, DataError, WorkbenchError) as exc:
            log.warning("stack: scorer %s dropped: %s", name, exc)
            continue
        out[name] = (values[: len(oof)], values[len(oof) :] if test is not None else None)
    return out


# ------------------------------------------------------------------------------------- features
def _group_stats(qids: np.ndarray, values: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    g = pd.Series(values).groupby(qids, sort=False)
    return {f"{prefix}_q{stat}": g.transform(stat).to_numpy() for stat in ("min", "median", "max", "mean")}


def _norm_words(text: object) -> list[str]:
    """``clean_text(text).lower().replace("/", " ").split()``, skipping ``clean_text`` for the usual
    title (printable, no ``&`` or ``<``): it could only collapse ASCII spaces, which ``split`` does
    anyway (every character it removes or maps to a space is non-printable)."""
    return _title_words(text)[0]


def _title_words(text: object) -> tuple[list[str], int]:
    """(:func:`_norm_words` of ``text``, ``len(text.split())``: its raw word count, 0 for a
    non-str). For a printable text without ``/`` the two splits cut at the same ASCII spaces, so
    the count is the normalised list's length and the text is split once."""
    if not isinstance(text, str):
        return clean_text(text).lower().replace("/", " ").split(), 0
    if "&" in text or "<" in text or not text.isprintable():
        return clean_text(text).lower().replace("/", " ").split(), len(text.split())
    words = text.lower().replace("/", " ").split()
    return words, len(words) if "/" not in text else len(text.split())


def _distinct_map(values: pd.Series, fn) -> list:
    """``fn`` of each row's text, computed once per distinct text (queries repeat over their
    products, brands and colours over the catalogue): a list of N results."""
    codes, uniques = pd.factorize(values.astype("string").fillna(""))
    done = [fn(u) for u in uniques]
    return [done[c] for c in codes]


def _empty(rows: pd.DataFrame, column: str) -> np.ndarray:
    """(N,) 1.0 where the product's ``column`` is empty after stripping whitespace: from its text,
    or from ``<column>_chars`` (:func:`core.data.esci.load_esci` ``length_columns``) when the
    text was not loaded."""
    if column in rows:
        return (rows[column].astype(str).str.strip() == "").to_numpy(np.float64)
    return (rows[f"{column}_chars"].to_numpy() == 0).astype(np.float64)


def _lexical(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Query-title overlap, brand/colour named in the query, empty product fields (N,) each.

    Each distinct query, brand and colour is normalised once (:func:`_distinct_map`); each title
    is split once per row (:func:`_title_words`)."""
    queries = _distinct_map(rows["query"], lambda t: (w := _norm_words(t), " " + " ".join(w) + " "))
    brands = _distinct_map(rows["product_brand"], lambda t: " ".join(_norm_words(t)))
    colors = _distinct_map(rows["product_color"], lambda t: " ".join(_norm_words(t)))
    overlap, brand_in, color_in, title_words = [], [], [], []
    for (qw, ql), title, b, c in zip(queries, rows["product_title"], brands, colors):
        words, n_words = _title_words(title)
        title_words.append(n_words)
        tw = set(words)
        overlap.append(sum(w in tw for w in qw) / len(qw) if qw else 0.0)
        brand_in.append(float(bool(b) and f" {b} " in ql))
        color_in.append(float(bool(c) and f" {c} " in ql))
    empty = sum(_empty(rows, c) for c in ("product_brand", "product_color") + LONG_FIELDS)
    return {
        "lex.query_title_overlap": np.array(overlap),
        "lex.brand_in_query": np.array(brand_in),
        "lex.color_in_query": np.array(color_in),
        "lex.empty_fields": np.asarray(empty, dtype=np.float64),
        "lex.title_words": np.asarray(title_words, dtype=np.float64),
    }


def _scaled(name: str, qids: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """raw, per-query z-score and per-query percentile rank of one score."""
    ranks = pd.Series(values).groupby(qids, sort=False).rank(method="average", pct=True).to_numpy()
    return {name: values, f"{name}_z": standardize_per_query(qids, values), f"{name}_rank": ranks}


def row_features(
    rows: pd.DataFrame, scorer_scores: dict[str, np.ndarray], groups: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The features that do not depend on a member run (scorers, query, lexical, small_share):
    computed once per set of rows and shared by every fold's :func:`build_features` call.

    Returns:
        (feature -> float (N,), feature -> monotone direction (+1 for each scorer's raw/z/rank))."""
    qids = rows["query_id"].to_numpy()
    cols: dict[str, np.ndarray] = {}
    mono: dict[str, int] = {}
    for sc, values in scorer_scores.items():
        if STACK_SCORERS[sc][0] in groups:
            scaled = _scaled(f"{sc}", qids, np.asarray(values, dtype=np.float64))
            cols.update(scaled)
            mono.update(dict.fromkeys(scaled, 1))
    if "query" in groups:
        q = rows["query"].astype(str)
        cols["query.words"] = np.asarray(_distinct_map(q, lambda t: len(t.split())), dtype=np.float64)
        cols["query.chars"] = q.str.len().to_numpy(np.float64)
        cols["query.products"] = pd.Series(qids).groupby(qids).transform("size").to_numpy(np.float64)
        locales = {"us": 0.0, "es": 1.0, "jp": 2.0}
        cols["query.locale"] = rows["product_locale"].astype(str).map(locales).fillna(3.0).to_numpy(np.float64)
    if "lexical" in groups:
        cols.update(_lexical(rows))
    if "small_share" in groups and {"small_version", "large_version"} <= set(rows.columns):
        small = rows["small_version"].to_numpy(np.float64)
        cols["query.small_share"] = pd.Series(small).groupby(qids).transform("mean").to_numpy()
    return cols, mono


def build_features(
    rows: pd.DataFrame,
    member_probs: list[tuple[str, np.ndarray]],
    scorer_scores: dict[str, np.ndarray],
    groups: list[str],
    shared: tuple[dict[str, np.ndarray], dict[str, int]] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The stacker's feature matrix for a set of rows (whole queries).

    Args:
        rows: N rows with query_id, query, product text, product_locale, small/large_version.
        member_probs: (member name, float (N, 4) probabilities E, S, C, I) per member run.
        scorer_scores: scorer name -> float (N,) raw score.
        groups: feature groups to build (keys of :data:`FEATURE_GROUPS`).
        shared: :func:`row_features` of these rows, scorers and groups, computed once by the
            caller (the test rows are featurised once per fold model); None: computed here.

    Returns:
        (float64 DataFrame N x F, feature -> monotone direction for the Task 1 ranker: +1 for a
        member's expected gain and each scorer (raw, z, rank), 0 otherwise).
    """
    qids = rows["query_id"].to_numpy()
    cols: dict[str, np.ndarray] = {}
    mono: dict[str, int] = {}
    for name, probs in member_probs:
        eg = expected_gain(probs)
        if "members" in groups:
            cols.update({f"{name}.p_{c}": probs[:, i] for i, c in enumerate("ESCI")})
            scaled = _scaled(f"{name}.eg", qids, eg)
            cols.update(scaled)
            mono.update(dict.fromkeys(scaled, 1))
        if "group" in groups:
            cols.update(_group_stats(qids, probs[:, 0], f"{name}.p_E"))
            cols.update(_group_stats(qids, eg, f"{name}.eg"))
    row_cols, row_mono = shared if shared is not None else row_features(rows, scorer_scores, groups)
    cols.update(row_cols)
    mono.update(row_mono)
    X = pd.DataFrame(cols, index=rows.index).astype(np.float64)
    return X, {c: mono.get(c, 0) for c in X.columns}


# ------------------------------------------------------------------------------------- models
def _lgb_params(cfg: StackConfig, objective: str, seed: int, max_group: int) -> dict[str, Any]:
    p = {
        "objective": objective,
        "num_leaves": cfg.num_leaves,
        "learning_rate": cfg.learning_rate,
        "min_data_in_leaf": cfg.min_child_samples,
        "lambda_l2": cfg.reg_lambda,
        "feature_fraction": cfg.feature_fraction,
        "bagging_fraction": cfg.bagging_fraction,
        "bagging_freq": 1 if cfg.bagging_fraction < 1 else 0,
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": cfg.num_threads,
        "verbose": -1,
    }
    if objective == "lambdarank":
        p.update(label_gain=LABEL_GAIN, lambdarank_truncation_level=max_group, metric="ndcg", eval_at=[max_group])
    elif objective == "multiclass":
        p.update(num_class=4, metric="multi_logloss")
    else:
        p.update(metric="binary_logloss")
    return p


def _targets(labels: np.ndarray, kind: str) -> np.ndarray:
    if kind == "rank":
        return np.array([RANK_GRADE[v] for v in labels])
    if kind == "esci":
        return np.array([LABEL_INDEX[v] for v in labels])
    return (labels == "S").astype(int)


def _dataset(X: pd.DataFrame, y: np.ndarray, qids: np.ndarray, kind: str, init: np.ndarray | None = None):
    """A lightgbm Dataset (``init``: the base margin boosting starts from); for the ranker, rows
    sorted by query with group sizes."""
    import lightgbm as lgb

    if kind != "rank":
        return lgb.Dataset(X, y, init_score=init, free_raw_data=False)
    order = np.argsort(qids, kind="stable")
    _, sizes = np.unique(qids[order], return_counts=True)
    return lgb.Dataset(
        X.iloc[order], y[order], group=sizes, init_score=None if init is None else init[order], free_raw_data=False
    )


def query_blocks(qids: np.ndarray, sizes: tuple[int, ...], seed: int) -> np.ndarray:
    """Consecutive blocks of whole queries in a random (seeded) order: block 0 holds the first
    queries whose rows add up to at most ``sizes[0]``, block 1 the next ones up to ``sizes[1]``
    more rows, and so on; the rest are in no block.

    Args:
        qids: (N,) query of each row; sizes: the most rows of each block (each >= 1);
        seed: numpy Generator seed of the query order.

    Returns:
        (N,) int8: the block of each row (-1: none). Every row of a query is in the same block;
        block 0 always holds at least 2 queries when there are 2 (even above ``sizes[0]`` rows).
    """
    uq, inv, counts = np.unique(qids, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uq))
    ends = np.cumsum(sizes)
    block = np.searchsorted(ends, np.cumsum(counts[order]), side="left")
    block[: min(2, len(uq))] = 0
    block[block >= len(sizes)] = -1
    by_query = np.empty(len(uq), dtype=np.int8)
    by_query[order] = block
    return by_query[inv.reshape(-1)]


@dataclass
class FittedStacker:
    """One fold's models for one task: the boosters of every seed (their outputs are averaged)."""

    kind: str
    boosters: list[Any]
    features: list[str]
    best_iterations: list[int]

    def predict(self, X: pd.DataFrame, init: np.ndarray | None = None) -> np.ndarray:
        """(N,) ranker score / P(substitute), or (N, 4) class probabilities; seeds averaged.
        ``init``: (N,) the base margin of these rows (a ranker fitted from a base, see :func:`fit_stacker`)."""
        raw = init is not None and self.kind != "rank"  # a classifier from a base: add margins, then link
        data = X[self.features]  # LightGBM predicts on every core by default (measured: 2 threads here)
        outs = [b.predict(data, num_iteration=it, raw_score=raw) for b, it in zip(self.boosters, self.best_iterations)]
        out = np.mean(outs, axis=0)
        if init is None:
            return out
        if self.kind == "esci":  # softmax of margins + base log-probabilities
            return softmax(out + init, axis=1)
        if self.kind == "substitute":
            return expit(out + init)
        return out + init

    def gain(self) -> pd.Series:
        """Total split gain per feature, summed over the seeds."""
        g = sum(pd.Series(b.feature_importance("gain"), index=self.features) for b in self.boosters)
        return g.astype(np.float64)


def fit_stacker(
    X: pd.DataFrame,
    labels: np.ndarray,
    qids: np.ndarray,
    kind: str,
    cfg: StackConfig,
    mono: dict[str, int],
    seed: int,
    init: np.ndarray | None = None,
) -> FittedStacker:
    """Fit one task's LightGBM on the given (training-fold) rows.

    Args:
        X: (N, F) features; labels: (N,) E/S/C/I; qids: (N,) query of each row.
        kind: ``rank`` (LambdaRank, official gains), ``esci`` (4-class), ``substitute`` (binary).
        cfg: the stack settings; mono: feature -> monotone direction (used for ``rank`` when
            ``cfg.monotone``).
        init: base margin boosting starts from (LightGBM ``init_score``), or None: (N,) for ``rank``
            and ``substitute`` (log-odds), (N, 4) log-probabilities for ``esci``; predictions must then
            be given the rows' own base (:meth:`FittedStacker.predict`).

    With ``cfg.early_stopping_rounds`` > 0 a share ``cfg.inner_fraction`` of the queries of these
    rows is held out to pick the number of rounds, then the model is refitted on all rows with that
    many rounds. Each of ``cfg.seeds`` seeds gives one booster.

    At scale (more than ``cfg.max_fit_rows`` rows, e.g. the full release's ~2M OOF rows) each seed
    fits on its own draw of whole queries holding at most ``cfg.max_fit_rows`` rows
    (:func:`query_blocks`), and stops early on the next ``cfg.inner_fraction`` x that many rows of
    other queries; that booster is kept as it is (no refit: it already saw ``max_fit_rows`` rows),
    which halves the boosting work. There ``cfg.seeds_at_scale`` seeds are fitted, each on its own
    draw (default 1: on the synthetic 1/10 release 3 seeds made the stack 2.6x slower for a CV
    nDCG of 0.98529 against 0.98528; the README has the figures).

    Raises:
        WorkbenchError: fewer than 2 queries to fit on.
    """
    import lightgbm as lgb

    objective = {"rank": "lambdarank", "esci": "multiclass", "substitute": "binary"}[kind]
    uq = np.unique(qids)
    if len(uq) < 2:
        raise WorkbenchError(f"stack: {len(uq)} query to fit the {kind} model on; need at least 2")
    y = _targets(labels, kind)
    max_group = int(pd.Series(qids).value_counts().max())
    capped = len(qids) > cfg.max_fit_rows
    stop_early = cfg.early_stopping_rounds > 0 and len(uq) >= 5

    def data(rows: np.ndarray):
        return _dataset(X[rows], y[rows], qids[rows], kind, None if init is None else init[rows])

    boosters, iters = [], []
    for s in range(cfg.seeds_at_scale if capped else cfg.seeds):
        params = _lgb_params(cfg, objective, seed + s, max_group)
        if kind == "rank" and cfg.monotone:
            params["monotone_constraints"] = [mono.get(c, 0) for c in X.columns]
            params["monotone_constraints_method"] = "advanced"
        if capped:  # a draw of queries to fit on, the next ones to stop on; no refit
            block = query_blocks(
                qids, (cfg.max_fit_rows, max(1, round(cfg.max_fit_rows * cfg.inner_fraction))), seed + s
            )
            stop = stop_early and bool((block == 1).any())
            booster = lgb.train(
                params,
                data(block == 0),
                cfg.n_estimators,
                valid_sets=[data(block == 1)] if stop else None,
                callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)] if stop else None,
            )
            n_rounds = (booster.best_iteration or cfg.n_estimators) if stop else cfg.n_estimators
            boosters.append(booster)
            iters.append(max(1, n_rounds))
            continue
        n_rounds = cfg.n_estimators
        if stop_early:
            rng = np.random.default_rng(seed + s)
            inner = rng.permutation(uq)[: max(1, round(len(uq) * cfg.inner_fraction))]
            va = np.isin(qids, inner)
            probe = lgb.train(
                params,
                data(~va),
                cfg.n_estimators,
                valid_sets=[data(va)],
                callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
            )
            n_rounds = max(1, probe.best_iteration or cfg.n_estimators)
        booster = lgb.train(params, _dataset(X, y, qids, kind, init), n_rounds)
        boosters.append(booster)
        iters.append(n_rounds)
    return FittedStacker(kind, boosters, list(X.columns), iters)


# ------------------------------------------------------------------------------------- the stack
@dataclass
class StackResult:
    """The stacker's output.

    Attributes:
        oof: OOF rows: example_id, query_id, product_id, esci_label, fold, p_E..p_I (Task 2 model),
            ce_score (their expected gain), score (Task 1 ranking), p_substitute (Task 3 model).
        test: the same for the test rows (fold -1), or None.
        cv: OOF figures: ndcg (score), ndcg_probs (expected gain), task2_f1, task3_f1, per fold.
        held_out: the same figures on the test rows when they carry labels, else {}.
        members: per member / scorer: OOF and held-out nDCG (the baselines next to the stacker).
        importance: feature gain per task (columns task, feature, gain, share).
        rounds: boosting rounds per (task, fold) (seed mean); ``base_weights``: fold -> the Task 1 base blend.
        seconds: wall time of the fits.
        scorer_oof: scorer -> (N_oof,) its raw OOF scores (row order of ``oof``).
    """

    oof: pd.DataFrame
    test: pd.DataFrame | None
    cv: dict[str, Any]
    held_out: dict[str, Any]
    members: dict[str, dict[str, float]]
    importance: pd.DataFrame
    rounds: dict[str, Any]
    seconds: float
    scorer_oof: dict[str, np.ndarray] = field(default_factory=dict)


def _z_mean(qids: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    """Mean of several ranker outputs after per-query standardisation (their scales differ)."""
    return np.mean([standardize_per_query(qids, o) for o in outs], axis=0)


def _labelled(frame: pd.DataFrame | None) -> bool:
    return frame is not None and frame["esci_label"].isin(ESCI_LABELS).all()


def _figures(frame: pd.DataFrame) -> dict[str, float]:
    q, lab = frame["query_id"].to_numpy(), frame["esci_label"].to_numpy()
    pred = argmax_labels(frame)
    return {
        "ndcg": mean_ndcg(q, frame["score"].to_numpy(), lab),
        "ndcg_probs": mean_ndcg(q, frame["ce_score"].to_numpy(), lab),
        "task2_f1": micro_f1_task2(lab, pred),
        "task3_f1": micro_f1_task3(lab == "S", frame["p_substitute"].to_numpy() >= 0.5),
        "majority_f1": float((lab == pd.Series(lab).mode()[0]).mean()),
    }


def _member_baselines(data: StackData) -> dict[str, dict[str, float]]:
    """OOF and held-out nDCG of each member's expected gain and each scorer (the rows the stack scores)."""
    q, lab = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy()
    out: dict[str, dict[str, float]] = {}
    labelled = _labelled(data.test)
    for m in data.members:
        out[m.name] = {"run": m.run_id, "oof_ndcg": mean_ndcg(q, expected_gain(m.oof), lab)}
        if labelled and m.test is not None:
            tq, tl = data.test["query_id"].to_numpy(), data.test["esci_label"].to_numpy()
            out[m.name]["held_out_ndcg"] = mean_ndcg(tq, expected_gain(m.test), tl)
            out[m.name]["held_out_ndcg_single_fold"] = float(
                np.mean([mean_ndcg(tq, expected_gain(p), tl) for p in m.test_by_fold.values()])
            )
    for sc, (o, t) in data.scorers.items():
        out[sc] = {"oof_ndcg": mean_ndcg(q, o, lab)}
        if labelled and t is not None:
            out[sc]["held_out_ndcg"] = mean_ndcg(
                data.test["query_id"].to_numpy(), t, data.test["esci_label"].to_numpy()
            )
    return out


def run_stack(
    data: StackData, cfg: StackConfig, seed: int = 0, progress: Callable[[str], None] | None = None
) -> StackResult:
    """Fit the stacker fold by fold and score the OOF and test rows.

    Args:
        data: :func:`load_stack_data` output.
        cfg: stack settings (feature groups, LightGBM parameters, test_features, base).
        seed: base seed of LightGBM.
        progress: called with a short message before each fold.

    Returns:
        StackResult; the OOF figures are out of fold (fold k scored by a stacker fitted on the
        other folds' rows), the test rows by the fold stackers (see the module notes).

    Raises:
        WorkbenchError: a single fold (nothing to fit fold k on), fewer than 2 queries to fit.
    """
    t0 = time.time()
    folds = data.folds
    if len(folds) < 2:
        raise WorkbenchError("stack: the member runs have one fold; the stacker needs at least 2")
    groups = list(cfg.features)
    X, mono = build_features(
        data.oof, [(m.name, m.oof) for m in data.members], {k: v[0] for k, v in data.scorers.items()}, groups
    )
    q, lab, fold = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy(), data.oof["fold"].to_numpy()
    kinds = _kinds(cfg)
    oof_out, test_outs, gains, rounds = _fit_folds(data, cfg, X, mono, seed, kinds, progress)
    if "esci" not in kinds:  # Task 2 not stacked: the members' mean probabilities
        oof_out["esci"] = np.mean([m.oof for m in data.members], axis=0)
        test_outs["esci"] = [np.mean([m.test for m in data.members], axis=0)] if data.test is not None else []
    if "substitute" not in kinds:  # Task 3 not stacked: P(S) of the Task 2 probabilities
        oof_out["substitute"] = oof_out["esci"][:, 1]
    if "rank" not in kinds:
        oof_out.pop("rank")
    bias = None
    if cfg.task2_bias and "esci" in kinds:
        cb = _class_base(data, cfg, "esci", folds[0])  # its OOF part does not depend on the fold
        oof_out["esci"], bias = _task2_bias(
            X, oof_out["esci"], lab, q, fold, folds, cfg, mono, seed, None if cb is None else cb[0]
        )
        rounds["task2_bias"] = {k: b.round(2).tolist() for k, b in bias.items()}
    oof = _assemble(data.oof, oof_out, cfg)
    test = None
    if data.test is not None:
        tq = data.test["query_id"].to_numpy()
        test_esci = np.mean(test_outs["esci"], axis=0)
        test_esci = test_esci if bias is None else prior_shift(test_esci, bias["all"])
        test_out = {
            "esci": test_esci,
            "substitute": np.mean(test_outs["substitute"], axis=0) if "substitute" in kinds else test_esci[:, 1],
        }
        if "rank" in kinds:
            test_out["rank"] = _z_mean(tq, test_outs["rank"])
        test = _assemble(data.test, test_out, cfg)
    cv = _figures(oof)
    cv["folds"] = {int(k): mean_ndcg(q[fold == k], oof["score"].to_numpy()[fold == k], lab[fold == k]) for k in folds}
    held_out = _figures(test) if _labelled(test) else {}
    scorer_oof = {k: v[0] for k, v in data.scorers.items()}
    return StackResult(
        oof, test, cv, held_out, _member_baselines(data), _importance(gains), rounds, time.time() - t0, scorer_oof
    )


def _test_features(data: StackData, cfg: StackConfig) -> dict[int | str, pd.DataFrame]:
    """The test rows' feature frames: one per fold (``test_features: per_fold``: fold k's members'
    test predictions) or one under ``"mean"``; {} without test rows. The member-independent
    features are built once and shared."""
    if data.test is None:
        return {}
    groups = list(cfg.features)
    t_scores = {k: v[1] for k, v in data.scorers.items()}
    shared = row_features(data.test, t_scores, groups)  # once: the same for every fold model

    def frame(preds: list[tuple[str, np.ndarray]]) -> pd.DataFrame:
        return build_features(data.test, preds, t_scores, groups, shared)[0]

    if cfg.test_features == "per_fold":
        return {k: frame([(m.name, m.test_by_fold[k]) for m in data.members]) for k in data.folds}
    return {"mean": frame([(m.name, m.test) for m in data.members])}


def _fit_folds(data: StackData, cfg: StackConfig, X: pd.DataFrame, mono, seed: int, kinds, progress):
    """Fold k's task models fitted on the other folds' rows, one after another, then fold k's OOF
    rows and the test rows predicted by them.

    The fits are not run in threads: LightGBM 4.7 crashed the process (SIGSEGV in an OpenMP thread)
    when one thread built a Dataset while another boosted (3 crashes in 10 runs of tests/test_stack.py).

    Returns:
        (kind -> OOF output (N,) or (N, 4), kind -> per-fold test outputs, kind -> summed feature
        gain, {kind: {fold: mean rounds}, "base_weights": {fold: the Task 1 base blend}}).
    """
    q, lab, fold = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy(), data.oof["fold"].to_numpy()
    test_X = _test_features(data, cfg)
    oof_out = {"rank": np.zeros(len(X)), "esci": np.zeros((len(X), 4)), "substitute": np.zeros(len(X))}
    test_outs: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    gains: dict[str, pd.Series] = {}
    rounds: dict[str, Any] = {t: {} for t in TASKS}
    base_weights: dict[int, dict[str, float]] = {}
    for k in data.folds:
        if progress:
            progress(f"stack: fold {k} (fitted on folds {[f for f in data.folds if f != k]})")
        tr, va = fold != k, fold == k
        tx = test_X.get(k, test_X.get("mean"))
        base = _base_margins(data, cfg, k, tr) if cfg.base == "blend" and "rank" in kinds else None
        if base is not None:
            base_weights[int(k)] = base[3]
        X_tr, X_va = X[tr], X[va]  # the fold's rows selected once, shared by its task models
        for kind in kinds:
            init = base if kind == "rank" else _class_base(data, cfg, kind, k)
            model = fit_stacker(X_tr, lab[tr], q[tr], kind, cfg, mono, seed, None if init is None else init[0][tr])
            oof_out[kind][va] = model.predict(X_va, None if init is None else init[0][va])
            rounds[kind][k] = float(np.mean(model.best_iterations))
            gains[kind] = gains.get(kind, 0) + model.gain()
            if tx is not None:
                test_outs[kind].append(model.predict(tx, None if init is None else init[1]))
    rounds["base_weights"] = base_weights
    return oof_out, test_outs, gains, rounds


def _importance(gains: dict[str, pd.Series]) -> pd.DataFrame:
    """Feature gain per task (columns task, feature, gain, share), largest first within a task."""
    return pd.concat(
        [
            pd.DataFrame(
                {"task": kind, "feature": g.index, "gain": g.to_numpy(), "share": (g / max(g.sum(), 1e-12)).to_numpy()}
            ).sort_values("gain", ascending=False)
            for kind, g in gains.items()
            if isinstance(g, pd.Series)
        ],
        ignore_index=True,
    )


def prior_shift(probs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``softmax(log p + b)``: (N, 4) probabilities with per-class log-prior offsets ``b`` (4,)
    (Saerens et al. 2002, prior adjustment); their argmax is :func:`core.scoring.ensemble.tune_task2_bias`'s rule."""
    return softmax(np.log(np.clip(probs, 1e-12, None)) + bias, axis=1)


def _task2_bias(X, probs, labels, qids, fold, folds, cfg: StackConfig, mono, seed: int, base=None):
    """Task 2 prior shift tuned for micro-F1 (:func:`core.scoring.ensemble.tune_task2_bias`),
    nested so the CV figure stays out of fold: fold k's offsets are tuned on inner OOF
    probabilities of its training folds (each training fold j scored by a Task 2 model fitted on
    the folds other than k and j), never on anything fitted with fold k's labels. The test rows get
    the offsets tuned on all outer OOF probabilities (``bias["all"]``).

    Returns:
        (fold-wise shifted OOF probabilities (N, 4), {fold or "all": offsets (4,)}).
    """
    from core.scoring.ensemble import tune_task2_bias

    y = np.array([LABEL_INDEX[v] for v in labels])
    out, bias = probs.copy(), {}
    for k in folds:
        tr = fold != k
        inner = np.zeros((len(y), 4))
        for j in folds:
            fit = tr & (fold != j)
            if j == k or not fit.any():
                continue
            model = fit_stacker(
                X[fit], labels[fit], qids[fit], "esci", cfg, mono, seed, None if base is None else base[fit]
            )
            inner[fold == j] = model.predict(X[fold == j], None if base is None else base[fold == j])
        b, _ = tune_task2_bias(inner[tr], y[tr])
        out[fold == k] = prior_shift(probs[fold == k], b)
        bias[int(k)] = b
    bias["all"] = tune_task2_bias(probs, y)[0]
    return out, bias


def _kinds(cfg: StackConfig) -> tuple[str, ...]:
    """The models to fit: ``rank`` for Task 1 (LambdaRank; with ``ranker: multiclass`` Task 1 sorts by
    the Task 2 model's expected gain), ``esci`` for Task 2, ``substitute`` for Task 3."""
    kinds = []
    if 1 in cfg.tasks and cfg.ranker == "lambdarank":
        kinds.append("rank")
    if 2 in cfg.tasks or (1 in cfg.tasks and cfg.ranker == "multiclass"):
        kinds.append("esci")
    if 3 in cfg.tasks:
        kinds.append("substitute")
    return tuple(kinds)


def _class_base(data: StackData, cfg: StackConfig, kind: str, k: int):
    """``stack.class_base: members``: the Task 2/3 models boost from the members' mean class
    probabilities (log p (N, 4) for ``esci``, the log-odds of P(S) (N,) for ``substitute``), so a
    model that finds nothing to add predicts what the cross-encoders predict rather than the class
    prior. Returns (OOF rows' base, test rows' base or None) or None (``class_base: none``)."""
    if cfg.class_base == "none" or kind not in ("esci", "substitute"):
        return None
    test_probs = None
    if data.test is not None:
        by = [m.test_by_fold[k] if cfg.test_features == "per_fold" else m.test for m in data.members]
        test_probs = np.mean(by, axis=0)

    def margin(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p) if kind == "esci" else np.log(p[:, 1]) - np.log1p(-p[:, 1])

    oof = margin(np.mean([m.oof for m in data.members], axis=0))
    return oof, None if test_probs is None else margin(test_probs)


def _base_margins(data: StackData, cfg: StackConfig, k: int, tr: np.ndarray):
    """The Task 1 base of fold k: Caruana weights (:func:`core.scoring.blend.fit_blend_weights`)
    over the per-query z-scores of each member's expected gain and each scorer, fitted on the
    training folds' rows ``tr`` only; returns (OOF margins (N_oof,), test margins (N_test,) or None,
    the weights, {candidate: weight})."""
    from core.scoring.blend import fit_blend_weights

    q, lab = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy()
    names, z_oof, z_test = [], [], []
    tq = data.test["query_id"].to_numpy() if data.test is not None else None
    for m in data.members:
        names.append(m.name)
        z_oof.append(standardize_per_query(q, expected_gain(m.oof)))
        if tq is not None:
            t = m.test_by_fold[k] if cfg.test_features == "per_fold" else m.test
            z_test.append(standardize_per_query(tq, expected_gain(t)))
    for sc, (o, t) in data.scorers.items():
        names.append(sc)
        z_oof.append(standardize_per_query(q, o))
        if tq is not None:
            z_test.append(standardize_per_query(tq, t))
    Z = np.column_stack(z_oof)
    w = fit_blend_weights(q[tr], lab[tr], Z[tr], resolution=10, method="caruana", fallback=cfg.base_fallback)
    test = np.column_stack(z_test) @ w * cfg.base_scale if z_test else None
    return Z @ w * cfg.base_scale, test, w, dict(zip(names, map(float, w)))


def _assemble(rows: pd.DataFrame, out: dict[str, np.ndarray], cfg: StackConfig) -> pd.DataFrame:
    """The prediction frame of a run: ids, labels, fold, p_E..p_I, ce_score, score, p_substitute."""
    frame = rows[["example_id", "query_id", "product_id", "esci_label", "fold"]].copy().reset_index(drop=True)
    probs = np.asarray(out["esci"], dtype=np.float64)
    frame[PROB_COLUMNS] = probs.astype(np.float32)
    frame["ce_score"] = expected_gain(probs)
    qids = frame["query_id"].to_numpy()
    score = out["rank"] if "rank" in out else frame["ce_score"].to_numpy()
    frame["score"] = standardize_per_query(qids, score)
    frame["p_substitute"] = np.asarray(out["substitute"], dtype=np.float64)
    return frame


# ------------------------------------------------------------------------------------- the run
def stack_run_config(data: StackData, cfg: StackConfig, name: str, output_dir: str, seed: int) -> dict[str, Any]:
    """The config dict saved with a stack run (``kind: stack``; data, members, stack settings)."""
    return {
        "kind": "stack",
        "name": name,
        "output_dir": output_dir,
        "data": {**data.data_config, "dir": data.data_dir, "task": data.task},  # max_queries, locales kept
        "model": {"name": "lightgbm-stack"},
        "train": {"folds": len(data.folds), "seed": seed},
        "members": [m.run_id for m in data.members],
        "stack": dataclasses.asdict(cfg),
    }


def record_stack(
    store,
    data: StackData,
    cfg: StackConfig,
    name: str = "stack",
    output_dir: str = "runs",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[str, StackResult]:
    """Fit the stacker and record it as a run in runs.db (``kind: stack``), like a training run.

    The run folder gets ``config.json``, ``oof.parquet``/``test.parquet`` (columns of
    :class:`StackResult`), ``feature_importance.csv`` and ``stack_report.json`` (figures, member
    baselines, rounds), each written atomically and recorded as an artifact; the metrics are the
    training run's names (``fold/final_ndcg``, ``cv/ndcg``, ``cv/final_ndcg``, ``cv/task2_f1``,
    ``cv/task3_f1``), so ``ensemble build``, ``submission``, compare and the app read it as they read a
    training run. Everything that can be refused is checked by :func:`load_stack_data` before this.

    Returns:
        (run id, StackResult).

    Raises:
        WorkbenchError: a file cannot be written (the run is marked failed); RunStopped on SIGTERM.
    """
    from core.runs import metric_names as mn
    from core.runs.lifecycle import atomic_write, claim_run, mark_running, recorded_run, setup_file_log

    config = stack_run_config(data, cfg, name, output_dir, seed)
    run_id, run_dir = claim_run(store, name, config, output_dir)
    handler = setup_file_log(run_dir)
    mark_running(
        store, run_id, run_dir, config=json.dumps(config, sort_keys=True), model="lightgbm-stack", task=data.task
    )
    with recorded_run(store, run_id, handler):
        atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))
        res = run_stack(data, cfg, seed, progress)
        files = {"oof": ("oof.parquet", res.oof), "test": ("test.parquet", res.test)}
        for kind, (fname, frame) in files.items():
            if frame is not None:
                atomic_write(run_dir / fname, lambda p, f=frame: f.to_parquet(p, index=False))
                store.add_artifact(run_id, kind, run_dir / fname)
        atomic_write(run_dir / "feature_importance.csv", lambda p: res.importance.to_csv(p, index=False))
        store.add_artifact(run_id, "feature_importance", run_dir / "feature_importance.csv")
        report = {
            "cv": res.cv,
            "held_out": res.held_out,
            "members": res.members,
            "rounds": res.rounds,
            "seconds": res.seconds,
        }
        atomic_write(run_dir / "stack_report.json", lambda p: p.write_text(json.dumps(report, indent=1, default=float)))
        store.add_artifact(run_id, "stack_report", run_dir / "stack_report.json")
        rows = [{"name": mn.FOLD_FINAL_NDCG, "value": v, "fold": k} for k, v in res.cv["folds"].items()]
        rows += [{"name": mn.FOLD_DONE, "value": 1.0, "fold": k} for k in res.cv["folds"]]
        rows += [{"name": mn.cv_name(short), "value": res.cv[key], "fold": -1} for short, key in CV_METRICS.items()]
        store.log_metrics(run_id, rows)
        log.info(
            "stack %s: CV final nDCG %.4f, Task 2 F1 %.4f (%.1f s)",
            run_id,
            res.cv["ndcg"],
            res.cv["task2_f1"],
            res.seconds,
        )
    return run_id, res


def scores_dir(cfg) -> Path:
    """Where a training config's scorer cache lives: ``scores/`` beside its token cache
    (``text.cache_dir``), shared by its blend members and its stacker."""
    return Path(cfg.text.cache_dir).parent / "scores"


def stack_after_training(store, run_id: str, cfg) -> tuple[str, StackResult]:
    """The stacker of a training config with ``stack.enabled``: fitted on that run alone (its OOF
    probabilities as the member) with ``stack.scorers``, recorded as run ``<name>-stack``.

    Args:
        store: runs.db; run_id: the finished training run; cfg: its :class:`core.config.RunConfig`.

    Raises:
        WorkbenchError, DataError: as :func:`load_stack_data` and :func:`record_stack`.
    """
    data = load_stack_data(store, [run_id], list(cfg.stack.scorers), scores_dir(cfg))
    return record_stack(
        store, data, cfg.stack, name=f"{cfg.name}-stack", output_dir=cfg.output_dir, seed=cfg.train.seed
    )
