"""The full-release rewrites (benchmarks/full_release.py) against the code they replaced, on the real
sample: ``load_esci(text_columns=...)``, the vectorised n-gram bags and word2vec initialisation, the
streamed pre-training corpus. Each reference below is the replaced implementation, kept verbatim."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest

from conftest import sample_subset, write_official
from core.config import FeaturesConfig
from core.data.esci import PRODUCT_TEXT_COLUMNS, load_esci
from core.data.text import FIELD_COLUMNS, clean_text
from core.errors import DataError
from core.modeling.features import (
    _WORD,
    BAG_COLUMNS,
    _crc_hash,
    _distinct_texts,
    _estimated_words,
    budget_sample,
    compute_ngram_bags,
    ngram_bucket,
    text_buckets,
    train_word2vec,
    word2vec_bucket_init,
    words,
)
from core.pretrain.multitask import TEXT_COLUMNS, load_corpus, pretrain_config_from_dict


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory, sample_frames):
    """60 real queries (10 in split test), HTML, Japanese and null text added to some products."""
    folder = sample_subset(tmp_path_factory.mktemp("full_release"), sample_frames, 60, 10)
    pr = pd.read_parquet(folder / "shopping_queries_dataset_products.parquet")
    pr.loc[pr.index[0], "product_description"] = (
        "ワイヤレスイヤホン Bluetooth 5.0 ノイズキャンセリング &amp; <b>防水</b>"
    )
    pr.loc[pr.index[1], "product_bullet_point"] = None
    pr.loc[pr.index[2], "product_brand"] = "  Straße   ÉTÉ "
    ex = pd.read_parquet(folder / "shopping_queries_dataset_examples.parquet")
    return write_official(folder, ex, pr)


# ---- load_esci(text_columns=...) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cols",
    [
        (),
        ("product_title",),
        ("product_title", "product_brand", "product_color"),
        ("product_description", "product_title"),
    ],
)
def test_load_esci_text_columns_equal_the_full_load(sample_dir, cols):
    full = load_esci(sample_dir)
    got = load_esci(sample_dir, text_columns=cols)
    want = [c for c in full.columns if c not in PRODUCT_TEXT_COLUMNS or c in cols]
    pd.testing.assert_frame_equal(got, full[want])
    filtered = load_esci(sample_dir, split="test", task=1, locales=["us"], text_columns=cols)
    pd.testing.assert_frame_equal(filtered, load_esci(sample_dir, split="test", task=1, locales=["us"])[want])


def test_load_esci_text_columns_keeps_the_validation(sample_dir, tmp_path):
    with pytest.raises(DataError, match="unknown text column"):
        load_esci(sample_dir, text_columns=["product_title", "title"])
    ex = pd.read_parquet(sample_dir / "shopping_queries_dataset_examples.parquet")
    pr = pd.read_parquet(sample_dir / "shopping_queries_dataset_products.parquet")
    bad = write_official(tmp_path / "bad", ex, pr.drop(columns=["product_description"]))
    with pytest.raises(DataError, match="shopping_queries_dataset_products.parquet: missing column"):
        load_esci(bad, text_columns=["product_title"])  # a file without a column fails however little is read
    ex.loc[3, "esci_label"] = "X"
    bad = write_official(tmp_path / "bad2", ex, pr)
    with pytest.raises(DataError, match="unknown esci_label"):
        load_esci(bad, text_columns=())


def test_load_esci_length_columns_are_the_stripped_lengths_of_the_text(sample_dir):
    """``length_columns``: the characters of each product field after stripping whitespace (the
    sample_dir fixture has a null bullet and padded brands), without loading that text."""
    full = load_esci(sample_dir)
    cols = ("product_bullet_point", "product_brand")
    got = load_esci(sample_dir, text_columns=("product_title",), length_columns=cols)
    assert "product_bullet_point" not in got and got["product_title"].equals(full["product_title"])
    for c in cols:
        want = full[c].astype(str).str.strip().str.len().to_numpy()
        np.testing.assert_array_equal(got[f"{c}_chars"].to_numpy(), want)
        assert got[f"{c}_chars"].dtype == np.int32
    assert (got["product_bullet_point_chars"] == 0).any() and (got["product_bullet_point_chars"] > 0).any()
    filtered = load_esci(sample_dir, split="test", length_columns=["product_description"])
    np.testing.assert_array_equal(
        filtered["product_description_chars"].to_numpy(),
        filtered["product_description"].astype(str).str.strip().str.len().to_numpy(),
    )
    with pytest.raises(DataError, match="unknown text column"):
        load_esci(sample_dir, length_columns=["bullets"])


# ---- n-gram bags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ngram,buckets,max_words", [(3, 2**18, 64), (4, 997, 7), (1, 50, None)])
def test_vectorised_bags_equal_text_buckets_on_every_row(sample_dir, ngram, buckets, max_words):
    df = load_esci(sample_dir)
    df.loc[5, "query"] = "ワイヤレスイヤホン 防水"  # non-ASCII words: UTF-8 lengths differ from str lengths
    cfg = FeaturesConfig(ngram_bags=True, ngram=ngram, buckets=buckets, max_words=max_words or 10**6)
    bags = compute_ngram_bags(df, cfg)
    for i in range(len(df)):
        for j, field in enumerate(bags.fields):
            seg = bags.bag(i, j)
            assert seg.tolist() == text_buckets(df[BAG_COLUMNS[field]].iloc[i], ngram, buckets, max_words), (i, field)
    assert bags.ids.dtype == np.int32 and bags.offsets.dtype == np.int64


# ---- word2vec -----------------------------------------------------------------------------------------


def _old_train_word2vec(df: pd.DataFrame, dim: int, epochs: int = 5, seed: int = 42):
    from gensim.models import Word2Vec

    prods = df.drop_duplicates(["product_id", "product_locale"]) if "product_id" in df else df
    cols = [c for c in FIELD_COLUMNS.values() if c in prods]
    sentences = []
    for row in prods[cols].astype("string").fillna("").itertuples(index=False):
        toks = [w for v in row for w in _WORD.findall(clean_text(v, max_chars=4000).lower())]
        if toks:
            sentences.append(toks)
    model = Word2Vec(
        sentences, vector_size=dim, window=5, min_count=1, workers=1, seed=seed, epochs=epochs, hashfxn=_crc_hash
    )
    return model.wv


def _old_bucket_init(df: pd.DataFrame, cfg: FeaturesConfig, wv) -> tuple[np.ndarray, np.ndarray]:
    index = wv.key_to_index
    grams: set[tuple[str, ...]] = set()
    for f in cfg.bag_fields:
        for t in pd.unique(df[BAG_COLUMNS[f]].astype("string").fillna("")):
            toks = words(t, cfg.max_words)
            for k in range(1, cfg.ngram + 1):
                grams.update(tuple(toks[i : i + k]) for i in range(len(toks) - k + 1))
    sums = np.zeros((cfg.buckets + 1, cfg.bag_dim), dtype=np.float64)
    counts = np.zeros(cfg.buckets + 1, dtype=np.int64)
    vectors = wv.vectors
    for g in grams:
        known = [index[w] for w in g if w in index]
        if not known:
            continue
        b = ngram_bucket(" ".join(g), cfg.buckets)
        sums[b] += vectors[known].mean(0)
        counts[b] += 1
    rows = np.flatnonzero(counts)
    return rows.astype(np.int64), (sums[rows] / counts[rows, None]).astype(np.float32)


def test_streamed_word2vec_equals_the_list_corpus_model(sample_dir):
    pytest.importorskip("gensim")
    df = load_esci(sample_dir)
    new, old = train_word2vec(df, 8, epochs=1, seed=3), _old_train_word2vec(df, 8, epochs=1, seed=3)
    assert new.index_to_key == old.index_to_key
    np.testing.assert_array_equal(new.vectors, old.vectors)


def test_vectorised_bucket_init_equals_the_gram_loop(sample_dir):
    pytest.importorskip("gensim")
    df = load_esci(sample_dir)
    wv = train_word2vec(df[df["query_id"] % 2 == 0], 8, epochs=1, seed=3)  # half the words have no vector
    for cfg in (
        FeaturesConfig(ngram_bags=True, buckets=2**16, bag_dim=8, max_words=16),
        FeaturesConfig(ngram_bags=True, buckets=101, bag_dim=8, ngram=2, max_words=64),  # many grams per bucket
    ):
        rows, vecs = word2vec_bucket_init(df, cfg, wv=wv)
        want_rows, want_vecs = _old_bucket_init(df, cfg, wv)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(vecs, want_vecs, rtol=1e-5, atol=1e-7)


def test_budget_sample_fits_the_budget_keeps_order_and_is_seeded():
    sizes = np.random.default_rng(0).integers(0, 50, size=1000)
    assert budget_sample(sizes, int(sizes.sum()), 1) is None and budget_sample(sizes, None, 1) is None
    picked = budget_sample(sizes, 5000, 1)
    assert picked is not None and int(sizes[picked].sum()) <= 5000 < int(sizes.sum())
    assert np.all(np.diff(picked) > 0)  # ascending: the frame's order is kept
    np.testing.assert_array_equal(picked, budget_sample(sizes, 5000, 1))
    assert not np.array_equal(picked, budget_sample(sizes, 5000, 2))
    assert len(budget_sample(np.array([10, 10]), 3, 0)) == 1  # never empty


def test_estimated_words_counts_spaces_on_the_real_text(sample_dir):
    df = load_esci(sample_dir)
    col = df["product_title"]
    est = _estimated_words(col)
    want = col.fillna("").map(lambda t: t.count(" ") + 1 if t else 0).to_numpy()
    np.testing.assert_array_equal(est, want)
    exact = col.map(lambda t: len(words(t))).to_numpy()
    assert abs(est.sum() / exact.sum() - 1) < 0.25  # an estimate of the words, within 25% on real titles
    np.testing.assert_array_equal(_estimated_words(col, max_words=3), np.minimum(want, 3))
    cut = col.fillna("").map(lambda t: t[:20].count(" ") + 1 if t else 0).to_numpy()
    np.testing.assert_array_equal(_estimated_words(col, max_chars=20), cut)  # only the long titles are cut


def test_word2vec_reads_a_seeded_sample_of_products_over_its_word_budget(sample_dir):
    pytest.importorskip("gensim")
    df = load_esci(sample_dir)
    full = train_word2vec(df, 8, epochs=1, seed=3)
    same = train_word2vec(df, 8, epochs=1, seed=3, max_words=10**9)  # under the budget: unchanged
    assert same.index_to_key == full.index_to_key
    np.testing.assert_array_equal(same.vectors, full.vectors)
    prods = df.drop_duplicates(["product_id", "product_locale"])
    cols = [c for c in FIELD_COLUMNS.values() if c in prods]
    est = sum(_estimated_words(prods[c], max_chars=4000) for c in cols)
    budget = int(est.sum()) // 3
    small = train_word2vec(df, 8, epochs=1, seed=3, max_words=budget)
    picked = budget_sample(np.asarray(est), budget, 3)
    sampled_words = {
        w for row in prods.iloc[picked][cols].fillna("").itertuples(index=False) for v in row for w in words(v[:4000])
    }
    assert set(small.index_to_key) == sampled_words  # exactly the sampled products' words
    assert len(picked) < 0.5 * len(prods) and set(small.index_to_key) < set(full.index_to_key)
    again = train_word2vec(df, 8, epochs=1, seed=3, max_words=budget)
    np.testing.assert_array_equal(again.vectors, small.vectors)


def test_capped_bucket_init_is_the_init_of_the_sampled_texts(sample_dir):
    """Over its budget the init reads a seeded sample of each field's distinct texts (its share of
    the budget in proportion to its words): the rows equal the reference loop's over those texts."""
    pytest.importorskip("gensim")
    df = load_esci(sample_dir)
    wv = train_word2vec(df, 8, epochs=1, seed=3)
    cfg = FeaturesConfig(ngram_bags=True, buckets=2**12, bag_dim=8, ngram=2, max_words=16)
    rows, vecs = word2vec_bucket_init(df, cfg, wv=wv, seed=5)
    uncapped = word2vec_bucket_init(df, FeaturesConfig(**{**cfg.__dict__, "w2v_max_words": 10**9}), wv=wv, seed=5)
    np.testing.assert_array_equal(uncapped[0], rows)  # the default budget is above the sample's words
    firsts = {f: _distinct_texts(df, BAG_COLUMNS[f])[1] for f in cfg.bag_fields}
    est = {f: _estimated_words(df[BAG_COLUMNS[f]], 16)[firsts[f]] for f in cfg.bag_fields}
    total = sum(int(e.sum()) for e in est.values())
    capped = FeaturesConfig(**{**cfg.__dict__, "w2v_max_words": total // 2})
    c_rows, c_vecs = word2vec_bucket_init(df, capped, wv=wv, seed=5)
    sampled = {}
    for j, f in enumerate(cfg.bag_fields):
        picked = budget_sample(est[f], int(total // 2 * est[f].sum() / total), 5 + j)
        sampled[BAG_COLUMNS[f]] = df[BAG_COLUMNS[f]].iloc[firsts[f][picked]].tolist()
    n = max(map(len, sampled.values()))
    sub = pd.DataFrame({c: v + [""] * (n - len(v)) for c, v in sampled.items()})
    want_rows, want_vecs = _old_bucket_init(sub, cfg, wv)
    np.testing.assert_array_equal(c_rows, want_rows)
    np.testing.assert_allclose(c_vecs, want_vecs, rtol=1e-5, atol=1e-7)
    assert len(c_rows) < len(rows)  # buckets no sampled n-gram reaches keep their random init


# ---- pre-training corpus --------------------------------------------------------------------------------


def _old_load_corpus(cfg, separator: str = " | "):
    """core.pretrain.multitask.load_corpus before streaming (products + pairs + positives_of)."""
    from core.data.esci import PRODUCT_COLUMNS, TableFile, find_dataset_files

    files = find_dataset_files(cfg.data.dir)
    cols = TableFile(files.products, PRODUCT_COLUMNS).read(PRODUCT_COLUMNS)
    pr = pd.DataFrame({c: cols[c].to_pandas() for c in PRODUCT_COLUMNS})
    for c in PRODUCT_COLUMNS:
        pr[c] = pr[c].astype(object).where(pr[c].notna(), "").astype(str)
    if cfg.data.locales:
        pr = pr[pr["product_locale"].isin(cfg.data.locales)]
    max_chars = cfg.model.max_length * 12
    fields = {f: [clean_text(v, max_chars=max_chars) for v in pr[TEXT_COLUMNS[f]]] for f in cfg.data.text_fields}
    text = [separator.join(v for v in vals if v) for vals in zip(*fields.values())]
    out = pd.DataFrame(
        {
            "product_id": pr["product_id"].to_numpy(),
            "product_locale": pr["product_locale"].to_numpy(),
            "text": text,
            "title": [clean_text(v, max_chars=max_chars) for v in pr["product_title"]],
            "brand": [clean_text(v) for v in pr["product_brand"]],
            "color": [clean_text(v) for v in pr["product_color"]],
        }
    )
    out = out[out["text"] != ""]
    if cfg.data.max_products:
        out = out.iloc[: cfg.data.max_products]
    out = out.reset_index(drop=True)
    ex = load_esci(cfg.data.dir, split=None, locales=cfg.data.locales)
    ex = ex[(ex["split"] == "train") & ex["esci_label"].isin(cfg.tasks.p2q.positive_labels)]
    row_of = {(p, loc): i for i, (p, loc) in enumerate(zip(out["product_id"], out["product_locale"]))}
    prod = np.array(
        [row_of.get((p, loc), -1) for p, loc in zip(ex["product_id"], ex["product_locale"])], dtype=np.int64
    )
    keep = prod >= 0
    queries = [clean_text(q) for q in ex["query"].to_numpy()[keep]]
    pairs = pd.DataFrame({"query": queries, "product": prod[keep], "query_id": ex["query_id"].to_numpy()[keep]})
    pairs = pairs[pairs["query"] != ""].reset_index(drop=True)
    positives_of: dict[str, set[int]] = {}
    for q, p in zip(pairs["query"], pairs["product"]):
        positives_of.setdefault(q, set()).add(int(p))
    return out, pairs, positives_of


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"text_fields": ["title", "bullet_point", "description", "brand", "color"], "max_products": 300},
        {"locales": ["us"], "text_fields": ["description"]},
    ],
)
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_streamed_corpus_equals_the_old_path(sample_dir, tmp_path, data, fmt):
    folder = sample_dir
    if fmt == "csv":
        folder = tmp_path / "csv"
        folder.mkdir()
        for stem in ("examples", "products"):
            df = pd.read_parquet(sample_dir / f"shopping_queries_dataset_{stem}.parquet")
            df.to_csv(folder / f"shopping_queries_dataset_{stem}.csv", index=False)
    cfg = pretrain_config_from_dict(
        {
            "data": {"dir": str(folder), **data},
            "model": {"max_length": 16},
            "tasks": {"p2q": {"positive_labels": ["E", "S"]}},
        }
    )
    corpus = load_corpus(cfg)
    products, pairs, positives_of = _old_load_corpus(cfg)
    pd.testing.assert_frame_equal(corpus.products, products)
    pd.testing.assert_frame_equal(corpus.pairs, pairs)
    assert corpus.positives_of == positives_of and len(pairs) > 0


def test_crc_combine_equals_zlib_on_long_and_multibyte_words():
    texts = ["x " * 300, "longword" * 40 + " b c d", "ワイヤレスイヤホン bluetooth 5.0", "", "a"]
    for t in texts:
        for n in (1, 2, 3, 5):
            assert text_buckets(t, n, 2**31 - 1) == [zlib.crc32(g.encode()) % (2**31 - 1) + 1 for g in _grams(t, n)]
    df = pd.DataFrame({"query": texts, "product_bullet_point": texts[::-1], "product_description": texts})
    cfg = FeaturesConfig(ngram_bags=True, ngram=5, buckets=2**31 - 1, max_words=10**6)
    bags = compute_ngram_bags(df, cfg)
    for i, t in enumerate(texts):
        seg = bags.bag(i, 0).astype(np.int64)
        assert seg.tolist() == [zlib.crc32(g.encode()) % (2**31 - 1) + 1 for g in _grams(t, 5)]


def _grams(t: str, n: int) -> list[str]:
    w = words(t)
    return [" ".join(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1)]
