"""Cumulative ablation of the training techniques (seed "MultiTask Pre-Training", Table 5 style).

Step 0 trains the config as given (the baseline); step i adds the i-th technique on top of all the
previous ones. Each step is a separate, ordinary run in runs.db (named ``<name>+ema+fgm...``), so the
app, ``runs show`` and ``evaluate`` see them like any other run; the table is built from what the
runs logged (``cv/*``, ``fold/*``), so :func:`ablation_table` can also rebuild it later from run ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import RunConfig, load_config
from core.errors import ConfigError, WorkbenchError
from core.runs import metric_names as mn
from core.runs.store import RunStore

#: ``--tricks`` names -> the ``tricks.*`` settings they turn on (their parameters come from the config)
TRICK_PRESETS: dict[str, dict[str, Any]] = {
    "ema": {"ema": True},
    "fgm": {"fgm": True},
    "pgd": {"pgd": True, "fgm": False},
    "awp": {"awp": True},
    "rdrop": {"rdrop": True},
    "poly1": {"loss": "poly1"},
    "focal": {"loss": "focal"},
    "ls": {"label_smoothing": 0.1},
    "msd": {"msd": True},
    "wlp": {"layer_pooling": True},
    "mixup": {"mixup": True},
    "distill": {"self_distill": True},
    "pseudo": {"pseudo_label": True},
    "llrd": {"llrd": True},
    "gc": {"grad_checkpointing": True},
}


def split_items(spec: str) -> list[str]:
    """``"ema,fgm,tricks.class_weights=[1,2,2,1]"`` -> items, splitting on commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items.append(cur.strip())
    return [i for i in items if i]


