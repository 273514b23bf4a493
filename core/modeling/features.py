"""Side features of the cross-encoder: multi-granular semantic units and ID embeddings.

Both come from the ESCI seed "MultiTask Pre-Training for E-Commerce Product Search" (KDD Cup 2022,
ZhichunRoad): besides the transformer's pooled vector, the classifier reads

* **multi-granular semantic units**: bags of hashed word n-grams (n = 1..``ngram``, default 3) of
  the query, the bullet points and the description, each averaged by ``torch.nn.EmbeddingBag``
  (mode ``mean``): the fastText recipe of hashed n-gram bags (Joulin et al. 2017, "Bag of Tricks
  for Efficient Text Classification", arXiv:1607.01759). "Word 3-grams" here are **word-level**
  n-grams (unigrams, bigrams and trigrams of words), not character tri-grams: the paper's semantic
  units are word n-grams up to 3. Words are ``\\w+`` runs of the cleaned, lower-cased text (so
  Japanese text without spaces gives one "word" per run of characters).
* **ID embeddings**: locale, brand and colour, one ``nn.Embedding`` each, over the values of the
  training fold's products.

Design choices (documented in the README):

* **One shared table, one lookup per field.** All bag fields hash into the same
  ``buckets + 1``-row table (row 0 = padding; empty fields give a zero vector, never NaN). A query
  n-gram and the same n-gram in a description share a vector (query/product matching in one
  space) and the table costs a third of three tables; the fields stay apart in the classifier
  input because each lookup fills its own ``bag_dim`` slot of the concatenation.
* **Deterministic hashing**: ``bucket = zlib.crc32(utf8(" ".join(words))) % buckets + 1``, the
  same in every process (Python's ``hash()`` of a str is salted per process, see PYTHONHASHSEED).
* **Not perturbed by FGM/PGD/AWP**: FGM and PGD attack the backbone's word-embedding matrix only;
  core.training.train leaves the ``semantic.*`` tables out of AWP. They are trained at ``train.head_lr``
  without weight decay (core.modeling.tricks.param_groups: everything outside ``backbone.``), averaged by
  EMA and saved in the fold's ``model.safetensors``.
* **word2vec init** (``features.init: word2vec``, Mikolov et al. 2013, "Efficient Estimation of
  Word Representations in Vector Space", arXiv:1301.3781; gensim's CBOW): vectors of size
  ``bag_dim`` are trained on the run's product text (title, brand, colour, bullets, description of
  every product in the loaded data, test products included: no labels are read). An n-gram's vector
  is the mean of its words' vectors; a bucket's initial row is the mean over the distinct n-grams of
  the bag fields that hash into it; buckets no n-gram reaches keep the random init.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.config import BAG_FIELDS, ID_FIELDS, FeaturesConfig
from core.data.text import FIELD_COLUMNS, clean_text, frame_fingerprint
from core.errors import ConfigError

log = logging.getLogger("esci.features")

#: bag field -> examples-frame column
BAG_COLUMNS = {"query": "query", **FIELD_COLUMNS}
#: ID field -> examples-frame column
ID_COLUMNS = {"locale": "product_locale", "brand": "product_brand", "color": "product_color"}
assert set(BAG_COLUMNS) == set(BAG_FIELDS) and set(ID_COLUMNS) == set(ID_FIELDS)

#: standard deviation of the random init of the bag and ID tables (row 0 of the bag table is 0)
INIT_STD = 0.1
#: the prefix of the side-feature parameters inside core.modeling.model.CrossEncoder
PARAM_PREFIX = "semantic."

_WORD = re.compile(r"\w+")


# ---- n-grams and hashing -------------------------------------------------------------------------


def words(text: object, max_words: int | None = None) -> list[str]:
    """Lower-cased ``\\w+`` words of ``core.data.text.clean_text(text)`` (HTML unescaped, tags dropped);
    at most ``max_words`` (the first ones). ``None``/NaN/"" give ``[]``."""
    out = _WORD.findall(clean_text(text).lower())
    return out[:max_words] if max_words is not None else out


def ngrams(tokens: list[str], n: int) -> list[str]:
    """Word 1..n-grams of ``tokens`` in order (all unigrams, then bigrams, ...), words joined by
    one space: ``ngrams(["usb", "c", "cable"], 2) == ["usb", "c", "cable", "usb c", "c cable"]``.
    Source: the fastText n-gram features (Joulin et al. 2017, arXiv:1607.01759)."""
    out = list(tokens)
    for k in range(2, n + 1):
        out += [" ".join(tokens[i : i + k]) for i in range(len(tokens) - k + 1)]
    return out


def ngram_bucket(gram: str, buckets: int) -> int:
    """Table row of an n-gram: ``zlib.crc32(gram.encode("utf-8")) % buckets + 1`` (1..buckets;
    row 0 is padding). Deterministic across processes and platforms.

    Raises:
        ConfigError: buckets <= 0.
    """
    if buckets <= 0:
        raise ConfigError(f"features.buckets={buckets}: expected a positive integer")
    return zlib.crc32(gram.encode("utf-8")) % buckets + 1


def text_buckets(text: object, n: int, buckets: int, max_words: int | None = None) -> list[int]:
    """Bucket rows (ints in 1..buckets) of the word 1..n-grams of ``text``; ``[]`` for empty text."""
    return [ngram_bucket(g, buckets) for g in ngrams(words(text, max_words), n)]


@dataclass
class NgramBags:
    """Hashed n-gram bags of N rows x F fields, each distinct text's bag stored once, flat.

    A query repeats over its products and a product over its queries, so bag (row i, field f) is
    segment ``index[i, f]`` of the distinct texts' bags: at the release's size 1.7 GB of ids
    instead of 2.6 GB for a copy per row (benchmarks/full_release.py).

    Attributes:
        fields: the F bag field names, in classifier-input order.
        ids: int32 (total,), bucket rows 1..buckets of all segments concatenated.
        offsets: int64 (S + 1,); segment s is ``ids[offsets[s]:offsets[s+1]]``.
        index: int64 (N, F), the segment of each (row, field).
    """

    fields: list[str]
    ids: np.ndarray
    offsets: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> np.ndarray:
        """int64 (N, F): n-grams in each (row, field) bag."""
        return np.diff(self.offsets)[self.index]

    def bag(self, i: int, j: int) -> np.ndarray:
        """int32 bucket rows of bag (row ``i``, field ``j``)."""
        s = int(self.index[i, j])
        return self.ids[self.offsets[s] : self.offsets[s + 1]]

    def batch(self, indices) -> torch.Tensor:
        """Bags of the rows ``indices`` as int64 (B, F, L) padded with 0 (L = longest bag, >= 1)."""
        idx = np.asarray(indices, dtype=np.int64)
        f = len(self.fields)
        sel = self.index[idx].ravel()
        start = self.offsets[sel]
        length = self.offsets[sel + 1] - start
        width = max(1, int(length.max()) if len(length) else 1)
        col = np.arange(width)
        mask = col[None, :] < length[:, None]
        out = np.zeros((len(sel), width), dtype=np.int64)
        out[mask] = self.ids[(start[:, None] + col[None, :])[mask]]
        return torch.from_numpy(out.reshape(len(idx), f, width))


# ---- vectorised CRC-32 of word n-grams ----------------------------------------------------------
# zlib.crc32(A + B) == shift(crc32(A), len(B)) ^ crc32(B), where shift(c, n) multiplies c by x^(8n)
# modulo the CRC-32 polynomial (GF(2), reflected bit order): zlib's crc32_combine (crc32.c,
# multmodp / x2nmodp, Mark Adler). Each distinct word is hashed once by zlib; the CRC of
# "w1 w2 w3" then follows from the words' CRCs and byte lengths with numpy table lookups.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (zlib's multmodp; bit 31 is x^0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _shift_tables(bits: int = 40) -> np.ndarray:
    """uint32 (bits, 4, 256): table j multiplies by x^(8 * 2**j), one 256-entry table per byte of c."""
    x2n = [1 << 30]  # x^1
    for _ in range(bits + 3):
        x2n.append(_multmodp(x2n[-1], x2n[-1]))  # x^(2**k)
    out = np.zeros((bits, 4, 256), dtype=np.uint32)
    for j in range(bits):
        m = x2n[j + 3]  # x^(8 * 2**j)
        for byte in range(4):
            out[j, byte] = [_multmodp(m, v << (8 * byte)) for v in range(256)]
    return out


_SHIFT: np.ndarray | None = None
_SPACE_CRC = zlib.crc32(b" ")


def _crc_shift(crc: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """``crc32_combine``'s shift: uint32 crc (N,) multiplied by x^(8 * nbytes) (N,) modulo P."""
    global _SHIFT
    if _SHIFT is None:
        _SHIFT = _shift_tables()
    crc = crc.astype(np.uint32, copy=True)
    n = nbytes.astype(np.int64, copy=False)
    for j in range(int(n.max(initial=0)).bit_length()):
        sel = np.flatnonzero((n >> j) & 1)
        if not len(sel):
            continue
        c, t = crc[sel], _SHIFT[j]
        crc[sel] = t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24]
    return crc


