"""Synthetic ``oof.parquet`` files for comparisons without training: the same examples, labels and
folds for every run of a seed, predictions whose quality a ``noise`` level sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.runs.store import RunStore

GAINS = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}


def oof_frame(
    n_queries: int = 40, per_query: int = 6, noise: float = 0.5, seed: int = 0, data_seed: int = 0, first_query: int = 0
) -> pd.DataFrame:
    """OOF rows of ``n_queries`` queries (ids ``first_query..``): examples, labels and 5 folds fixed
    by ``data_seed``; ``score``/``ce_score`` = gain + ``noise`` x N(0, 1) and probabilities that put
    mass on the true class, both drawn with ``seed``."""
    rng = np.random.default_rng(data_seed)
    n = n_queries * per_query
    labels = rng.choice(list("ESCI"), size=n, p=[0.6, 0.2, 0.05, 0.15])
    q = np.repeat(np.arange(first_query, first_query + n_queries), per_query)
    noise_rng = np.random.default_rng(seed)
    gain = np.array([GAINS[c] for c in labels])
    logits = noise_rng.normal(0, 1 + 2 * noise, (n, 4))
    logits[np.arange(n), ["ESCI".index(c) for c in labels]] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ce = gain + noise * noise_rng.normal(size=n)
    return pd.DataFrame(
        {
            "example_id": np.arange(n) + 10 * first_query,
            "query_id": q,
            "esci_label": labels,
            "fold": q % 5,
            "p_E": p[:, 0],
            "p_S": p[:, 1],
            "p_C": p[:, 2],
            "p_I": p[:, 3],
            "ce_score": ce,
            "score": ce + 0.5 * gain,
        }
    )


def oof_run(store: RunStore, root: Path, name: str, frame: pd.DataFrame, run_id: str | None = None) -> str:
    """A finished run in ``store`` whose ``runs/<id>/oof.parquet`` under ``root`` is ``frame``."""
    rid = store.create_run(name, {"train": {"epochs": 1}}, status="finished", run_id=run_id)
    run_dir = Path(root) / "runs" / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(run_dir / "oof.parquet", index=False)
    store.update_run(rid, run_dir=str(run_dir))
    return rid
