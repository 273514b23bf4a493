"""The token cache (core.data.token_cache): equal to today's pair tokenization on the real sample,
incremental, crash-safe, keyed by the settings, loud about corrupt files."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, write_official
from core.config import TextConfig
from core.data.text import FIELD_COLUMNS, encode_pairs
from core.data.token_cache import MANIFEST, TokenStore, pair_tokens
from core.modeling.markers import add_marker_tokens

DEMO_BUDGETS = {"query": 12, "title": 28, "brand": 6, "color": 4, "bullet_point": 12, "description": 4}


@pytest.fixture(scope="module")
def sample_df(tmp_path_factory, sample_frames) -> pd.DataFrame:
    """The real 150-query sample (6,678 pairs) through the official loader."""
    from core.data.esci import load_esci

    ex, pr = sample_frames
    return load_esci(write_official(tmp_path_factory.mktemp("sample"), ex, pr))


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _assert_same(cached, enc) -> None:
    assert len(cached) == len(enc)
    np.testing.assert_array_equal(cached.lengths, enc.lengths)
    np.testing.assert_array_equal(cached.type_starts, enc.type_starts)
    flat = cached.materialize()
    np.testing.assert_array_equal(flat.offsets, enc.offsets)
    np.testing.assert_array_equal(flat.input_ids, enc.input_ids)


def _stores(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "markers",
    [{}, {"field_markers": True}, {"entity_markers": True}, {"field_markers": True, "entity_markers": True}],
    ids=["plain", "field", "entity", "both"],
)
def test_equal_to_encode_pairs_on_the_real_sample(sample_df, tiny_bert, tmp_path, markers):
    cfg = TextConfig(max_length=48, budgets=dict(DEMO_BUDGETS), cache_dir=str(tmp_path), **markers)
    tok = _tok(tiny_bert)
    add_marker_tokens(tok, cfg)
    enc = encode_pairs(sample_df, tok, cfg)
    _assert_same(pair_tokens(sample_df, tok, cfg), enc)
    _assert_same(pair_tokens(sample_df, tok, cfg), enc)  # read back from the memory maps


def test_equal_with_the_demo_tokenizer_and_config(sample_df, tmp_path):
    from core.config import load_config
    from core.modeling.model import load_tokenizer

    cfg = load_config(REPO / "configs" / "demo.yaml").text
    cfg.cache_dir = str(tmp_path)
    tok = load_tokenizer("all-MiniLM-L6-v2")
    _assert_same(pair_tokens(sample_df, tok, cfg), encode_pairs(sample_df, tok, cfg))


def test_tiny_max_length_and_field_subsets(sample_df, tiny_bert, tmp_path):
    """The rows whose query does not fit (max_length 8 with markers) and templates without the
    title or without any field."""
    tok = _tok(tiny_bert)
    df = sample_df.iloc[:400]
    for kw in (
        {"max_length": 8, "field_markers": True, "entity_markers": True},
        {"max_length": 8},
        {"max_length": 24, "fields": ["description", "brand"]},
        {"max_length": 16, "fields": []},
    ):
        cfg = TextConfig(cache_dir=str(tmp_path), **kw)
        add_marker_tokens(tok, cfg)
        _assert_same(pair_tokens(df, tok, cfg), encode_pairs(df, tok, cfg))


class CountingTokenizer:
    """A tokenizer that records every batch of texts it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.batches = tok, []

    def __call__(self, texts, **kw):
        if isinstance(texts, list):
            self.batches.append(list(texts))
        return self.tok(texts, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def counting(tok) -> CountingTokenizer:
    """``tok`` wrapped in a :class:`CountingTokenizer` under its own class name (the tokenizer
    fingerprint, hence the stores, stay those of ``tok``)."""
    return type(type(tok).__name__, (CountingTokenizer,), {})(tok)


def test_a_new_selection_tokenizes_only_new_texts(sample_df, tiny_bert, tmp_path):
    cfg = TextConfig(max_length=48, budgets=dict(DEMO_BUDGETS), cache_dir=str(tmp_path))
    tok = counting(_tok(tiny_bert))
    first = sample_df[sample_df["query_id"] < sample_df["query_id"].unique()[40]]
    pair_tokens(first, tok, cfg)
    n_first = sum(map(len, tok.batches))
    distinct_first = sum(first[c].nunique() for c in ["query", *FIELD_COLUMNS.values()])
    assert n_first == distinct_first  # each distinct text once, not once per row

    tok.batches.clear()
    cached = pair_tokens(sample_df, tok, cfg)
    cols = ["query", *FIELD_COLUMNS.values()]
    new = sum(len(set(sample_df[c]) - set(first[c])) for c in cols)
    assert 0 < sum(map(len, tok.batches)) == new < sum(sample_df[c].nunique() for c in cols)
    _assert_same(cached, encode_pairs(sample_df, tok.tok, cfg))

    tok.batches.clear()
    pair_tokens(sample_df.iloc[::-1], tok, cfg)  # any order, nothing new
    assert tok.batches == []
    assert all(len(TokenStore.open(tmp_path / s).shards) == 2 for s in _stores(tmp_path))


KILLER = """
import os, signal, sys
import pandas as pd
from transformers import AutoTokenizer
import core.data.token_cache as tc
from core.config import TextConfig

def die(root, manifest):  # the shard's files are written and renamed; the commit never comes
    os.kill(os.getpid(), signal.SIGKILL)

tc._commit_manifest = die
df = pd.read_parquet(sys.argv[1])
tc.pair_tokens(df, AutoTokenizer.from_pretrained(sys.argv[2]), TextConfig(max_length=48, cache_dir=sys.argv[3]))
"""


def test_a_killed_build_is_not_read_as_complete(sample_df, tiny_bert, tmp_path):
    cache = tmp_path / "cache"
    cfg = TextConfig(max_length=48, cache_dir=str(cache))
    tok = _tok(tiny_bert)
    first = sample_df.iloc[:1000]
    pair_tokens(first, tok, cfg)
    committed = {s: (cache / s / MANIFEST).read_bytes() for s in _stores(cache)}
    sample_df.to_parquet(tmp_path / "all.parquet")
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "all.parquet"), str(tiny_bert), str(cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    query = next(cache / s for s in _stores(cache) if s.startswith("query-"))  # built first, killed
    assert len(list(query.glob("*.tok"))) == 2  # the killed build's shard is on disk ...
    assert {s: (cache / s / MANIFEST).read_bytes() for s in _stores(cache)} == committed
    store = TokenStore.open(query)  # ... but not read: only the first build's texts are there
    assert len(store) == first["query"].nunique() < sample_df["query"].nunique()

    tok2 = counting(tok)
    cached = pair_tokens(sample_df, tok2, cfg)  # the next build redoes the torn part
    assert sum(map(len, tok2.batches)) > 0
    _assert_same(cached, encode_pairs(sample_df, tok, cfg))
    assert len(list(query.glob("*.tok"))) == 2  # the orphan is gone, the new shard is listed
    assert len(TokenStore.open(query).shards) == 2


def test_settings_key_the_stores(sample_df, tiny_bert, tmp_path):
    df = sample_df.iloc[:300]
    tok = _tok(tiny_bert)
    base = TextConfig(max_length=48, budgets=dict(DEMO_BUDGETS), cache_dir=str(tmp_path))
    pair_tokens(df, tok, base)
    plain = _stores(tmp_path)
    assert len(plain) == 6  # the query and five fields

    other_budgets = TextConfig(max_length=48, cache_dir=str(tmp_path), budgets={**DEMO_BUDGETS, "title": 4})
    cached = pair_tokens(df, tok, other_budgets)  # product budgets apply per pair: same stores
    assert _stores(tmp_path) == plain
    _assert_same(cached, encode_pairs(df, tok, other_budgets))
    assert not np.array_equal(cached.lengths, pair_tokens(df, tok, base).lengths)

    longer = TextConfig(max_length=64, budgets=dict(DEMO_BUDGETS), cache_dir=str(tmp_path))
    pair_tokens(df, tok, longer)
    grown = _stores(tmp_path) - plain
    assert len(grown) == 5 and not any(s.startswith("query-") for s in grown)  # fields cut at max_length

    entity = TextConfig(max_length=48, budgets=dict(DEMO_BUDGETS), cache_dir=str(tmp_path), entity_markers=True)
    add_marker_tokens(tok, entity)  # a tokenizer with more tokens: every store is new
    before = _stores(tmp_path)
    cached = pair_tokens(df, tok, entity)
    assert len(_stores(tmp_path) - before) == 6
    _assert_same(cached, encode_pairs(df, tok, entity))
    query_budget = TextConfig(
        max_length=48, cache_dir=str(tmp_path), entity_markers=True, budgets={**DEMO_BUDGETS, "query": 5}
    )
    before = _stores(tmp_path)
    pair_tokens(df, tok, query_budget)
    assert [s.split("-")[0] for s in _stores(tmp_path) - before] == ["query"]


@pytest.mark.parametrize("damage", ["manifest", "tokens", "offsets"])
def test_a_corrupt_file_is_one_line_naming_it_then_rebuilt(sample_df, tiny_bert, tmp_path, caplog, damage):
    df = sample_df.iloc[:300]
    cfg = TextConfig(max_length=48, cache_dir=str(tmp_path))
    tok = _tok(tiny_bert)
    want = encode_pairs(df, tok, cfg)
    pair_tokens(df, tok, cfg)
    title = next(tmp_path / s for s in _stores(tmp_path) if s.startswith("title-"))
    bad = {
        "manifest": title / MANIFEST,
        "tokens": next(title.glob("*.tok")),
        "offsets": next(title.glob("*.off.npy")),
    }[damage]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2] if damage != "manifest" else b"{not json")
    with caplog.at_level(logging.WARNING, logger="esci.tokens"):
        cached = pair_tokens(df, tok, cfg)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0] and str(bad) in lines[0], lines
    _assert_same(cached, want)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esci.tokens"):
        pair_tokens(df, tok, cfg)  # rebuilt: read back quietly
    assert not caplog.records


