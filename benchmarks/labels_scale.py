"""`labels find` at the full release's size: 2.6M x 4 OOF probabilities, end to end.

Baseline (same process, same arrays): the bare ``cleanlab.filter.find_label_issues`` call with
the same settings (filter_by=prune_by_noise_rate, ranked by self_confidence). Ours: what
``workbench labels find RUN`` does: read oof.parquet, check every training example of the run's
data selection has OOF probabilities (reads the id columns of the examples file), confident
learning + label quality scores, store the issues in runs.db. Target: at most 3x the baseline.

Synthetic data shaped like ESCI: ~130k queries of 20 products, labels E/S/C/I at 65/22/3/10 %,
an imperfect model (confident on 80% of the examples, unsure on 20%) and 4% of labels flipped.

    .venv/bin/python benchmarks/labels_scale.py [--n 2600000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cleaning.labels import find_issues
from core.runs.store import RunStore


def synth(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.choice(4, size=n, p=[0.65, 0.22, 0.03, 0.10])
    conf = rng.uniform(0.4, 0.95, size=(n, 1)).astype(np.float32)
    probs = conf * np.eye(4, dtype=np.float32)[true] + (1 - conf) * rng.dirichlet(np.ones(4), size=n).astype(np.float32)
    unsure = rng.random(n) < 0.2
    probs[unsure] = 0.5 * probs[unsure] + 0.5 * rng.dirichlet(np.ones(4), size=int(unsure.sum())).astype(np.float32)
    given = true.copy()
    flip = rng.random(n) < 0.04
    given[flip] = (given[flip] + rng.integers(1, 4, size=int(flip.sum()))) % 4
    ex = pd.DataFrame(
        {
            "example_id": np.arange(n, dtype=np.int64),
            "query_id": np.arange(n, dtype=np.int64) // 20,
            "split": "train",
            "small_version": 1,
            "large_version": 1,
            "product_locale": "us",
        }
    )
    return ex, given, probs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_600_000)
    args = ap.parse_args()
    from cleanlab.filter import find_label_issues

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        ex, given, probs = synth(args.n)
        labels = np.asarray(["E", "S", "C", "I"])[given]
        data = root / "data"
        data.mkdir()
        ex.to_parquet(data / "shopping_queries_dataset_examples.parquet", index=False)
        pd.DataFrame({"product_id": ["x"], "product_locale": ["us"]}).to_parquet(
            data / "shopping_queries_dataset_products.parquet"
        )  # present, never read by `find`
        oof = pd.DataFrame(
            {
                "example_id": ex["example_id"],
                "query_id": ex["query_id"],
                "esci_label": labels,
                "fold": ex["query_id"] % 5,
            }
        )
        oof[["p_E", "p_S", "p_C", "p_I"]] = probs
        oof["score"] = probs @ np.array([1.0, 0.1, 0.01, 0.0], dtype=np.float32)
        run_dir = root / "runs" / "r"
        run_dir.mkdir(parents=True)
        oof.to_parquet(run_dir / "oof.parquet", index=False)
        store = RunStore(root / "runs.db")
        run_id = store.create_run(
            "bench", {"data": {"dir": str(data), "task": 1}}, run_dir=str(run_dir), status="finished"
        )
        store.add_artifact(run_id, "oof", run_dir / "oof.parquet")
        print(f"synthetic {args.n:,} x 4 OOF written in {time.perf_counter() - t:.1f} s")
        del oof, ex

        # baseline: the bare call on arrays already in memory
        p64 = probs.astype(np.float64)
        p64 /= p64.sum(1, keepdims=True)
        t = time.perf_counter()
        idx = find_label_issues(given, p64, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence")
        base = time.perf_counter() - t
        print(f"baseline find_label_issues: {base:.2f} s, {len(idx):,} issues")
        del p64

        stages: list[tuple[str, float]] = []
        t = time.perf_counter()
        res = find_issues(store, run_id, progress=lambda m: stages.append((m, time.perf_counter())))
        ours = time.perf_counter() - t
        stages.append(("end", time.perf_counter()))
        for (name, t0), (_, t1) in zip(stages, stages[1:]):
            print(f"  {t1 - t0:6.2f} s  {name}")
        n_stored = store.conn.execute("SELECT COUNT(*) FROM label_issues WHERE run_id = ?", [run_id]).fetchone()[0]
        assert n_stored == len(res.issues) == len(idx), (n_stored, len(res.issues), len(idx))
        flagged_flipped = np.isin(res.issues["example_id"].to_numpy(), np.flatnonzero(given != np.argmax(probs, 1)))
        print(
            f"labels find end to end: {ours:.2f} s, {len(res.issues):,} issues stored "
            f"({100 * res.share:.1f}% of the data; {100 * flagged_flipped.mean():.0f}% disagree with the argmax)"
        )
        print(f"ratio ours / bare find_label_issues: {ours / base:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
