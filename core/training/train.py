"""K-fold cross-encoder training on ESCI with OOF and test predictions.

Reads top to bottom like the transformers ``examples/`` scripts (:func:`run_training`):
validate the config and data -> claim the run -> label cleaning, query-grouped folds, tokens
(cached), side features -> for each fold :func:`core.training.fold_loop.train_fold` (or the fold's saved
result when a resumed run already finished it) -> OOF assembled from the folds' files -> blend
with baselines on OOF -> ``runs/<run_id>/oof.parquet``, ``test.parquet`` and CV metrics in runs.db.

Nothing finished is lost: each fold's predictions are on disk when the fold ends, step
checkpoints are written every ``train.checkpoint_every`` steps, and ``resume=True`` (``workbench
resume RUN``) continues a crashed, stopped, failed or partial run under its id.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from core.cleaning.labels import apply_to_training
from core.config import RunConfig, save_config
from core.data.augment import check_unchanged, load_translations
from core.data.esci import ESCI_LABELS
from core.data.folds import assign_folds
from core.data.text import encode_pairs_cached
from core.errors import WorkbenchError
from core.modeling.features import ngram_bags_cached, word2vec_bucket_init
from core.modeling.markers import add_marker_tokens
from core.modeling.model import load_tokenizer
from core.modeling.tricks import distill_targets, parse_class_weights, select_pseudo_labels
from core.runs import metric_names as mn
from core.runs.lifecycle import (
    RunStopped,
    atomic_write,
    check_stop,
    claim_run,
    mark_running,
    recorded_run,
    setup_file_log,
)
from core.runs.ranks import distributed_world, is_main_rank, join_ranks, leave_ranks, main_first, rank_store
from core.runs.store import RunStore, Status
from core.scoring.baselines import random_scores
from core.scoring.blend import nested_blend, standardize_per_query
from core.scoring.metrics import expected_gain, mean_ndcg
from core.scoring.report import PROB_COLUMNS
from core.scoring.stack import cached_scores, scores_dir
from core.training.backbone import with_backbone
from core.training.fold_loop import FoldResult, TrainContext, eval_metrics, load_fold_result, train_fold
from core.training.validate import validate_run

log = logging.getLogger("esci.train")

LABEL_TO_INDEX = {lab: i for i, lab in enumerate(ESCI_LABELS)}

#: scorers a blend can use; each maps the examples frame to one score per row
BLEND_MEMBERS = {
    "bm25": lambda df, cfg: cached_scores(None, df, scores_dir(cfg)),
    "dense": lambda df, cfg: cached_scores(cfg.blend.dense_model, df, scores_dir(cfg)),
    "dense-e5": lambda df, cfg: cached_scores("multilingual-e5-small", df, scores_dir(cfg)),
    "random": lambda df, cfg: random_scores(df, seed=cfg.train.seed),
}


class Progress(Protocol):
    """What the trainer reports to a UI (a rich progress bar in the CLI)."""

    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int = 1, description: str | None = None) -> None: ...
    def message(self, text: str) -> None: ...


class NullProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1, description: str | None = None) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass
class RunResult:
    """What a finished run produced.

    ``oof``: one row per trained example: example_id, query_id, esci_label, fold, p_E..p_I,
    ce_score (expected gain), score (final ranking score). ``test``: the same columns for test
    examples (probabilities averaged over folds, fold = -1), or None. ``cv``: run-level metrics.
    ``partial``: only ``train.run_folds`` were trained (no run-level files, status ``partial``).
    """

    run_id: str
    run_dir: Path
    oof: pd.DataFrame
    test: pd.DataFrame | None
    cv: dict[str, float]
    fold_metrics: list[dict[str, Any]] = field(default_factory=list)
    blend_weights: dict[str, float] = field(default_factory=dict)
    partial: bool = False


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it, fp16 on other GPUs, ``no`` on CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def is_partial(cfg: RunConfig) -> bool:
    """True when ``train.run_folds`` leaves out some of the ``train.folds`` folds."""
    return cfg.train.run_folds is not None and set(cfg.train.run_folds) != set(range(cfg.train.folds))


def run_training(
    cfg: RunConfig, store: RunStore, run_id: str | None = None, progress: Progress | None = None, resume: bool = False
) -> RunResult:
    """Train ``cfg`` with k-fold CV, record everything in ``store`` and ``runs/<run_id>/``.

    The config and the data selection are checked before a run row or folder exists.

    Args:
        cfg: the resolved run config.
        store: runs.db connection of this process (the trainer writes its own metrics).
        run_id: an existing ``queued`` run (from ``workbench launch``) or, with ``resume``, the
            crashed/stopped/failed/partial run to continue; None for a new run.
        progress: UI callbacks.
        resume: keep the run's finished folds, continue its interrupted fold from its last step
            checkpoint, train the rest (metrics logged after the checkpoint are replaced).

    Returns:
        RunResult with the OOF and test frames and the CV metrics.

    With several ranks (``WORLD_SIZE`` > 1, started by the supervisor or torchrun: see
    :mod:`core.runs.ranks`) each rank trains on its shard of every fold's batches; evaluation and
    prediction are gathered over the ranks, so the files hold every example once, in the order
    of a 1-process run. Rank 0 alone writes runs.db, ``train.log`` and the files; the other ranks
    return a RunResult without predictions or CV after the last fold.

    Raises:
        DataError, ConfigError: bad data or settings (nothing created).
        WorkbenchError: ``run_id`` is not a run that may be started or resumed; a file cannot
            be written (the run is marked ``failed``).
        RunStopped: SIGTERM/SIGINT (the run is marked ``stopped``).
    """
    progress = progress or NullProgress()
    cfg = with_backbone(cfg, store)  # model.pretrain -> its finished pre-training run's backbone (or refused)
    df = validate_run(cfg)
    join_ranks(cpu=not torch.cuda.is_available())  # several ranks (WORLD_SIZE > 1): torch.distributed
    try:
        return _run(cfg, df, rank_store(store), run_id, progress, resume)  # other ranks than 0: no writes
    finally:
        leave_ranks()


def _run(
    cfg: RunConfig, df: pd.DataFrame, store: RunStore, run_id: str | None, progress: Progress, resume: bool
) -> RunResult:
    """:func:`run_training` after the checks: claim the run, record it, train."""
    run_id, run_dir = claim_run(store, cfg.name, cfg.to_dict(), cfg.output_dir, run_id=run_id, resume=resume)
    main = is_main_rank()
    if main:
        atomic_write(run_dir / "config.yaml", lambda p: save_config(cfg, p))
    handler = setup_file_log(run_dir) if main else logging.NullHandler()
    mark_running(store, run_id, run_dir, config=cfg.to_json(), model=cfg.model.name, task=cfg.data.task)
    if cfg.train.num_processes != distributed_world():
        log.warning(
            "train.num_processes=%d, but %d process(es) train this run (WORLD_SIZE decides: `workbench "
            "train/launch` start train.num_processes ranks, torchrun its --nproc_per_node)",
            cfg.train.num_processes,
            distributed_world(),
        )
    _record_artifact(store, run_id, "config", run_dir / "config.yaml")
    _record_artifact(store, run_id, "log", run_dir / "train.log")
    with recorded_run(store, run_id, handler, final_status=Status.PARTIAL if is_partial(cfg) else Status.FINISHED):
        if resume:
            log.info("run %s resumed", run_id)
        result = _train(cfg, df, store, run_id, run_dir, progress, resume)
        log.info("run %s %s: %s", run_id, "partial" if result.partial else "finished", result.cv)
    return result


def _record_artifact(store: RunStore, run_id: str, kind: str, path: Path, fold: int = -1) -> None:
    """Record an artifact once (a resumed run writes the same files again)."""
    if not any(a["kind"] == kind and a["fold"] == fold and a["path"] == str(path) for a in store.artifacts(run_id)):
        store.add_artifact(run_id, kind, path, fold=fold)


def _train(
    cfg: RunConfig, df: pd.DataFrame, store: RunStore, run_id: str, run_dir: Path, progress: Progress, resume: bool
) -> RunResult:
    t_run = time.time()
    tc, tk = cfg.train, cfg.tricks
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    ctx = build_context(cfg, df, store, run_id, run_dir, progress)
    run_folds, hard_targets = ctx.run_folds, ctx.hard_targets
    two_stage = tk.self_distill or tk.pseudo_label  # a teacher k-fold pass first
    stages = ["teacher", "final"] if two_stage else ["final"]
    if resume:
        prune_run_metrics_for_resume(ctx)

    # ---- the folds (teacher pass first for self-distillation / pseudo-labels) -----------------
    total_steps = sum(fold_steps(len(ctx.train_rows(k)), tc, ctx.world) for k in run_folds) * len(stages)
    progress.start(total_steps, "training")
    # progress/*: what a monitor needs for an ETA (run-level, fold = -1)
    store.log_metrics(run_id, [{"name": mn.PROGRESS_TOTAL_STEPS, "value": float(total_steps), "fold": -1}])
    targets_of: Callable[[int], tuple[np.ndarray, np.ndarray]] = lambda k: (hard_targets, np.zeros(0, np.int64))  # noqa: E731
    if two_stage:
        progress.message("teacher pass (self-distillation / pseudo-labels)")
        teacher = run_stage(ctx, "teacher", targets_of)
        targets_of = _student_targets(ctx, teacher, hard_targets)
    results = run_stage(ctx, "final", targets_of)
    if not ctx.accelerator.is_main_process:  # rank 0 alone assembles, blends and writes the run's files
        return RunResult(run_id, run_dir, pd.DataFrame(), None, {}, partial=is_partial(cfg))

    # ---- OOF and test frames from the folds' files, blend, CV metrics, run-level files -------
    oof, test = assemble_predictions(ctx, results)
    partial = is_partial(cfg)
    weights = {"ce": 1.0}
    oof["score"] = oof["ce_score"]
    if test is not None:
        test["score"] = test["ce_score"]
    if cfg.blend.members and not partial:
        progress.message("blending")
        weights = _blend(cfg, df, ctx, oof, test)
    cv = eval_metrics(oof[PROB_COLUMNS].to_numpy(), oof)
    cv["final_ndcg"] = mean_ndcg(oof["query_id"].to_numpy(), oof["score"].to_numpy(), oof["esci_label"].to_numpy())
    cv["seconds"] = time.time() - t_run
    fold_metrics = [{"fold": r.fold, **r.best, "seconds": r.seconds} for r in results.values()]
    if partial:  # no run-level OOF or CV for a subset of the folds: `workbench resume --all-folds`
        log.info("partial run: folds %s of %d trained; their predictions are in fold<k>/", run_folds, tc.folds)
        return RunResult(run_id, run_dir, oof, test, cv, fold_metrics, weights, partial=True)
    _log_cv(store, run_id, oof, run_folds, cv, weights)
    atomic_write(run_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    _record_artifact(store, run_id, "oof", run_dir / "oof.parquet")
    if test is not None:
        atomic_write(run_dir / "test.parquet", lambda p: test.to_parquet(p, index=False))
        _record_artifact(store, run_id, "test", run_dir / "test.parquet")
    log.info(
        "CV: cross-encoder nDCG %.4f, final (blend %s) nDCG %.4f, task2 F1 %.4f, task3 F1 %.4f",
        cv["ndcg"],
        weights,
        cv["final_ndcg"],
        cv["task2_f1"],
        cv["task3_f1"],
    )
    return RunResult(run_id, run_dir, oof, test, cv, fold_metrics, weights)


def fold_steps(n_rows: int, tc, world: int = 1) -> int:
    """Optimiser steps of one fold of ``n_rows`` training rows on each of ``world`` ranks: the
    ``ceil(n_rows / batch_size)`` batches are dealt out to the ranks (every rank gets
    ``ceil(batches / world)``, the last ones padded from the epoch's first batches, as accelerate's
    ``even_batches``), then ``grad_accum`` batches make a step; times ``epochs``."""
    return math.ceil(math.ceil(math.ceil(n_rows / tc.batch_size) / world) / tc.grad_accum) * tc.epochs


def build_context(
    cfg: RunConfig, df: pd.DataFrame, store: RunStore, run_id: str, run_dir: Path, progress: Progress
) -> TrainContext:
    """What every fold shares: label cleaning (:mod:`core.cleaning.labels`: a fit mask and labels,
    never df itself, so dropped examples are still scored out-of-fold on their original labels),
    query-grouped folds, the translated training rows of ``data.augment_translations`` (appended
    to the context's df: :func:`_add_translations`), the tokens (cached), side features, the
    ``accelerate`` device and mixed precision, and the one-hot targets (len(ctx.df), 4)."""
    from accelerate import Accelerator

    tc, tk = cfg.train, cfg.tricks
    fit_mask, fit_labels, labels_summary = apply_to_training(df, cfg.labels, store)
    log.info("%s", labels_summary)
    train_idx = np.flatnonzero((df["split"] == "train").to_numpy())
    test_idx = np.flatnonzero((df["split"] == "test").to_numpy())
    folds = assign_folds(df["query_id"].to_numpy()[train_idx], tc.folds, tc.seed)
    run_folds = tc.run_folds if tc.run_folds is not None else list(range(tc.folds))
    df, fit_mask, fit_labels, aug_idx, aug_source = _add_translations(cfg, df, fit_mask, fit_labels, run_dir)
    fold_of = np.full(len(df), -1, dtype=np.int64)
    fold_of[train_idx] = folds
    log.info(
        "data %s: %d train examples (%d queries), %d test examples; %d folds, training %s",
        cfg.data.dir,
        len(train_idx),
        df["query_id"].iloc[train_idx].nunique(),
        len(test_idx),
        tc.folds,
        run_folds,
    )
    check_stop("after loading the data", collective=True)
    progress.message("tokenizing")
    tokenizer = load_tokenizer(cfg.model.name)
    markers = add_marker_tokens(tokenizer, cfg.text)  # text.field_markers / entity_markers; None when off
    if markers is not None:
        log.info("marker tokens added to the tokenizer: ids %s", list(markers.new_ids))
    with main_first():  # rank 0 tokenizes and writes the caches, the other ranks read them
        encoded = encode_pairs_cached(df, tokenizer, cfg.text)
        bags, bag_init = _side_features(cfg, df)
    log.info("tokenized: mean length %.1f, max %d", encoded.lengths.mean(), encoded.lengths.max())
    check_stop("after tokenizing", collective=True)
    mp = resolve_mixed_precision(tc.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mp, gradient_accumulation_steps=tc.grad_accum, cpu=not torch.cuda.is_available()
    )
    if tc.num_threads:  # after the Accelerator, which may set its own on CPU
        torch.set_num_threads(tc.num_threads)
    log.info(
        "device %s, mixed precision %s, processes %d (%s), %d threads",
        accelerator.device,
        mp,
        accelerator.num_processes,
        accelerator.distributed_type,
        torch.get_num_threads(),
    )
    # targets are class-probability rows (one-hot for hard labels; soft for distillation/pseudo-labels)
    hard_targets = np.zeros((len(df), 4), dtype=np.float32)
    codes = pd.Series(fit_labels).map(LABEL_TO_INDEX)
    has_label = codes.notna().to_numpy()
    hard_targets[np.flatnonzero(has_label), codes[has_label].astype(int).to_numpy()] = 1.0
    return TrainContext(
        cfg=cfg,
        store=store,
        run_id=run_id,
        run_dir=run_dir,
        df=df,
        train_idx=train_idx,
        test_idx=test_idx,
        folds=folds,
        run_folds=run_folds,
        fit_mask=fit_mask,
        encoded=encoded,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        labels_all=df["esci_label"].map(LABEL_TO_INDEX).to_numpy(),
        accelerator=accelerator,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp),
        class_weights=parse_class_weights(tk.class_weights),
        bags=bags,
        bag_init=bag_init,
        progress=progress,
        hard_targets=hard_targets,
        markers=markers,
        aug_idx=aug_idx,
        aug_source=aug_source,
        aug_folds=fold_of[aug_source],
    )


def _add_translations(cfg: RunConfig, df: pd.DataFrame, fit_mask: np.ndarray, fit_labels: np.ndarray, run_dir: Path):
    """``data.augment_translations`` (:mod:`core.data.augment`; off: everything unchanged) ->
    (df with the M translated rows appended (split ``augment``), fit mask and fit labels (N + M,)
    taken from each row's source (a dropped or relabelled example's translations are too), the
    rows' indices (M,) and their sources' rows (M,)). A resumed run checks they are unchanged.

    Raises:
        DataError: the file is bad (:func:`core.data.augment.load_translations`).
        WorkbenchError: a resumed run's translations changed (:func:`core.data.augment.check_unchanged`).
    """
    none = np.zeros(0, np.int64)
    path = cfg.data.augment_translations
    if not path:
        return df, fit_mask, fit_labels, none, none
    tr = load_translations(path, df, cfg.data.dir)
    check_unchanged(run_dir, path, tr, write=is_main_rank())
    log.info(
        "translations %s: %d training rows added (locales %s), %d rows of unselected examples ignored",
        path,
        len(tr.rows),
        tr.rows["product_locale"].value_counts().to_dict(),
        tr.ignored,
    )
    frame = pd.concat([df, tr.rows], ignore_index=True)
    keep, labels = np.concatenate([fit_mask, fit_mask[tr.source]]), np.concatenate([fit_labels, fit_labels[tr.source]])
    return frame, keep, labels, np.arange(len(df), len(frame), dtype=np.int64), tr.source


def run_stage(
    ctx: TrainContext, stage: str, targets_of: Callable[[int], tuple[np.ndarray, np.ndarray]]
) -> dict[int, FoldResult]:
    """Every fold of ``ctx.run_folds`` for ``stage``: the fold's saved result when it is done
    (a resumed run), else :func:`core.training.fold_loop.train_fold` with ``targets_of(k) -> (targets
    (len(df), 4), extra rows)``. Returns {fold: FoldResult}."""
    results: dict[int, FoldResult] = {}
    for k in ctx.run_folds:
        done = load_fold_result(ctx, stage, k)
        if done is not None:
            log.info(
                "%sfold %d already done (kept from %s)",
                "" if stage == "final" else "teacher ",
                k,
                ctx.fold_dir(stage, k),
            )
            ctx.progress.advance(max(0, done.global_step - ctx.global_step))
            ctx.global_step = max(ctx.global_step, done.global_step)
            if done.metric_rows and not any(
                m["fold"] == k for m in ctx.store.metrics(ctx.run_id, [done.metric_rows[0]["name"]])
            ):
                ctx.store.log_metrics(ctx.run_id, done.metric_rows)  # the crash came between the files and the rows
            results[k] = done
            continue
        targets, extra = targets_of(k)
        results[k] = train_fold(ctx, k, stage, targets, extra)
    return results


def prune_run_metrics_for_resume(ctx: TrainContext) -> None:
    """Before a resume: delete the run-level rows the resumed run logs again (CV, blend weights,
    ``progress/total_steps``, ``fold/final_ndcg``). A fold's own rows after its step checkpoint are
    deleted by :func:`core.training.fold_loop.train_fold` when the fold starts again."""
    ctx.store.delete_metrics(
        ctx.run_id, fold=-1, name_prefixes=[mn.CV_PREFIX, mn.BLEND_PREFIX, mn.PROGRESS_TOTAL_STEPS]
    )
    ctx.store.delete_metrics(ctx.run_id, names=[mn.FOLD_FINAL_NDCG])


def _side_features(cfg: RunConfig, df: pd.DataFrame):
    """The n-gram bags of every row and the word2vec bucket init (core.modeling.features), or (None, None)."""
    fc = cfg.features
    if not fc.ngram_bags:
        return None, None
    t_feat = time.time()
    bags = ngram_bags_cached(df, fc, cfg.text.cache_dir)
    bag_init = (
        word2vec_bucket_init(df, fc, seed=cfg.train.seed, cache_dir=cfg.text.cache_dir)
        if fc.init == "word2vec"
        else None
    )
    per = bags.lengths()
    log.info(
        "n-gram bags %s: word 1..%d-grams into %d buckets, mean %s per pair, init %s%s (%.1f s)",
        fc.bag_fields,
        fc.ngram,
        fc.buckets,
        np.round(per.mean(0), 1).tolist(),
        fc.init,
        f" ({len(bag_init[0])} buckets from word2vec)" if bag_init is not None else "",
        time.time() - t_feat,
    )
    return bags, bag_init


def _student_targets(ctx: TrainContext, teacher: dict[int, FoldResult], hard_targets: np.ndarray):
    """The final pass's ``targets_of(k)`` after a teacher pass: self-distillation's soft labels
    ``w * OOF + (1 - w) * hard`` and/or fold k's own teacher's confident test rows (pseudo-labels:
    no label of validation fold k leaks in). Logs the exact total steps (pseudo rows add steps)."""
    tc, tk = ctx.cfg.train, ctx.cfg.tricks
    student = hard_targets.copy()
    if tk.self_distill:
        t_oof = np.full((len(ctx.train_idx), 4), np.nan, dtype=np.float32)
        for k, r in teacher.items():
            t_oof[ctx.folds == k] = r.oof
        have = ~np.isnan(t_oof).any(1) & ctx.fit_mask[ctx.train_idx]
        rows = ctx.train_idx[have]
        student[rows] = distill_targets(t_oof[have], hard_targets[rows].argmax(1), tk.distill_weight)
        log.info(
            "self-distillation: %d training rows get %.2f * OOF + %.2f * hard labels",
            len(rows),
            tk.distill_weight,
            1 - tk.distill_weight,
        )
    student[ctx.aug_idx] = student[ctx.aug_source]  # a translation learns its source's (soft) target
    t_test = {k: r.test for k, r in teacher.items() if r.test is not None}

    def targets_of(k: int) -> tuple[np.ndarray, np.ndarray]:
        if not (tk.pseudo_label and k in t_test):
            return student, np.zeros(0, np.int64)
        keep = select_pseudo_labels(t_test[k], tk.pseudo_threshold)
        t = student.copy()
        t[ctx.test_idx[keep]] = t_test[k][keep]
        log.info(
            "pseudo-labels for fold %d: %d of %d test pairs with max p >= %.2f",
            k,
            keep.sum(),
            len(keep),
            tk.pseudo_threshold,
        )
        return t, ctx.test_idx[keep]

    if tk.pseudo_label:  # the student folds train on more rows: exact ETA total
        steps = sum(
            fold_steps(
                len(ctx.train_rows(k))
                + (select_pseudo_labels(t_test[k], tk.pseudo_threshold).sum() if k in t_test else 0),
                tc,
                ctx.world,
            )
            for k in ctx.run_folds
        )
        ctx.store.log_metrics(
            ctx.run_id, [{"name": mn.PROGRESS_TOTAL_STEPS, "value": float(ctx.global_step + steps), "fold": -1}]
        )
    return targets_of


def assemble_predictions(ctx: TrainContext, results: dict[int, FoldResult]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The OOF frame (trained folds' rows in train order) and the test frame (probabilities
    averaged over the folds, fold = -1) from the folds' results, with ``ce_score`` = expected gain."""
    df = ctx.df
    trained = np.isin(ctx.folds, ctx.run_folds)
    probs = np.full((len(ctx.train_idx), 4), np.nan, dtype=np.float32)
    for k, r in results.items():
        probs[ctx.folds == k] = r.oof
    cols = ["example_id", "query_id", "product_id", "esci_label"]
    oof = df.iloc[ctx.train_idx[trained]][cols].reset_index(drop=True)
    oof["fold"] = ctx.folds[trained]
    oof[PROB_COLUMNS] = probs[trained]
    oof["ce_score"] = expected_gain(probs[trained])
    test = None
    if len(ctx.test_idx):
        test = df.iloc[ctx.test_idx][cols].reset_index(drop=True)
        test["fold"] = -1
        test[PROB_COLUMNS] = (sum(r.test for r in results.values()) / len(results)).astype(np.float32)
        test["ce_score"] = expected_gain(test[PROB_COLUMNS].to_numpy())
    return oof, test


