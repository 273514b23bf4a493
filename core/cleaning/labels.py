"""Label errors: confident learning on a run's OOF probabilities, a review log, export and apply.

ESCI labels come from crowd workers and are noisy. Confident learning (Northcutt, Jiang & Chuang,
"Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021; implemented by
``cleanlab``) estimates the joint of given and true labels from out-of-fold (OOF) probabilities
and flags the examples most likely mislabelled. The KDD Cup 2022 "MultiTask Pre-Training" seed
removed ~4% of the training data found this way.

Tables in runs.db (created, read and written by :class:`core.runs.store.RunStore`):

``label_issues(run_id, example_id, given_label, suggested_label, label_quality, rank)``
    the issues ``find_label_issues`` flagged for one run's OOF, ``rank`` 1 = most likely wrong;
    ``suggested_label`` = argmax of the OOF probabilities, ``label_quality`` in [0, 1]
    (``cleanlab.rank.get_label_quality_scores``, low = suspicious).
``label_decisions(id, example_id, decision, new_label, reviewer, time, source_run)``
    an append-only log. ``decision`` is ``keep``, ``relabel`` (``new_label`` set), ``accept``
    (relabel to the suggested label), ``drop`` or ``undo`` (cancels the latest still-active
    decision of the same example). Rows are never updated or deleted, so a review resumes where
    it stopped and the whole history stays auditable.

Test examples (``split == "test"``) are never dropped or relabelled by :func:`apply_to_training`
or :func:`export_cleaned`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import DEFAULT_DATA_DIR
from core.errors import ConfigError, DataError, WorkbenchError
from core.runs.store import LABEL_DECISION_COLUMNS, LABEL_ISSUE_COLUMNS, RunRecord, RunStore
from core.scoring.metrics import ESCI_LABELS

log = logging.getLogger("esci.labels")

#: decisions a reviewer can record (``undo`` cancels the latest active one of an example)
DECISIONS = ("keep", "relabel", "accept", "drop", "undo")
#: ``filter_by`` methods of ``cleanlab.filter.find_label_issues``
FILTER_BY = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
#: ranking methods (``return_indices_ranked_by`` and the label quality score method)
RANK_BY = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
_PROBS = ["p_E", "p_S", "p_C", "p_I"]


# --------------------------------------------------------------------------- find
def _run_config(store: RunStore, run: dict[str, Any]) -> dict[str, Any]:
    """The run's parsed config (WorkbenchError naming the database when unreadable)."""
    return RunRecord.from_row(run, store.path).config


