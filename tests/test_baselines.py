"""Tests of core.scoring.baselines on the real 150-query ESCI sample and on small synthetic tables."""

from __future__ import annotations

import json
import time
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.scoring.baselines import DEFAULT_BM25_FIELDS, bm25_scores, product_text, random_scores
from core.scoring.metrics import mean_ndcg

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "esci_us_opensearch_150q"

# Ratings of the OpenSearch judgment file = KDD Cup Task 1 gains x 100 (see SOURCE.md).
RATING_TO_LABEL = {"100.000": "E", "10.000": "S", "1.000": "C", "0.000": "I"}
# ESCI-S document field -> official products column.
DOC_FIELDS = {
    "title": "product_title",
    "description": "product_description",
    "bullet_points": "product_bullet_point",
    "brand": "product_brand",
    "color": "product_color",
}


@lru_cache(maxsize=1)
def load_sample(sample_dir: Path = SAMPLE_DIR) -> pd.DataFrame:
    """The 150-query sample as an examples table with the official ESCI column names.

    Columns: example_id, query, query_id (the original ESCI id: the one id shared by every judged
    product's ``query_id[]``), product_id, product_locale, esci_label, and the five product text
    columns. 6,678 rows.
    """
    judgments = json.loads((sample_dir / "esci_us_judgments.json").read_text())["judgmentRatings"]
    docs = {}
    with zipfile.ZipFile(sample_dir / "esci_us_ecommerce_shrunk.ndjson.zip") as zf:
        (name,) = zf.namelist()
        with zf.open(name) as fh:
            for line in fh:
                doc = json.loads(line)
                if "index" not in doc:
                    docs[doc["asin"]] = doc
    rows = []
    for entry in judgments:
        asins = [r["docId"] for r in entry["ratings"]]
        (qid,) = set.intersection(*(set(docs[a]["query_id"]) for a in asins))
        for r in entry["ratings"]:
            doc = docs[r["docId"]]
            row = {
                "query": entry["query"],
                "query_id": int(qid),
                "product_id": r["docId"],
                "product_locale": "us",
                "esci_label": RATING_TO_LABEL[r["rating"]],
            }
            row.update({col: doc.get(src) or "" for src, col in DOC_FIELDS.items()})
            rows.append(row)
    df = pd.DataFrame(rows)
    df.insert(0, "example_id", np.arange(len(df)))
    return df


needs_sample = pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"{SAMPLE_DIR} not present")


@needs_sample
def test_sample_loads():
    df = load_sample()
    assert len(df) == 6678
    assert df["query"].nunique() == 150 and df["query_id"].nunique() == 150
    assert df["esci_label"].value_counts().to_dict() == {"E": 3389, "S": 1898, "I": 1086, "C": 305}
    assert (df["product_title"] != "").all()


@needs_sample
def test_bm25_beats_random_on_real_sample():
    df = load_sample()
    t0 = time.perf_counter()
    bm25 = bm25_scores(df)
    elapsed = time.perf_counter() - t0
    assert bm25.shape == (len(df),) and bm25.dtype == np.float32
    ndcg_bm25 = mean_ndcg(df["query_id"], bm25, df["esci_label"])
    ndcg_random = float(
        np.mean([mean_ndcg(df["query_id"], random_scores(df, seed=s), df["esci_label"]) for s in range(5)])
    )
    print(f"\n150 queries: BM25 nDCG {ndcg_bm25:.4f} ({elapsed:.2f}s), random nDCG {ndcg_random:.4f} (5 seeds)")
    assert ndcg_bm25 > ndcg_random + 0.03
    assert elapsed < 10


@needs_sample
@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_pair_gather_equals_bm25s_get_scores(method):
    """bm25_scores equals bm25s.BM25.get_scores over the whole corpus, picked at each row's product."""
    import bm25s

    df = load_sample()
    ours = bm25_scores(df, fields=("product_title", "product_brand"), method=method)
    products = df.drop_duplicates("product_id")
    retriever = bm25s.BM25(k1=1.2, b=0.75, method=method)
    retriever.index(
        bm25s.tokenize(product_text(products, ("product_title", "product_brand")), show_progress=False),
        show_progress=False,
    )
    position = {p: i for i, p in enumerate(products["product_id"])}
    for query, group in list(df.groupby("query"))[:40]:
        ids = retriever.get_tokens_ids(bm25s.tokenize([query], return_ids=False, show_progress=False)[0])
        full = retriever.get_scores(ids) if ids else np.zeros(len(products), dtype=np.float32)
        expected = full[[position[p] for p in group["product_id"]]]
        np.testing.assert_allclose(ours[group.index.to_numpy()], expected, rtol=1e-5, atol=1e-6)


def _toy() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "query": ["red shoes", "red shoes", "red shoes", "the and of", "the and of", "zzzz qqqq"],
            "query_id": [1, 1, 1, 2, 2, 3],
            "product_id": ["a", "b", "c", "a", "b", "c"],
            "product_title": [
                "Red running shoes",
                "Blue shoes",
                "Red hat",
                "Red running shoes",
                "Blue shoes",
                "Red hat",
            ],
            "product_brand": ["Acme", "", None, "Acme", "", None],
            "product_color": ["red", "blue", "red", "red", "blue", "red"],
            "product_bullet_point": ["", "comfortable", "warm", "", "comfortable", "warm"],
            "product_description": ["", "", "", "", "", ""],
        }
    )


def test_all_stopword_and_unknown_queries_score_zero():
    df = _toy()
    scores = bm25_scores(df)
    assert scores.dtype == np.float32 and scores.shape == (6,)
    np.testing.assert_array_equal(scores[3:], 0.0)  # "the and of": stopwords only; "zzzz qqqq": unknown
    assert scores[0] > scores[1] > 0 and scores[0] > scores[2] > 0  # "red shoes": a has both terms
    # Without stopword removal "the" etc. are still absent from the corpus -> still 0.
    np.testing.assert_array_equal(bm25_scores(df, stopwords=None)[3:], 0.0)


def test_bm25_empty_text_and_empty_frame():
    df = _toy()
    for col in ("product_title", "product_color", "product_bullet_point"):
        df[col] = ""
    df["product_brand"] = None
    np.testing.assert_array_equal(bm25_scores(df), np.zeros(6, dtype=np.float32))
    assert bm25_scores(_toy().iloc[:0]).shape == (0,)


def test_product_text():
    texts = product_text(_toy(), ("product_title", "product_brand", "product_description"))
    assert texts[:3] == ["Red running shoes\nAcme", "Blue shoes", "Red hat"]
    with pytest.raises(ValueError, match="nope"):
        product_text(_toy(), ("product_title", "nope"))
    assert DEFAULT_BM25_FIELDS[0] == "product_title"


def test_stem_requires_pystemmer():
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="PyStemmer"):
            bm25_scores(_toy(), stem=True)
    else:
        assert bm25_scores(_toy(), stem=True).shape == (6,)


def test_random_scores_deterministic():
    df = _toy()
    a, b, c = random_scores(df, seed=7), random_scores(df, seed=7), random_scores(df, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (6,) and ((a >= 0) & (a < 1)).all()
