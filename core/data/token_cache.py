"""A token cache that scales: tokenized texts stored once, pairs assembled at batch time.

The cross-encoder's input (:mod:`core.data.text`) is ``[CLS] query [SEP] title [SEP] brand / ...
[SEP]``, each field cut to a budget that depends on the other fields of the same pair. What can be
cached is each *text* tokenized on its own; the cut and the special tokens are applied per pair,
when a batch is built (:meth:`CachedPairs.get`), by the same row functions as
:func:`core.data.text.encode_pairs` (``_row_plain`` / ``_row_marked``), so the sequences are equal
token for token (tests/test_token_cache.py checks it on the real sample).

Layout: one **store** per text column and tokenization setting, a folder
``<text.cache_dir>/<name>-<key>/`` (``name``: ``query`` or a field; ``key``: 16 hex characters of a
SHA-1 over the settings in ``manifest.json``: tokenizer fingerprint, column, character cut, token
cap, and for queries the query budget and, with ``text.entity_markers``, the gazetteer). Product
stores do not depend on the budgets: one title store serves every budget and template of a
tokenizer and ``max_length``; training, OOF/test prediction and every fold share it.

A store holds append-only **shards**, each four files: ``<shard>.key.npy`` uint64 (n, 2) (64-bit
SipHash of the raw UTF-8 text, its byte length), ``<shard>.off.npy`` int64 (n+1,) offsets into
``<shard>.tok`` (raw little-endian int32 token ids, memory-mapped). Entries are keyed by the text
itself (not by ``product_id``): the same ASIN in two locales, a translated training row
(``data.augment_translations``) and a changed product text are different entries, and a brand
shared by 10,000 products is tokenized once. Tokens are stored cut to the most the template can
use (``max_length`` for a product field; the query budget for a query).

Incremental and crash-safe: a new selection or test file tokenizes only texts no shard holds,
into one new shard. The shard's files are written under temporary names, flushed, renamed, and
only then listed in ``manifest.json`` (written to a temporary file and renamed): a killed build
leaves files no manifest names, which readers ignore and the next build deletes. Builders take an
exclusive ``flock`` on ``<store>/lock``, so two runs sharing ``text.cache_dir`` tokenize a text once.
A corrupt file (unreadable manifest, wrong sizes or offsets) is reported in one log line naming it,
and the store is rebuilt.

Design after the KDD Cup 2022 ETS-Lab solution (product tokens cached on disk in HDF5), with
numpy memory maps instead of HDF5.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.config import TextConfig
from core.data.text import (
    FIELD_COLUMNS,
    GAZETTEER_VERSION,
    EncodedPairs,
    Gazetteer,
    _close_cut,
    _row_marked,
    _row_plain,
    build_gazetteer,
    clean_text,
    template_ids,
    tokenizer_fingerprint,
)

log = logging.getLogger("esci.tokens")

STORE_VERSION = 1
MANIFEST = "manifest.json"
#: texts per tokenizer call while building (bounds the Python lists held at once)
BUILD_CHUNK = 8192
#: texts taken from the frame at once while building: an Arrow take from a 2.6M-row column costs
#: ~80 ms whatever its size (measured at the release's size): 8192 a take cost a full-size build
#: 15% more CPU (1,123 s against 977 s; 956 s with this block size)
TAKE_CHUNK = 65_536
#: the SipHash key of the text keys (pandas.util.hash_array); part of every store's settings
HASH_KEY = "esci-token-v1-00"
#: rows hashed per pass of :func:`text_keys`
KEY_CHUNK = 65_536
#: a column with at most this many UTF-8 bytes a row on average is deduplicated by Arrow before hashing
SHORT_TEXT_BYTES = 64


class CacheCorrupt(Exception):
    """A store file that cannot be read as written: ``path`` and ``reason``."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ------------------------------------------------------------------------------- text keys