@pytest.mark.parametrize("chunk", [7, 65_536])
@pytest.mark.parametrize("short_bytes", [0, 10**6])  # every column long (hashed row by row) / short (deduped first)
def test_text_keys_are_the_siphash_of_each_distinct_text(sample_df, monkeypatch, chunk, short_bytes):
    """Chunked Arrow hashing keys each text as one pass of pandas' SipHash over its UTF-8 bytes
    would (the stores' format depends on it), for str, object and NaN-holding columns alike."""
    import core.data.token_cache as tc

    monkeypatch.setattr(tc, "KEY_CHUNK", chunk)
    monkeypatch.setattr(tc, "SHORT_TEXT_BYTES", short_bytes)
    col = sample_df["product_description"].head(500).copy()
    col.iloc[:6] = [None, "", "ワイヤレス &amp; <b>防水</b>", "  padded  ", None, "ワイヤレス &amp; <b>防水</b>"]
    for values in (col, col.astype(object), col.astype("string")):
        codes, keys, nbytes, first = tc.text_keys(values)
        plain = values.astype(object).where(values.notna(), "").astype(str).to_numpy(dtype=object)
        want = pd.util.hash_array(plain, hash_key=tc.HASH_KEY, categorize=False)
        np.testing.assert_array_equal(keys[codes], want)  # every row's key
        assert len(keys) == len(set(plain)) and len(first) == len(keys)
        np.testing.assert_array_equal(plain[first][codes], plain)  # first: a row of each distinct text
        np.testing.assert_array_equal(nbytes, [len(t.encode()) for t in plain[first]])
        assert codes[0] == codes[1] == codes[4] and codes[2] == codes[5]  # None reads as ""
        assert nbytes[codes[2]] > len(plain[2])  # UTF-8 bytes, not characters


