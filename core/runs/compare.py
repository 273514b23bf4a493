"""Comparing runs: best value per metric with the per-fold spread, config diffs, curves, and the
differences of per-query OOF metrics with their paired bootstrap interval.

The services behind ``workbench runs compare`` and the app's Compare screen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.runs import metric_names as mn
from core.runs.store import RunStore
from core.scoring.significance import DEFAULT_RESAMPLES, DEFAULT_SEED, PairedDiff

#: (label, per-fold metric, short name of the best value (:meth:`RunStore.best_values`) or None)
COMPARE_METRICS = [
    ("CV nDCG", mn.FOLD_NDCG, mn.NDCG),
    ("final nDCG", mn.FOLD_FINAL_NDCG, mn.FINAL_NDCG),
    ("Task 2 F1", mn.FOLD_TASK2_F1, mn.TASK2_F1),
    ("Task 3 F1", mn.FOLD_TASK3_F1, mn.TASK3_F1),
    ("fold seconds", mn.FOLD_SECONDS, None),
]

#: metrics a curve can show (per fold, by step)
CURVE_METRICS = [
    mn.TRAIN_LOSS,
    mn.EVAL_NDCG,
    mn.EVAL_TASK2_F1,
    mn.EVAL_TASK3_F1,
    mn.TRAIN_LR,
    mn.EVAL_LOSS,
    mn.TRAIN_SAMPLES_PER_S,
    mn.TRAIN_GRAD_NORM,
]


def metric_summary(store: RunStore, run_id: str) -> dict[str, dict[str, float | None]]:
    """Per comparable metric of one run: ``best`` and the per-fold ``mean``, ``std``, ``min``,
    ``max``, ``n`` (folds).

    ``best`` is :meth:`RunStore.best_values` (the run-level CV value when logged, else the mean
    over folds of each fold's best eval value so far: never the last value); for fold seconds the
    mean over folds. The spread is over the finished folds' best checkpoints (``fold/*``), std
    with ddof = 0.

    Returns:
        {label: {"best", "mean", "std", "min", "max", "n"}} (None where unknown).
    """
    rows = store.metrics(run_id, [fold for _, fold, _ in COMPARE_METRICS])
    bests = store.best_values([run_id], [short for _, _, short in COMPARE_METRICS if short]).get(run_id, {})
    out: dict[str, dict[str, float | None]] = {}
    for label, fold_name, short in COMPARE_METRICS:
        per_fold = {m["fold"]: m["value"] for m in rows if m["name"] == fold_name and m["fold"] >= 0}
        vals = np.array(list(per_fold.values()), dtype=float)
        best = bests.get(short) if short else (float(vals.mean()) if len(vals) else None)
        out[label] = {
            "best": best,
            "mean": float(vals.mean()) if len(vals) else None,
            "std": float(vals.std()) if len(vals) else None,
            "min": float(vals.min()) if len(vals) else None,
            "max": float(vals.max()) if len(vals) else None,
            "n": float(len(vals)),
        }
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = object()


def config_diff(
    configs: dict[str, dict[str, Any]], ignore: Sequence[str] = ("output_dir",)
) -> list[tuple[str, dict[str, Any]]]:
    """Only the config keys whose values differ between runs.

    Args:
        configs: run id -> nested config dict.
        ignore: dotted keys never shown (paths that always differ).

    Returns:
        [(dotted key, {run id: value or None if absent})], sorted by key; empty when all agree.
    """
    flat = {rid: flatten(c) for rid, c in configs.items()}
    keys = sorted(set().union(*[f.keys() for f in flat.values()])) if flat else []
    out = []
    for key in keys:
        if key in ignore:
            continue
        vals = {rid: f.get(key, _MISSING) for rid, f in flat.items()}
        if (
            len(
                {
                    json.dumps(v, sort_keys=True, default=str) if v is not _MISSING else "\0missing"
                    for v in vals.values()
                }
            )
            > 1
        ):
            out.append((key, {rid: (None if v is _MISSING else v) for rid, v in vals.items()}))
    return out


def run_configs(store: RunStore, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """run id -> its stored config dict (``{}`` when none), with today's defaults filled in
    (through :func:`core.config.config_from_dict`) so that a section added since an older run
    does not show up as a difference; a config that no longer validates is compared as stored."""
    from core.config import config_from_dict

    out = {}
    for rid in run_ids:
        raw = store.get_record(rid).config
        try:
            out[rid] = config_from_dict(raw).to_dict() if raw else {}
        except Exception:  # noqa: BLE001 - ConfigError and friends: compare what is stored
            out[rid] = raw
    return out


def curve(store: RunStore, run_id: str, name: str) -> list[tuple[float, float, int]]:
    """One metric's curve over the whole run: [(x, value, fold)], x = the global position in
    epochs (fold k's epoch e is plotted at ``k * epochs + e``) so folds follow each other."""
    rows = store.metrics(run_id, [name])
    epochs = store.get_record(run_id).epochs
    out = []
    for m in rows:
        if m["fold"] < 0:
            continue
        ep = m["epoch"] if m["epoch"] is not None else 0.0
        out.append((m["fold"] * epochs + ep, m["value"], m["fold"]))
    return out


# --------------------------------------------------------------------------- OOF differences
#: (key, label) of the differences :func:`oof_deltas` computes, in the order they are shown
OOF_DELTAS = [("ndcg", "Δ nDCG"), ("ce_ndcg", "Δ CE nDCG"), ("task2_f1", "Δ Task 2 F1")]


@dataclass
class QueryMetrics:
    """One run's per-query OOF metrics, read once from its ``oof.parquet`` (:func:`query_metrics`).

    Attributes:
        run_id: the run.
        ndcg: Task 1 nDCG per query of the final ranking ``score`` (Series indexed by query_id).
        ce_ndcg: the same for the cross-encoder's ``ce_score``; None when the file has no such column.
        task2: per query ``correct`` (argmax of p_E..p_I equals esci_label) and ``n`` (examples).
    """

    run_id: str
    ndcg: pd.Series
    ce_ndcg: pd.Series | None
    task2: pd.DataFrame


def query_metrics(store: RunStore, run_id: str) -> QueryMetrics:
    """Read a run's ``oof.parquet`` and reduce it to per-query metrics (nDCG of ``score`` and of
    ``ce_score``, Task 2 correct/total); the file is read once, the rest is cheap to compare.

    Raises:
        WorkbenchError: unknown run. DataError: the OOF file is missing or malformed, unknown labels.
    """
    from core.cleaning.labels import read_oof
    from core.scoring.metrics import ndcg_per_query
    from core.scoring.significance import query_correct

    run, oof = read_oof(store, run_id)
    q, labels = oof["query_id"].to_numpy(), oof["esci_label"].to_numpy()
    ce = ndcg_per_query(q, oof["ce_score"].to_numpy(), labels) if "ce_score" in oof.columns else None
    return QueryMetrics(run["id"], ndcg_per_query(q, oof["score"].to_numpy(), labels), ce, query_correct(oof, 2))


def oof_deltas(
    base: QueryMetrics, other: QueryMetrics, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, PairedDiff | None]:
    """``other - base`` on the queries both OOF files have, each with its paired bootstrap interval.

    Keys of :data:`OOF_DELTAS`: ``ndcg`` (mean per-query nDCG of the final ``score``), ``ce_ndcg``
    (of ``ce_score``; None when a run has none), ``task2_f1`` (micro-F1 of the argmax over the
    examples of the common queries). Intervals: :func:`core.scoring.significance.paired_bootstrap`
    and :func:`~core.scoring.significance.paired_bootstrap_ratio`, resampling queries (Efron &
    Tibshirani 1993), ``n_resamples`` draws with ``seed`` (the same draws for every metric).

    Raises:
        WorkbenchError: the two runs share no query (one line).
    """
    from core.scoring.significance import common_queries, paired_bootstrap, paired_bootstrap_ratio

    q = common_queries(base.ndcg, other.ndcg, f"runs {base.run_id} and {other.run_id}")
    kw = {"n_resamples": n_resamples, "seed": seed}
    out: dict[str, PairedDiff | None] = {
        "ndcg": paired_bootstrap(base.ndcg.loc[q].to_numpy(), other.ndcg.loc[q].to_numpy(), **kw),
        "ce_ndcg": None,
    }
    if base.ce_ndcg is not None and other.ce_ndcg is not None:
        out["ce_ndcg"] = paired_bootstrap(base.ce_ndcg.loc[q].to_numpy(), other.ce_ndcg.loc[q].to_numpy(), **kw)
    a, b = base.task2.loc[q], other.task2.loc[q]
    out["task2_f1"] = paired_bootstrap_ratio(
        a["correct"].to_numpy(), a["n"].to_numpy(), b["correct"].to_numpy(), b["n"].to_numpy(), **kw
    )
    return out


def compare_oof(
    store: RunStore, run_ids: Sequence[str], n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> list[dict[str, Any]]:
    """Every run after the first against the first (the baseline), on their OOF files.

    Returns:
        One dict per other run, in order: ``run_id``, ``name``, ``deltas`` (:func:`oof_deltas`);
        plus the baseline's ``base_id`` and ``base_name``.

    Raises:
        WorkbenchError: fewer than two runs, an unknown run, two runs sharing no query.
        DataError: an OOF file missing or malformed.
    """
    from core.errors import WorkbenchError

    if len(run_ids) < 2:
        raise WorkbenchError("runs compare: give at least two runs (the first is the baseline)")
    runs = [store.get_run(r) for r in run_ids]
    metrics = [query_metrics(store, r["id"]) for r in runs]
    return [
        {
            "base_id": runs[0]["id"],
            "base_name": runs[0]["name"],
            "run_id": run["id"],
            "name": run["name"],
            "deltas": oof_deltas(metrics[0], m, n_resamples, seed),
        }
        for run, m in zip(runs[1:], metrics[1:], strict=True)
    ]