def text_keys(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deduplicate a text column and key each distinct text.

    Args:
        values: N texts (any string dtype; None/NaN read as ``""``, as :func:`clean_text` does).

    Returns:
        ``(codes, keys, nbytes, first)``: codes int64 (N,) the distinct text of each row;
        keys uint64 (U,) the 64-bit SipHash (``pandas.util.hash_array``, key :data:`HASH_KEY`) of
        each distinct text's UTF-8 bytes; nbytes int64 (U,) their byte lengths (a check against
        hash collisions); first int64 (U,) a row holding each distinct text.

    The column is read as Arrow data and hashed :data:`KEY_CHUNK` rows at a time: only one
    chunk's Python strings exist at once (a whole column of them was several GB at the release's
    size, and hashing them in one pass ran about 2x slower: measured at 1/10 of the release). A
    column of short texts (at most :data:`SHORT_TEXT_BYTES` a row on average) is deduplicated by
    Arrow first and only its distinct texts are hashed (queries repeat over their products);
    for long texts Arrow's dedupe cost more than it saved (measured on the bullets).
    """
    text = values if isinstance(values.dtype, pd.StringDtype) else values.astype("string")
    arr = pa.chunked_array(pa.array(text))  # zero-copy for Arrow-backed strings
    at = None  # short, repeated texts (queries, brands, colours): Arrow dedupes them before hashing
    if len(arr) and (pc.sum(pc.binary_length(arr)).as_py() or 0) <= SHORT_TEXT_BYTES * len(arr):
        filled = arr.fill_null("")
        arr = pa.chunked_array([filled.unique()])
        at = np.asarray(pc.index_in(filled, value_set=arr.chunk(0)), dtype=np.int64)
    hashes = np.empty(len(arr), dtype=np.uint64)
    row_bytes = np.empty(len(arr), dtype=np.int64)
    for a in range(0, len(arr), KEY_CHUNK):
        part = arr.slice(a, KEY_CHUNK).fill_null("")
        row_bytes[a : a + len(part)] = np.asarray(pc.binary_length(part), dtype=np.int64)
        obj = part.to_numpy(zero_copy_only=False)
        hashes[a : a + len(part)] = pd.util.hash_array(obj, hash_key=HASH_KEY, categorize=False)
    if at is not None:
        hashes, row_bytes = hashes[at], row_bytes[at]
    codes, keys = pd.factorize(hashes)
    codes = codes.astype(np.int64, copy=False)
    first = np.full(len(keys), -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)
    return codes, np.asarray(keys, dtype=np.uint64), row_bytes[first], first


# ------------------------------------------------------------------------------- one store
@dataclass
class TokenStore:
    """One store opened for reading: every shard memory-mapped, one sorted key index.

    Attributes:
        root: the store's folder.
        settings: what its tokens depend on (``manifest.json``).
        sorted_keys: uint64 (N,) all keys, ascending; ``sorted_rows`` int64 (N,) their global rows.
        lengths: int32 (N,) tokens of each global row.
    """

    root: Path
    settings: dict
    shards: list[dict]
    sorted_keys: np.ndarray
    sorted_rows: np.ndarray
    nbytes: np.ndarray
    lengths: np.ndarray
    shard_of: np.ndarray
    starts: np.ndarray
    tokens_mm: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sorted_keys)

    @classmethod
    def open(cls, root: Path) -> TokenStore:
        """Read ``root/manifest.json`` and memory-map the shards it lists (an empty store when
        there is no manifest). Files no manifest lists are not read.

        Raises:
            CacheCorrupt: the manifest or a listed shard file is unreadable or inconsistent
                (sizes, offsets), naming the file.
        """
        manifest = _read_manifest(root)
        shards = manifest.get("shards", [])
        keys, offs, toks = [], [], []
        for sh in shards:
            k, o, t = _open_shard(root, sh)
            keys.append(k)
            offs.append(o)
            toks.append(t)
        n_rows = [len(k) for k in keys]
        all_keys = np.concatenate([k[:, 0] for k in keys]) if keys else np.zeros(0, np.uint64)
        nbytes = np.concatenate([k[:, 1] for k in keys]).astype(np.int64) if keys else np.zeros(0, np.int64)
        order = np.argsort(all_keys, kind="stable")
        starts = np.concatenate([o[:-1] for o in offs]) if offs else np.zeros(0, np.int64)
        lengths = np.concatenate([np.diff(o) for o in offs]).astype(np.int32) if offs else np.zeros(0, np.int32)
        shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), n_rows)
        return cls(
            root, manifest.get("settings", {}), shards, all_keys[order], order, nbytes, lengths, shard_of, starts, toks
        )

    def lookup(self, keys: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Global rows of ``keys`` (uint64 (M,)), -1 where absent.

        Raises:
            RuntimeError: a key found with another byte length (a 64-bit hash collision; never seen).
        """
        if len(self.sorted_keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        order = np.argsort(keys)  # sorted needles: numpy's binary search narrows from the last hit (~2x)
        pos = np.empty(len(keys), dtype=np.int64)
        pos[order] = np.searchsorted(self.sorted_keys, keys[order])
        pos_c = np.minimum(pos, len(self.sorted_keys) - 1)
        hit = self.sorted_keys[pos_c] == keys
        rows = np.where(hit, self.sorted_rows[pos_c], -1)
        bad = hit & (self.nbytes[np.maximum(rows, 0)] != nbytes)
        if bad.any():
            raise RuntimeError(f"{self.root}: 64-bit text hash collision ({int(bad.sum())} texts); delete the folder")
        return rows

    def tokens(self, row: int) -> np.ndarray:
        """int32 (length,) the token ids of global row ``row`` (a view of the memory map)."""
        start = self.starts[row]
        return self.tokens_mm[self.shard_of[row]][start : start + self.lengths[row]]


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("version") != STORE_VERSION or not isinstance(manifest.get("shards"), list):
            raise ValueError(f"not a version {STORE_VERSION} manifest")
    except (OSError, ValueError, AttributeError) as exc:
        raise CacheCorrupt(path, f"unreadable manifest ({exc})") from None
    return manifest


def _open_shard(root: Path, sh: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys (n, 2) uint64, offsets (n+1,) int64, tokens (t,) int32 memmap) of one listed shard."""
    name, n, t = sh.get("name"), sh.get("rows"), sh.get("tokens")
    paths = {ext: root / f"{name}.{ext}" for ext in ("key.npy", "off.npy", "tok")}
    for ext, shape, dtype in (("key.npy", (n, 2), np.uint64), ("off.npy", (n + 1,), np.int64)):
        try:
            arr = np.load(paths[ext], mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise CacheCorrupt(paths[ext], f"unreadable ({exc})") from None
        if arr.shape != shape or arr.dtype != dtype:
            raise CacheCorrupt(
                paths[ext], f"shape {arr.shape} {arr.dtype}, the manifest says {shape} {np.dtype(dtype)}"
            )
        if ext == "key.npy":
            keys = arr
        else:
            offs = np.asarray(arr)
    if offs[0] != 0 or offs[-1] != t or (n and np.any(np.diff(offs) < 0)):
        raise CacheCorrupt(paths["off.npy"], f"offsets do not run from 0 to {t} tokens")
    size = paths["tok"].stat().st_size if paths["tok"].is_file() else -1
    if size != 4 * t:
        raise CacheCorrupt(paths["tok"], f"{size} bytes, the manifest says {4 * t}")
    toks = np.memmap(paths["tok"], dtype="<i4", mode="r", shape=(t,)) if t else np.zeros(0, np.int32)
    return keys, offs, toks


# ------------------------------------------------------------------------------- building
@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_write(path: Path, data: bytes | None = None, array: np.ndarray | None = None) -> None:
    with open(path, "wb") as fh:
        if array is not None:
            np.save(fh, array)
        else:
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _commit_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename): the commit point."""
    tmp = root / f"{MANIFEST}.{secrets.token_hex(4)}.tmp"
    _fsync_write(tmp, json.dumps(manifest, indent=1).encode())
    tmp.replace(root / MANIFEST)


def _write_shard(root: Path, name: str, texts, rows: np.ndarray, keys: np.ndarray, nbytes: np.ndarray, encode) -> dict:
    """Tokenize the texts of ``rows`` (int64 (m,); ``texts(rows)`` -> object array of raw texts)
    with ``encode`` (list[str] -> list of token id lists), :data:`BUILD_CHUNK` texts a call; the
    texts are taken from the frame :data:`TAKE_CHUNK` at a time (only those are held as Python
    strings); write the shard under temporary names, then rename."""
    m = len(rows)
    offsets = np.zeros(m + 1, dtype=np.int64)
    tmp = {ext: root / f"{name}.{ext}.tmp" for ext in ("tok", "key.npy", "off.npy")}
    with open(tmp["tok"], "wb") as fh:
        for a in range(0, m, TAKE_CHUNK):
            block = texts(rows[a : a + TAKE_CHUNK])
            for b in range(0, len(block), BUILD_CHUNK):
                seqs = encode(block[b : b + BUILD_CHUNK].tolist())
                lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
                flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype="<i4", count=int(lens.sum()))
                fh.write(flat.tobytes())
                offsets[a + b + 1 : a + b + 1 + len(seqs)] = lens
        fh.flush()
        os.fsync(fh.fileno())
    np.cumsum(offsets, out=offsets)
    _fsync_write(tmp["key.npy"], array=np.stack([keys, nbytes.astype(np.uint64)], axis=1))
    _fsync_write(tmp["off.npy"], array=offsets)
    for ext, path in tmp.items():
        path.replace(root / f"{name}.{ext}")
    return {"name": name, "rows": m, "tokens": int(offsets[-1])}


