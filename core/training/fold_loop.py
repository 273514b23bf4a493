"""One fold of cross-encoder training, read top to bottom, and what it leaves on disk.

:func:`train_fold` trains fold ``k`` of a k-fold run (AdamW + linear warm-up/decay on
``accelerate``; the training tricks of :mod:`core.modeling.tricks`), evaluates ``evals_per_epoch`` times an
epoch, keeps the best weights, predicts the fold's validation rows (OOF) and the test rows, and
writes them at once (:func:`write_fold_result`), so no finished fold is ever lost.

Every ``train.checkpoint_every`` optimiser steps it writes a step checkpoint
(``fold<k>/resume.pt``, atomically): model, optimiser, scheduler, EMA, AWP state, the RNG states
(torch, CUDA, NumPy, Python, the mixup generator), the sampler's position (the epoch's permutation
seed and the batches done), the best weights and OOF probabilities so far, and the logging
window. :func:`train_fold` started on a fold with a checkpoint continues from it and, on CPU,
produces bit-identical weights and predictions to an uninterrupted run (tested).

Files of a fold (``stage_dir`` is the run folder, or ``<run>/teacher`` for the teacher pass of
self-distillation / pseudo-labels): ``fold<k>/oof.parquet`` (example_id, fold, p_E..p_I),
``fold<k>/test.parquet`` (example_id, p_E..p_I), ``fold<k>/model.safetensors`` (final stage),
and ``fold<k>/result.json`` written last: a fold is done when its result.json exists.

With N data-parallel ranks (:mod:`core.runs.ranks`) ``accelerate`` wraps the model in DDP and
deals each rank every N-th batch of the sampler's epoch (padded to a multiple of N), so a rank
takes ``ceil(batches / N)`` steps of ``batch_size`` rows (N x ``batch_size`` rows a step; the
learning-rate schedule runs over the same rows as one process). Evaluation and prediction are
split by batches and summed over the ranks (:func:`predict_proba`): every rank holds all the
probabilities, in the order of one process. A stop is decided by all ranks together at every step
and prediction batch. Rank 0 alone writes the files and ``resume.pt``, which then holds every
rank's RNG states; it resumes only a run with the same number of ranks (else the fold restarts).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.config import RunConfig
from core.data.esci import ESCI_LABELS
from core.data.text import EncodedPairs
from core.errors import WorkbenchError
from core.modeling.features import (
    PARAM_PREFIX,
    RowFeatures,
    build_id_vocab,
    build_semantic,
    encode_ids,
    features_on,
    save_fold_features,
)
from core.modeling.markers import resize_for_markers
from core.modeling.model import CrossEncoder, collate
from core.modeling.tricks import AWP, EMA, FGM, PGD, classification_loss, draw_mixup, param_groups, rdrop_kl
from core.runs import metric_names as mn
from core.runs.lifecycle import atomic_write, check_stop, checkpoint_requested
from core.runs.ranks import all_ranks, any_rank, mean_over_ranks, sum_over_ranks
from core.runs.store import RunStore
from core.scoring.metrics import expected_gain, mean_ndcg, micro_f1_task2, micro_f1_task3
from core.scoring.report import PROB_COLUMNS

log = logging.getLogger("esci.train")


class LengthGroupedBatchSampler:
    """Batches of similar length (less padding), in random order, deterministic by seed.

    Shuffles the indices, cuts them into mega-batches of ``rows * mega`` rows (``rows``: the
    batch size), sorts each mega-batch by length (longest first) and cuts it into batches; the
    batch order is shuffled again (the ``LengthGroupedSampler`` idea of transformers' Trainer).
    Each call of ``__iter__`` draws a new permutation; ``epoch_state`` is the generator state it
    started from, and :meth:`resume_at` makes the next ``__iter__`` replay an epoch from such a
    state, skipping the batches already trained (the resume of a step checkpoint).

    ``pad_to`` (the number of ranks): the epoch's batch list is padded with its first batches to
    a multiple of ``pad_to``, so accelerate's ``BatchSamplerShard`` deals every rank the same
    number of batches (rank r: batches r, r + N, ...) and never pads on its own. The sampler has
    no ``batch_size`` attribute on purpose: its batches vary in size (the last of a mega-batch),
    and ``BatchSamplerShard`` would drop a group of N batches holding a short one at its end.
    """

    def __init__(
        self,
        indices: np.ndarray,
        lengths: np.ndarray,
        batch_size: int,
        seed: int,
        grouped: bool = True,
        mega: int = 50,
        pad_to: int = 1,
    ):
        self.indices = np.asarray(indices)
        self.lengths = np.asarray(lengths)
        self.rows = batch_size
        self.grouped = grouped
        self.mega = mega
        self.pad_to = pad_to
        self.rng = np.random.default_rng(seed)
        self.epoch_state: dict | None = None
        self._skip = 0

    def __len__(self) -> int:
        n = math.ceil(len(self.indices) / self.rows)
        return math.ceil(n / self.pad_to) * self.pad_to if n else 0

    def resume_at(self, epoch_state: dict, skip: int) -> None:
        """Replay the epoch that started from generator state ``epoch_state``, without its first
        ``skip`` batches (next ``__iter__`` only; with N ranks, ``skip`` counts all ranks' batches)."""
        self.rng.bit_generator.state = epoch_state
        self._skip = int(skip)

    def __iter__(self):
        self.epoch_state = self.rng.bit_generator.state
        skip, self._skip = self._skip, 0
        perm = self.rng.permutation(self.indices)
        if not self.grouped:
            batches = [perm[i : i + self.rows] for i in range(0, len(perm), self.rows)]
        else:
            size = self.rows * self.mega
            batches = []
            for i in range(0, len(perm), size):
                chunk = perm[i : i + size]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches += [chunk[j : j + self.rows] for j in range(0, len(chunk), self.rows)]
            order = self.rng.permutation(len(batches))
            batches = [batches[o] for o in order]
        while batches and len(batches) % self.pad_to:  # N ranks: every rank the same number of batches
            batches += batches[: self.pad_to - len(batches) % self.pad_to]
        for b in batches[skip:]:
            yield b.tolist()


@torch.inference_mode()
def predict_proba(
    model: torch.nn.Module,
    encoded: EncodedPairs,
    indices: np.ndarray,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    features: RowFeatures | None = None,
    shard: tuple[int, int] = (0, 1),
) -> np.ndarray:
    """Class probabilities for the sequences ``indices``: float32 (len(indices), 4), order kept.

    Batches are formed from length-sorted rows (little padding), then put back in order.
    ``features``: the rows' side features (n-gram bags / ID ids) for a model with ``semantic``.
    ``shard=(rank, world)``: with several ranks each computes every ``world``-th batch and the
    rows are summed over the ranks (a row is non-zero on one rank only), so every rank returns
    all of them, exactly as one process computes them with the same weights.

    Raises:
        core.runs.lifecycle.RunStopped: a stop was requested (checked before every batch, on every
        rank the same number of times).
    """
    model.eval()
    indices = np.asarray(indices)
    rank, world = shard
    out = np.zeros((len(indices), 4), dtype=np.float32)
    order = np.argsort(-encoded.lengths[indices], kind="stable")
    n_batches = math.ceil(len(order) / batch_size)
    for j in range(rank, rank + world * math.ceil(n_batches / world), world):
        check_stop("prediction", collective=True)
        if j >= n_batches:  # this rank's share ran out: it still takes part in the stop decision
            continue
        pos = order[j * batch_size : (j + 1) * batch_size]
        batch = {k: v.to(device) for k, v in collate(encoded, indices[pos], pad_id, features).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch)
        out[pos] = torch.softmax(logits.float(), -1).cpu().numpy()
    return sum_over_ranks(out) if world > 1 else out


def eval_metrics(probs: np.ndarray, frame: pd.DataFrame) -> dict[str, float]:
    """nDCG of the expected gain, Task 2/3 micro-F1 of the argmax; probs (N, 4) for frame's rows."""
    labels = frame["esci_label"].to_numpy()
    pred = np.asarray(ESCI_LABELS)[probs.argmax(1)]
    return {
        "ndcg": mean_ndcg(frame["query_id"].to_numpy(), expected_gain(probs), labels),
        "task2_f1": micro_f1_task2(labels, pred),
        "task3_f1": micro_f1_task3(labels, pred == "S"),
    }


# ---------------------------------------------------------------------------------- context
@dataclass
class TrainContext:
    """What every fold of a run shares (built once by :func:`core.training.train.run_training`).

    ``df``: all examples (train and test split; then the translated rows of
    ``data.augment_translations``, split ``augment``, trained on only); ``train_idx``/``test_idx``: their rows in df;
    ``folds``: the fold of each train row (len(train_idx),); ``fit_mask``: rows of df trained on
    (label cleaning); ``encoded``: the tokenized pairs of df; ``global_step``: optimiser steps of
    the run so far (all folds and stages; the ETA's numerator).
    """

    cfg: RunConfig
    store: RunStore
    run_id: str
    run_dir: Path
    df: pd.DataFrame
    train_idx: np.ndarray
    test_idx: np.ndarray
    folds: np.ndarray
    run_folds: list[int]
    fit_mask: np.ndarray
    encoded: EncodedPairs
    pad_id: int
    labels_all: np.ndarray
    accelerator: Any
    autocast_dtype: torch.dtype | None
    class_weights: torch.Tensor | None
    bags: Any = None
    bag_init: Any = None
    progress: Any = None
    global_step: int = 0
    hard_targets: np.ndarray | None = None  # (len(df), 4) one-hot labels of the rows trained on
    markers: Any = None  # core.modeling.markers.MarkerSpec of the tokenizer's marker tokens, or None
    # data.augment_translations (core.data.augment): rows of df that translate a training example
    # (after the original rows), the row of df each translates, and that source's fold; all (M,)
    aug_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    aug_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    aug_folds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        """The number of data-parallel ranks of the run (1: one process)."""
        return self.accelerator.num_processes

    @property
    def shard(self) -> tuple[int, int]:
        """(this rank, number of ranks): the prediction shard of :func:`predict_proba`."""
        return self.accelerator.process_index, self.accelerator.num_processes

    def fold_dir(self, stage: str, k: int) -> Path:
        """``<run>/fold<k>`` (final stage) or ``<run>/teacher/fold<k>``."""
        return (self.run_dir if stage == "final" else self.run_dir / "teacher") / f"fold{k}"

    def val_rows(self, k: int) -> np.ndarray:
        """Rows of df in validation fold ``k`` (train order): its OOF rows."""
        return self.train_idx[self.folds == k]

    def train_rows(self, k: int) -> np.ndarray:
        """Rows of df that fold ``k`` trains on (the other folds, label-cleaning drops left out),
        then the translated rows whose source is in those folds (``data.augment_translations``)."""
        own = self.train_idx[(self.folds != k) & self.fit_mask[self.train_idx]]
        return np.concatenate([own, self.aug_idx[(self.aug_folds != k) & self.fit_mask[self.aug_idx]]])


@dataclass
class FoldResult:
    """A finished fold: ``oof`` (len(va), 4) for the fold's train rows in train order, ``test``
    (len(test_idx), 4) or None, ``best`` (nDCG, F1s, loss, epoch, step of the best evaluation),
    ``seconds`` of training, ``global_step`` of the run when the fold ended."""

    fold: int
    stage: str
    oof: np.ndarray
    test: np.ndarray | None
    best: dict[str, float]
    seconds: float
    global_step: int
    metric_rows: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------- fold IO
def write_fold_result(ctx: TrainContext, res: FoldResult) -> None:
    """Write a fold's OOF and test predictions, then ``result.json`` (the fold's commit mark),
    each atomically (:func:`core.runs.lifecycle.atomic_write`).

    Raises:
        WorkbenchError: a file cannot be written (the previous files stay intact).
    """
    fold_dir = ctx.fold_dir(res.stage, res.fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    va = ctx.val_rows(res.fold)
    oof = pd.DataFrame({"example_id": ctx.df["example_id"].to_numpy()[va], "fold": res.fold})
    oof[PROB_COLUMNS] = res.oof
    atomic_write(fold_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    if res.test is not None:
        test = pd.DataFrame({"example_id": ctx.df["example_id"].to_numpy()[ctx.test_idx]})
        test[PROB_COLUMNS] = res.test
        atomic_write(fold_dir / "test.parquet", lambda p: test.to_parquet(p, index=False))
    meta = {
        "fold": res.fold,
        "stage": res.stage,
        "best": res.best,
        "seconds": res.seconds,
        "global_step": res.global_step,
        "metric_rows": res.metric_rows,
    }
    atomic_write(fold_dir / "result.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


def load_fold_result(ctx: TrainContext, stage: str, k: int) -> FoldResult | None:
    """The fold's saved result, or None when the fold is not done (no ``result.json``).

    Raises:
        WorkbenchError: the saved predictions do not cover exactly the fold's examples (the data
        changed since the run started), or a file is unreadable.
    """
    fold_dir = ctx.fold_dir(stage, k)
    if not (fold_dir / "result.json").is_file():
        return None
    try:
        meta = json.loads((fold_dir / "result.json").read_text())
        oof = pd.read_parquet(fold_dir / "oof.parquet")
        test = pd.read_parquet(fold_dir / "test.parquet") if len(ctx.test_idx) else None
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{fold_dir}: cannot read the fold's saved result ({exc})") from None
    ids = ctx.df["example_id"].to_numpy()
    va = ctx.val_rows(k)
    if not np.array_equal(oof["example_id"].to_numpy(), ids[va]) or (
        test is not None and not np.array_equal(test["example_id"].to_numpy(), ids[ctx.test_idx])
    ):
        raise WorkbenchError(
            f"{fold_dir}/oof.parquet: the saved predictions do not match fold {k}'s examples "
            f"(the data or the folds changed since the run started)"
        )
    return FoldResult(
        k,
        stage,
        oof[PROB_COLUMNS].to_numpy(np.float32),
        None if test is None else test[PROB_COLUMNS].to_numpy(np.float32),
        meta["best"],
        meta["seconds"],
        meta["global_step"],
        meta.get("metric_rows", []),
    )


# ---------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """The torch, CUDA, NumPy and Python RNG states (a step checkpoint's ``rng``)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_step_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of a fold's training state to ``path``, atomically.

    Raises:
        WorkbenchError: the file cannot be written (full disk): the previous checkpoint is kept.
    """

    def write(p: Path) -> None:
        try:
            torch.save(state, p)
        except RuntimeError as exc:  # torch's zip writer reports write errors as RuntimeError
            raise OSError(str(exc).splitlines()[0]) from None

    atomic_write(path, write)


def load_step_checkpoint(path: Path) -> dict[str, Any] | None:
    """The step checkpoint at ``path`` or None if there is none.

    Raises:
        WorkbenchError: the file exists but cannot be read.
    """
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise WorkbenchError(f"{path}: unreadable step checkpoint ({str(exc).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------- one fold
@dataclass
class FoldSetup:
    """Everything fold ``k`` trains with: the prepared model/optimizer/scheduler/loader (and the
    raw optimizer and scheduler whose state a checkpoint saves), the tricks' objects, the fold's
    validation rows ``va`` (rows of df, train order) and its side features."""

    k: int
    stage: str
    model: Any
    unwrapped: torch.nn.Module
    optimizer: Any
    scheduler: Any
    raw_optimizer: torch.optim.Optimizer
    raw_scheduler: Any
    loader: Any
    sampler: LengthGroupedBatchSampler
    trainable: list[torch.nn.Parameter]
    emb: torch.nn.Parameter
    attack_only_emb: bool
    adversary: Any
    awp: AWP | None
    ema: EMA | None
    mix_rng: np.random.Generator
    feats: RowFeatures | None
    id_vocab: Any
    va: np.ndarray
    va_frame: pd.DataFrame
    batches_per_epoch: int
    eval_points: set[int]
    extra: np.ndarray

    @property
    def final(self) -> bool:
        return self.stage == "final"

    @property
    def who(self) -> str:
        return "" if self.final else "teacher "

    def mname(self, name: str) -> str:
        """The metric's name in this stage (``teacher/train_loss`` for the teacher pass)."""
        return name if self.final else mn.TEACHER_PREFIX + name.replace("/", "_")


def setup_fold(ctx: TrainContext, k: int, stage: str, targets: np.ndarray, extra: np.ndarray) -> FoldSetup:
    """Build fold ``k``'s model (fresh weights of ``model.name``), AdamW with its parameter groups,
    the linear warm-up/decay schedule, the length-grouped batches of its training rows (+ ``extra``
    rows) and the tricks' objects, prepared by ``accelerate``. Seeds ``train.seed + k`` first."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    cfg, acc = ctx.cfg, ctx.accelerator
    tc, tk, fc = cfg.train, cfg.tricks, cfg.features
    set_seed(tc.seed + k)
    tr = ctx.train_rows(k)
    id_vocab = build_id_vocab(ctx.df.iloc[tr], fc.id_fields, fc.id_min_count) if fc.id_embeddings else None
    if len(extra):
        tr = np.concatenate([tr, extra])
    va = ctx.val_rows(k)
    feats = (
        RowFeatures(ctx.bags, encode_ids(ctx.df, id_vocab) if id_vocab is not None else None)
        if features_on(fc)
        else None
    )
    if id_vocab is not None:
        log.info(
            "fold %d ID vocabularies (min_count %d): %s", k, fc.id_min_count, {f: len(v) for f, v in id_vocab.items()}
        )
    model = CrossEncoder.from_pretrained(
        cfg.model.name,
        cfg.model.pooling,
        cfg.model.dropout,
        msd_rates=tk.msd_rates if tk.msd else None,
        layer_pooling_last=tk.layer_pooling_last if tk.layer_pooling else 0,
        semantic=build_semantic(fc, id_vocab, ctx.bag_init),
        marker_slots=(ctx.markers.slot_ids, ctx.markers.slot_segments) if ctx.markers is not None else None,
    )
    if ctx.markers is not None:  # rows for the marker tokens (with trainable offsets when frozen)
        resize_for_markers(model, ctx.markers, trainable_offsets=cfg.model.freeze_embeddings)
    if cfg.model.freeze_embeddings:
        model.backbone.get_input_embeddings().weight.requires_grad_(False)
    if tk.grad_checkpointing:  # Chen et al. 2016 (arXiv:1604.06174): recompute activations in backward
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.lr, tc.head_lr, tc.weight_decay, layer_decay=tk.llrd_decay if tk.llrd else 1.0)
    )
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    emb = model.backbone.get_input_embeddings().weight
    attack_only_emb = (tk.fgm or tk.pgd) and not emb.requires_grad
    if attack_only_emb:  # frozen embeddings still need their gradient for the attack (not optimised)
        emb.requires_grad_(True)
    # the schedule in 1-process steps: with N ranks accelerate's scheduler steps it N times a step
    n_steps = math.ceil(math.ceil(len(tr) / tc.batch_size) / tc.grad_accum) * tc.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * n_steps), n_steps)
    sampler = LengthGroupedBatchSampler(
        tr, ctx.encoded.lengths, tc.batch_size, tc.seed + k, tc.length_grouping, pad_to=acc.num_processes
    )
    loader = torch.utils.data.DataLoader(
        np.arange(len(ctx.encoded)),
        batch_sampler=sampler,  # the sampler yields rows of df
        collate_fn=lambda idx: {
            **collate(ctx.encoded, idx, ctx.pad_id, feats),
            "targets": torch.from_numpy(targets[idx]),
        },
    )
    raw_optimizer, raw_scheduler = optimizer, scheduler
    # N ranks: DDP model, each rank every N-th batch of the sampler's epoch (same permutation on all)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    batches_per_epoch = len(loader)  # this rank's batches: ceil(batches / N)
    if acc.num_processes > 1:  # the same weights everywhere (DDP), other dropout draws on each rank
        set_seed(tc.seed + k, device_specific=True)
    unwrapped = acc.unwrap_model(model)
    adversary = (
        FGM(unwrapped, tk.fgm_epsilon)
        if tk.fgm
        else PGD(unwrapped, tk.pgd_epsilon, tk.pgd_alpha, tk.pgd_steps)
        if tk.pgd
        else None
    )
    awp = (
        AWP(
            unwrapped,
            tk.awp_lr,
            tk.awp_eps,
            start_epoch=tk.awp_start_epoch,
            start_loss=tk.awp_start_loss,
            skip_prefixes=(PARAM_PREFIX,),
        )
        if tk.awp
        else None
    )  # side-feature tables never perturbed
    ema = EMA(unwrapped, tk.ema_decay) if tk.ema else None
    eval_points = {
        min(batches_per_epoch, round(batches_per_epoch * (j + 1) / tc.evals_per_epoch))
        for j in range(tc.evals_per_epoch)
    }
    return FoldSetup(
        k,
        stage,
        model,
        unwrapped,
        optimizer,
        scheduler,
        raw_optimizer,
        raw_scheduler,
        loader,
        sampler,
        trainable,
        emb,
        attack_only_emb,
        adversary,
        awp,
        ema,
        np.random.default_rng(tc.seed + k),
        feats,
        id_vocab,
        va,
        ctx.df.iloc[va],
        batches_per_epoch,
        eval_points,
        extra,
    )


def new_loop_state(n_va: int) -> dict[str, Any]:
    """The fold loop's mutable state (what a step checkpoint saves besides the objects' states):
    position (epoch, batches done, optimiser steps), the best evaluation, its weights and OOF
    probabilities (n_va, 4), the running loss and the logging window (loss sum, batches, pairs)."""
    return {
        "epoch": 0,
        "batches_done": 0,
        "fold_step": 0,
        "best": {"ndcg": -1.0},
        "best_state": None,
        "oof": np.full((n_va, 4), np.nan, dtype=np.float32),
        "running_loss": None,
        "window": [0.0, 0, 0],
        "extras": {},
    }


def train_fold(ctx: TrainContext, k: int, stage: str, targets: np.ndarray, extra: np.ndarray) -> FoldResult:
    """Train fold ``k`` (continuing from its step checkpoint if one exists) and write its result.

    Args:
        ctx: the run's shared state.
        k: the validation fold.
        stage: ``"final"``, or ``"teacher"`` (the first pass of self-distillation /
            pseudo-labels: metrics logged as ``teacher/*``, no model checkpoint saved).
        targets: (len(df), 4) float32 target distribution of every row (one-hot for hard labels).
        extra: rows of df trained on in addition to the other folds (pseudo-labelled test rows).

    Returns:
        The fold's :class:`FoldResult` (also written to disk).

    Raises:
        core.runs.lifecycle.RunStopped: a stop was requested (checked before every step).
        WorkbenchError: a file cannot be written.
    """
    tc = ctx.cfg.train
    fold_dir = ctx.fold_dir(stage, k)
    fold_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = fold_dir / "resume.pt"
    t_fold = time.time()
    fs = setup_fold(ctx, k, stage, targets, extra)
    s, pending_rng = new_loop_state(len(fs.va)), None
    ckpt = load_step_checkpoint(ckpt_path)
    if ckpt is not None and ckpt.get("world", 1) != ctx.world:
        log.warning(
            "%sfold %d: %s was written by a run with %d process(es), this one has %d: ignored, the fold starts again",
            fs.who,
            k,
            ckpt_path.name,
            ckpt.get("world", 1),
            ctx.world,
        )
        ckpt = None
    if ckpt is not None:
        s, pending_rng = restore_step_checkpoint(ctx, fs, ckpt)
        log.info(
            "%sfold %d resumed from %s at epoch %d, batch %d, step %d",
            fs.who,
            k,
            ckpt_path.name,
            s["epoch"],
            s["batches_done"],
            s["fold_step"],
        )
    # rows an earlier attempt of this fold logged after its checkpoint (all of them without one)
    # are logged again from here: delete them first, so none is ever duplicated
    ctx.store.delete_metrics(ctx.run_id, fold=k, teacher=not fs.final, after_step=s["fold_step"])
    ctx.store.delete_metrics(ctx.run_id, fold=-1, names=[mn.PROGRESS_STEP], after_step=ctx.global_step)
    window_t = time.time()
    for epoch in range(s["epoch"], tc.epochs):
        s["epoch"] = epoch
        fs.model.train()
        for b_i, batch in enumerate(fs.loader, start=s["batches_done"] + 1):
            if pending_rng is not None:
                set_rng_state(pending_rng)
                pending_rng = None
            check_stop(f"{fs.who}fold {k} step {s['fold_step']}", collective=True)
            ep = epoch + b_i / fs.batches_per_epoch
            loss, grad_norm = train_step(ctx, fs, batch, s, ep)
            s["batches_done"] = b_i
            lv = mean_over_ranks(loss.item())  # N ranks: the same running loss (AWP's start) on all
            s["running_loss"] = lv if s["running_loss"] is None else 0.9 * s["running_loss"] + 0.1 * lv
            s["window"][0] += lv
            s["window"][1] += 1
            s["window"][2] += len(batch["input_ids"])
            sync = ctx.accelerator.sync_gradients
            if sync:
                if fs.ema is not None:
                    fs.ema.update(fs.unwrapped)
                s["fold_step"] += 1
                ctx.global_step += 1
                if ctx.progress is not None:
                    ctx.progress.advance(1, description=f"{fs.who}fold {k} epoch {epoch + 1}/{tc.epochs} loss {lv:.3f}")
                if s["fold_step"] % tc.log_every == 0:
                    log_window(ctx, fs, s, ep, grad_norm, time.time() - window_t)
                    window_t = time.time()
            if b_i in fs.eval_points:
                _evaluate(ctx, k, stage, fs.unwrapped, fs.ema, fs.va, fs.va_frame, fs.feats, s, ep)
                fs.model.train()
            if sync and (
                any_rank(checkpoint_requested()) or tc.checkpoint_every and s["fold_step"] % tc.checkpoint_every == 0
            ):  # SIGUSR1 (a Slurm job near its time limit): a checkpoint now, the stop at the next step
                state = checkpoint_state(ctx, fs, s, epoch, b_i)  # N ranks: collective (every rank's RNG)
                if ctx.accelerator.is_main_process:
                    save_step_checkpoint(ckpt_path, state)
        s["batches_done"] = 0
    result = finish_fold(ctx, fs, s, t_fold)
    if ctx.accelerator.is_main_process:
        ckpt_path.unlink(missing_ok=True)
    return result


def compute_loss(
    ctx: TrainContext, fs: FoldSetup, batch: dict[str, torch.Tensor], t: torch.Tensor, mix
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward (twice with R-Drop) -> (loss, R-Drop KL or None); ``t`` (B, 4) target rows,
    ``mix`` the mixup draw (lam, permutation) or None (:mod:`core.modeling.tricks` for the formulas)."""
    tk = ctx.cfg.tricks
    logits = fs.model(**batch, mix=mix)
    if mix is not None:
        t = mix[0] * t + (1.0 - mix[0]) * t[mix[1]]

    def lossf(z):
        return classification_loss(
            z,
            t,
            tk.loss,
            label_smoothing=tk.label_smoothing,
            class_weights=ctx.class_weights,
            poly1_epsilon=tk.poly1_epsilon,
            focal_gamma=tk.focal_gamma,
        )

    if not tk.rdrop:
        return lossf(logits), None
    logits2 = fs.model(**batch, mix=mix)
    kl = rdrop_kl(logits, logits2)
    return 0.5 * (lossf(logits) + lossf(logits2)) + tk.rdrop_alpha * kl, kl


def train_step(
    ctx: TrainContext, fs: FoldSetup, batch: dict[str, torch.Tensor], s: dict[str, Any], ep: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch under ``accelerator.accumulate``: loss (+ FGM/PGD and AWP adversarial passes),
    backward, gradient clipping on sync steps, optimizer and scheduler step. Extra losses go to
    ``s["extras"]``. Returns (loss, grad norm or None when gradients are still accumulating)."""
    acc, tc, tk = ctx.accelerator, ctx.cfg.train, ctx.cfg.tricks
    with acc.accumulate(fs.model):
        t = batch.pop("targets")
        mix = draw_mixup(len(t), tk.mixup_alpha, fs.mix_rng) if tk.mixup else None
        mix = (mix[0], mix[1].to(t.device)) if mix is not None else None
        loss, kl = compute_loss(ctx, fs, batch, t, mix)
        acc.backward(loss)
        if kl is not None:
            s["extras"].setdefault(mn.TRAIN_RDROP_KL, []).append(kl.item())
        if fs.adversary is not None:
            adv = fs.adversary.backward_adversarial(lambda: compute_loss(ctx, fs, batch, t, mix)[0], acc.backward)
            s["extras"].setdefault(mn.TRAIN_ADV_LOSS, []).append(adv.item())
        if fs.awp is not None and fs.awp.active(ep, s["running_loss"]):
            adv = fs.awp.backward_adversarial(lambda: compute_loss(ctx, fs, batch, t, mix)[0], acc.backward)
            s["extras"].setdefault(mn.TRAIN_AWP_LOSS, []).append(adv.item())
        grad_norm = acc.clip_grad_norm_(fs.trainable, tc.max_grad_norm) if acc.sync_gradients else None
        fs.optimizer.step()
        fs.scheduler.step()
        fs.optimizer.zero_grad()
        if fs.attack_only_emb and acc.sync_gradients:
            fs.emb.grad = None
    return loss, grad_norm


def log_window(ctx: TrainContext, fs: FoldSetup, s: dict[str, Any], ep: float, grad_norm, seconds: float) -> None:
    """Log the window's mean loss, lr, grad norm, pairs/s and extra losses (``train/*``) and the
    run's ``progress/step``; reset the window. With N ranks the loss is the mean over the ranks and
    pairs/s counts all ranks (this rank's pairs x N); the extra losses are this rank's."""
    dt = max(seconds, 1e-9) / ctx.world  # pairs/s of all ranks (each counts its own pairs)
    w_loss, w_n, w_pairs = s["window"]
    lr_now = fs.scheduler.get_last_lr()[0]
    step, fold_step, k = ctx.global_step, s["fold_step"], fs.k
    ctx.store.log_metrics(
        ctx.run_id,
        [
            *[
                {"name": fs.mname(n), "value": v, "fold": k, "step": fold_step, "epoch": ep}
                for n, v in (
                    (mn.TRAIN_LOSS, w_loss / w_n),
                    (mn.TRAIN_LR, lr_now),
                    (mn.TRAIN_GRAD_NORM, float(grad_norm) if grad_norm is not None else float("nan")),
                    (mn.TRAIN_SAMPLES_PER_S, w_pairs / dt),
                    *[(n, float(np.mean(v))) for n, v in s["extras"].items()],
                )
            ],
            {"name": mn.PROGRESS_STEP, "value": float(step), "fold": -1, "step": step},
        ],
    )
    log.info(
        "%sfold %d step %d epoch %.2f loss %.4f lr %.2e %.1f pairs/s%s",
        fs.who,
        k,
        fold_step,
        ep,
        w_loss / w_n,
        lr_now,
        w_pairs / dt,
        "".join(f" {n[6:]} {np.mean(v):.4f}" for n, v in s["extras"].items()),
    )
    s["window"], s["extras"] = [0.0, 0, 0], {}


def checkpoint_state(ctx: TrainContext, fs: FoldSetup, s: dict[str, Any], epoch: int, b_i: int) -> dict[str, Any]:
    """What ``resume.pt`` holds after batch ``b_i`` of ``epoch``: model, optimizer, scheduler, EMA,
    AWP, every RNG, the accelerator's accumulation counter, the sampler's position and the loop
    state ``s`` (at an epoch's end: the next epoch, batch 0, and the generator's current state)."""
    last = b_i >= fs.batches_per_epoch
    rng, mix_rng = rng_state(), fs.mix_rng.bit_generator.state
    return {
        "world": ctx.world,
        "rng_ranks": all_ranks(rng),  # one process: [rng]; N ranks: rank r's at [r]
        "mix_rng_ranks": all_ranks(mix_rng),
        "model": fs.unwrapped.state_dict(),
        "optimizer": fs.raw_optimizer.state_dict(),
        "scheduler": fs.raw_scheduler.state_dict(),
        "ema": {"shadow": fs.ema.shadow, "num_updates": fs.ema.num_updates} if fs.ema is not None else None,
        "awp_started": fs.awp.started if fs.awp is not None else None,
        "mix_rng": mix_rng,
        "rng": rng,
        "accelerator_step": ctx.accelerator.step,
        "sampler_epoch_state": fs.sampler.rng.bit_generator.state if last else fs.sampler.epoch_state,
        "global_step": ctx.global_step,
        "loop": {**s, "epoch": epoch + 1 if last else epoch, "batches_done": 0 if last else b_i},
    }


def restore_step_checkpoint(ctx: TrainContext, fs: FoldSetup, ckpt: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Load a ``resume.pt`` into the fold's objects. Returns (loop state, the RNG state still to
    restore after the epoch's loader iterator draws its base seed, or None when it was restored
    here, at an epoch boundary, as an uninterrupted run has it before the next iterator)."""
    fs.unwrapped.load_state_dict(ckpt["model"])
    fs.raw_optimizer.load_state_dict(ckpt["optimizer"])
    fs.raw_scheduler.load_state_dict(ckpt["scheduler"])
    if fs.ema is not None:
        fs.ema.shadow, fs.ema.num_updates = ckpt["ema"]["shadow"], ckpt["ema"]["num_updates"]
    if fs.awp is not None:
        fs.awp.started = ckpt["awp_started"]
    r = ctx.accelerator.process_index  # N ranks: this rank's generators (rank 0's = "rng"/"mix_rng")
    fs.mix_rng.bit_generator.state = ckpt["mix_rng_ranks"][r] if "mix_rng_ranks" in ckpt else ckpt["mix_rng"]
    rng = ckpt["rng_ranks"][r] if "rng_ranks" in ckpt else ckpt["rng"]
    ctx.accelerator.step = ckpt["accelerator_step"]
    s = ckpt["loop"]
    fs.sampler.resume_at(ckpt["sampler_epoch_state"], s["batches_done"] * ctx.world)  # all ranks' batches
    ctx.global_step = ckpt["global_step"]
    if ctx.progress is not None:
        ctx.progress.advance(0, description=f"{fs.who}fold {fs.k} resumed at step {s['fold_step']}")
    if s["batches_done"]:  # mid-epoch: the saved state already had this epoch's base seed drawn
        return s, rng
    set_rng_state(rng)
    return s, None


def finish_fold(ctx: TrainContext, fs: FoldSetup, s: dict[str, Any], t_fold: float) -> FoldResult:
    """The best weights -> test predictions, ``model.safetensors`` (final stage), the fold's files
    and its ``fold/*`` metric rows (``fold/seconds``: since ``t_fold``, a ``time.time()``)."""
    tc, fc, k = ctx.cfg.train, ctx.cfg.features, fs.k
    if fs.attack_only_emb:
        fs.emb.requires_grad_(False)
    if s["best_state"] is None:
        raise WorkbenchError(f"fold {k}: no evaluation ran (no training batch?)")
    fs.unwrapped.load_state_dict(s["best_state"])
    test_probs = (
        predict_proba(
            fs.unwrapped,
            ctx.encoded,
            ctx.test_idx,
            tc.eval_batch_size,
            ctx.pad_id,
            ctx.device,
            ctx.autocast_dtype,
            fs.feats,
            shard=ctx.shard,
        )
        if len(ctx.test_idx)
        else None
    )
    fold_dir = ctx.fold_dir(fs.stage, k)
    if fs.final and tc.save_checkpoints and ctx.accelerator.is_main_process:
        from safetensors.torch import save_file

        atomic_write(
            fold_dir / "model.safetensors",
            lambda p: save_file({n: t_.contiguous() for n, t_ in s["best_state"].items()}, str(p)),
        )
        ctx.store.add_artifact(ctx.run_id, "checkpoint", fold_dir / "model.safetensors", fold=k)
        if features_on(fc):  # the shapes and ID vocabularies the checkpoint's tables belong to
            ctx.store.add_artifact(ctx.run_id, "features", save_fold_features(fold_dir, fc, fs.id_vocab), fold=k)
    seconds = time.time() - t_fold
    best = s["best"]
    rows = [{"name": fs.mname(f"fold/{n}"), "value": best[n], "fold": k} for n in ("ndcg", "task2_f1", "task3_f1")]
    rows += [{"name": fs.mname(mn.FOLD_SECONDS), "value": seconds, "fold": k}]
    rows += [{"name": mn.FOLD_DONE, "value": 1.0, "fold": k}] if fs.final else []
    rows += (
        [{"name": mn.TRICKS_PSEUDO_ROWS, "value": float(len(fs.extra)), "fold": k}]
        if fs.final and ctx.cfg.tricks.pseudo_label
        else []
    )
    result = FoldResult(k, fs.stage, s["oof"], test_probs, best, seconds, ctx.global_step, rows)
    if ctx.accelerator.is_main_process:
        write_fold_result(ctx, result)
    ctx.store.log_metrics(ctx.run_id, rows)
    log.info("%sfold %d done in %.0f s: best nDCG %.4f at epoch %.2f", fs.who, k, seconds, best["ndcg"], best["epoch"])
    ctx.accelerator.free_memory()
    ctx.accelerator.wait_for_everyone()  # N ranks: the fold's files are on disk before any rank goes on
    return result


def _evaluate(
    ctx: TrainContext,
    k: int,
    stage: str,
    unwrapped: torch.nn.Module,
    ema: EMA | None,
    va: np.ndarray,
    va_frame: pd.DataFrame,
    feats: RowFeatures | None,
    s: dict[str, Any],
    ep: float,
) -> None:
    """Score the validation rows (with the EMA weights when on), log ``eval/*`` and keep the best
    weights and OOF probabilities in the loop state ``s``."""
    tc = ctx.cfg.train
    final = stage == "final"
    if ema is not None:  # evaluation and checkpoints use the EMA weights
        with ema.applied(unwrapped):
            probs = predict_proba(
                unwrapped,
                ctx.encoded,
                va,
                tc.eval_batch_size,
                ctx.pad_id,
                ctx.device,
                ctx.autocast_dtype,
                feats,
                ctx.shard,
            )
    else:
        probs = predict_proba(
            unwrapped, ctx.encoded, va, tc.eval_batch_size, ctx.pad_id, ctx.device, ctx.autocast_dtype, feats, ctx.shard
        )
    m = eval_metrics(probs, va_frame)
    m["loss"] = float(-np.log(np.clip(probs[np.arange(len(va)), ctx.labels_all[va]], 1e-12, 1)).mean())
    prefix = mn.EVAL_PREFIX if final else mn.TEACHER_EVAL_PREFIX
    ctx.store.log_metrics(
        ctx.run_id,
        [{"name": prefix + n, "value": v, "fold": k, "step": s["fold_step"], "epoch": ep} for n, v in m.items()],
    )
    log.info(
        "%sfold %d eval epoch %.2f: nDCG %.4f task2 F1 %.4f task3 F1 %.4f loss %.4f",
        "" if final else "teacher ",
        k,
        ep,
        m["ndcg"],
        m["task2_f1"],
        m["task3_f1"],
        m["loss"],
    )
    if m["ndcg"] > s["best"]["ndcg"]:
        s["best"] = {**m, "epoch": ep, "step": s["fold_step"]}
        weights = ema.state_dict() if ema is not None else {}
        s["best_state"] = {
            n: weights.get(n, t_).detach().to("cpu", copy=True) for n, t_ in unwrapped.state_dict().items()
        }
        s["oof"] = probs
