"""K-fold cross-encoder training on ESCI with OOF and test predictions.

Reads top to bottom like the transformers ``examples/`` scripts:
load data -> query-grouped folds -> tokenize (cached) -> per fold: train with AdamW + linear
warmup/decay on ``accelerate`` (device placement, bf16/fp16, gradient accumulation, multi-GPU via
``accelerate launch``), evaluate ``evals_per_epoch`` times per epoch, keep the best checkpoint,
predict the fold's validation rows (OOF) and the test rows -> blend with baselines on OOF ->
artifacts under ``runs/<run_id>/`` and metrics in runs.db.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from core.baselines import bm25_scores, random_scores
from core.blend import nested_blend, standardize_per_query
from core.config import RunConfig, save_config
from core.dense import dense_scores
from core.data import ESCI_LABELS, load_esci
from core.errors import ConfigError, DataError, WorkbenchError
from core.features import (PARAM_PREFIX, RowFeatures, build_id_vocab, build_semantic, check_features, encode_ids,
                           features_on, ngram_bags_cached, save_fold_features, word2vec_bucket_init)
from core.folds import assign_folds
from core.labels import apply_to_training
from core.metrics import expected_gain, mean_ndcg, micro_f1_task2, micro_f1_task3
from core.model import CrossEncoder, collate, load_tokenizer
from core.tricks import (AWP, EMA, FGM, PGD, classification_loss, distill_targets, draw_mixup, param_groups,
                         parse_class_weights, rdrop_kl, select_pseudo_labels)
from core.report import PROB_COLUMNS
from core.runs import RunStore, now_iso
from core.text import EncodedPairs, encode_pairs_cached

log = logging.getLogger("esci.train")

LABEL_TO_INDEX = {lab: i for i, lab in enumerate(ESCI_LABELS)}

#: scorers a blend can use; each maps the examples frame to one score per row
BLEND_MEMBERS = {
    "bm25": lambda df, cfg: bm25_scores(df),
    "dense": lambda df, cfg: dense_scores(df, cfg.blend.dense_model),
    "random": lambda df, cfg: random_scores(df, seed=cfg.train.seed),
}


class RunStopped(WorkbenchError):
    """Raised inside the trainer when SIGTERM/SIGINT asks the run to stop."""


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
    """

    run_id: str
    run_dir: Path
    oof: pd.DataFrame
    test: pd.DataFrame | None
    cv: dict[str, float]
    fold_metrics: list[dict[str, Any]] = field(default_factory=list)
    blend_weights: dict[str, float] = field(default_factory=dict)


class LengthGroupedBatchSampler:
    """Batches of similar length (less padding), in random order, deterministic by seed.

    Shuffles the indices, cuts them into mega-batches of ``batch_size * mega`` rows, sorts
    each mega-batch by length (longest first) and cuts it into batches; the batch order is
    shuffled again (the ``LengthGroupedSampler`` idea of transformers' Trainer). Each call of
    ``__iter__`` draws a new permutation.
    """

    def __init__(self, indices: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int,
                 grouped: bool = True, mega: int = 50):
        self.indices = np.asarray(indices)
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.grouped = grouped
        self.mega = mega
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        perm = self.rng.permutation(self.indices)
        if not self.grouped:
            batches = [perm[i : i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        else:
            size = self.batch_size * self.mega
            batches = []
            for i in range(0, len(perm), size):
                chunk = perm[i : i + size]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
            order = self.rng.permutation(len(batches))
            batches = [batches[o] for o in order]
        for b in batches:
            yield b.tolist()


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> bf16 on a GPU that supports it, fp16 on other GPUs, ``no`` on CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, encoded: EncodedPairs, indices: np.ndarray, batch_size: int,
                  pad_id: int, device: torch.device, autocast_dtype: torch.dtype | None = None,
                  features: RowFeatures | None = None) -> np.ndarray:
    """Class probabilities for the sequences ``indices``: float32 (len(indices), 4), order kept.

    Batches are formed from length-sorted rows (little padding), then put back in order.
    ``features``: the rows' side features (n-gram bags / ID ids) for a model with ``semantic``.
    """
    model.eval()
    indices = np.asarray(indices)
    out = np.zeros((len(indices), 4), dtype=np.float32)
    order = np.argsort(-encoded.lengths[indices], kind="stable")
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(encoded, indices[pos], pad_id, features).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch)
        out[pos] = torch.softmax(logits.float(), -1).cpu().numpy()
    return out