def _clear(root: Path, keep: set[str]) -> None:
    """Delete every file of ``root`` but the lock, the manifest and the shards named in ``keep``."""
    for p in root.iterdir():
        if p.name in ("lock", MANIFEST) or p.name.split(".")[0] in keep:
            continue
        p.unlink(missing_ok=True)


def ensure_store(
    root: Path, settings: dict, keys: np.ndarray, nbytes: np.ndarray, texts, encode
) -> tuple[TokenStore, np.ndarray]:
    """Open the store at ``root`` holding every key of ``keys``, tokenizing only the missing ones.

    Args:
        root: the store's folder (created when absent).
        settings: what the tokens depend on (written into a new manifest; part of ``root``'s name).
        keys: uint64 (U,) distinct text keys (:func:`text_keys`); nbytes: int64 (U,) their lengths.
        texts: callable ``rows (int64 array) -> object array`` of the raw texts of those keys.
        encode: ``list[str] -> list[list[int]]``, the tokenization of raw texts.

    Returns:
        ``(store, rows)``: the :class:`TokenStore`, with every key present, and int64 (U,) the
        global row of each key. A corrupt store is logged (one line naming the file) and rebuilt
        from scratch.
    """
    try:
        store = TokenStore.open(root)
        rows = store.lookup(keys, nbytes)
        if (rows >= 0).all():
            return store, rows
    except CacheCorrupt as exc:
        log.warning("token cache file %s is corrupt (%s): rebuilding %s", exc.path, exc.reason, root)
        with _locked(root):
            _clear(root, keep=set())
            (root / MANIFEST).unlink(missing_ok=True)
    with _locked(root):  # another builder may have added them meanwhile: look again
        try:
            store = TokenStore.open(root)
        except CacheCorrupt as exc:
            log.warning("token cache file %s is corrupt (%s): rebuilding %s", exc.path, exc.reason, root)
            _clear(root, keep=set())
            (root / MANIFEST).unlink(missing_ok=True)
            store = TokenStore.open(root)
        manifest = {"version": STORE_VERSION, "settings": settings, "shards": list(store.shards)}
        _clear(root, keep={sh["name"] for sh in store.shards})  # leftovers of killed builds
        missing = np.flatnonzero(store.lookup(keys, nbytes) < 0)
        if len(missing):
            name = f"s{len(store.shards):05d}-{secrets.token_hex(4)}"
            shard = _write_shard(root, name, texts, missing, keys[missing], nbytes[missing], encode)
            manifest["shards"].append(shard)
            _commit_manifest(root, manifest)
            log.info(
                "token cache %s: %d new texts, %d tokens (%d shards)",
                root.name,
                len(missing),
                shard["tokens"],
                len(manifest["shards"]),
            )
        store = TokenStore.open(root)
        return store, store.lookup(keys, nbytes)