def _blend(
    cfg: RunConfig, df: pd.DataFrame, ctx: TrainContext, oof: pd.DataFrame, test: pd.DataFrame | None
) -> dict[str, float]:
    """Per-query standardised blend of the cross-encoder with ``blend.members`` (core.scoring.blend):
    OOF rows get weights fitted on the other folds, test rows the weights fitted on all OOF rows.
    Sets ``score`` and each member's raw column in ``oof``/``test``; returns the full weights."""
    members = list(cfg.blend.members)
    z_oof = [standardize_per_query(oof["query_id"], oof["ce_score"])]
    z_test = [standardize_per_query(test["query_id"], test["ce_score"])] if test is not None else []
    trained = np.isin(ctx.folds, ctx.run_folds)
    for name in list(members):
        try:
            raw = BLEND_MEMBERS[name](df, cfg)
        except WorkbenchError as exc:  # e.g. multilingual-e5-small without its wheels here
            if isinstance(exc, RunStopped):
                raise
            log.warning("blend member %s left out: %s", name, exc)
            members.remove(name)
            continue
        oof[name] = raw[ctx.train_idx][trained]
        z_oof.append(standardize_per_query(oof["query_id"], oof[name]))
        if test is not None:
            test[name] = raw[ctx.test_idx]
            z_test.append(standardize_per_query(test["query_id"], test[name]))
    final, per_fold_w, full_w = nested_blend(
        oof["fold"],
        oof["query_id"],
        oof["esci_label"],
        np.column_stack(z_oof),
        cfg.blend.resolution,
        cfg.blend.method,
        cfg.blend.fallback,
    )
    oof["score"] = final
    if test is not None:
        test["score"] = np.column_stack(z_test) @ full_w
    for f, w in per_fold_w.items():
        log.info("fold %d blend weights (fitted on other folds): %s", f, dict(zip(["ce", *members], np.round(w, 3))))
    return dict(zip(["ce", *members], map(float, full_w)))


def _log_cv(
    store: RunStore,
    run_id: str,
    oof: pd.DataFrame,
    run_folds: list[int],
    cv: dict[str, float],
    weights: dict[str, float],
) -> None:
    """Per-fold nDCG of the final ranking, the CV metrics and the blend weights (run-level rows)."""
    labels, qids, score = oof["esci_label"].to_numpy(), oof["query_id"].to_numpy(), oof["score"].to_numpy()
    for f in run_folds:
        sel = oof["fold"].to_numpy() == f
        store.log_metrics(
            run_id, [{"name": mn.FOLD_FINAL_NDCG, "value": mean_ndcg(qids[sel], score[sel], labels[sel]), "fold": f}]
        )
    store.log_metrics(
        run_id,
        [{"name": mn.cv_name(n), "value": v, "fold": -1} for n, v in cv.items()]
        + [{"name": mn.blend_weight_name(n), "value": v, "fold": -1} for n, v in weights.items()],
    )
