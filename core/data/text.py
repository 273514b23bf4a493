"""Product text cleaning and the cross-encoder input builder (with an on-disk token cache).

Input template (BERT style, two segments)::

    [CLS] query [SEP] title [SEP] brand / color / bullet points / description [SEP]
     type 0 ..........  type 1 ...............................................

Each field is first cut to its token budget (``TextConfig.budgets``); budget a short field does
not use flows to the later fields, in template order, up to ``max_length``.

Typed field markers (``text.field_markers``; ETS-Lab's KDD Cup 2022 Task 2/3 solution, Amazon KDD
Cup 2022 workshop paper): one special token before the query and before each product field that
keeps at least one token; they replace the `` / `` separators::

    [CLS] [QUERY] query [SEP] [TITLE] title [SEP] [BRAND] brand [COLOR] color [BULLET] bullets [DESC] desc [SEP]

Budgets: a marker is template overhead, like ``[SEP]``: it is not taken from its field's budget
but from the room ``max_length`` leaves for the fields (one token per non-empty field, one for
``[QUERY]``); a sequence never exceeds ``max_length``. A field cut to 0 tokens (or empty) has no
marker (``model.pooling: markers`` then reads zeros for it).

Typed entity markers (``text.entity_markers``; after Zhong & Chen 2020, "A Frustratingly Easy
Approach for Entity and Relation Extraction", arXiv:2010.12812, without an NER model): brand and
colour mentions in the query, found by :class:`Gazetteer` (built from the frame's own
``product_brand``/``product_color`` values, rule in :func:`build_gazetteer`), are wrapped as
``[BRAND] nike [/BRAND] running shoes``. These markers are part of the query's tokens and count
against ``budgets.query``; a cut that would leave a mention open drops its opening marker.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.config import TextConfig

FIELD_COLUMNS = {
    "title": "product_title",
    "brand": "product_brand",
    "color": "product_color",
    "bullet_point": "product_bullet_point",
    "description": "product_description",
}

#: typed field markers: the special token before the query and before each product field
FIELD_MARKERS = {
    "query": "[QUERY]",
    "title": "[TITLE]",
    "brand": "[BRAND]",
    "color": "[COLOR]",
    "bullet_point": "[BULLET]",
    "description": "[DESC]",
}
#: typed entity markers around a mention in the query: entity type -> (opening, closing) token
ENTITY_MARKERS = {"brand": ("[BRAND]", "[/BRAND]"), "color": ("[COLOR]", "[/COLOR]")}
#: the gazetteer's filter (:func:`build_gazetteer`); GAZETTEER_VERSION is part of the token cache key
GAZETTEER_MIN_CHARS = 3
GAZETTEER_MAX_WORDS = 4
GAZETTEER_MAX_TITLE_DF = 0.2
GAZETTEER_STOP = frozenset(
    "generic unknown unbranded none null nan n a na other others no brand not applicable see description "
    "the and for with of in on to by from new one multi multicolor multicolour assorted various pack set "
    "mix mixed size small medium large xl xxl full queen king twin regular standard".split()  # sizes in the colour field
)
GAZETTEER_VERSION = 2
_WORD = re.compile(r"\w+")

_TAG = re.compile(r"<[^>]{0,200}>")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\ufeff]")
_WS = re.compile(r"\s+")


def clean_text(text: object, max_chars: int | None = None) -> str:
    """Clean one product/query string.

    Unescapes HTML entities (``&amp;`` -> ``&``), replaces HTML tags by a space, drops control
    and zero-width characters, collapses whitespace (newlines included) and strips. ``None``/NaN
    become ``""``. ``max_chars`` cuts the result (to bound tokenizer work on long descriptions).
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    s = str(text)
    if "&" in s:
        s = html.unescape(s)
    if "<" in s:
        s = _TAG.sub(" ", s)
    s = _CONTROL.sub(" ", s)
    s = _WS.sub(" ", s).strip()
    if max_chars is not None and len(s) > max_chars:
        s = s[:max_chars]
    return s


@dataclass
class EncodedPairs:
    """Tokenized (query, product) pairs, ragged, stored flat.

    Attributes:
        input_ids: int32 array (total_tokens,), all sequences concatenated.
        offsets: int64 array (N+1,), sequence i is ``input_ids[offsets[i]:offsets[i+1]]``.
        type_starts: int32 array (N,), index within sequence i where token type 1 starts.
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    type_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 array (N,), tokens per sequence."""
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        """Return (token ids of sequence i, start of its second segment)."""
        return self.input_ids[self.offsets[i] : self.offsets[i + 1]], int(self.type_starts[i])