def _eval_metrics(probs: np.ndarray, frame: pd.DataFrame) -> dict[str, float]:
    """nDCG of the expected gain, Task 2/3 micro-F1 of the argmax; probs (N, 4) for frame's rows."""
    labels = frame["esci_label"].to_numpy()
    pred = np.asarray(ESCI_LABELS)[probs.argmax(1)]
    return {
        "ndcg": mean_ndcg(frame["query_id"].to_numpy(), expected_gain(probs), labels),
        "task2_f1": micro_f1_task2(labels, pred),
        "task3_f1": micro_f1_task3(labels, pred == "S"),
    }


def _setup_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("esci")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def _process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - best effort
        return None


def load_training_frame(cfg: RunConfig) -> pd.DataFrame:
    """Examples of ``cfg.data`` (train and test split), with ``max_queries`` applied to train.

    Raises:
        DataError: see :func:`core.data.load_esci`.
    """
    df = load_esci(cfg.data.dir, task=cfg.data.task, locales=cfg.data.locales)
    if cfg.data.max_queries:
        train_q = pd.unique(df.loc[df["split"] == "train", "query_id"])
        keep = set(train_q[: cfg.data.max_queries])
        df = df[(df["split"] != "train") | df["query_id"].isin(keep)].reset_index(drop=True)
    if not (df["split"] == "train").any():
        raise DataError(cfg.data.dir, "no examples with split == 'train' to train on")
    return df


