"""Product text cleaning and the cross-encoder input builder (with an on-disk token cache).

Input template (BERT style, two segments)::

    [CLS] query [SEP] title [SEP] brand / color / bullet points / description [SEP]
     type 0 ..........  type 1 ...............................................

Each field is first cut to its token budget (``TextConfig.budgets``); budget a short field does
not use flows to the later fields, in template order, up to ``max_length``.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

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


def encode_pairs(df: pd.DataFrame, tokenizer, cfg: TextConfig) -> EncodedPairs:
    """Tokenize each row of ``df`` (columns ``query`` and the official product text columns).

    Args:
        df: N rows, one per example.
        tokenizer: a transformers (fast) tokenizer with ``cls_token_id`` and ``sep_token_id``.
        cfg: template fields, per-field budgets and ``max_length``.

    Returns:
        EncodedPairs with N sequences, each at most ``cfg.max_length`` tokens.

    Raises:
        ValueError: an unknown field name in ``cfg.fields`` or ``max_length`` < 8.
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

    n = len(df)
    query_tok = _tokenize_column(tokenizer, df["query"].tolist(), cfg.budgets.get("query", 32))
    fields = list(cfg.fields)
    field_tok = {f: _tokenize_column(tokenizer, df[FIELD_COLUMNS[f]].tolist(), cfg.max_length) for f in fields}
    budgets = [cfg.budgets.get(f, 16) for f in fields]

    seqs: list[list[int]] = []
    type_starts = np.empty(n, dtype=np.int32)
    for i in range(n):
        q = query_tok[i][: cfg.budgets.get("query", 32)]
        toks = [field_tok[f][i] for f in fields]
        # fixed overhead: CLS, SEP after query, SEP after title, final SEP, separators between rest
        nonempty_rest = [j for j in range(1, len(fields)) if toks[j]]
        overhead = 3 + (1 if fields else 0) + max(0, len(nonempty_rest) - 1) * len(slash)
        room = max(0, cfg.max_length - overhead - len(q))
        take = [min(len(t), b) for t, b in zip(toks, budgets)]
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
                extra = min(left, len(toks[j]) - take[j])
                take[j] += extra
                left -= extra
                if left == 0:
                    break
        seq = [cls_id, *q, sep_id]
        type_starts[i] = len(seq)
        if fields:
            seq += toks[0][: take[0]]
            seq.append(sep_id)
            first = True
            for j in range(1, len(fields)):
                if take[j] == 0:
                    continue
                if not first:
                    seq += slash
                seq += toks[j][: take[j]]
                first = False
        seq.append(sep_id)
        seqs.append(seq[: cfg.max_length])
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return EncodedPairs(flat, offsets, type_starts)


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


def encode_pairs_cached(df: pd.DataFrame, tokenizer, cfg: TextConfig) -> EncodedPairs:
    """``encode_pairs`` with an on-disk cache in ``cfg.cache_dir``.

    The key hashes the tokenizer, the template (fields, budgets), ``max_length`` and the data.
    A corrupt cache file is ignored and rewritten (written atomically: temp file + rename).
    """
    key_src = json.dumps(
        {
            "tok": tokenizer_fingerprint(tokenizer),
            "fields": cfg.fields,
            "budgets": cfg.budgets,
            "max_length": cfg.max_length,
            "data": frame_fingerprint(df),
            "version": 1,
        },
        sort_keys=True,
    )
    key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
    path = Path(cfg.cache_dir) / f"pairs-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                enc = EncodedPairs(z["input_ids"], z["offsets"], z["type_starts"])
            if len(enc) == len(df):
                return enc
        except (OSError, ValueError, KeyError):
            pass
    enc = encode_pairs(df, tokenizer, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, input_ids=enc.input_ids, offsets=enc.offsets, type_starts=enc.type_starts)
    tmp.replace(path)
    return enc