class _WordIds(dict):
    """word -> id, growing (ids in order of first sight), with each word's zlib CRC-32 and UTF-8 length."""

    def __init__(self):
        super().__init__()
        self.crc: list[int] = []
        self.nbytes: list[int] = []

    def __missing__(self, word: str) -> int:
        raw = word.encode("utf-8")
        self.crc.append(zlib.crc32(raw))
        self.nbytes.append(len(raw))
        i = self[word] = len(self.crc) - 1
        return i


def _text_ngram_buckets(per_text: list[list[str]], n: int, buckets: int, vocab: _WordIds):
    """Bucket rows of the word 1..n-grams of each text's words (the order of :func:`ngrams`), flat.

    Args:
        per_text: each text's :func:`words`.

    Returns:
        (int32 (total,) buckets 1..buckets, int64 (len(per_text),) bag lengths). Equal to
        ``[text_buckets(t, n, buckets, max_words) for t in texts]`` concatenated; Python runs once
        per word (a dict lookup) and once per new word (zlib), numpy does the n-grams.
    """
    n_words = np.fromiter((len(w) for w in per_text), dtype=np.int64, count=len(per_text))
    total = int(n_words.sum())
    wid = np.fromiter(map(vocab.__getitem__, (w for ws in per_text for w in ws)), dtype=np.int64, count=total)
    w_crc = np.asarray(vocab.crc, dtype=np.uint32)[wid]
    w_len = np.asarray(vocab.nbytes, dtype=np.int64)[wid]
    del wid
    text_start = np.zeros(len(n_words) + 1, dtype=np.int64)
    np.cumsum(n_words, out=text_start[1:])
    # bag of a text: its unigrams, then its bigrams, ... (k-grams: max(0, n_t - k + 1) of them)
    per_k = [np.maximum(n_words - k + 1, 0) for k in range(1, n + 1)]
    bag_len = np.sum(per_k, axis=0) if per_k else np.zeros(len(n_words), np.int64)
    bag_start = np.zeros(len(n_words) + 1, dtype=np.int64)
    np.cumsum(bag_len, out=bag_start[1:])
    out = np.empty(int(bag_start[-1]), dtype=np.int32)
    text_of_word = np.repeat(np.arange(len(n_words)), n_words)
    pos_in_text = np.arange(total) - text_start[:-1][text_of_word]
    crc = w_crc.copy()  # CRC-32 of the k-gram starting at each word
    before = np.zeros(len(n_words), dtype=np.int64)  # grams of lower order in each bag
    for k in range(1, n + 1):
        if k > 1:  # extend each (k-1)-gram starting at word i by " " + word i+k-1
            crc = _crc_shift(_crc_shift(crc[:-1], np.ones(len(crc) - 1, np.int64)) ^ _SPACE_CRC, w_len[k - 1 :])
            crc ^= w_crc[k - 1 :]
        valid = np.flatnonzero(pos_in_text[: len(crc)] <= n_words[text_of_word[: len(crc)]] - k)
        t = text_of_word[valid]
        out[bag_start[:-1][t] + before[t] + pos_in_text[valid]] = (crc[valid] % buckets + 1).astype(np.int32)
        before += per_k[k - 1]
    return out, bag_len