def run_training(cfg: RunConfig, store: RunStore, run_id: str | None = None,
                 progress: Progress | None = None) -> RunResult:
    """Train ``cfg`` with k-fold CV, record everything in ``store`` and ``runs/<run_id>/``.

    Args:
        cfg: the resolved run config.
        store: runs.db connection of this process (the trainer writes its own metrics).
        run_id: an existing ``queued`` run (from ``workbench launch``) or None for a new one.
        progress: UI callbacks.

    Returns:
        RunResult with the OOF and test frames and the CV metrics.

    Raises:
        DataError, ConfigError: bad data or settings (the run is marked ``failed``).
        RunStopped: SIGTERM/SIGINT (the run is marked ``stopped``).
    """
    progress = progress or NullProgress()
    if run_id is None:
        run_id = store.create_run(cfg.name, cfg.to_dict())
    run_dir = Path(cfg.output_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    handler = _setup_file_log(run_dir)
    # a launched run keeps its supervisor's pid (the session leader that records the exit code)
    supervised = os.environ.get("WORKBENCH_SUPERVISOR_PID") == str(os.getppid())
    pid_fields = {} if supervised else {"pid": os.getpid(), "process_start_time": _process_start_time(os.getpid())}
    store.update_run(run_id, status="running", **pid_fields,
                     host=socket.gethostname(), started=now_iso(), run_dir=str(run_dir),
                     config=cfg.to_json(), model=cfg.model.name, task=cfg.data.task)
    store.add_artifact(run_id, "config", run_dir / "config.yaml")
    store.add_artifact(run_id, "log", run_dir / "train.log")

    with recorded_run(store, run_id, handler):
        result = _train(cfg, store, run_id, run_dir, progress)
        log.info("run %s finished: %s", run_id, result.cv)
    return result


@contextlib.contextmanager
def recorded_run(store: RunStore, run_id: str, handler: logging.Handler):
    """The lifecycle of a run's body, shared by training and pre-training.

    SIGTERM/SIGINT raise :class:`RunStopped` inside the body (main thread only). On exit the run
    row gets its final status and exit code: finished/0, stopped/143 (RunStopped), failed/2 (any
    other WorkbenchError, message kept), failed/1 (anything else, type and message kept). The
    exception is re-raised; the signal handlers are restored and the file log ``handler`` closed.
    """
    def _on_signal(signum, frame):
        raise RunStopped(f"run {run_id}: stopped by signal {signum}")

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread (e.g. a UI worker): no signal handling
        previous = {}
    try:
        yield
        store.update_run(run_id, status="finished", ended=now_iso(), exit_code=0)
    except RunStopped:
        log.warning("run %s stopped", run_id)
        store.update_run(run_id, status="stopped", ended=now_iso(), exit_code=143)
        raise
    except WorkbenchError as exc:
        log.error("run %s failed: %s", run_id, exc)
        store.update_run(run_id, status="failed", ended=now_iso(), exit_code=2, error=str(exc))
        raise
    except BaseException as exc:
        log.exception("run %s crashed", run_id)
        store.update_run(run_id, status="failed", ended=now_iso(), exit_code=1,
                         error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        logging.getLogger("esci").removeHandler(handler)
        handler.close()


def _train(cfg: RunConfig, store: RunStore, run_id: str, run_dir: Path, progress: Progress) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    t_run = time.time()
    tc = cfg.train
    fc = cfg.features
    check_features(fc)  # before anything heavy: a bad features section fails at once
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    progress.message("loading data")
    df = load_training_frame(cfg)
    # label cleaning (core.labels): fit_mask/fit_labels change what is trained on, never df itself,
    # so dropped examples are still scored out-of-fold and evaluated on their original labels
    fit_mask, fit_labels, labels_summary = apply_to_training(df, cfg.labels, store)
    log.info("%s", labels_summary)
    train_idx = np.flatnonzero((df["split"] == "train").to_numpy())
    test_idx = np.flatnonzero((df["split"] == "test").to_numpy())
    train_df = df.iloc[train_idx].reset_index(drop=True)
    folds = assign_folds(train_df["query_id"].to_numpy(), tc.folds, tc.seed)
    run_folds = tc.run_folds if tc.run_folds is not None else list(range(tc.folds))
    bad = [k for k in run_folds if not 0 <= k < tc.folds]
    if bad:
        raise ConfigError(f"train.run_folds: {bad} outside 0..{tc.folds - 1}")
    log.info("data %s: %d train examples (%d queries), %d test examples; %d folds, training %s",
             cfg.data.dir, len(train_idx), train_df["query_id"].nunique(), len(test_idx), tc.folds, run_folds)

    progress.message("tokenizing")
    tokenizer = load_tokenizer(cfg.model.name)
    encoded = encode_pairs_cached(df, tokenizer, cfg.text)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    labels_all = df["esci_label"].map(LABEL_TO_INDEX).to_numpy()
    log.info("tokenized: mean length %.1f, max %d", encoded.lengths.mean(), encoded.lengths.max())
    # ---- side features (core.features; config section ``features``, all off by default) --------
    bags, bag_init = None, None
    if fc.ngram_bags:
        t_feat = time.time()
        bags = ngram_bags_cached(df, fc, cfg.text.cache_dir)
        if fc.init == "word2vec":
            bag_init = word2vec_bucket_init(df, fc, seed=tc.seed, cache_dir=cfg.text.cache_dir)
        per = np.diff(bags.offsets).reshape(len(df), -1)
        log.info("n-gram bags %s: word 1..%d-grams into %d buckets, mean %s per pair, init %s%s (%.1f s)",
                 fc.bag_fields, fc.ngram, fc.buckets, np.round(per.mean(0), 1).tolist(), fc.init,
                 f" ({len(bag_init[0])} buckets from word2vec)" if bag_init is not None else "", time.time() - t_feat)

    mp = resolve_mixed_precision(tc.mixed_precision)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=tc.grad_accum, cpu=not torch.cuda.is_available())
    device = accelerator.device
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    log.info("device %s, mixed precision %s, processes %d", device, mp, accelerator.num_processes)

    # ---- training techniques (core.tricks; config section ``tricks``, all off by default) -------
    tk = cfg.tricks
    if tk.fgm and tk.pgd:
        raise ConfigError("tricks.fgm and tricks.pgd both perturb the word embeddings: turn on one of them")
    class_weights = parse_class_weights(tk.class_weights)
    # targets are class-probability rows (one-hot for hard labels; soft for distillation/pseudo-labels)
    hard_targets = np.zeros((len(df), 4), dtype=np.float32)
    codes = pd.Series(fit_labels).map(LABEL_TO_INDEX)
    has_label = codes.notna().to_numpy()
    hard_targets[np.flatnonzero(has_label), codes[has_label].astype(int).to_numpy()] = 1.0
    two_stage = tk.self_distill or tk.pseudo_label  # a teacher k-fold pass first

    steps_per_epoch = {k: math.ceil(math.ceil(((folds != k) & fit_mask[train_idx]).sum() / tc.batch_size) / tc.grad_accum) for k in run_folds}
    total_steps = sum(steps_per_epoch[k] * tc.epochs for k in run_folds) * (2 if two_stage else 1)
    progress.start(total_steps, "training")
    # progress/*: what a monitor needs for an ETA (run-level, fold = -1)
    store.log_metrics(run_id, [{"name": "progress/total_steps", "value": float(total_steps), "fold": -1}])
    global_step = 0

    def fit_folds(stage: str, targets_of) -> tuple[np.ndarray, dict[int, np.ndarray], list[dict[str, Any]]]:
        """Train every fold of ``run_folds``; ``targets_of(k) -> (targets (len(df), 4), extra rows)``.

        Returns OOF probabilities (len(train_idx), 4) (NaN for folds not run), each fold's test
        probabilities and the per-fold best metrics. The ``teacher`` stage of self-distillation /
        pseudo-labelling logs under ``teacher/*`` and saves no checkpoints.
        """
        nonlocal global_step
        final = stage == "final"

        def mname(name: str) -> str:
            return name if final else "teacher/" + name.replace("/", "_")

        oof_probs = np.full((len(train_idx), 4), np.nan, dtype=np.float32)
        test_by_fold: dict[int, np.ndarray] = {}
        fold_metrics: list[dict[str, Any]] = []
        for k in run_folds:
            t_fold = time.time()
            set_seed(tc.seed + k)
            targets, extra = targets_of(k)
            tr = train_idx[(folds != k) & fit_mask[train_idx]]  # rows of df trained on (dropped labels left out)
            if len(extra):
                tr = np.concatenate([tr, extra])
            va_local = np.flatnonzero(folds == k)  # rows of train_df
            va = train_idx[va_local]
            va_frame = train_df.iloc[va_local]
            # ID vocabularies from this fold's training products only (saved with the checkpoint)
            id_vocab = build_id_vocab(df.iloc[train_idx[(folds != k) & fit_mask[train_idx]]], fc.id_fields,
                                      fc.id_min_count) if fc.id_embeddings else None
            feats = RowFeatures(bags, encode_ids(df, id_vocab) if id_vocab is not None else None) \
                if features_on(fc) else None
            if id_vocab is not None:
                log.info("fold %d ID vocabularies (min_count %d): %s", k, fc.id_min_count,
                         {f: len(v) for f, v in id_vocab.items()})
            model = CrossEncoder.from_pretrained(cfg.model.name, cfg.model.pooling, cfg.model.dropout,
                                                 msd_rates=tk.msd_rates if tk.msd else None,
                                                 layer_pooling_last=tk.layer_pooling_last if tk.layer_pooling else 0,
                                                 semantic=build_semantic(fc, id_vocab, bag_init))
            if cfg.model.freeze_embeddings:
                model.backbone.get_input_embeddings().weight.requires_grad_(False)
            if tk.grad_checkpointing:  # Chen et al. 2016 (arXiv:1604.06174): recompute activations in backward
                model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            optimizer = torch.optim.AdamW(param_groups(model, tc.lr, tc.head_lr, tc.weight_decay,
                                                       layer_decay=tk.llrd_decay if tk.llrd else 1.0))
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            emb = model.backbone.get_input_embeddings().weight
            attack_only_emb = (tk.fgm or tk.pgd) and not emb.requires_grad
            if attack_only_emb:  # frozen embeddings still need their gradient for the attack (not optimised)
                emb.requires_grad_(True)
            n_steps = steps_per_epoch[k] * tc.epochs if not len(extra) else \
                math.ceil(math.ceil(len(tr) / tc.batch_size) / tc.grad_accum) * tc.epochs
            scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * n_steps), n_steps)
            sampler = LengthGroupedBatchSampler(tr, encoded.lengths, tc.batch_size, tc.seed + k, tc.length_grouping)
            loader = torch.utils.data.DataLoader(
                np.arange(len(encoded)), batch_sampler=sampler,  # the sampler yields rows of df
                collate_fn=lambda idx, t=targets, f=feats: {**collate(encoded, idx, pad_id, f), "targets": torch.from_numpy(t[idx])},
            )
            model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
            unwrapped = accelerator.unwrap_model(model)
            adversary = None
            if tk.fgm:
                adversary = FGM(unwrapped, tk.fgm_epsilon)
            elif tk.pgd:
                adversary = PGD(unwrapped, tk.pgd_epsilon, tk.pgd_alpha, tk.pgd_steps)
            awp = AWP(unwrapped, tk.awp_lr, tk.awp_eps, start_epoch=tk.awp_start_epoch, start_loss=tk.awp_start_loss,
                      skip_prefixes=(PARAM_PREFIX,)) if tk.awp else None  # side-feature tables never perturbed
            ema = EMA(unwrapped, tk.ema_decay) if tk.ema else None
            mix_rng = np.random.default_rng(tc.seed + k)

            def compute_loss(batch, t, mix):
                """Forward (twice with R-Drop) -> (loss, R-Drop KL or None)."""
                logits = model(**batch, mix=mix)
                if mix is not None:
                    t = mix[0] * t + (1.0 - mix[0]) * t[mix[1]]
                lossf = lambda z: classification_loss(  # noqa: E731
                    z, t, tk.loss, label_smoothing=tk.label_smoothing, class_weights=class_weights,
                    poly1_epsilon=tk.poly1_epsilon, focal_gamma=tk.focal_gamma)
                if not tk.rdrop:
                    return lossf(logits), None
                logits2 = model(**batch, mix=mix)
                kl = rdrop_kl(logits, logits2)
                return 0.5 * (lossf(logits) + lossf(logits2)) + tk.rdrop_alpha * kl, kl

            batches_per_epoch = len(sampler)
            eval_points = {
                min(batches_per_epoch, round(batches_per_epoch * (j + 1) / tc.evals_per_epoch))
                for j in range(tc.evals_per_epoch)
            }
            best = {"ndcg": -1.0}
            best_state = None
            window_loss, window_n, window_t, window_pairs = 0.0, 0, time.time(), 0
            extras: dict[str, list[float]] = {}
            running_loss = None
            fold_step = 0
            for epoch in range(tc.epochs):
                model.train()
                for b_i, batch in enumerate(loader, start=1):
                    ep = epoch + b_i / batches_per_epoch
                    with accelerator.accumulate(model):
                        t = batch.pop("targets")
                        mix = draw_mixup(len(t), tk.mixup_alpha, mix_rng) if tk.mixup else None
                        mix = (mix[0], mix[1].to(t.device)) if mix is not None else None
                        loss, kl = compute_loss(batch, t, mix)
                        accelerator.backward(loss)
                        if kl is not None:
                            extras.setdefault("train/rdrop_kl", []).append(kl.item())
                        if adversary is not None:
                            adv = adversary.backward_adversarial(lambda: compute_loss(batch, t, mix)[0], accelerator.backward)
                            extras.setdefault("train/adv_loss", []).append(adv.item())
                        if awp is not None and awp.active(ep, running_loss):
                            adv = awp.backward_adversarial(lambda: compute_loss(batch, t, mix)[0], accelerator.backward)
                            extras.setdefault("train/awp_loss", []).append(adv.item())
                        grad_norm = None
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(trainable, tc.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                        if attack_only_emb and accelerator.sync_gradients:
                            emb.grad = None
                    running_loss = loss.item() if running_loss is None else 0.9 * running_loss + 0.1 * loss.item()
                    window_loss += loss.item()
                    window_n += 1
                    window_pairs += len(t)
                    if accelerator.sync_gradients:
                        if ema is not None:
                            ema.update(unwrapped)
                        fold_step += 1
                        global_step += 1
                        progress.advance(1, description=f"{'' if final else 'teacher '}fold {k} epoch {epoch + 1}/{tc.epochs} loss {loss.item():.3f}")
                        if fold_step % tc.log_every == 0:
                            dt = time.time() - window_t
                            lr_now = scheduler.get_last_lr()[0]
                            store.log_metrics(run_id, [
                                {"name": mname("train/loss"), "value": window_loss / window_n, "fold": k, "step": fold_step, "epoch": ep},
                                {"name": mname("train/lr"), "value": lr_now, "fold": k, "step": fold_step, "epoch": ep},
                                {"name": mname("train/grad_norm"), "value": float(grad_norm) if grad_norm is not None else float("nan"),
                                 "fold": k, "step": fold_step, "epoch": ep},
                                {"name": mname("train/samples_per_s"), "value": window_pairs / max(dt, 1e-9), "fold": k, "step": fold_step, "epoch": ep},
                                *[{"name": mname(n), "value": float(np.mean(v)), "fold": k, "step": fold_step, "epoch": ep}
                                  for n, v in extras.items()],
                                {"name": "progress/step", "value": float(global_step), "fold": -1, "step": global_step},
                            ])
                            log.info("%sfold %d step %d epoch %.2f loss %.4f lr %.2e %.1f pairs/s%s", "" if final else "teacher ",
                                     k, fold_step, ep, window_loss / window_n, lr_now, window_pairs / max(dt, 1e-9),
                                     "".join(f" {n[6:]} {np.mean(v):.4f}" for n, v in extras.items()))
                            window_loss, window_n, window_t, window_pairs = 0.0, 0, time.time(), 0
                            extras = {}
                    if b_i in eval_points:
                        if ema is not None:  # evaluation and checkpoints use the EMA weights
                            with ema.applied(unwrapped):
                                probs = predict_proba(unwrapped, encoded, va, tc.eval_batch_size, pad_id, device,
                                                      autocast_dtype, feats)
                        else:
                            probs = predict_proba(unwrapped, encoded, va, tc.eval_batch_size, pad_id, device,
                                                  autocast_dtype, feats)
                        m = _eval_metrics(probs, va_frame)
                        m["loss"] = float(-np.log(np.clip(probs[np.arange(len(va)), labels_all[va]], 1e-12, 1)).mean())
                        store.log_metrics(run_id, [
                            {"name": mname(f"eval/{n}"), "value": v, "fold": k, "step": fold_step, "epoch": ep} for n, v in m.items()
                        ])
                        log.info("%sfold %d eval epoch %.2f: nDCG %.4f task2 F1 %.4f task3 F1 %.4f loss %.4f",
                                 "" if final else "teacher ", k, ep, m["ndcg"], m["task2_f1"], m["task3_f1"], m["loss"])
                        if m["ndcg"] > best["ndcg"]:
                            best = {**m, "epoch": ep, "step": fold_step}
                            weights = ema.state_dict() if ema is not None else {}
                            best_state = {n: weights.get(n, t_).detach().to("cpu", copy=True)
                                          for n, t_ in unwrapped.state_dict().items()}
                            oof_probs[va_local] = probs
                        model.train()
            # best checkpoint -> test predictions and the saved weights
            if attack_only_emb:
                emb.requires_grad_(False)
            unwrapped.load_state_dict(best_state)
            if len(test_idx):
                test_by_fold[k] = predict_proba(unwrapped, encoded, test_idx, tc.eval_batch_size, pad_id, device,
                                                autocast_dtype, feats)
            if final and tc.save_checkpoints and accelerator.is_main_process:
                from safetensors.torch import save_file

                fold_dir = run_dir / f"fold{k}"
                fold_dir.mkdir(exist_ok=True)
                save_file({n: t_.contiguous() for n, t_ in best_state.items()}, str(fold_dir / "model.safetensors"))
                store.add_artifact(run_id, "checkpoint", fold_dir / "model.safetensors", fold=k)
                if features_on(fc):  # the shapes and ID vocabularies the checkpoint's tables belong to
                    store.add_artifact(run_id, "features", save_fold_features(fold_dir, fc, id_vocab), fold=k)
            fold_time = time.time() - t_fold
            fold_metrics.append({"fold": k, **best, "seconds": fold_time})
            store.log_metrics(run_id, [
                {"name": mname("fold/ndcg"), "value": best["ndcg"], "fold": k},
                {"name": mname("fold/task2_f1"), "value": best["task2_f1"], "fold": k},
                {"name": mname("fold/task3_f1"), "value": best["task3_f1"], "fold": k},
                {"name": mname("fold/seconds"), "value": fold_time, "fold": k},
                *([{"name": "fold/done", "value": 1.0, "fold": k}] if final else []),
                *([{"name": "tricks/pseudo_rows", "value": float(len(extra)), "fold": k}] if final and tk.pseudo_label else []),
            ])
            log.info("%sfold %d done in %.0f s: best nDCG %.4f at epoch %.2f", "" if final else "teacher ",
                     k, fold_time, best["ndcg"], best["epoch"])
            accelerator.free_memory()
            del model, optimizer, loader, scheduler, best_state, unwrapped, adversary, awp, ema, feats
        return oof_probs, test_by_fold, fold_metrics

    no_extra = np.zeros(0, dtype=np.int64)
    if not two_stage:
        oof_probs, test_by_fold, fold_metrics = fit_folds("final", lambda k: (hard_targets, no_extra))
    else:
        # teacher pass -> soft labels (self-distillation) and/or pseudo-labelled test rows
        progress.message("teacher pass (self-distillation / pseudo-labels)")
        t_oof, t_test, t_metrics = fit_folds("teacher", lambda k: (hard_targets, no_extra))
        student = hard_targets.copy()
        if tk.self_distill:
            have = ~np.isnan(t_oof).any(1) & fit_mask[train_idx]
            rows = train_idx[have]
            student[rows] = distill_targets(t_oof[have], hard_targets[rows].argmax(1), tk.distill_weight)
            log.info("self-distillation: %d training rows get %.2f * OOF + %.2f * hard labels",
                     len(rows), tk.distill_weight, 1 - tk.distill_weight)

        def student_targets(k):
            if not (tk.pseudo_label and k in t_test):
                return student, no_extra
            # fold k's own teacher labels the test rows: no label of validation fold k leaks in
            keep = select_pseudo_labels(t_test[k], tk.pseudo_threshold)
            t = student.copy()
            t[test_idx[keep]] = t_test[k][keep]
            log.info("pseudo-labels for fold %d: %d of %d test pairs with max p >= %.2f", k, keep.sum(),
                     len(keep), tk.pseudo_threshold)
            return t, test_idx[keep]

        if tk.pseudo_label:  # the student folds train on more rows: exact ETA total
            extra_steps = sum(math.ceil(math.ceil((((folds != k) & fit_mask[train_idx]).sum()
                                                  + select_pseudo_labels(t_test[k], tk.pseudo_threshold).sum())
                                                 / tc.batch_size) / tc.grad_accum) * tc.epochs
                              for k in run_folds if k in t_test)
            base = sum(steps_per_epoch[k] * tc.epochs for k in run_folds if k not in t_test)
            store.log_metrics(run_id, [{"name": "progress/total_steps", "value": float(global_step + extra_steps + base),
                                        "fold": -1}])
        oof_probs, test_by_fold, fold_metrics = fit_folds("final", student_targets)
    test_probs = sum(test_by_fold.values()) if test_by_fold else np.zeros((len(test_idx), 4))

    # ---- OOF frame, blend, CV metrics ----------------------------------------------------
    trained = np.isin(folds, run_folds)
    oof = train_df.loc[trained, ["example_id", "query_id", "product_id", "esci_label"]].reset_index(drop=True)
    oof["fold"] = folds[trained]
    oof[PROB_COLUMNS] = oof_probs[trained]
    oof["ce_score"] = expected_gain(oof_probs[trained])
    test = None
    if len(test_idx):
        test = df.iloc[test_idx][["example_id", "query_id", "product_id", "esci_label"]].reset_index(drop=True)
        test["fold"] = -1
        test[PROB_COLUMNS] = (test_probs / len(run_folds)).astype(np.float32)
        test["ce_score"] = expected_gain(test[PROB_COLUMNS].to_numpy())

    progress.message("blending")
    members = list(cfg.blend.members)
    unknown = [m for m in members if m not in BLEND_MEMBERS]
    if unknown:
        raise ConfigError(f"blend.members: unknown {unknown}; known: {sorted(BLEND_MEMBERS)}")
    weights: dict[str, float] = {"ce": 1.0}
    oof["score"] = oof["ce_score"]
    if members:
        z_oof = [standardize_per_query(oof["query_id"], oof["ce_score"])]
        z_test = [standardize_per_query(test["query_id"], test["ce_score"])] if test is not None else []
        for name in members:
            raw = BLEND_MEMBERS[name](df, cfg)
            oof[name] = raw[train_idx][trained]
            z_oof.append(standardize_per_query(oof["query_id"], oof[name]))
            if test is not None:
                test[name] = raw[test_idx]
                z_test.append(standardize_per_query(test["query_id"], test[name]))
        final, per_fold_w, full_w = nested_blend(oof["fold"], oof["query_id"], oof["esci_label"],
                                                 np.column_stack(z_oof), cfg.blend.resolution)
        oof["score"] = final
        weights = dict(zip(["ce", *members], map(float, full_w)))
        if test is not None:
            test["score"] = np.column_stack(z_test) @ full_w
        for f, w in per_fold_w.items():
            log.info("fold %d blend weights (fitted on other folds): %s", f,
                     dict(zip(["ce", *members], np.round(w, 3))))
    elif test is not None:
        test["score"] = test["ce_score"]

    labels = oof["esci_label"].to_numpy()
    qids = oof["query_id"].to_numpy()
    cv = _eval_metrics(oof[PROB_COLUMNS].to_numpy(), oof)
    cv["final_ndcg"] = mean_ndcg(qids, oof["score"].to_numpy(), labels)
    cv["seconds"] = time.time() - t_run
    for f in run_folds:
        sel = oof["fold"].to_numpy() == f
        store.log_metrics(run_id, [{"name": "fold/final_ndcg", "value": mean_ndcg(qids[sel], oof["score"].to_numpy()[sel], labels[sel]), "fold": f}])
    store.log_metrics(run_id, [{"name": f"cv/{n}", "value": v, "fold": -1} for n, v in cv.items()]
                      + [{"name": f"blend/w_{n}", "value": v, "fold": -1} for n, v in weights.items()])

    oof.to_parquet(run_dir / "oof.parquet", index=False)
    store.add_artifact(run_id, "oof", run_dir / "oof.parquet")
    if test is not None:
        test.to_parquet(run_dir / "test.parquet", index=False)
        store.add_artifact(run_id, "test", run_dir / "test.parquet")
    log.info("CV: cross-encoder nDCG %.4f, final (blend %s) nDCG %.4f, task2 F1 %.4f, task3 F1 %.4f",
             cv["ndcg"], weights, cv["final_ndcg"], cv["task2_f1"], cv["task3_f1"])
    return RunResult(run_id, run_dir, oof, test, cv, fold_metrics, weights)
