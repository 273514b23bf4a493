"""Score tables: several scorers side by side on the same query-grouped folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.data.esci import ESCI_LABELS
from core.errors import DataError
from core.scoring.metrics import mean_ndcg, micro_f1_task2, micro_f1_task3

PROB_COLUMNS = ["p_E", "p_S", "p_C", "p_I"]
OOF_COLUMNS = ["example_id", "query_id", "esci_label", "fold", *PROB_COLUMNS, "score"]


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read an ``oof.parquet``/``test.parquet`` file and check its columns.

    Raises:
        DataError: file missing/unreadable, missing columns, duplicate example_id.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "prediction file not found")
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(p, f"cannot read: {str(exc).splitlines()[0]}") from None
    missing = [c for c in OOF_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(p, f"missing column(s) {', '.join(missing)}")
    dup = df["example_id"].duplicated()
    if dup.any():
        raise DataError(
            p, f"{int(dup.sum())} duplicate example_id(s), first {df.loc[dup, 'example_id'].head(3).tolist()}"
        )
    return df


def scorer_table(
    oof: pd.DataFrame, scorers: dict[str, np.ndarray | str], classifiers: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """nDCG per fold and over all OOF rows for each scorer, plus Task 2/3 micro-F1 where known.

    Args:
        oof: rows with ``query_id``, ``esci_label``, ``fold``.
        scorers: name -> (N,) ranking scores, or the name of a column of ``oof``.
        classifiers: name -> (N,) predicted ESCI labels (E/S/C/I), for the F1 columns.

    Returns:
        DataFrame indexed by scorer with columns ``fold0..foldK-1`` (nDCG), ``cv_ndcg`` (mean nDCG
        over all queries), ``fold_std`` (std of the fold nDCGs), ``task2_f1``, ``task3_f1``.
    """
    folds = oof["fold"].to_numpy()
    qids = oof["query_id"].to_numpy()
    labels = oof["esci_label"].to_numpy()
    rows = {}
    classifiers = classifiers or {}
    for name, s in scorers.items():
        scores = oof[s].to_numpy() if isinstance(s, str) else np.asarray(s)
        row = {}
        for f in np.unique(folds):
            sel = folds == f
            row[f"fold{int(f)}"] = mean_ndcg(qids[sel], scores[sel], labels[sel])
        per_fold = [row[k] for k in row]
        row["cv_ndcg"] = mean_ndcg(qids, scores, labels)
        row["fold_std"] = float(np.std(per_fold))
        pred = classifiers.get(name)
        row["task2_f1"] = micro_f1_task2(labels, pred) if pred is not None else np.nan
        row["task3_f1"] = micro_f1_task3(labels, np.asarray(pred) == "S") if pred is not None else np.nan
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def argmax_labels(df: pd.DataFrame) -> np.ndarray:
    """(N,) E/S/C/I from the p_E..p_I columns."""
    return np.asarray(ESCI_LABELS)[df[PROB_COLUMNS].to_numpy().argmax(1)]