_TEXT_CHUNK = 20_000  # distinct texts per vectorised pass: bounds the word lists and per-word int64 arrays


def _distinct_texts(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The distinct texts of one text column: (codes int64 (N,) the distinct text of each row,
    first int64 (U,) a row holding each one, in code order); :func:`_texts_at` reads them.

    A product field is a function of the product (``product_id``, ``product_locale``: the key
    load_esci joins the products on), so it is deduplicated by that short key instead of by its
    text, and the texts are taken from the frame chunk by chunk: hashing, or taking, 2.6M long
    texts at once held another copy of the column (several GB at the release's size). Queries
    are deduplicated by their text."""
    if column == "query" or "product_id" not in df.columns:
        codes, _ = pd.factorize(df[column].astype("string").fillna(""), use_na_sentinel=False)
    else:
        keys = [c for c in ("product_id", "product_locale") if c in df.columns]
        codes = df.groupby(keys, sort=False, dropna=False).ngroup().to_numpy(np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    return codes, np.unique(codes, return_index=True)[1]


def _texts_at(column: pd.Series, rows: np.ndarray) -> list[str]:
    """The texts of ``column`` at positions ``rows`` (int64 (n,)) as str, NaN read as ``""``."""
    return list(column.iloc[rows].astype("string").fillna(""))


def _estimated_words(column: pd.Series, max_words: int | None = None, max_chars: int | None = None) -> np.ndarray:
    """An estimate of each text's :func:`words`: spaces + 1 (0 for an empty text), at most
    ``max_words``, over its first ``max_chars`` characters. int64 (N,). Vectorised (pandas/pyarrow
    string kernels) and without a copy of the text (only the few texts over ``max_chars`` are cut):
    it only sizes samples (:func:`budget_sample`), so it need not be exact."""
    text = column if isinstance(column.dtype, pd.StringDtype) else column.astype("string")  # no copy of str data
    chars = text.str.len().fillna(0).to_numpy(np.int64)
    spaces = text.str.count(" ").fillna(0).to_numpy(np.int64, copy=True)
    if max_chars is not None:
        long = np.flatnonzero(chars > max_chars)
        if len(long):
            spaces[long] = text.iloc[long].str.slice(0, max_chars).str.count(" ").fillna(0).to_numpy(np.int64)
    est = np.where(chars > 0, spaces + 1, 0)
    return est if max_words is None else np.minimum(est, max_words)


def budget_sample(sizes: np.ndarray, budget: int | None, seed: int) -> np.ndarray | None:
    """A seeded random sample of items whose sizes fit ``budget``, or None when all of them fit.

    Args:
        sizes: int64 (N,) each item's size (e.g. words).
        budget: the most the sample's sizes may add up to; None = no budget.

    Returns:
        int64 (n,) the sampled items' positions, ascending (their order kept), at least one; or
        None (every item fits: the caller uses them all, unchanged).
    """
    if budget is None or int(sizes.sum()) <= budget:
        return None
    order = np.random.default_rng(seed).permutation(len(sizes))
    n = int(np.searchsorted(np.cumsum(sizes[order]), budget, side="right"))
    return np.sort(order[: max(n, 1)])


def compute_ngram_bags(df: pd.DataFrame, cfg: FeaturesConfig) -> NgramBags:
    """Hash the word 1..``cfg.ngram``-grams of ``cfg.bag_fields`` for every row of ``df``.

    Vectorised: each distinct text of a column is split into words once (queries repeat over
    their products, products over their queries), each distinct word is hashed once by zlib, and
    the n-grams' CRC-32 follow from their words' (``crc32_combine``, numpy). The bags are kept per
    distinct text (:class:`NgramBags` with ``index``); a batch gathers its rows' bags. Each bag is
    equal to :func:`text_buckets` of its row and field (tests check it on the real sample).
    Cost: Python linear in the distinct texts' first ``max_words`` words; memory about 4 bytes
    per n-gram of the distinct texts plus 8 x F per row (the index). At the release's size
    (2.6M rows, default fields) see benchmarks/full_release.py.

    Args:
        df: N rows with the columns of :data:`BAG_COLUMNS` for the chosen fields.
        cfg: ``ngram``, ``buckets``, ``max_words``, ``bag_fields``.

    Returns:
        NgramBags with N x len(bag_fields) bags, per-distinct-text layout (ids int32, offsets
        int64, index int64 (N, F)).

    Raises:
        ConfigError: buckets <= 0.
    """
    if cfg.buckets <= 0:
        raise ConfigError(f"features.buckets={cfg.buckets}: expected a positive integer")
    fields = list(cfg.bag_fields)
    vocab = _WordIds()
    seg_len: list[np.ndarray] = []
    index = np.zeros((len(df), len(fields)), dtype=np.int64)
    base = 0
    # each chunk's bags are spilled to an unnamed temporary file as they are made, then read back
    # as one array: concatenating in memory held them twice (freed ~10 MB numpy buffers stay in
    # the C heap), 1.7 GB extra at the release's size
    with tempfile.TemporaryFile(prefix="esci-bags-") as spill:
        for j, f in enumerate(fields):
            codes, first = _distinct_texts(df, BAG_COLUMNS[f])
            n_distinct = len(first)
            index[:, j] = codes + base
            for i in range(0, n_distinct, _TEXT_CHUNK):
                per_text = [words(t, cfg.max_words) for t in _texts_at(df[BAG_COLUMNS[f]], first[i : i + _TEXT_CHUNK])]
                flat, lens = _text_ngram_buckets(per_text, cfg.ngram, cfg.buckets, vocab)
                spill.write(memoryview(np.ascontiguousarray(flat, dtype=np.int32)))
                seg_len.append(lens)
            base += n_distinct
        del vocab
        offsets = np.zeros(base + 1, dtype=np.int64)
        if seg_len:
            np.cumsum(np.concatenate(seg_len), out=offsets[1:])
        spill.seek(0)
        ids = np.fromfile(spill, dtype=np.int32, count=int(offsets[-1]))
    return NgramBags(fields, ids, offsets, index)


def _bag_key(df: pd.DataFrame, cfg: FeaturesConfig, extra: dict | None = None) -> str:
    src = json.dumps(
        {
            "fields": cfg.bag_fields,
            "ngram": cfg.ngram,
            "buckets": cfg.buckets,
            "max_words": cfg.max_words,
            "data": frame_fingerprint(df),
            "version": 2,  # 2: the per-distinct-text layout (index)
            **(extra or {}),
        },
        sort_keys=True,
    )
    return hashlib.sha1(src.encode()).hexdigest()[:20]


def ngram_bags_cached(df: pd.DataFrame, cfg: FeaturesConfig, cache_dir: str | Path) -> NgramBags:
    """:func:`compute_ngram_bags` with an on-disk cache ``cache_dir/bags-<key>.npz`` (next to the
    token cache; the key hashes the bag settings and the data). A corrupt file is recomputed;
    writes are atomic (temp file + rename)."""
    path = Path(cache_dir) / f"bags-{_bag_key(df, cfg)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                bags = NgramBags(list(cfg.bag_fields), z["ids"], z["offsets"], z["index"])
            if (
                bags.index.shape == (len(df), len(cfg.bag_fields))
                and int(bags.index.max(initial=-1)) < len(bags.offsets) - 1
            ):
                return bags
        except (OSError, ValueError, KeyError):
            pass
    bags = compute_ngram_bags(df, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=bags.ids, offsets=bags.offsets, index=bags.index)
    tmp.replace(path)
    return bags


# ---- word2vec initialisation ---------------------------------------------------------------------


def _crc_hash(s) -> int:
    """gensim's ``hashfxn`` (seeds each word's initial vector): crc32, not the salted ``hash()``."""
    return zlib.crc32(str(s).encode("utf-8"))


class _Sentences:
    """A restartable corpus for gensim: sentences stored as int32 word ids + offsets, yielded as
    lists of the vocabulary's own ``str`` objects (one object per distinct word, not per token)."""

    def __init__(self):
        self.vocab = _WordIds()
        self.ids: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []

    def add(self, sentences: list[list[str]]) -> None:
        """Append sentences (empty ones are skipped)."""
        sentences = [s for s in sentences if s]
        n = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        flat = (w for s in sentences for w in s)
        self.ids.append(np.fromiter(map(self.vocab.__getitem__, flat), dtype=np.int32, count=int(n.sum())))
        self.lengths.append(n)

    def __len__(self) -> int:
        return int(sum(len(n) for n in self.lengths))

    def __iter__(self):
        words = list(self.vocab)  # insertion order == id order
        for ids, n in zip(self.ids, self.lengths):
            ends = np.cumsum(n).tolist()
            start = 0
            for end in ends:
                yield [words[i] for i in ids[start:end].tolist()]
                start = end


def train_word2vec(df: pd.DataFrame, dim: int, epochs: int = 5, seed: int = 42, max_words: int | None = None):
    """Word2vec (gensim CBOW, window 5, min_count 1, one worker: reproducible) on the catalogue.

    Sentences: one per distinct product ``(product_id, product_locale)`` of ``df``: the words of its
    title, brand, colour, bullet points and description (first 4,000 characters each). No labels
    are read. Source: Mikolov et al. 2013 (arXiv:1301.3781). The sentences are tokenized once and
    held as int32 word ids (a few bytes per token instead of a Python ``str`` per token), then
    streamed to gensim on every pass; the model is the same as with a list of sentences (same
    order, one worker).

    ``max_words`` bounds the corpus (``features.w2v_max_words``): when the products' estimated
    words (:func:`_estimated_words`) add up to more, a seeded random sample of whole products that
    fits it is read, in the frame's order (:func:`budget_sample`). One worker trained ~1.4M words
    a second here (measured at 1/100 of the release), so the release's ~350M words x 5 epochs
    would take about 20 min (estimated); with the 20M default (about text8's size) the corpus and
    training took 148.6 s at full size. Under the budget the corpus is every product.

    Returns:
        gensim ``KeyedVectors`` (vectors float32 (V, dim)).

    Raises:
        ConfigError: gensim is not installed, or the data has no product text.
    """
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise ConfigError("features.init=word2vec needs gensim (pip install gensim)") from None
    cols = [c for c in FIELD_COLUMNS.values() if c in df]
    # a row of each distinct product (product fields are a function of the product), read from
    # the frame block by block: a deduplicated copy of the frame held every text column again
    prods = _distinct_texts(df, cols[0])[1] if "product_id" in df and cols else np.arange(len(df))
    if max_words is not None and cols:
        est = sum(_estimated_words(df[c], max_chars=4000)[prods] for c in cols)
        picked = budget_sample(np.asarray(est), max_words, seed)
        if picked is not None:
            log.info("word2vec: %d of %d products (estimated words over %d)", len(picked), len(prods), max_words)
            prods = prods[picked]
    corpus = _Sentences()
    block = 50_000
    for s in range(0, len(prods), block):
        part = df[cols].iloc[prods[s : s + block]].astype("string").fillna("")
        corpus.add(
            [
                [w for v in row for w in _WORD.findall(clean_text(v, max_chars=4000).lower())]
                for row in part.itertuples(index=False)
            ]
        )
    if not len(corpus):
        raise ConfigError("features.init=word2vec: the data has no product text to train on")
    model = Word2Vec(
        corpus, vector_size=dim, window=5, min_count=1, workers=1, seed=seed, epochs=epochs, hashfxn=_crc_hash
    )
    return model.wv


def _gram_table(
    df: pd.DataFrame, cfg: FeaturesConfig, max_words: int | None = None, seed: int = 42
) -> tuple[list[np.ndarray], np.ndarray, _WordIds]:
    """The distinct word 1..n-grams of the distinct texts of the bag fields.

    ``max_words``: when the distinct texts' estimated words (at most ``cfg.max_words`` each) add
    up to more, each field reads a seeded random sample of its distinct texts (:func:`budget_sample`),
    its share of the budget in proportion to its words.

    Returns:
        (per order k = 1..n: int32 (G_k, k) word ids of each distinct k-gram, int32 (sum G_k,)
        their bucket rows in the same order (k = 1 first), the word vocabulary).
    """
    vocab = _WordIds()
    grams: list[list[np.ndarray]] = [[] for _ in range(cfg.ngram)]
    rows: list[list[np.ndarray]] = [[] for _ in range(cfg.ngram)]
    firsts = {f: _distinct_texts(df, BAG_COLUMNS[f])[1] for f in cfg.bag_fields}
    if max_words is not None:
        est = {f: _estimated_words(df[BAG_COLUMNS[f]], cfg.max_words)[firsts[f]] for f in cfg.bag_fields}
        total = sum(int(e.sum()) for e in est.values())
        for j, f in enumerate(cfg.bag_fields):
            picked = (
                budget_sample(est[f], int(max_words * est[f].sum() / max(total, 1)), seed + j)
                if total > max_words
                else None
            )
            if picked is not None:
                log.info("word2vec init: %s: %d of %d distinct texts", f, len(picked), len(firsts[f]))
                firsts[f] = firsts[f][picked]
    for f in cfg.bag_fields:
        column, text_rows = df[BAG_COLUMNS[f]], firsts[f]
        for i in range(0, len(text_rows), _TEXT_CHUNK):
            per_text = [words(t, cfg.max_words) for t in _texts_at(column, text_rows[i : i + _TEXT_CHUNK])]
            n_words = np.fromiter((len(w) for w in per_text), dtype=np.int64, count=len(per_text))
            flat = (w for ws in per_text for w in ws)
            wid = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=int(n_words.sum()))
            flat_b, _ = _text_ngram_buckets(per_text, cfg.ngram, cfg.buckets, vocab)
            text_of = np.repeat(np.arange(len(n_words)), n_words)
            pos = np.arange(len(wid)) - (np.cumsum(n_words) - n_words)[text_of]
            # bucket of the k-gram starting at each word: its place in the text's bag
            per_k = [np.maximum(n_words - k + 1, 0) for k in range(1, cfg.ngram + 1)]
            bag_start = np.cumsum(np.sum(per_k, axis=0)) - np.sum(per_k, axis=0)
            before = np.zeros(len(n_words), dtype=np.int64)
            for k in range(1, cfg.ngram + 1):
                ok = np.flatnonzero(pos <= n_words[text_of] - k)
                key = np.stack([wid[ok + j] for j in range(k)], axis=1).astype(np.int32)
                b = flat_b[bag_start[text_of[ok]] + before[text_of[ok]] + pos[ok]]
                key, first = _unique_rows(key)
                grams[k - 1].append(key)
                rows[k - 1].append(b[first])
                before += per_k[k - 1]
    out_keys, out_rows = [], []
    for k in range(cfg.ngram):
        key, first = _unique_rows(np.concatenate(grams[k]) if grams[k] else np.zeros((0, k + 1), np.int32))
        out_keys.append(key)
        out_rows.append(np.concatenate(rows[k])[first] if rows[k] else np.zeros(0, np.int32))
        grams[k] = rows[k] = []
    return out_keys, np.concatenate(out_rows).astype(np.int32), vocab