# ------------------------------------------------------------------------------- encoders
def _tokenize(tokenizer, texts: list[str], cap: int) -> list[list[int]]:
    """Token ids of ``texts`` (no special tokens), each cut to its first ``cap`` tokens.

    The tokenizer cuts (``truncation=True``, right side: the first ``cap`` ids, as slicing
    ``[:cap]`` of the whole encoding gives) unless it truncates on the left; then we slice."""
    if cap <= 0:
        return [[] for _ in texts]
    if getattr(tokenizer, "truncation_side", "right") == "right":
        return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=cap)["input_ids"]
    return [ids[:cap] for ids in tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]]


def _field_encoder(tokenizer, cfg: TextConfig):
    """Product field text -> its tokens, as :func:`core.data.text.encode_pairs` tokenizes a field
    (cleaned, cut to ``max_length * 12`` characters), kept to the first ``max_length`` tokens (no
    template takes more)."""

    def encode(texts: list[str]) -> list[list[int]]:
        return _tokenize(tokenizer, [clean_text(t, max_chars=cfg.max_length * 12) for t in texts], cfg.max_length)

    return encode


def _query_encoder(tokenizer, budget: int, gazetteer: Gazetteer | None, pairs: dict[int, int]):
    """Query text -> its tokens as :func:`core.data.text.encode_pairs` has them: cut to the query
    budget (with entity markers: mentions wrapped first, an opening marker left open by the cut dropped)."""

    def encode(texts: list[str]) -> list[list[int]]:
        if gazetteer is None:
            return _tokenize(tokenizer, [clean_text(t, max_chars=budget * 12) for t in texts], budget)
        marked = [gazetteer.mark(clean_text(t, max_chars=max(budget, 1) * 12)) for t in texts]
        ids = tokenizer(marked, add_special_tokens=False, truncation=False)["input_ids"]
        return [_close_cut(q[:budget], pairs) for q in ids]

    return encode