def _tokenize_column(tokenizer, texts: list[str], budget: int) -> list[list[int]]:
    if budget <= 0:
        return [[] for _ in texts]
    # a budget of B tokens never needs more than ~12 characters per token
    texts = [clean_text(t, max_chars=budget * 12) for t in texts]
    enc = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    return enc


# ---------------------------------------------------------------------------------- markers
def marker_tokens(cfg: TextConfig) -> list[str]:
    """The special tokens ``cfg`` needs, in a fixed order (their ids depend on it): all six field
    markers when ``field_markers`` is on, then the entity markers not already in the list."""
    out: list[str] = list(FIELD_MARKERS.values()) if cfg.field_markers else []
    if cfg.entity_markers:
        out += [t for pair in ENTITY_MARKERS.values() for t in pair if t not in out]
    return out


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text.lower()))


@dataclass
class Gazetteer:
    """Brand / colour names as lower-cased word tuples -> entity type (``"brand"`` or ``"color"``).

    :meth:`find` returns leftmost-longest whole-word matches; :meth:`mark` wraps them in the
    typed entity markers of :data:`ENTITY_MARKERS`.
    """

    entries: dict[tuple[str, ...], str]
    max_words: int = 1

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Mentions in ``text``: ``(start, end, type)`` character spans, left to right, no overlap.

        Words are ``\\w+`` runs of the lower-cased text, so a match never ends or starts inside a
        word (``nikes`` does not match ``nike``); at each word the longest entry wins."""
        words = _words(text)
        spans, i = [], 0
        while i < len(words):
            for n in range(min(self.max_words, len(words) - i), 0, -1):
                kind = self.entries.get(tuple(m.group() for m in words[i : i + n]))
                if kind is not None:
                    spans.append((words[i].start(), words[i + n - 1].end(), kind))
                    i += n
                    break
            else:
                i += 1
        return spans

    def mark(self, text: str) -> str:
        """``text`` with each mention wrapped: ``"nike shoes"`` -> ``"[BRAND] nike [/BRAND] shoes"``."""
        out, prev = [], 0
        for start, end, kind in self.find(text):
            open_, close = ENTITY_MARKERS[kind]
            out += [text[prev:start], f"{open_} ", text[start:end], f" {close}"]
            prev = end
        out.append(text[prev:])
        return "".join(out)


def build_gazetteer(products: pd.DataFrame) -> Gazetteer:
    """The gazetteer of the catalogue's own ``product_brand`` / ``product_color`` values.

    Args:
        products: rows with ``product_brand``, ``product_color`` and ``product_title`` (and
            ``product_id``: duplicates are counted once), e.g. the whole examples frame, test
            products included (product text is not a label).

    Returns:
        A :class:`Gazetteer`. Rule: each value is cleaned (:func:`clean_text`), lower-cased and
        split into ``\\w+`` words; a value is left out when it has fewer than
        ``GAZETTEER_MIN_CHARS`` (3) characters, no letter, more than ``GAZETTEER_MAX_WORDS`` (4)
        words, only words of ``GAZETTEER_STOP`` (placeholders such as "generic", "no brand";
        function words; size words that sellers put in the colour field), or when it is a single
        word found in the titles of more than
        ``GAZETTEER_MAX_TITLE_DF`` (20%) of the products (a word that common is no entity cue).
        A value that is both a brand and a colour takes the type of more products (brand on a tie).
    """
    if "product_id" in products.columns:
        products = products.drop_duplicates("product_id")
    title_df: dict[str, int] = {}
    for title in products["product_title"].astype("string").fillna("").tolist():
        for w in {m.group() for m in _words(title)}:
            title_df[w] = title_df.get(w, 0) + 1
    max_df = GAZETTEER_MAX_TITLE_DF * max(1, len(products))
    counts: dict[tuple[str, ...], dict[str, int]] = {}
    for kind, col in (("brand", "product_brand"), ("color", "product_color")):
        for value, n in products[col].astype("string").fillna("").value_counts().items():
            text = clean_text(value).lower()
            words = tuple(m.group() for m in _words(text))
            if (
                len(text) < GAZETTEER_MIN_CHARS
                or not any(c.isalpha() for c in text)
                or not words
                or len(words) > GAZETTEER_MAX_WORDS
                or all(w in GAZETTEER_STOP for w in words)
                or (len(words) == 1 and title_df.get(words[0], 0) > max_df)
            ):
                continue
            by_kind = counts.setdefault(words, {})
            by_kind[kind] = by_kind.get(kind, 0) + int(n)
    entries = {w: max(k, key=lambda t: (k[t], t == "brand")) for w, k in counts.items()}
    return Gazetteer(entries, max((len(w) for w in entries), default=1))


def _marked_queries(df: pd.DataFrame, tokenizer, budget: int) -> list[list[int]]:
    """Token ids of the queries with their entity mentions wrapped (:class:`Gazetteer`), uncut."""
    gazetteer = build_gazetteer(df)
    texts = [gazetteer.mark(clean_text(q, max_chars=max(budget, 1) * 12)) for q in df["query"].tolist()]
    return tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]


def _close_cut(q: list[int], pairs: dict[int, int]) -> list[int]:
    """Drop an entity opening marker (``pairs``: opening id -> closing id) left open by a cut."""
    for j in range(len(q) - 1, -1, -1):
        if q[j] in pairs.values():
            return q
        if q[j] in pairs:
            return q[:j] + q[j + 1 :]
    return q


def _allocate(lengths: list[int], budgets: list[int], room: int) -> list[int]:
    """Tokens taken from each field: its budget, cut from the last field backwards to fit
    ``room``, or leftover room flowing to the fields in template order."""
    take = [min(n, b) for n, b in zip(lengths, budgets)]
    total = sum(take)
    if total > room:  # budgets exceed room: shrink from the last field backwards
        excess = total - room
        for j in reversed(range(len(take))):
            cut = min(excess, take[j])
            take[j] -= cut
            excess -= cut
            if excess == 0:
                break
    else:  # leftover room flows to the fields in template order
        left = room - total
        for j in range(len(take)):
            extra = min(left, lengths[j] - take[j])
            take[j] += extra
            left -= extra
            if left == 0:
                break
    return take


def _row_plain(q: list[int], toks: list[list[int]], budgets: list[int], max_length: int, ids) -> tuple[list[int], int]:
    """One sequence of the plain template (`` / `` between the fields after the title)."""
    cls_id, sep_id, slash = ids
    nonempty_rest = [j for j in range(1, len(toks)) if toks[j]]
    # fixed overhead: CLS, SEP after query, SEP after title, final SEP, separators between rest
    overhead = 3 + (1 if toks else 0) + max(0, len(nonempty_rest) - 1) * len(slash)
    room = max(0, max_length - overhead - len(q))
    take = _allocate([len(t) for t in toks], budgets, room)
    seq = [cls_id, *q, sep_id]
    start = len(seq)
    if toks:
        seq += toks[0][: take[0]]
        seq.append(sep_id)
        first = True
        for j in range(1, len(toks)):
            if take[j] == 0:
                continue
            if not first:
                seq += slash
            seq += toks[j][: take[j]]
            first = False
    seq.append(sep_id)
    return seq[:max_length], start


def _row_marked(
    q: list[int], toks: list[list[int]], budgets: list[int], max_length: int, ids, marks: list[int], pairs
) -> tuple[list[int], int]:
    """One sequence with typed field markers (``marks``: the query's marker, then each field's)."""
    cls_id, sep_id, _ = ids
    # overhead: CLS, [QUERY], SEP after query, SEP after title, final SEP, one marker per non-empty field
    overhead = 4 + (1 if toks else 0) + sum(1 for t in toks if t)
    if len(q) > max_length - overhead:  # a tiny max_length: the query yields first
        q = _close_cut(q[: max(0, max_length - overhead)], pairs)
    room = max(0, max_length - overhead - len(q))
    take = _allocate([len(t) for t in toks], budgets, room)
    seq = [cls_id, marks[0], *q, sep_id]
    start = len(seq)
    for j, t in enumerate(toks):
        if take[j]:
            seq += [marks[j + 1], *t[: take[j]]]
        if j == 0:
            seq.append(sep_id)
    seq.append(sep_id)
    return seq[:max_length], start


def encode_pairs(df: pd.DataFrame, tokenizer, cfg: TextConfig) -> EncodedPairs:
    """Tokenize each row of ``df`` (columns ``query`` and the official product text columns).

    Args:
        df: N rows, one per example.
        tokenizer: a transformers (fast) tokenizer with ``cls_token_id`` and ``sep_token_id``;
            with ``cfg.field_markers`` / ``cfg.entity_markers`` it must hold :func:`marker_tokens`
            as special tokens (:func:`core.modeling.markers.add_marker_tokens`).
        cfg: template fields, per-field budgets, ``max_length`` and the marker switches.

    Returns:
        EncodedPairs with N sequences, each at most ``cfg.max_length`` tokens (template and budget
        rules at the top of this module).

    Raises:
        ValueError: an unknown field name in ``cfg.fields``, ``max_length`` < 8, or a marker token
            the tokenizer does not hold as one token.
    """
    ids, marker_ids, pairs, marks = template_ids(tokenizer, cfg)
    n = len(df)
    q_budget = cfg.budgets.get("query", 32)
    if cfg.entity_markers:
        query_tok = [_close_cut(q[:q_budget], pairs) for q in _marked_queries(df, tokenizer, q_budget)]
    else:
        query_tok = [q[:q_budget] for q in _tokenize_column(tokenizer, df["query"].tolist(), q_budget)]
    fields = list(cfg.fields)
    field_tok = {f: _tokenize_column(tokenizer, df[FIELD_COLUMNS[f]].tolist(), cfg.max_length) for f in fields}
    budgets = [cfg.budgets.get(f, 16) for f in fields]

    seqs: list[list[int]] = []
    type_starts = np.empty(n, dtype=np.int32)
    for i in range(n):
        toks = [field_tok[f][i] for f in fields]
        if cfg.field_markers:
            seq, type_starts[i] = _row_marked(query_tok[i], toks, budgets, cfg.max_length, ids, marks, pairs)
        else:
            seq, type_starts[i] = _row_plain(query_tok[i], toks, budgets, cfg.max_length, ids)
        seqs.append(seq)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return EncodedPairs(flat, offsets, type_starts)


def template_ids(tokenizer, cfg: TextConfig) -> tuple[tuple, dict[str, int], dict[int, int], list[int]]:
    """The special token ids of ``cfg``'s template, after checking ``cfg``.

    Returns:
        ``((cls_id, sep_id, slash_ids), marker_ids {token: id}, entity pairs {opening id: closing
        id} (empty without entity markers), field marks [query's marker, then each field's] (empty
        without field markers))``.

    Raises:
        ValueError: an unknown field name in ``cfg.fields``, ``max_length`` < 8, or a marker token
            the tokenizer does not hold as one token.
    """
    unknown = [f for f in cfg.fields if f not in FIELD_COLUMNS]
    if unknown:
        raise ValueError(f"text.fields: unknown field(s) {unknown}; known: {list(FIELD_COLUMNS)}")
    if cfg.max_length < 8:
        raise ValueError("text.max_length must be at least 8")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None:  # e.g. XLM-R style tokenizers expose bos/eos instead
        cls_id = tokenizer.bos_token_id
    if sep_id is None:
        sep_id = tokenizer.eos_token_id
    slash = tokenizer(" /", add_special_tokens=False)["input_ids"] or [sep_id]
    marker_ids = {t: _marker_id(tokenizer, t) for t in marker_tokens(cfg)}
    pairs = {marker_ids[o]: marker_ids[c] for o, c in ENTITY_MARKERS.values()} if cfg.entity_markers else {}
    marks = [marker_ids[FIELD_MARKERS[f]] for f in ["query", *cfg.fields]] if cfg.field_markers else []
    return (cls_id, sep_id, slash), marker_ids, pairs, marks


def _marker_id(tokenizer, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"marker {token} is not one token of the tokenizer: add it first (core.modeling.markers.add_marker_tokens)"
        )
    return int(ids[0])


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of a tokenizer's identity (class, name/path, vocabulary size, special ids)."""
    ident = [
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        len(tokenizer),
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        getattr(tokenizer, "do_lower_case", None),
    ]
    return hashlib.sha1(json.dumps(ident, default=str).encode()).hexdigest()[:12]


def frame_fingerprint(df: pd.DataFrame) -> str:
    """Short hash of the text a pair encoding depends on (query + product columns, row order)."""
    h = hashlib.sha1()
    cols = ["query", *FIELD_COLUMNS.values()]
    for col in cols:
        values = df[col].astype("string").fillna("")
        h.update(pd.util.hash_pandas_object(values, index=False).values.tobytes())
    return h.hexdigest()[:16]


def encode_pairs_cached(df: pd.DataFrame, tokenizer, cfg: TextConfig):
    """The pairs of ``df`` through the token cache in ``cfg.cache_dir``: a
    :class:`core.data.token_cache.CachedPairs` (same ``len`` / ``lengths`` / ``get`` as
    :class:`EncodedPairs`, equal sequences), built by :func:`core.data.token_cache.pair_tokens`."""
    from core.data.token_cache import pair_tokens

    return pair_tokens(df, tokenizer, cfg)
