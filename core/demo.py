"""The demo on the real ESCI sample: import -> 5-fold cross-encoder -> compare with baselines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import DEFAULT_DATA_DIR, load_config
from core.data.esci import find_dataset_files
from core.data.opensearch import import_opensearch
from core.errors import DataError
from core.runs.store import RunStore
from core.scoring.baselines import bm25_scores, random_scores
from core.scoring.report import argmax_labels, scorer_table
from core.scoring.stack import StackResult, stack_after_training
from core.training.backbone import with_backbone
from core.training.train import Progress, RunResult, run_training
from core.training.validate import load_training_frame

#: ./configs/demo.yaml when it exists, else the bundled one (core.config.resolve_config_path)
DEFAULT_CONFIG = "demo.yaml"
WHERE_TO_GET = (
    "the real sample ships in shared/data/esci_us_opensearch_150q beside the repo; the official "
    "files are at github.com/amazon-science/esci-data (shopping_queries_dataset_*.parquet)"
)


@dataclass
class DemoReport:
    """The demo's run and its comparison table (see :func:`core.scoring.report.scorer_table`)."""

    result: RunResult
    table: pd.DataFrame
    data_dir: Path
    stack_run: str | None = None  # the stack run (``stack.enabled``), recorded after the training run
    stack: StackResult | None = None
    backbone: str | None = None  # model.pretrain's pre-trained backbone folder the cross-encoder started from


def prepare_sample(src: str | Path, data_dir: str | Path) -> Path:
    """Import the OpenSearch ESCI sample into the official layout (once; reused when present).

    Raises:
        DataError: ``src`` missing (the message says where to get data) or malformed.
    """
    src, data_dir = Path(src), Path(data_dir)
    try:
        find_dataset_files(data_dir)
        return data_dir
    except DataError:
        pass
    if not src.is_dir():
        raise DataError(src, f"sample folder not found; {WHERE_TO_GET}")
    import_opensearch(src, data_dir)
    return data_dir


def run_demo(
    src: str | Path,
    store: RunStore,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    config_path: str | Path = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    progress: Progress | None = None,
) -> DemoReport:
    """Import the sample, train the demo config with k-fold CV, score it next to baselines.

    The table rows: ``random`` (seeded uniform scores), ``bm25``, ``dense`` (zero-shot
    bi-encoder, when a blend member), ``cross-enc`` (expected gain alone), ``final`` (per-query
    standardised blend, weights fitted on the other folds), ``majority <label>`` (Task 2/3 F1 of
    always predicting the most frequent label; its nDCG is that of a constant score), all on the
    same folds. With ``stack.enabled`` the LightGBM stacker (core.scoring.stack) is fitted on the
    run's OOF rows afterwards and recorded as its own run; the table then also has ``dense-e5``
    (when a stack scorer) and ``stack`` (each fold scored by a stacker fitted on the other folds).
    """
    data_dir = prepare_sample(src, data_dir)
    cfg = load_config(config_path, [*(overrides or []), f"data.dir={data_dir}"])
    if cfg.model.pretrain and progress is not None:
        progress.message(f"pre-training the backbone ({cfg.model.pretrain}) unless runs.db has it")
    pretrained = bool(cfg.model.pretrain)
    cfg = with_backbone(cfg, store, pretrain_missing=True, progress=progress)  # model.name: the backbone folder
    backbone = cfg.model.name if pretrained else None
    result = run_training(cfg, store, progress=progress)
    oof = result.oof
    if "bm25" in oof:  # a blend member: the trainer already scored it
        bm25 = oof["bm25"].to_numpy()
    else:
        frame = load_training_frame(cfg).set_index("example_id").loc[oof["example_id"]].reset_index()
        bm25 = bm25_scores(frame)
    majority = oof["esci_label"].mode().iloc[0]
    scorers = {
        "random": random_scores(oof, seed=cfg.train.seed),
        "bm25": bm25,
        **({"dense": oof["dense"].to_numpy()} if "dense" in oof else {}),
        "cross-enc": oof["ce_score"].to_numpy(),
        "final": oof["score"].to_numpy(),
        f"majority {majority}": np.zeros(len(oof)),
    }
    classifiers = {
        "cross-enc": argmax_labels(oof),
        "final": argmax_labels(oof),
        f"majority {majority}": np.full(len(oof), majority),
    }
    stack_run, stack = None, None
    if cfg.stack.enabled and not result.partial:
        if progress is not None:
            progress.message("stacking: LightGBM over the run's OOF probabilities and the scorers")
        stack_run, stack = stack_after_training(store, result.run_id, cfg)
        if "dense-e5" in stack.scorer_oof:
            scorers["dense-e5"] = stack.scorer_oof["dense-e5"]
        scorers["stack"] = stack.oof["score"].to_numpy()
        classifiers["stack"] = argmax_labels(stack.oof)
    table = scorer_table(oof, scorers, classifiers)
    return DemoReport(result, table, Path(data_dir), stack_run, stack, backbone)