def gazetteer_fingerprint(gazetteer: Gazetteer) -> str:
    """16 hex characters of a SHA-1 over the gazetteer's sorted entries and rule version."""
    items = sorted((" ".join(k), v) for k, v in gazetteer.entries.items())
    return hashlib.sha1(json.dumps([GAZETTEER_VERSION, items]).encode()).hexdigest()[:16]


def _store_for(cache_dir: Path, name: str, settings: dict, column: pd.Series, encode):
    """(store, global row of each of the N rows of ``column``) for one text column."""
    codes, keys, nbytes, first = text_keys(column)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def texts(rows: np.ndarray) -> np.ndarray:  # only a build needs them
        return column.iloc[first[rows]].astype("string").fillna("").to_numpy(dtype=object)

    store, rows = ensure_store(Path(cache_dir) / f"{name}-{key}", settings, keys, nbytes, texts, encode)
    return store, rows[codes]


# ------------------------------------------------------------------------------- pairs
class CachedPairs:
    """N (query, product) pairs whose sequences are assembled from the token stores on demand.

    The same interface as :class:`core.data.text.EncodedPairs` (``len``, ``lengths``, ``get``);
    ``get(i)`` builds sequence i from the cached query and field tokens with the template's row
    function, so it equals ``encode_pairs(df, ...).get(i)``.

    Attributes:
        lengths: int64 (N,) tokens per sequence (computed without assembling, :func:`pair_lengths`).
        type_starts: int32 (N,) index within each sequence where token type 1 starts.
    """

    def __init__(self, cfg: TextConfig, ids, query_store, query_rows, stores, field_rows, tokenizer_key: str):
        self.cfg = cfg
        self._ids = ids  # (cls, sep, slash), marks, pairs
        self.query_store, self.query_rows = query_store, query_rows
        self.stores, self.field_rows = stores, field_rows
        self.budgets = [cfg.budgets.get(f, 16) for f in cfg.fields]
        self.tokenizer_key = tokenizer_key
        self.lengths, self.type_starts = self._lengths()

    def __len__(self) -> int:
        return len(self.query_rows)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        """(int32 token ids of sequence i, start of its second segment), assembled now."""
        q = self.query_store.tokens(self.query_rows[i]).tolist()
        toks = [st.tokens(r).tolist() for st, r in zip(self.stores, self.field_rows[i])]
        (cls_sep_slash, marks, pairs), ml = self._ids, self.cfg.max_length
        if self.cfg.field_markers:
            seq, start = _row_marked(q, toks, self.budgets, ml, cls_sep_slash, marks, pairs)
        else:
            seq, start = _row_plain(q, toks, self.budgets, ml, cls_sep_slash)
        return np.asarray(seq, dtype=np.int32), int(start)

    def _lengths(self) -> tuple[np.ndarray, np.ndarray]:
        qlen = self.query_store.lengths[self.query_rows].astype(np.int64)
        if self.stores:
            field_len = np.stack([st.lengths[self.field_rows[:, j]] for j, st in enumerate(self.stores)], axis=1)
        else:
            field_len = np.zeros((len(qlen), 0), dtype=np.int64)
        lengths, starts, exact = pair_lengths(
            qlen, field_len, self.budgets, self.cfg.max_length, len(self._ids[0][2]), self.cfg.field_markers
        )
        for i in np.flatnonzero(~exact):  # a query longer than the room (tiny max_length): assemble it
            seq, starts[i] = self.get(int(i))
            lengths[i] = len(seq)
        return lengths, starts

    def materialize(self, rows: np.ndarray | None = None) -> EncodedPairs:
        """The pairs ``rows`` (default all) as flat arrays (:class:`EncodedPairs`), assembled now."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        seqs = [self.get(int(i)) for i in rows]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s, _ in seqs], out=offsets[1:])
        flat = np.concatenate([s for s, _ in seqs]) if seqs else np.zeros(0, np.int32)
        return EncodedPairs(flat.astype(np.int32), offsets, np.array([t for _, t in seqs], dtype=np.int32))


def pair_lengths(
    qlen: np.ndarray, field_len: np.ndarray, budgets: list[int], max_length: int, slash_len: int, marked: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequence lengths of the template without building the sequences (vectorised
    ``core.data.text._allocate`` and row functions).

    Args:
        qlen: int (N,) query tokens (already cut to the query budget).
        field_len: int (N, F) tokens of each field (at most ``max_length`` needed).
        budgets: F field budgets; slash_len: tokens of the `` / `` separator; marked: field markers.

    Returns:
        ``(lengths int64 (N,), type_starts int32 (N,), exact bool (N,))``; rows not ``exact`` (with
        field markers, a query longer than the room left: it is cut and an entity marker may go)
        must be assembled to know them.
    """
    n, f = field_len.shape
    qlen = np.asarray(qlen, dtype=np.int64)
    ln = [field_len[:, j].astype(np.int64) for j in range(f)]  # one contiguous column per field
    has_fields = 1 if f else 0
    counted = range(f) if marked else range(1, f)  # fields whose presence adds a token (marker / separator)
    present = sum((ln[j] > 0 for j in counted), np.zeros(n, dtype=np.int64))
    if marked:
        overhead = 4 + has_fields + present
    else:
        overhead = 3 + has_fields + np.maximum(0, present - 1) * slash_len
    exact = ~(qlen > max_length - overhead) if marked else np.ones(n, dtype=bool)
    room = np.maximum(0, max_length - overhead - qlen)
    take0 = [np.minimum(ln[j], budgets[j]) for j in range(f)]
    total = sum(take0, np.zeros(n, dtype=np.int64))
    over = total > room
    # budgets over the room: fields kept in template order up to the room (cut from the back);
    # room left over: it flows to the fields in template order
    left_cut, left_flow = room.copy(), room - total
    taken = np.zeros(n, dtype=np.int64)
    used = np.zeros(n, dtype=np.int64)
    for j in range(f):
        cut = np.minimum(np.maximum(left_cut, 0), take0[j])
        spare = ln[j] - take0[j]
        flow = take0[j] + np.minimum(np.maximum(left_flow, 0), spare)
        left_cut -= take0[j]
        left_flow -= spare
        take = np.where(over, cut, flow)
        taken += take
        if j in counted:
            used += take > 0
    if marked:
        lengths = 4 + qlen + has_fields + taken + used
        starts = qlen + 3
    else:
        lengths = 3 + qlen + has_fields + taken + np.maximum(0, used - 1) * slash_len
        starts = qlen + 2
    return np.minimum(lengths, max_length).astype(np.int64), starts.astype(np.int32), exact