def item_overrides(item: str) -> list[str]:
    """One ``--tricks`` item -> ``--set`` style overrides.

    A preset name (:data:`TRICK_PRESETS`) or ``key=value`` (``key`` inside ``tricks`` unless dotted,
    e.g. ``label_smoothing=0.2`` or ``train.lr=3e-5``).

    Raises:
        ConfigError: an unknown name.
    """
    if "=" in item:
        key, value = item.split("=", 1)
        key = key.strip()
        return [f"{key if '.' in key else 'tricks.' + key}={value.strip()}"]
    if item not in TRICK_PRESETS:
        raise ConfigError(
            f"--tricks {item!r}: unknown technique; known: {', '.join(TRICK_PRESETS)} "
            "(or key=value of the tricks section)"
        )
    return [f"tricks.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in TRICK_PRESETS[item].items()]


@dataclass
class AblationStep:
    """One run of the ablation: the items added so far and the resolved config."""

    step: int
    added: str  # the item this step adds ("baseline" for step 0)
    items: list[str]
    overrides: list[str]
    config: RunConfig


def plan_ablation(config_path: str | Path, tricks: list[str], overrides: list[str] | None = None) -> list[AblationStep]:
    """The cumulative steps: baseline, +item1, +item1+item2, ... with every config resolved up front.

    Raises:
        ConfigError: an unknown item, a bad value or range, settings in conflict
            (:func:`core.training.validate.check_run_config`), an empty list, a repeated item (checked before any run).
    """
    from core.training.validate import check_run_config

    if not tricks:
        raise ConfigError("--tricks: give at least one technique, e.g. ema,fgm,rdrop")
    if len(set(tricks)) != len(tricks):
        raise ConfigError(f"--tricks {','.join(tricks)}: an item is repeated")
    steps = []
    extra: list[str] = []
    for i, item in enumerate(["baseline", *tricks]):
        if i:
            extra = extra + item_overrides(item)
        cfg = load_config(config_path, list(overrides or []) + extra)
        if cfg.tricks.fgm and cfg.tricks.pgd:
            raise ConfigError(
                f"--tricks step {i} ({item}): fgm and pgd both perturb the word embeddings; use one of them"
            )
        try:
            check_run_config(cfg)
        except ConfigError as exc:
            raise ConfigError(f"--tricks step {i} ({item}): {exc}") from None
        items = list(tricks[:i])
        cfg.name = f"{cfg.name}+{'+'.join(items)}" if items else f"{cfg.name} (ablation baseline)"
        steps.append(AblationStep(i, item, items, list(extra), cfg))
    return steps


def _metric(ms: list[dict], name: str) -> float:
    vals = [m["value"] for m in ms if m["name"] == name and m["fold"] == -1]
    return vals[-1] if vals else float("nan")


def _per_fold(ms: list[dict], name: str) -> dict[int, float]:
    return {m["fold"]: m["value"] for m in ms if m["name"] == name and m["fold"] >= 0}


def _query_ndcg(store: RunStore, run_id: str) -> pd.Series | None:
    """The cross-encoder's nDCG per query from the run's oof.parquet (``ce_score``, else ``score``);
    None when the run has no readable OOF file."""
    from core.errors import DataError
    from core.runs.compare import query_metrics

    try:
        qm = query_metrics(store, run_id)
    except DataError:
        return None
    return qm.ce_ndcg if qm.ce_ndcg is not None else qm.ndcg


def ablation_table(
    store: RunStore, run_ids: list[str], labels: list[str] | None = None, n_resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """One row per run (in order) from runs.db and the runs' OOF files: no retraining.

    Columns: ``run_id``, ``added``, ``cv_ndcg`` (cross-encoder OOF nDCG over all queries),
    ``final_ndcg`` (after the blend), ``task2_f1`` (micro-F1 of the argmax), ``fold_std`` (std of the
    per-fold nDCG), ``delta`` (CV nDCG minus the previous row's), ``paired_std`` (std over folds of
    the per-fold nDCG difference to the previous row, the folds being the same queries),
    ``ci_low`` / ``ci_high`` (the paired bootstrap 95% interval of the change of the mean per-query
    cross-encoder nDCG from the previous row, over the queries both OOF files have:
    :func:`core.scoring.significance.paired_bootstrap`, ``n_resamples`` draws of queries with
    ``seed``; NaN when a run has no OOF file or none in common), ``ci_queries`` (those queries), ``within_noise``
    (the interval covers 0; without an interval, |delta| < paired_std), ``noise_rule``
    (``"bootstrap"``, ``"paired fold std"`` or None), ``sec_per_epoch`` (training seconds per fold
    and epoch, the teacher pass of distillation / pseudo-labels included).

    Raises:
        WorkbenchError: an unknown run id.
    """
    from core.scoring.significance import paired_bootstrap

    rows = []
    prev_folds: dict[int, float] | None = None
    prev_cv = None
    prev_q: pd.Series | None = None
    for i, rid in enumerate(run_ids):
        run = store.get_record(rid)
        ms = store.metrics(run.id)
        epochs = run.epochs
        folds = _per_fold(ms, mn.FOLD_NDCG)
        secs = _per_fold(ms, mn.FOLD_SECONDS)
        teacher = _per_fold(ms, mn.TEACHER_FOLD_SECONDS)
        cv = _metric(ms, mn.CV_NDCG)
        row = {
            "run_id": run.id,
            "added": labels[i] if labels else run.name,
            "cv_ndcg": cv,
            "final_ndcg": _metric(ms, mn.CV_FINAL_NDCG),
            "task2_f1": _metric(ms, mn.CV_TASK2_F1),
            "fold_std": float(np.std(list(folds.values()), ddof=1)) if len(folds) > 1 else float("nan"),
            "delta": float("nan"),
            "paired_std": float("nan"),
            "sec_per_epoch": (sum(secs.values()) + sum(teacher.values())) / max(len(secs), 1) / epochs
            if secs
            else float("nan"),
        }
        row.update(ci_low=float("nan"), ci_high=float("nan"), ci_queries=0)
        q_ndcg = _query_ndcg(store, run.id)
        if prev_folds is not None:
            row["delta"] = cv - prev_cv
            common = sorted(set(folds) & set(prev_folds))
            if len(common) > 1:
                row["paired_std"] = float(np.std([folds[f] - prev_folds[f] for f in common], ddof=1))
            q = prev_q.index.intersection(q_ndcg.index) if q_ndcg is not None and prev_q is not None else []
            if len(q):
                d = paired_bootstrap(prev_q.loc[q].to_numpy(), q_ndcg.loc[q].to_numpy(), n_resamples, seed)
                row.update(ci_low=d.low, ci_high=d.high, ci_queries=d.n_queries)
        if row["ci_low"] == row["ci_low"]:
            row["within_noise"], row["noise_rule"] = bool(row["ci_low"] <= 0.0 <= row["ci_high"]), "bootstrap"
        elif row["paired_std"] == row["paired_std"]:
            row["within_noise"], row["noise_rule"] = bool(abs(row["delta"]) < row["paired_std"]), "paired fold std"
        else:
            row["within_noise"], row["noise_rule"] = None, None
        rows.append(row)
        prev_folds, prev_cv, prev_q = folds, cv, q_ndcg
    return pd.DataFrame(rows)


def run_ablation(
    config_path: str | Path, tricks: list[str], store: RunStore, overrides: list[str] | None = None, progress=None
) -> tuple[list[AblationStep], pd.DataFrame]:
    """Train every step of :func:`plan_ablation` (sequentially, each a run in ``store``).

    Returns the steps and :func:`ablation_table` of their runs.

    Raises:
        ConfigError / DataError: a bad item, config or data selection (every step checked before anything
        is trained, nothing created); WorkbenchError: a step's run failed or was stopped (the message
        lists the finished runs).
    """
    from core.training.train import run_training
    from core.training.validate import validate_run

    steps = plan_ablation(config_path, tricks, overrides)
    checked = set()  # the data selection is read once per distinct data section and fold count
    for st in steps:
        key = json.dumps([st.config.to_dict()["data"], st.config.train.folds], sort_keys=True)
        if key not in checked:
            validate_run(st.config)
            checked.add(key)
    run_ids = []
    for st in steps:
        if progress is not None:
            progress.message(f"ablation step {st.step}/{len(steps) - 1}: {st.config.name}")
        try:
            res = run_training(st.config, store, progress=progress)
        except WorkbenchError as exc:  # keep what was trained: the table can be rebuilt with --runs
            raise WorkbenchError(
                f"ablation step {st.step} ({st.config.name}) did not finish: {exc}; finished runs: "
                f"{','.join(run_ids) or 'none'} (rebuild the table with --runs)"
            ) from None
        run_ids.append(res.run_id)
    labels = ["baseline"] + [f"+ {s.added}" for s in steps[1:]]
    return steps, ablation_table(store, run_ids, labels)


def interval(row, digits: int = 4) -> str:
    """``[low, high]`` of a row of :func:`ablation_table` (``-`` without one)."""
    low, high = row.get("ci_low", float("nan")), row.get("ci_high", float("nan"))
    if low != low:
        return "-"
    return f"[{low + 0.0:+.{digits}f}, {high + 0.0:+.{digits}f}]"


def to_markdown(table: pd.DataFrame) -> str:
    """The ablation table as a Markdown table (README); ``within noise``: the Δ's 95% paired
    bootstrap interval covers 0 (without OOF files: |Δ| < the paired fold std)."""
    head = (
        "| step | run | CV nDCG | fold std | Δ nDCG | Δ 95% interval | paired fold std | within noise | final nDCG "
        "| Task 2 micro-F1 | s / fold-epoch |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, d=4):
        return "-" if v is None or v != v else f"{v:.{d}f}"

    for _, r in table.iterrows():
        wn = "-" if r["within_noise"] is None else ("yes" if r["within_noise"] else "no")
        delta = "-" if r["delta"] != r["delta"] else f"{r['delta']:+.4f}"
        lines.append(
            f"| {r['added']} | {r['run_id']} | {f(r['cv_ndcg'])} | {f(r['fold_std'])} | {delta} | {interval(r)} | "
            f"{f(r['paired_std'])} | {wn} | {f(r['final_ndcg'])} | {f(r['task2_f1'])} | {f(r['sec_per_epoch'], 0)} |"
        )
    return "\n".join(lines)
