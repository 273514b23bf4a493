from __future__ import annotations

import pandas as pd
import pytest

from core.config import TextConfig
from core.data.text import clean_text, encode_pairs, encode_pairs_cached


def test_clean_text():
    assert clean_text("Soft &amp; <b>Fluffy</b>\n\n towels\x00\u200b ") == "Soft & Fluffy towels"
    assert clean_text(None) == "" and clean_text(float("nan")) == ""
    assert clean_text("abcdef", max_chars=3) == "abc"


@pytest.fixture()
def tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def _frame(n=3, desc="kitchen towels " * 50):
    return pd.DataFrame(
        {
            "query": ["kitchen towels"] * n,
            "product_title": ["cotton towel set"] * n,
            "product_brand": ["acme"] * n,
            "product_color": ["white"] * n,
            "product_bullet_point": ["soft and absorbent"] * n,
            "product_description": [desc] * n,
        }
    )


def test_template_segments_and_budgets(tok):
    cfg = TextConfig(max_length=40)
    enc = encode_pairs(_frame(), tok, cfg)
    ids, start = enc.get(0)
    toks = tok.convert_ids_to_tokens(ids.tolist())
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]"
    assert len(ids) == 40  # the long description fills the leftover room exactly
    assert toks[start - 1] == "[SEP]" and tok.convert_tokens_to_string(toks[1 : start - 1]) == "kitchen towels"
    text = tok.decode(ids[start:], skip_special_tokens=False)
    assert text.startswith("cotton towel set [SEP] acme / white / soft and absorbent / kitchen towels")


def test_short_pairs_not_padded_and_budget_respected(tok):
    cfg = TextConfig(
        max_length=128, budgets={"query": 1, "title": 2, "brand": 8, "color": 6, "bullet_point": 40, "description": 0}
    )
    enc = encode_pairs(_frame(desc=""), tok, cfg)
    ids, start = enc.get(0)
    assert start == 3  # [CLS] + 1 query token + [SEP]
    assert len(ids) < 128


def test_cache_hit_and_key(tok, tmp_path):
    cfg = TextConfig(max_length=32, cache_dir=str(tmp_path))
    a = encode_pairs_cached(_frame(), tok, cfg)
    stores = {p.name for p in tmp_path.iterdir()}
    assert len(stores) == 6  # token stores: the query and the five fields (core.data.token_cache)
    b = encode_pairs_cached(_frame(), tok, cfg)
    assert (a.materialize().input_ids == b.materialize().input_ids).all()
    assert (a.materialize().input_ids == encode_pairs(_frame(), tok, cfg).input_ids).all()
    cfg2 = TextConfig(max_length=24, cache_dir=str(tmp_path))
    encode_pairs_cached(_frame(), tok, cfg2)
    assert len({p.name for p in tmp_path.iterdir()} - stores) == 5  # max_length keys the field stores
    title = next(tmp_path / n for n in stores if n.startswith("title-"))
    (title / "manifest.json").write_bytes(b"corrupt")
    c = encode_pairs_cached(_frame(), tok, cfg)  # a corrupt cache is rebuilt
    assert (c.materialize().input_ids == a.materialize().input_ids).all()