def test_a_build_holds_one_chunk_of_texts_at_a_time(sample_df, tiny_bert, tmp_path, monkeypatch):
    """The texts to tokenize are taken from the frame TAKE_CHUNK at a time, not all at once (at
    the release's size the distinct descriptions alone are GBs of Python strings), and tokenized
    BUILD_CHUNK a call; same tokens."""
    import core.data.token_cache as tc

    monkeypatch.setattr(tc, "BUILD_CHUNK", 100)
    monkeypatch.setattr(tc, "TAKE_CHUNK", 250)
    taken: list[int] = []
    write = tc._write_shard

    def spy(root, name, texts, rows, *a):
        return write(root, name, lambda r: (taken.append(len(r)), texts(r))[1], rows, *a)

    monkeypatch.setattr(tc, "_write_shard", spy)
    cfg = TextConfig(max_length=48, budgets=dict(DEMO_BUDGETS), cache_dir=str(tmp_path))
    tok = counting(_tok(tiny_bert))
    cached = pair_tokens(sample_df, tok, cfg)
    n_texts = sum(sample_df[c].nunique() for c in ["query", *FIELD_COLUMNS.values()])
    assert max(taken) == 250 and sum(taken) == n_texts
    assert max(map(len, tok.batches)) == 100 and sum(map(len, tok.batches)) == n_texts
    _assert_same(cached, encode_pairs(sample_df, tok.tok, cfg))