def _unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a C-contiguous 2-D array and the index of each one's first occurrence."""
    a = np.ascontiguousarray(a)
    if len(a) == 0:
        return a, np.zeros(0, dtype=np.int64)
    view = a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()
    _, first = np.unique(view, return_index=True)
    return a[first], first


_GRAM_CHUNK = 1 << 17  # distinct n-grams per vectorised pass of word2vec_bucket_init (~70 MB)


def word2vec_bucket_init(
    df: pd.DataFrame, cfg: FeaturesConfig, seed: int = 42, wv=None, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Initial rows of the bag table from word2vec: ``(rows int64 (R,), vectors float32 (R, bag_dim))``.

    For every distinct word 1..n-gram of the bag fields of ``df`` whose words have vectors (words
    without one are skipped; an n-gram with none is skipped), its vector = mean of its words'
    vectors; a bucket's row = mean over the distinct n-grams hashed into it. ``wv``: precomputed
    KeyedVectors (else :func:`train_word2vec` on ``df``). Cached in ``cache_dir`` when given.
    Vectorised: distinct n-grams are found as rows of word ids (numpy), their buckets as in
    :func:`compute_ngram_bags`, and the sums per bucket are ``np.bincount`` per dimension.

    Raises:
        ConfigError: gensim missing, or the vectors' size differs from ``bag_dim``.
    """
    path = None
    if cache_dir is not None and wv is None:
        path = (
            Path(cache_dir)
            / f"w2v-{_bag_key(df, cfg, {'dim': cfg.bag_dim, 'epochs': cfg.w2v_epochs, 'seed': seed, 'max': cfg.w2v_max_words})}.npz"
        )
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["rows"], z["vectors"]
            except (OSError, ValueError, KeyError):
                pass
    if wv is None:
        wv = train_word2vec(df, cfg.bag_dim, cfg.w2v_epochs, seed, cfg.w2v_max_words)
    if wv.vector_size != cfg.bag_dim:
        raise ConfigError(f"features.bag_dim={cfg.bag_dim}: word2vec vectors have size {wv.vector_size}")
    keys, buckets, vocab = _gram_table(df, cfg, cfg.w2v_max_words, seed)
    index = wv.key_to_index
    w2v_row = np.fromiter((index.get(w, -1) for w in vocab), dtype=np.int64, count=len(vocab))
    vectors = np.asarray(wv.vectors)
    sums = np.zeros((cfg.buckets + 1, cfg.bag_dim), dtype=np.float64)
    counts = np.zeros(cfg.buckets + 1, dtype=np.int64)
    start = 0
    for key in keys:
        b_all = buckets[start : start + len(key)]
        start += len(key)
        for s in range(0, len(key), _GRAM_CHUNK):
            r = w2v_row[key[s : s + _GRAM_CHUNK]]  # (m, k), -1 = no vector
            known = (r >= 0).sum(1)
            ok = known > 0
            r, known, b = r[ok], known[ok], b_all[s : s + _GRAM_CHUNK][ok]
            vec = np.zeros((len(r), cfg.bag_dim), dtype=np.float64)
            for j in range(r.shape[1]):
                has = r[:, j] >= 0
                vec[has] += vectors[r[has, j]]
            vec /= known[:, None]
            order = np.argsort(b, kind="stable")  # sum per bucket: one reduceat over the sorted grams
            b, vec = b[order], vec[order]
            starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]]) if len(b) else np.zeros(0, np.int64)
            if len(starts):
                sums[b[starts]] += np.add.reduceat(vec, starts, axis=0)
                counts[b[starts]] += np.diff(np.r_[starts, len(b)])
    rows = np.flatnonzero(counts)
    out = (rows.astype(np.int64), (sums[rows] / counts[rows, None]).astype(np.float32))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, rows=out[0], vectors=out[1])
        tmp.replace(path)
    return out


# ---- ID vocabularies -----------------------------------------------------------------------------


def _normalise_id(values: pd.Series) -> pd.Series:
    """Cleaned, lower-cased values ("" for missing); each distinct value is cleaned once (the
    examples frame repeats a product's brand on every row, and this runs once per fold)."""
    codes, uniques = pd.factorize(values.astype("string").fillna(""), use_na_sentinel=False)
    cleaned = np.array([clean_text(v).lower() for v in uniques] or [""], dtype=object)
    return pd.Series(cleaned[codes], index=values.index, dtype=object)


def build_id_vocab(df: pd.DataFrame, fields: list[str], min_count: int = 2) -> dict[str, list[str]]:
    """Vocabularies of the ID fields from the products of ``df`` (the training fold's rows).

    Each distinct product ``(product_id, product_locale)`` counts once; a value (cleaned,
    lower-cased) seen on ``>= min_count`` products gets an id 1..V in the order of the returned list
    (most frequent first, ties alphabetical); empty, rare and unseen values all map to 0.

    Returns:
        ``{field: [value of id 1, value of id 2, ...]}``.

    Raises:
        ConfigError: an unknown field or min_count < 1.
    """
    bad = [f for f in fields if f not in ID_COLUMNS]
    if bad:
        raise ConfigError(f"features.id_fields: unknown field(s) {bad}; known: {list(ID_COLUMNS)}")
    if min_count < 1:
        raise ConfigError(f"features.id_min_count={min_count}: expected >= 1")
    prods = df.drop_duplicates(["product_id", "product_locale"]) if "product_id" in df else df
    vocab = {}
    for f in fields:
        counts = _normalise_id(prods[ID_COLUMNS[f]]).value_counts()
        counts = counts[(counts >= min_count) & (counts.index != "")]
        vocab[f] = sorted(counts.index, key=lambda v: (-int(counts[v]), v))
    return vocab


def encode_ids(df: pd.DataFrame, vocab: dict[str, list[str]]) -> np.ndarray:
    """int64 (len(df), len(vocab)): each row's id per field (0 = unknown, rare or empty)."""
    out = np.zeros((len(df), len(vocab)), dtype=np.int64)
    for j, (f, values) in enumerate(vocab.items()):
        lookup = {v: i + 1 for i, v in enumerate(values)}
        out[:, j] = _normalise_id(df[ID_COLUMNS[f]]).map(lookup).fillna(0).astype(np.int64).to_numpy()
    return out


# ---- what a batch carries, the module, checkpoints -----------------------------------------------


@dataclass
class RowFeatures:
    """The side features of every row of the examples frame, for ``core.modeling.model.collate``.

    ``bags``: NgramBags or None; ``ids``: int64 (N, n_id_fields) or None.
    """

    bags: NgramBags | None = None
    ids: np.ndarray | None = None

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """``{"bags": int64 (B, F, L), "ids": int64 (B, n_id_fields)}`` (only the ones present)."""
        out = {}
        if self.bags is not None:
            out["bags"] = self.bags.batch(indices)
        if self.ids is not None:
            out["ids"] = torch.from_numpy(self.ids[np.asarray(indices, dtype=np.int64)])
        return out


class SemanticUnits(nn.Module):
    """Hashed n-gram bags and ID embeddings -> one vector per pair, concatenated to the pooled one.

    Args:
        n_bag_fields: F, bag lookups per pair (0: no bag table).
        buckets: hash buckets; the shared ``nn.EmbeddingBag(buckets + 1, bag_dim, mode="mean",
            padding_idx=0)`` ignores row 0 in the mean, so an empty bag gives zeros (no NaN).
        bag_dim: size of each bag vector.
        id_sizes: ``{field: vocabulary size V}``; each gets ``nn.Embedding(V + 1, id_dim)`` (0 = unknown).
        id_dim: size of each ID vector.
        bag_init: ``(rows, vectors)`` from :func:`word2vec_bucket_init`, copied over the random init.

    Random init: normal(0, INIT_STD) for both tables. ``forward(bags, ids)``: bags int64 (B, F, L),
    ids int64 (B, len(id_sizes)) -> float (B, out_dim), ``out_dim = F * bag_dim + len(id_sizes) * id_dim``
    (bag vectors first, field by field, then the ID vectors).
    Sources: the ESCI MultiTask Pre-Training seed; Joulin et al. 2017 (arXiv:1607.01759).
    """

    def __init__(
        self,
        n_bag_fields: int,
        buckets: int,
        bag_dim: int,
        id_sizes: dict[str, int] | None = None,
        id_dim: int = 16,
        bag_init: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        super().__init__()
        id_sizes = dict(id_sizes or {})
        self.n_bag_fields, self.bag_dim, self.id_dim = n_bag_fields, bag_dim, id_dim
        self.bag = None
        if n_bag_fields:
            self.bag = nn.EmbeddingBag(buckets + 1, bag_dim, mode="mean", padding_idx=0)
            with torch.no_grad():
                nn.init.normal_(self.bag.weight, std=INIT_STD)
                if bag_init is not None:
                    rows, vecs = bag_init
                    self.bag.weight[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(
                        vecs, dtype=self.bag.weight.dtype
                    )
                self.bag.weight[0].zero_()
        self.ids = nn.ModuleDict({f: nn.Embedding(v + 1, id_dim) for f, v in id_sizes.items()})
        for e in self.ids.values():
            nn.init.normal_(e.weight, std=INIT_STD)
        self.out_dim = n_bag_fields * bag_dim + len(id_sizes) * id_dim

    def forward(self, bags: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """bags int64 (B, F, W) bucket ids (0 = padding), ids int64 (B, len(id_fields)) ->
        float (B, out_dim): each field's mean bag vector, then each ID vector, concatenated.

        Raises:
            ValueError: the model has bags / ID embeddings and the batch carries none.
        """
        parts = []
        if self.bag is not None:
            if bags is None:
                raise ValueError("SemanticUnits: the model has n-gram bags but the batch carries none")
            b, f, width = bags.shape
            parts.append(self.bag(bags.reshape(b * f, width)).reshape(b, f * self.bag_dim))
        if len(self.ids):
            if ids is None:
                raise ValueError("SemanticUnits: the model has ID embeddings but the batch carries none")
            parts += [emb(ids[:, j]) for j, emb in enumerate(self.ids.values())]
        return torch.cat(parts, dim=-1)


def features_on(cfg: FeaturesConfig) -> bool:
    """True when the ``features`` section turns on n-gram bags or ID embeddings."""
    return bool(cfg.ngram_bags or cfg.id_embeddings)


def check_features(cfg: FeaturesConfig, need_gensim: bool = True) -> None:
    """Validate the ``features`` section (also done when the config loads).

    Raises:
        ConfigError: unknown field, non-positive size, or ``init: word2vec`` without gensim.
    """
    FeaturesConfig(**asdict(cfg))  # __post_init__ checks fields and sizes
    if need_gensim and cfg.ngram_bags and cfg.init == "word2vec":
        import importlib.util

        if importlib.util.find_spec("gensim") is None:
            raise ConfigError("features.init=word2vec needs gensim, which is not installed (pip install gensim)")


def build_semantic(
    cfg: FeaturesConfig, id_vocab: dict[str, list[str]] | None, bag_init: tuple[np.ndarray, np.ndarray] | None = None
) -> SemanticUnits | None:
    """The fold's :class:`SemanticUnits` for ``cfg`` and its ID vocabularies, or None when both are off."""
    if not features_on(cfg):
        return None
    sizes = {f: len(v) for f, v in (id_vocab or {}).items()} if cfg.id_embeddings else {}
    return SemanticUnits(
        len(cfg.bag_fields) if cfg.ngram_bags else 0,
        cfg.buckets,
        cfg.bag_dim,
        sizes,
        cfg.id_dim,
        bag_init=bag_init if cfg.ngram_bags else None,
    )


FEATURES_FILE = "features.json"


def save_fold_features(fold_dir: Path, cfg: FeaturesConfig, id_vocab: dict[str, list[str]] | None) -> Path:
    """Write ``fold_dir/features.json``: the features section and the fold's ID vocabularies (the
    ids the checkpoint's embedding rows belong to). Returns its path."""
    path = Path(fold_dir) / FEATURES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"features": asdict(cfg), "id_vocab": id_vocab or {}}, ensure_ascii=False))
    tmp.replace(path)
    return path


def load_fold_features(fold_dir: Path) -> tuple[FeaturesConfig, dict[str, list[str]]]:
    """Read ``fold_dir/features.json`` -> (features config, ID vocabularies).

    Raises:
        ConfigError: the file is missing or malformed.
    """
    path = Path(fold_dir) / FEATURES_FILE
    try:
        data = json.loads(path.read_text())
        return FeaturesConfig(**data["features"]), {f: list(v) for f, v in data["id_vocab"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the fold's feature vocabularies ({type(exc).__name__})") from None


def load_fold_model(
    run_dir: Path,
    fold: int,
    model_name: str,
    pooling: str = "mean",
    dropout: float = 0.1,
    msd_rates: list[float] | None = None,
    layer_pooling_last: int = 0,
    markers=None,
):
    """A saved fold checkpoint for prediction: ``(CrossEncoder in eval mode, FeaturesConfig, id_vocab)``.

    ``markers``: the :class:`core.modeling.markers.MarkerSpec` of a run with ``text.field_markers`` /
    ``entity_markers`` (``add_marker_tokens`` on the run's tokenizer): the embeddings are resized
    (and the frozen-embedding offsets added when the checkpoint has them) before the weights load.

    Builds the model with the side-feature shapes of ``run_dir/fold<k>/features.json`` (when present;
    else a plain cross-encoder and the default, all-off features) and loads ``model.safetensors``.
    Predict with ``RowFeatures(bags, encode_ids(df, id_vocab))`` so the test rows get the training
    fold's ids.

    Raises:
        ConfigError: weights or the features file missing or malformed.
    """
    from safetensors.torch import load_file

    from core.modeling.model import CrossEncoder

    fold_dir = Path(run_dir) / f"fold{fold}"
    if (fold_dir / FEATURES_FILE).is_file():
        fcfg, vocab = load_fold_features(fold_dir)
    else:
        fcfg, vocab = FeaturesConfig(), {}
    semantic = build_semantic(fcfg, vocab)
    weights = fold_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{weights}: checkpoint not found")
    state = load_file(str(weights))
    model = CrossEncoder.from_pretrained(
        model_name,
        pooling,
        dropout,
        msd_rates=msd_rates,
        layer_pooling_last=layer_pooling_last,
        semantic=semantic,
        marker_slots=(markers.slot_ids, markers.slot_segments) if markers is not None else None,
    )
    if markers is not None:
        from core.modeling.markers import OFFSETS_NAME, resize_for_markers

        resize_for_markers(model, markers, trainable_offsets=any(k.startswith(OFFSETS_NAME + ".") for k in state))
    model.load_state_dict(state)
    model.eval()
    return model, fcfg, vocab