def training_example_ids(data: dict[str, Any]) -> np.ndarray:
    """The ``example_id`` s a run trained on (``split == "train"`` under its data selection).

    Reads only the id/selection columns of the examples file (cheap even for the full release).

    Args:
        data: the run config's ``data`` section (``dir``, ``task``, ``locales``, ``max_queries``).

    Returns:
        int64 array of example ids, in file order.

    Raises:
        DataError: folder or examples file missing/unreadable, missing columns.
    """
    from core.data.esci import find_dataset_files

    files = find_dataset_files(data.get("dir", DEFAULT_DATA_DIR))
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = ["example_id", "query_id", "split", "small_version", "large_version", "product_locale"]
    try:
        if files.examples.suffix == ".parquet":
            tab = pq.read_table(files.examples, columns=cols)
        else:
            tab = pa.Table.from_pandas(pd.read_csv(files.examples, usecols=cols), preserve_index=False)
    except Exception as exc:  # noqa: BLE001 - pyarrow/pandas raise many types
        raise DataError(files.examples, f"cannot read ids: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    # string columns stay in Arrow (converting 2.6M strings to Python objects costs seconds)
    keep = pc.equal(tab["split"], "train")
    task = data.get("task")
    if task == 1:
        keep = pc.and_(keep, pc.equal(tab["small_version"], 1))
    elif task in (2, 3):
        keep = pc.and_(keep, pc.equal(tab["large_version"], 1))
    if data.get("locales"):
        keep = pc.and_(keep, pc.is_in(tab["product_locale"], value_set=pa.array([str(x) for x in data["locales"]])))
    tab = tab.filter(keep)
    ex = pd.DataFrame({"example_id": tab["example_id"].to_numpy(), "query_id": tab["query_id"].to_numpy()})
    if data.get("max_queries"):
        first = set(pd.unique(ex["query_id"])[: data["max_queries"]])
        ex = ex[ex["query_id"].isin(first)]
    return ex["example_id"].to_numpy(np.int64)


def read_oof(store: RunStore, run_id: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """A run's row and its ``oof.parquet`` (see :func:`core.scoring.report.read_predictions`).

    Raises:
        WorkbenchError: unknown run. DataError: the OOF file is missing or malformed.
    """
    from core.scoring.report import read_predictions

    run = store.get_run(run_id)
    oof_path = next((a["path"] for a in reversed(store.artifacts(run["id"])) if a["kind"] == "oof"), None)
    if oof_path is None:
        oof_path = str((store.run_dir(run) or store.resolve_path(Path("runs") / run["id"])) / "oof.parquet")
    return run, read_predictions(oof_path)


@dataclass
class FindResult:
    """What :func:`find_issues` stored. ``issues``: one row per flagged example, ranked
    (columns of the ``label_issues`` table); ``n_examples``: OOF rows examined;
    ``crosstab``: given (rows) x suggested (columns) counts over the issues, E/S/C/I order."""

    run_id: str
    issues: pd.DataFrame
    n_examples: int
    crosstab: pd.DataFrame

    @property
    def share(self) -> float:
        """Fraction of the examined examples flagged (0..1)."""
        return len(self.issues) / max(self.n_examples, 1)


def find_issues_arrays(
    labels: np.ndarray,
    pred_probs: np.ndarray,
    filter_by: str = "prune_by_noise_rate",
    rank_by: str = "self_confidence",
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning on class indices and OOF probabilities.

    Args:
        labels: (N,) int class indices 0..3 (E, S, C, I).
        pred_probs: (N, 4) OOF probabilities, rows summing to 1.
        filter_by: ``cleanlab.filter.find_label_issues`` ``filter_by`` (see :data:`FILTER_BY`).
        rank_by: ranking method for both the issue order and the quality score (:data:`RANK_BY`).
        n_jobs: cleanlab's worker processes (None = its default).

    Returns:
        ``(issue_indices ranked most-suspicious first, label_quality (N,) in [0, 1])``.

    Raises:
        ConfigError: unknown ``filter_by`` / ``rank_by``.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if filter_by not in FILTER_BY:
        raise ConfigError(f"filter_by {filter_by!r}: not one of {list(FILTER_BY)}")
    if rank_by not in RANK_BY:
        raise ConfigError(f"rank_by {rank_by!r}: not one of {list(RANK_BY)}")
    if n_jobs is None and threading.active_count() > 1:
        # cleanlab's workers are forked; a fork of a process with other threads (the app's workers)
        # can copy a held lock and hang for ever (seen once in the suite): one process then
        n_jobs = 1
    idx = find_label_issues(labels, pred_probs, filter_by=filter_by, return_indices_ranked_by=rank_by, n_jobs=n_jobs)
    quality = get_label_quality_scores(labels, pred_probs, method=rank_by)
    return np.asarray(idx, dtype=np.int64), np.asarray(quality, dtype=np.float64)


def find_issues(
    store: RunStore,
    run_id: str,
    filter_by: str = "prune_by_noise_rate",
    rank_by: str = "self_confidence",
    n_jobs: int | None = None,
    check_coverage: bool = True,
    progress: Callable[[str], None] | None = None,
) -> FindResult:
    """Find label issues in a run's OOF probabilities and store them in ``label_issues``.

    Replaces the run's previous issues (one transaction). Source: confident learning
    (Northcutt et al., JAIR 2021) via ``cleanlab.filter.find_label_issues`` and
    ``cleanlab.rank.get_label_quality_scores``.

    Args:
        store: a writable RunStore.
        run_id: the run (a unique prefix works) whose ``oof.parquet`` holds p_E..p_I for
            every training example.
        filter_by, rank_by, n_jobs: see :func:`find_issues_arrays`.
        check_coverage: refuse when a training example of the run's data selection has no OOF
            probabilities (reads the examples file named by the run's config).
        progress: called with a short message before each stage.

    Returns:
        FindResult.

    Raises:
        WorkbenchError: unknown run; training examples without OOF probabilities (the message
            counts them and names the first ids). DataError: OOF file missing/malformed, NaN or
            non-probability rows, unknown labels. ConfigError: bad method names.
    """
    say = progress or (lambda s: None)
    say("reading OOF probabilities")
    run, oof = read_oof(store, run_id)
    run_id = run["id"]
    where = f"run {run_id} oof.parquet"
    if check_coverage:
        say("checking every training example has OOF probabilities")
        train_ids = training_example_ids(_run_config(store, run).get("data", {}))
        # np.isin picks a lookup table when the id range allows (O(n)); setdiff1d sorts (10x slower)
        missing = train_ids[~np.isin(train_ids, oof["example_id"].to_numpy(np.int64))]
        if len(missing):
            raise WorkbenchError(
                f"{where}: {len(missing):,} of {len(train_ids):,} training examples have no OOF probabilities "
                f"(first {missing[:5].tolist()}); train all folds before finding label issues"
            )
    probs = oof[_PROBS].to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(1)
    if bad.any():
        raise DataError(
            where,
            f"{int(bad.sum()):,} rows with missing OOF probabilities "
            f"(first example_id {oof.loc[bad, 'example_id'].head(3).tolist()})",
        )
    cat = pd.Categorical(oof["esci_label"])  # fast on millions of rows; then categories -> 0..3, unknown -> -1
    to_index = np.array([ESCI_LABELS.index(c) if c in ESCI_LABELS else -1 for c in cat.categories] + [-1])
    labels = to_index[cat.codes].astype(np.int64)  # code -1 (null) picks the trailing -1
    if (labels < 0).any():
        bad_labels = oof.loc[labels < 0, "esci_label"].astype(str).unique()[:5].tolist()
        raise DataError(where, f"unknown esci_label values {bad_labels}")
    probs = probs / probs.sum(1, keepdims=True)  # float32 rounding -> exact row sums for cleanlab

    say(f"confident learning on {len(oof):,} x 4 OOF probabilities")
    idx, quality = find_issues_arrays(labels, probs, filter_by, rank_by, n_jobs)
    suggested = np.asarray(ESCI_LABELS)[probs[idx].argmax(1)]
    issues = pd.DataFrame(
        {
            "run_id": run_id,
            "example_id": oof["example_id"].to_numpy(np.int64)[idx],
            "given_label": np.asarray(ESCI_LABELS)[labels[idx]],
            "suggested_label": suggested,
            "label_quality": quality[idx],
            "rank": np.arange(1, len(idx) + 1, dtype=np.int64),
        }
    )
    say(f"storing {len(issues):,} issues")
    store_issues(store, run_id, issues)
    crosstab = pd.crosstab(
        pd.Categorical(issues["given_label"], ESCI_LABELS),
        pd.Categorical(issues["suggested_label"], ESCI_LABELS),
        rownames=["given"],
        colnames=["suggested"],
        dropna=False,
    )
    return FindResult(run_id, issues, len(oof), crosstab)


def store_issues(store: RunStore, run_id: str, issues: pd.DataFrame) -> None:
    """Replace ``run_id``'s rows of ``label_issues`` with ``issues`` in one transaction."""
    store.replace_label_issues(run_id, zip(*(issues[c].tolist() for c in LABEL_ISSUE_COLUMNS)))


def load_issues(store: RunStore, run_id: str) -> pd.DataFrame:
    """The stored issues of a run, ranked (rank 1 first); empty frame if none.

    Raises:
        WorkbenchError: unknown run.
    """
    run_id = store.get_run(run_id)["id"]
    return pd.DataFrame(store.label_issues(run_id), columns=list(LABEL_ISSUE_COLUMNS))


# --------------------------------------------------------------------------- decisions
def record_decision(
    store: RunStore,
    source_run: str,
    example_id: int,
    decision: str,
    new_label: str | None = None,
    reviewer: str | None = None,
) -> int:
    """Append one decision to ``label_decisions`` and return its id.

    Args:
        source_run: the run whose issues are being reviewed.
        decision: ``keep``, ``relabel`` (``new_label`` in E/S/C/I), ``accept`` (``new_label`` =
            the suggested label), ``drop`` or ``undo``.
        reviewer: defaults to ``$USER``.

    Raises:
        WorkbenchError: unknown decision, or a relabel/accept without a valid ``new_label``.
    """
    if decision not in DECISIONS:
        raise WorkbenchError(f"decision {decision!r}: not one of {list(DECISIONS)}")
    if decision in ("relabel", "accept") and new_label not in ESCI_LABELS:
        raise WorkbenchError(f"decision {decision}: new_label {new_label!r} is not one of {list(ESCI_LABELS)}")
    if decision not in ("relabel", "accept"):
        new_label = None
    return store.add_label_decision(
        source_run, int(example_id), decision, new_label, reviewer or os.environ.get("USER") or "unknown"
    )


def decision_log(store: RunStore, source_run: str | None = None) -> pd.DataFrame:
    """All ``label_decisions`` rows (of one source run, or all), in append order."""
    return pd.DataFrame(store.label_decisions(source_run), columns=list(LABEL_DECISION_COLUMNS))


def _replay(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Active decisions after replaying the log: ``undo`` pops the example's latest active one.

    Returns the active decision rows in the order they were made (latest last)."""
    return replay_decisions(rows.to_dict("records"))[1]


def effective_decisions(store: RunStore, source_run: str) -> pd.DataFrame:
    """The decision in force for each example reviewed from ``source_run``: the latest decision
    not cancelled by an ``undo``. Columns as ``label_decisions``, one row per example_id."""
    active = _replay(decision_log(store, source_run))
    df = pd.DataFrame(active, columns=["id", "example_id", "decision", "new_label", "reviewer", "time", "source_run"])
    return df.drop_duplicates("example_id", keep="last").reset_index(drop=True)


def last_active_decision(store: RunStore, source_run: str) -> dict[str, Any] | None:
    """The most recent decision that an ``undo`` would cancel (None if nothing to undo)."""
    active = _replay(decision_log(store, source_run))
    return active[-1] if active else None


def undo_last(store: RunStore, source_run: str, reviewer: str | None = None) -> dict[str, Any] | None:
    """Append an ``undo`` for the most recent active decision; returns the undone row or None."""
    last = last_active_decision(store, source_run)
    if last is not None:
        record_decision(store, source_run, last["example_id"], "undo", reviewer=reviewer)
    return last


# --------------------------------------------------------------------------- apply / export
@dataclass
class CleanPlan:
    """What to do with training rows: ``drop`` example ids and ``relabel`` {example_id: label}."""

    drop: set[int]
    relabel: dict[int, str]
    source: str


def cleaning_plan(
    store: RunStore,
    decisions_from: str | None = None,
    auto_drop_fraction: float = 0.0,
    issues_run: str | None = None,
    n_train: int | None = None,
) -> CleanPlan:
    """Combine reviewed decisions and an automatic drop of the top label issues.

    Args:
        decisions_from: apply the effective decisions recorded while reviewing this run's issues.
        auto_drop_fraction: drop the ``round(fraction * n_train)`` top-ranked issues of
            ``issues_run`` (at most all the issues found), without review, as the MultiTask
            Pre-Training seed (~4% of the data). 0 = off.
        issues_run: whose ``label_issues`` the automatic drop takes (default: ``decisions_from``).
        n_train: number of training examples the fraction refers to.

    Raises:
        ConfigError: fraction outside [0, 1); automatic drop without an issues run or with no
            stored issues; ``n_train`` missing.
        WorkbenchError: unknown run.
    """
    drop: set[int] = set()
    relabel: dict[int, str] = {}
    parts = []
    if decisions_from:
        rid = store.get_run(decisions_from)["id"]
        eff = effective_decisions(store, rid)
        for r in eff.itertuples():
            if r.decision == "drop":
                drop.add(int(r.example_id))
            elif r.decision in ("relabel", "accept"):
                relabel[int(r.example_id)] = str(r.new_label)
        parts.append(f"decisions of {rid}")
    if not 0.0 <= auto_drop_fraction < 1.0:
        raise ConfigError(f"labels.auto_drop_fraction: {auto_drop_fraction} is not in [0, 1)")
    if auto_drop_fraction > 0:
        src = issues_run or decisions_from
        if not src:
            raise ConfigError("labels.auto_drop_fraction > 0 needs labels.issues_run (a run with stored label issues)")
        if n_train is None:
            raise ConfigError("labels.auto_drop_fraction: number of training examples unknown")
        issues = load_issues(store, src)
        if issues.empty:
            raise ConfigError(f"labels.issues_run {src}: no label issues stored (run `workbench labels find {src}`)")
        n = min(int(round(auto_drop_fraction * n_train)), len(issues))
        drop |= set(issues["example_id"].head(n).astype(int).tolist())
        parts.append(f"top {n} issues of {issues['run_id'].iloc[0]}")
    return CleanPlan(drop, relabel, ", ".join(parts))


def apply_to_training(df: pd.DataFrame, labels_cfg: Any, store: RunStore | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Which rows of a training frame to fit on, and with which labels.

    Args:
        df: the loaded examples (``example_id``, ``split``, ``esci_label``), N rows.
        labels_cfg: the config's ``labels`` section (``decisions_from``, ``auto_drop_fraction``,
            ``issues_run``); all off leaves everything unchanged.
        store: runs.db holding the decisions / issues (needed only when a setting is on).

    Returns:
        ``(fit_mask (N,) bool, fit_labels (N,) str, summary)``: rows with ``fit_mask`` False are
        not trained on (they are still scored out-of-fold and evaluated on their original
        label); ``fit_labels`` are the training targets. Rows with ``split == "test"`` are never
        dropped or relabelled.

    Raises:
        ConfigError, WorkbenchError: see :func:`cleaning_plan`.
    """
    fit_mask = np.ones(len(df), dtype=bool)
    fit_labels = df["esci_label"].astype(str).to_numpy().copy()
    if labels_cfg is None or (not labels_cfg.decisions_from and not labels_cfg.auto_drop_fraction):
        return fit_mask, fit_labels, "labels: none dropped or relabelled"
    if store is None:
        raise ConfigError("labels: applying label decisions needs runs.db")
    is_train = (df["split"] == "train").to_numpy()
    plan = cleaning_plan(
        store, labels_cfg.decisions_from, labels_cfg.auto_drop_fraction, labels_cfg.issues_run, int(is_train.sum())
    )
    ids = df["example_id"].to_numpy(np.int64)
    drop = is_train & np.isin(ids, np.fromiter(plan.drop, np.int64, len(plan.drop)))
    fit_mask &= ~drop
    n_relabel = 0
    if plan.relabel:
        new = pd.Series(ids).map(plan.relabel).to_numpy(object)
        hit = is_train & ~drop & pd.notna(new) & (new != fit_labels)
        fit_labels[hit] = new[hit]
        n_relabel = int(hit.sum())
    summary = (
        f"labels ({plan.source}): dropped {int(drop.sum()):,} of {int(is_train.sum()):,} training examples, "
        f"relabelled {n_relabel:,}; dropped examples are still scored out-of-fold and evaluated on their "
        f"original labels; test examples untouched"
    )
    return fit_mask, fit_labels, summary


def export_cleaned(
    store: RunStore,
    out_dir: str | Path,
    data_dir: str | Path,
    decisions_from: str | None,
    auto_drop_fraction: float = 0.0,
    issues_run: str | None = None,
) -> dict[str, int]:
    """Write the cleaned release in the official layout into ``out_dir``.

    The examples file keeps every official column and row except dropped training examples;
    relabelled training examples get the new ``esci_label`` and every row an
    ``original_esci_label`` column. Products (and sources) are copied unchanged. Test examples
    are never dropped or relabelled. Written into a temporary folder next to ``out_dir`` and
    moved into place, so nothing is half-written.

    Returns:
        counts ``{"examples": rows written, "dropped": n, "relabelled": n}``.

    Raises:
        DataError: input files missing/unreadable; ``out_dir`` exists and is not empty.
        ConfigError, WorkbenchError: see :func:`cleaning_plan`.
    """
    from core.data.esci import find_dataset_files

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "output folder exists and is not empty")
    files = find_dataset_files(data_dir)
    try:
        ex = pd.read_parquet(files.examples) if files.examples.suffix == ".parquet" else pd.read_csv(files.examples)
    except Exception as exc:  # noqa: BLE001
        raise DataError(files.examples, f"cannot read: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    for c in ("example_id", "esci_label", "split"):
        if c not in ex.columns:
            raise DataError(files.examples, f"missing column {c}")
    is_train = (ex["split"] == "train").to_numpy()
    plan = cleaning_plan(store, decisions_from, auto_drop_fraction, issues_run, int(is_train.sum()))
    ids = ex["example_id"].to_numpy(np.int64)
    drop = is_train & np.isin(ids, np.fromiter(plan.drop, np.int64, len(plan.drop)))
    ex["original_esci_label"] = ex["esci_label"]
    new = pd.Series(ids).map(plan.relabel).to_numpy(object)
    hit = is_train & ~drop & pd.notna(new) & (new != ex["esci_label"].astype(str).to_numpy())
    labels = ex["esci_label"].astype(object).to_numpy().copy()
    labels[hit] = new[hit]
    ex["esci_label"] = labels.astype(str)
    ex = ex.loc[~drop].reset_index(drop=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ex.to_parquet(tmp / "shopping_queries_dataset_examples.parquet", index=False)
        for src in (files.products, files.sources):
            if src is not None:
                shutil.copyfile(src, tmp / src.name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"examples": len(ex), "dropped": int(drop.sum()), "relabelled": int(hit.sum())}


def runs_with_issues(store: RunStore) -> list[dict[str, Any]]:
    """Runs that have stored label issues, newest first: ``{run_id, n_issues, decided}``."""
    return store.runs_with_issues()


def default_issues_run(store: RunStore) -> str:
    """The newest run with stored label issues.

    Raises:
        WorkbenchError: no run has label issues yet.
    """
    runs = runs_with_issues(store)
    if not runs:
        raise WorkbenchError(f"{store.path}: no label issues stored yet (run `workbench labels find RUN` first)")
    return runs[0]["run_id"]


def compare_runs(
    store: RunStore, base_run: str, cleaned_run: str, n_resamples: int | None = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per-fold nDCG of two runs on the same examples and folds, on the *original* labels.

    The fair comparison of a run trained on cleaned labels: both runs' OOF predictions over all
    training examples (dropped ones included: they are scored out-of-fold), evaluated against the
    labels as released. Rows: ``(run, scorer)`` for the cross-encoder (``ce_score``; Task 2/3
    micro-F1 of the argmax) and the final ranking (``score``), plus ``diff`` rows (cleaned - base)
    for each scorer; columns ``fold0..``, ``cv_ndcg``, ``fold_std``, ``task2_f1``, ``task3_f1``
    (see :func:`core.scoring.report.scorer_table`).

    ``table.attrs["differences"]`` holds the cleaned - base differences over all OOF queries with
    their paired bootstrap 95% interval (:mod:`core.scoring.significance`: queries resampled
    ``n_resamples`` times with ``seed``, the same draws for both runs): keys ``("cross-encoder",
    "cv_ndcg")``, ``("final", "cv_ndcg")``, ``("cross-encoder", "task2_f1")``, ``("cross-encoder",
    "task3_f1")`` -> :class:`~core.scoring.significance.PairedDiff` (its ``diff`` equals the
    table's diff row); ``n_resamples=None`` skips them (empty dict).

    Raises:
        WorkbenchError: unknown run; the two OOF files differ in examples, labels or folds.
        DataError: an OOF file missing or malformed.
    """
    from core.scoring.report import argmax_labels, scorer_table

    rb, base = read_oof(store, base_run)
    rc, clean = read_oof(store, cleaned_run)
    base = base.sort_values("example_id").reset_index(drop=True)
    clean = clean.sort_values("example_id").reset_index(drop=True)
    for col in ("example_id", "esci_label", "fold"):
        if len(base) != len(clean) or not (base[col].to_numpy() == clean[col].to_numpy()).all():
            raise WorkbenchError(
                f"runs {rb['id']} and {rc['id']}: OOF files differ in {col} "
                "(compare runs on the same data, folds and original labels)"
            )
    tables = {}
    for name, oof in (("base", base), ("cleaned", clean)):
        t = scorer_table(
            oof,
            {"cross-encoder": "ce_score" if "ce_score" in oof else "score", "final": "score"},
            {"cross-encoder": argmax_labels(oof)},
        )
        tables[name] = t
    diff = tables["cleaned"] - tables["base"]
    diff["fold_std"] = diff[[c for c in diff.columns if c.startswith("fold") and c != "fold_std"]].std(axis=1, ddof=0)
    out = pd.concat(
        {f"base {rb['id']}": tables["base"], f"cleaned {rc['id']}": tables["cleaned"], "cleaned - base": diff}
    )
    out.attrs["differences"] = {}
    if n_resamples:
        from core.scoring.significance import f1_diff, ndcg_diff

        kw = {"n_resamples": n_resamples, "seed": seed, "what": f"runs {rb['id']} and {rc['id']}"}
        ce_b, ce_c = ("ce_score" if "ce_score" in oof else "score" for oof in (base, clean))
        out.attrs["differences"] = {
            ("cross-encoder", "cv_ndcg"): ndcg_diff(base, clean, ce_b, ce_c, **kw),
            ("final", "cv_ndcg"): ndcg_diff(base, clean, "score", **kw),
            ("cross-encoder", "task2_f1"): f1_diff(base, clean, 2, **kw),
            ("cross-encoder", "task3_f1"): f1_diff(base, clean, 3, **kw),
        }
    return out


# --------------------------------------------------------------------------- review (the app's label-review screen)
def replay_decisions(log: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Replay a decision log (rows of ``label_decisions``, oldest first): ``undo`` cancels the
    example's latest still-active decision.

    Returns:
        ``(in_force, active)``: example_id -> the decision in force for it, and the active
        decisions in the order they were made (latest last; an ``undo`` would cancel the last).
    """
    stacks: dict[int, list[dict[str, Any]]] = {}
    active: list[dict[str, Any]] = []
    for r in log:
        ex = int(r["example_id"])
        if r["decision"] == "undo":
            if stacks.get(ex):
                active.remove(stacks[ex].pop())
        else:
            stacks.setdefault(ex, []).append(r)
            active.append(r)
    return {ex: s[-1] for ex, s in stacks.items() if s}, active


def undo_target(log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The decision an ``undo`` appended to ``log`` would cancel (None if nothing to undo)."""
    active = replay_decisions(log)[1]
    return active[-1] if active else None


@dataclass
class ReviewData:
    """What the label-review screen shows for one run (:func:`load_review_data`).

    ``items``: one row per issue, ranked by label quality (lowest first): example_id,
    given_label, suggested_label, label_quality, rank, p_E..p_I, query, query_id,
    product_locale and the product text columns. ``query_labels``: query_id -> given-label
    counts over all of the query's examples. ``log``: the decision log of this source run
    (rows of ``label_decisions`` as dicts, oldest first).
    """

    run_id: str
    items: pd.DataFrame
    query_labels: dict[int, dict[str, int]]
    log: list[dict[str, Any]]


def load_review_data(db_path: str | Path, run_id: str) -> ReviewData:
    """A run's issues joined with its OOF probabilities and the examples' text, and its decision
    log, read through a read-only connection of its own (closed before returning).

    Raises:
        WorkbenchError: unknown run or no stored issues. DataError: OOF or data files.
    """
    from core.data.esci import load_esci

    store = RunStore(db_path, readonly=True)
    try:
        run, oof = read_oof(store, run_id)
        issues = load_issues(store, run["id"])
        if issues.empty:
            raise WorkbenchError(f"run {run['id']}: no label issues stored (run `workbench labels find {run['id']}`)")
        log = decision_log(store, run["id"]).to_dict("records")
    finally:
        store.close()
    data = _run_config(store, run).get("data", {})
    ex = load_esci(data.get("dir", DEFAULT_DATA_DIR), task=data.get("task"), locales=data.get("locales"))
    text_cols = [
        "example_id",
        "query",
        "query_id",
        "product_id",
        "product_locale",
        "product_title",
        "product_brand",
        "product_color",
        "product_bullet_point",
        "product_description",
    ]
    items = (
        issues.merge(oof[["example_id", *_PROBS]], on="example_id", how="left")
        .merge(ex[text_cols], on="example_id", how="left")
        .sort_values(["label_quality", "rank"], kind="stable")
        .reset_index(drop=True)
    )
    for c in text_cols[1:]:
        if c != "query_id":
            items[c] = items[c].fillna("").astype(str)
    in_q = ex[ex["query_id"].isin(set(items["query_id"].dropna().astype(int)))]
    query_labels: dict[int, dict[str, int]] = {}
    for (qid, lab), n in in_q.groupby(["query_id", "esci_label"]).size().items():
        query_labels.setdefault(int(qid), {})[str(lab)] = int(n)
    return ReviewData(run["id"], items, query_labels, log)