def pair_tokens(df: pd.DataFrame, tokenizer, cfg: TextConfig, gazetteer: Gazetteer | None = None) -> CachedPairs:
    """Tokenize the (query, product) pairs of ``df`` for ``cfg`` through the token cache.

    The entry point for training and prediction: texts not yet in ``cfg.cache_dir`` are tokenized
    and added (one new shard per store), then the pairs are indexed; sequences are assembled per
    batch by :meth:`CachedPairs.get`, equal to :func:`core.data.text.encode_pairs`.

    Args:
        df: N rows with ``query`` and the product text columns of ``cfg.fields``
            (:data:`core.data.text.FIELD_COLUMNS`); no id column is needed (texts are the keys).
        tokenizer: a transformers (fast) tokenizer; with markers on it must hold
            :func:`core.data.text.marker_tokens` (:func:`core.modeling.markers.add_marker_tokens`).
        cfg: the text settings (fields, budgets, ``max_length``, markers, ``cache_dir``).
        gazetteer: with ``cfg.entity_markers``, the gazetteer to mark queries with (default:
            :func:`core.data.text.build_gazetteer` of ``df``, as ``encode_pairs`` does).

    Returns:
        :class:`CachedPairs` of N sequences, each at most ``cfg.max_length`` tokens.

    Raises:
        ValueError: as :func:`core.data.text.encode_pairs` (unknown field, ``max_length`` < 8,
            marker not one token).
        RuntimeError: a 64-bit text hash collision (:meth:`TokenStore.lookup`).
    """
    ids, marker_ids, pairs, marks = template_ids(tokenizer, cfg)
    cache_dir = Path(cfg.cache_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    added = sorted(tokenizer.get_added_vocab().items()) if hasattr(tokenizer, "get_added_vocab") else []
    base = {"v": STORE_VERSION, "hash": HASH_KEY, "tok": tok_fp, "added": added}
    q_budget = cfg.budgets.get("query", 32)
    gaz_fp = None
    if cfg.entity_markers:
        gazetteer = gazetteer if gazetteer is not None else build_gazetteer(df)
        gaz_fp = gazetteer_fingerprint(gazetteer)
        q_settings = {**base, "column": "query", "budget": q_budget, "gazetteer": gaz_fp, "markers": marker_ids}
    else:
        gazetteer = None
        q_settings = {**base, "column": "query", "budget": q_budget}
    q_encode = _query_encoder(tokenizer, q_budget, gazetteer, pairs)
    q_store, q_rows = _store_for(cache_dir, "query", q_settings, df["query"], q_encode)
    stores, rows = [], []
    f_encode = _field_encoder(tokenizer, cfg)
    for f in cfg.fields:
        settings = {**base, "column": FIELD_COLUMNS[f], "max_length": cfg.max_length}
        st, r = _store_for(cache_dir, f, settings, df[FIELD_COLUMNS[f]], f_encode)
        stores.append(st)
        rows.append(r)
    field_rows = np.stack(rows, axis=1) if rows else np.zeros((len(df), 0), dtype=np.int64)
    return CachedPairs(cfg, (ids, marks, pairs), q_store, q_rows, stores, field_rows, tok_fp)
