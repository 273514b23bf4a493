"""The names of the metric rows in runs.db, in one place.

A metric row is ``(run_id, fold, step, epoch, name, value, time)`` (:class:`core.runs.store.RunStore`);
``fold = -1`` marks a run-level row. The writers (training, pre-training) and the readers (runs
list, compare, ablation, the app's screens) use these constants instead of string literals.

Families (the part before the ``/``):

``train/*``     per logging step of a fold: loss, learning rate, throughput, gradient norm
``eval/*``      per evaluation of a fold (several per epoch): nDCG, Task 2/3 F1, loss
``fold/*``      one row per fold: the best checkpoint's figures, its seconds, ``fold/done``
``cv/*``        run level (fold -1): the figures over all OOF rows, logged once the folds end
``blend/*``     run level: the final ranking's blend weights (``blend/w_<member>``)
``progress/*``  run level: the global optimizer step and the total, for ETA
``teacher/*``   the teacher pass of distillation / pseudo-labels (``teacher/eval_*`` etc.)
``pretrain/*``  multitask pre-training: per-task losses, seconds
``tricks/*``    per fold: what a training trick did (pseudo-label rows)
"""

from __future__ import annotations

TRAIN_PREFIX = "train/"
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_SAMPLES_PER_S = "train/samples_per_s"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_ADV_LOSS = "train/adv_loss"
TRAIN_AWP_LOSS = "train/awp_loss"
TRAIN_RDROP_KL = "train/rdrop_kl"

EVAL_PREFIX = "eval/"
EVAL_NDCG = "eval/ndcg"
EVAL_TASK2_F1 = "eval/task2_f1"
EVAL_TASK3_F1 = "eval/task3_f1"
EVAL_LOSS = "eval/loss"

FOLD_PREFIX = "fold/"
FOLD_NDCG = "fold/ndcg"
FOLD_TASK2_F1 = "fold/task2_f1"
FOLD_TASK3_F1 = "fold/task3_f1"
FOLD_FINAL_NDCG = "fold/final_ndcg"
FOLD_SECONDS = "fold/seconds"
FOLD_DONE = "fold/done"

CV_PREFIX = "cv/"
CV_NDCG = "cv/ndcg"
CV_TASK2_F1 = "cv/task2_f1"
CV_TASK3_F1 = "cv/task3_f1"
CV_FINAL_NDCG = "cv/final_ndcg"

BLEND_PREFIX = "blend/"

PROGRESS_PREFIX = "progress/"
PROGRESS_STEP = "progress/step"
PROGRESS_TOTAL_STEPS = "progress/total_steps"

TEACHER_PREFIX = "teacher/"
TEACHER_EVAL_PREFIX = "teacher/eval_"
TEACHER_FOLD_SECONDS = "teacher/fold_seconds"

PRETRAIN_PREFIX = "pretrain/"
PRETRAIN_SECONDS = "pretrain/seconds"

TRICKS_PSEUDO_ROWS = "tricks/pseudo_rows"

#: the figures reported as a run's "best" (:meth:`core.runs.store.RunStore.best_values`), by short name
NDCG, TASK2_F1, TASK3_F1, FINAL_NDCG = "ndcg", "task2_f1", "task3_f1", "final_ndcg"


def cv_name(short: str) -> str:
    """``"ndcg"`` -> ``"cv/ndcg"``: the run-level value over all OOF rows."""
    return CV_PREFIX + short


def eval_name(short: str) -> str:
    """``"ndcg"`` -> ``"eval/ndcg"``: one evaluation of a fold during training."""
    return EVAL_PREFIX + short


def fold_name(short: str) -> str:
    """``"ndcg"`` -> ``"fold/ndcg"``: a fold's best checkpoint."""
    return FOLD_PREFIX + short


def blend_weight_name(member: str) -> str:
    """``"bm25"`` -> ``"blend/w_bm25"``: a member's weight in the final ranking."""
    return f"{BLEND_PREFIX}w_{member}"


def pretrain_loss_name(task: str, final: bool = False) -> str:
    """``pretrain/<task>_loss`` (per logging step) or ``pretrain/final_<task>_loss`` (run level)."""
    return f"{PRETRAIN_PREFIX}final_{task}_loss" if final else f"{PRETRAIN_PREFIX}{task}_loss"


def pretrain_task_on_name(task: str) -> str:
    """``pretrain/<task>_on``: the run-level flag of an enabled pre-training task."""
    return f"{PRETRAIN_PREFIX}{task}_on"
