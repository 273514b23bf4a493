from __future__ import annotations

import numpy as np
import pandas as pd

from core.scoring.dense import dense_scores, embed_texts


def test_embeddings_unit_norm_and_order_kept(tiny_bert):
    texts = ["kitchen towels", "a much longer text about cotton kitchen towels in white", "x"]
    e = embed_texts(texts, str(tiny_bert))
    assert e.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embed_texts(texts[::-1], str(tiny_bert))[::-1], e, atol=1e-6)


def test_dense_scores_cosine(tiny_bert):
    df = pd.DataFrame(
        {
            "query": ["cotton towels", "cotton towels", "garden hose"],
            "product_id": ["A", "B", "A"],
            "product_title": ["cotton towels", "steel garden hose", "cotton towels"],
            "product_brand": ["", "", ""],
            "product_color": ["", "", ""],
        }
    )
    s = dense_scores(df, str(tiny_bert))
    assert s.shape == (3,) and (np.abs(s) <= 1 + 1e-5).all()
    assert abs(s[0] - 1.0) < 1e-5  # identical text -> cosine 1
    assert s[1] < s[0]
