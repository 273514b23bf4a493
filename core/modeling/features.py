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
    """Hashed n-gram bags of N rows x F fields, ragged, stored flat (like core.data.text.EncodedPairs).

    Attributes:
        fields: the F bag field names, in classifier-input order.
        ids: int32 (total,), bucket rows 1..buckets of all bags concatenated.
        offsets: int64 (N*F + 1,); bag (row i, field f) is ``ids[offsets[i*F+f]:offsets[i*F+f+1]]``.
    """

    fields: list[str]
    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // max(1, len(self.fields))

    def batch(self, indices) -> torch.Tensor:
        """Bags of the rows ``indices`` as int64 (B, F, L) padded with 0 (L = longest bag, >= 1)."""
        idx = np.asarray(indices, dtype=np.int64)
        f = len(self.fields)
        sel = (idx[:, None] * f + np.arange(f)[None, :]).ravel()
        start = self.offsets[sel]
        length = self.offsets[sel + 1] - start
        width = max(1, int(length.max()) if len(length) else 1)
        col = np.arange(width)
        mask = col[None, :] < length[:, None]
        out = np.zeros((len(sel), width), dtype=np.int64)
        out[mask] = self.ids[(start[:, None] + col[None, :])[mask]]
        return torch.from_numpy(out.reshape(len(idx), f, width))


def compute_ngram_bags(df: pd.DataFrame, cfg: FeaturesConfig) -> NgramBags:
    """Hash the word 1..``cfg.ngram``-grams of ``cfg.bag_fields`` for every row of ``df``.

    Vectorised over repeated texts: each distinct text of a column is hashed once (queries repeat
    over their products, products over their queries) and an n-gram -> bucket memo is shared, then
    the rows are gathered with numpy. Cost: linear in the distinct texts' first ``max_words`` words.

    Args:
        df: N rows with the columns of :data:`BAG_COLUMNS` for the chosen fields.
        cfg: ``ngram``, ``buckets``, ``max_words``, ``bag_fields``.

    Returns:
        NgramBags with N x len(bag_fields) bags.

    Raises:
        ConfigError: an unknown field or buckets <= 0.
    """
    n_rows, fields = len(df), list(cfg.bag_fields)
    memo: dict[str, int] = {}

    def bucket(g: str) -> int:
        b = memo.get(g)
        if b is None:
            b = memo[g] = ngram_bucket(g, cfg.buckets)
        return b

    flats, lengths, starts, base = (
        [],
        np.zeros((n_rows, len(fields)), np.int64),
        np.zeros((n_rows, len(fields)), np.int64),
        0,
    )
    for j, f in enumerate(fields):
        codes, uniques = pd.factorize(df[BAG_COLUMNS[f]].astype("string").fillna(""), use_na_sentinel=False)
        per = [[bucket(g) for g in ngrams(words(t, cfg.max_words), cfg.ngram)] for t in uniques]
        u_len = np.fromiter((len(p) for p in per), dtype=np.int64, count=len(per))
        u_off = np.zeros(len(per) + 1, dtype=np.int64)
        np.cumsum(u_len, out=u_off[1:])
        flats.append(np.fromiter((b for p in per for b in p), dtype=np.int32, count=int(u_off[-1])))
        lengths[:, j] = u_len[codes]
        starts[:, j] = u_off[:-1][codes] + base
        base += int(u_off[-1])
    big = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    seg = lengths.ravel()
    offsets = np.zeros(len(seg) + 1, dtype=np.int64)
    np.cumsum(seg, out=offsets[1:])
    pos = np.repeat(starts.ravel() - offsets[:-1], seg) + np.arange(int(offsets[-1]))
    return NgramBags(fields, big[pos].astype(np.int32), offsets)


def _bag_key(df: pd.DataFrame, cfg: FeaturesConfig, extra: dict | None = None) -> str:
    src = json.dumps(
        {
            "fields": cfg.bag_fields,
            "ngram": cfg.ngram,
            "buckets": cfg.buckets,
            "max_words": cfg.max_words,
            "data": frame_fingerprint(df),
            "version": 1,
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
                bags = NgramBags(list(cfg.bag_fields), z["ids"], z["offsets"])
            if len(bags.offsets) == len(df) * len(cfg.bag_fields) + 1:
                return bags
        except (OSError, ValueError, KeyError):
            pass
    bags = compute_ngram_bags(df, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=bags.ids, offsets=bags.offsets)
    tmp.replace(path)
    return bags


# ---- word2vec initialisation ---------------------------------------------------------------------


def _crc_hash(s) -> int:
    """gensim's ``hashfxn`` (seeds each word's initial vector): crc32, not the salted ``hash()``."""
    return zlib.crc32(str(s).encode("utf-8"))


def train_word2vec(df: pd.DataFrame, dim: int, epochs: int = 5, seed: int = 42):
    """Word2vec (gensim CBOW, window 5, min_count 1, one worker: reproducible) on the catalogue.

    Sentences: one per distinct product ``(product_id, product_locale)`` of ``df``: the words of its
    title, brand, colour, bullet points and description (first 4,000 characters each). No labels
    are read. Source: Mikolov et al. 2013 (arXiv:1301.3781).

    Returns:
        gensim ``KeyedVectors`` (vectors float32 (V, dim)).

    Raises:
        ConfigError: gensim is not installed.
    """
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise ConfigError("features.init=word2vec needs gensim (pip install gensim)") from None
    prods = df.drop_duplicates(["product_id", "product_locale"]) if "product_id" in df else df
    cols = [c for c in FIELD_COLUMNS.values() if c in prods]
    sentences = []
    for row in prods[cols].astype("string").fillna("").itertuples(index=False):
        toks = [w for v in row for w in _WORD.findall(clean_text(v, max_chars=4000).lower())]
        if toks:
            sentences.append(toks)
    if not sentences:
        raise ConfigError("features.init=word2vec: the data has no product text to train on")
    model = Word2Vec(
        sentences, vector_size=dim, window=5, min_count=1, workers=1, seed=seed, epochs=epochs, hashfxn=_crc_hash
    )
    return model.wv


def word2vec_bucket_init(
    df: pd.DataFrame, cfg: FeaturesConfig, seed: int = 42, wv=None, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Initial rows of the bag table from word2vec: ``(rows int64 (R,), vectors float32 (R, bag_dim))``.

    For every distinct word 1..n-gram of the bag fields of ``df`` whose words have vectors (words
    without one are skipped; an n-gram with none is skipped), its vector = mean of its words'
    vectors; a bucket's row = mean over the distinct n-grams hashed into it. ``wv``: precomputed
    KeyedVectors (else :func:`train_word2vec` on ``df``). Cached in ``cache_dir`` when given.

    Raises:
        ConfigError: gensim missing, or the vectors' size differs from ``bag_dim``.
    """
    path = None
    if cache_dir is not None and wv is None:
        path = (
            Path(cache_dir)
            / f"w2v-{_bag_key(df, cfg, {'dim': cfg.bag_dim, 'epochs': cfg.w2v_epochs, 'seed': seed})}.npz"
        )
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["rows"], z["vectors"]
            except (OSError, ValueError, KeyError):
                pass
    if wv is None:
        wv = train_word2vec(df, cfg.bag_dim, cfg.w2v_epochs, seed)
    if wv.vector_size != cfg.bag_dim:
        raise ConfigError(f"features.bag_dim={cfg.bag_dim}: word2vec vectors have size {wv.vector_size}")
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
