"""Load the official ESCI release (Shopping Queries Dataset) into one pandas frame.

The release, as users download it from amazon-science/esci-data, is a folder with

* ``shopping_queries_dataset_examples.parquet``: one row per judged (query, product) pair,
  columns :data:`EXAMPLE_COLUMNS`;
* ``shopping_queries_dataset_products.parquet``: one row per (product_id, product_locale),
  columns :data:`PRODUCT_COLUMNS`;
* ``shopping_queries_dataset_sources.csv`` (optional): ``query_id,source``.

CSV variants of the first two (same stem, ``.csv``) are accepted; parquet wins when both exist.

:func:`load_esci` reads only the columns it needs, validates them, joins examples to products
on ``(product_id, product_locale)`` and returns one row per example. It is built for the full
release (2.6M examples, 1.8M products, ~1.2 GB of product text): the join is computed on
integer keys; the product text is then streamed column by column (largest first) into one
contiguous buffer, gathered into example order in slices, and handed to pandas as Arrow-backed
``str`` columns without a copy, so that at most about one product column lives next to the
growing result. ``benchmarks/load_scale.py`` compares it with ``pd.read_parquet`` + ``merge``
(full size, this repo's 2-core VM: ~0.6-0.8x the time, ~0.7x the peak RSS).

Every bad input raises :class:`core.errors.DataError` with a one-line ``"<path>: <problem>"``.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.errors import DataError
from core.scoring.metrics import ESCI_LABELS  # re-exported: the class order E, S, C, I

__all__ = [
    "ESCI_LABELS",
    "EXAMPLES_FILE",
    "PRODUCTS_FILE",
    "SOURCES_FILE",
    "EXAMPLE_COLUMNS",
    "PRODUCT_COLUMNS",
    "PRODUCT_TEXT_COLUMNS",
    "OUTPUT_COLUMNS",
    "DatasetFiles",
    "find_dataset_files",
    "load_esci",
    "data_fingerprint",
]

#: The four ESCI labels: Exact, Substitute, Complement, Irrelevant.

#: File stems (``.parquet`` or ``.csv``) and the sources file name of the official release.
EXAMPLES_FILE = "shopping_queries_dataset_examples"
PRODUCTS_FILE = "shopping_queries_dataset_products"
SOURCES_FILE = "shopping_queries_dataset_sources.csv"

#: Required columns of the examples file.
EXAMPLE_COLUMNS: tuple[str, ...] = (
    "example_id",
    "query",
    "query_id",
    "product_id",
    "product_locale",
    "esci_label",
    "small_version",
    "large_version",
    "split",
)
#: Text columns of the products file (nulls become "" in :func:`load_esci`).
PRODUCT_TEXT_COLUMNS: tuple[str, ...] = (
    "product_title",
    "product_description",
    "product_bullet_point",
    "product_brand",
    "product_color",
)
#: Required columns of the products file.
PRODUCT_COLUMNS: tuple[str, ...] = ("product_id", "product_locale") + PRODUCT_TEXT_COLUMNS
#: Required columns of the sources file.
SOURCE_COLUMNS: tuple[str, ...] = ("query_id", "source")
#: Columns of the frame returned by :func:`load_esci`, in order (plus ``source`` when present).
OUTPUT_COLUMNS: tuple[str, ...] = (
    "example_id",
    "query",
    "query_id",
    "product_id",
    "product_locale",
    "esci_label",
    "split",
    "small_version",
    "large_version",
) + PRODUCT_TEXT_COLUMNS

_INT_COLUMNS = frozenset({"example_id", "query_id", "small_version", "large_version"})
_TAKE_SLICE = 1 << 16  # rows gathered per Arrow take: bounds the take's scratch memory
_READ_BATCH = 1 << 16  # rows per parquet read batch
_SHOW = 5  # how many offending values an error message lists


@dataclass(frozen=True)
class DatasetFiles:
    """Paths of one ESCI release folder; ``sources`` is None when the sources CSV is absent."""

    examples: Path
    products: Path
    sources: Path | None


# --------------------------------------------------------------------------- files
def find_dataset_files(data_dir: str | Path) -> DatasetFiles:
    """Locate the release files in ``data_dir``.

    For examples and products, ``<stem>.parquet`` is preferred over ``<stem>.csv``; the sources
    file is ``shopping_queries_dataset_sources.csv`` and optional.

    Returns:
        DatasetFiles with absolute-or-as-given paths.

    Raises:
        DataError: ``data_dir`` does not exist or is not a folder; the examples or the products
            file is missing (the message lists the names looked for).
    """
    d = Path(data_dir)
    if not d.exists():
        raise DataError(d, "data folder does not exist")
    if not d.is_dir():
        raise DataError(d, "not a folder (expected the folder holding the ESCI files)")

    def pick(stem: str, what: str) -> Path:
        names = [f"{stem}.parquet", f"{stem}.csv"]
        for name in names:
            if (d / name).is_file():
                return d / name
        raise DataError(d, f"missing {what} file (looked for {' or '.join(names)})")

    sources = d / SOURCES_FILE
    return DatasetFiles(
        examples=pick(EXAMPLES_FILE, "examples"),
        products=pick(PRODUCTS_FILE, "products"),
        sources=sources if sources.is_file() else None,
    )


def _short(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot read: {_short(exc)}") from None


class TableFile:
    """A parquet or CSV file whose required columns are checked up front, then read on demand.

    Parquet columns are read lazily (column projection); a CSV file is parsed once, on the first
    read, and columns are handed out (and forgotten) as they are asked for.
    """

    def __init__(self, path: Path, required: Sequence[str]):
        self.path = path
        self.required = tuple(required)
        self._pf: pq.ParquetFile | None = None
        self._csv: dict[str, pa.ChunkedArray] | None = None
        if path.suffix == ".parquet":
            try:
                self._pf = pq.ParquetFile(path)
                names = self._pf.schema_arrow.names
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise DataError(path, f"cannot read: {_short(exc)}") from None
        else:
            names = _csv_header(path)
        missing = [c for c in self.required if c not in names]
        if missing:
            raise DataError(path, f"missing column(s): {', '.join(missing)}")

    def size_order(self, columns: Sequence[str]) -> list[str]:
        """``columns`` sorted by stored size, largest first (parquet); unchanged for CSV."""
        if self._pf is None:
            return list(columns)
        size = {c: self.stored_size(c) for c in columns}
        return sorted(columns, key=lambda c: -size[c])

    def stored_size(self, column: str) -> int:
        """Uncompressed parquet size of ``column`` (an estimate of its text bytes); for CSV the
        size of the parsed column."""
        if self._pf is None:
            self._load_csv()
            return self._csv[column].nbytes if column in self._csv else 0
        md = self._pf.metadata
        total = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for i in range(rg.num_columns):
                if rg.column(i).path_in_schema == column:
                    total += rg.column(i).total_uncompressed_size
        return total

    def read(self, columns: Sequence[str]) -> dict[str, pa.ChunkedArray]:
        """Read whole ``columns`` (as many chunks); DataError ``cannot read: ...`` if corrupt."""
        if self._pf is None:
            self._load_csv()
            return {c: self._csv.pop(c) for c in columns}
        try:
            # batch by batch: less scratch memory (and time) than ParquetFile.read, which
            # grows one buffer per column by reallocation
            batches = list(self._pf.iter_batches(batch_size=_READ_BATCH, columns=list(columns), use_threads=True))
            if batches:
                table = pa.Table.from_batches(batches)
            else:
                table = pa.schema([self._pf.schema_arrow.field(c) for c in columns]).empty_table()
            del batches
            return {c: table.column(c) for c in columns}
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(self.path, f"cannot read: {_short(exc)}") from None

    def iter_batches(self, columns: Sequence[str]):
        """Yield ``{column: pa.Array}`` for consecutive row batches (:data:`_READ_BATCH` rows for
        parquet; the parsed chunks for CSV), in file order; DataError ``cannot read: ...`` if corrupt."""
        if self._pf is None:
            self._load_csv()
            table = pa.table({c: self._csv[c] for c in columns})
            for batch in table.to_batches():
                yield {c: batch.column(c) for c in columns}
            return
        try:
            for batch in self._pf.iter_batches(batch_size=_READ_BATCH, columns=list(columns), use_threads=True):
                yield {c: batch.column(c) for c in columns}
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(self.path, f"cannot read: {_short(exc)}") from None

    def iter_column(self, column: str):
        """Yield ``column`` as a sequence of Arrow arrays, one read batch at a time."""
        if self._pf is None:
            self._load_csv()
            yield from self._csv.pop(column).chunks
            return
        try:
            # a reader of its own, so that columns can be read from several threads
            pf = pq.ParquetFile(self.path, metadata=self._pf.metadata)
            for batch in pf.iter_batches(batch_size=_READ_BATCH, columns=[column], use_threads=False):
                yield batch.column(0)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(self.path, f"cannot read: {_short(exc)}") from None

    def _load_csv(self) -> None:
        if self._csv is not None:
            return
        # every column as text (ids like "0393356418" keep their zeros; integers are checked
        # later with a clearer message); only an empty field is missing
        try:
            table = pacsv.read_csv(
                self.path,
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.large_string() for c in self.required},
                    include_columns=list(self.required),
                    strings_can_be_null=True,
                    null_values=[""],
                ),
            )
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(self.path, f"cannot read: {_short(exc)}") from None
        self._csv = {c: table.column(c) for c in self.required}


# --------------------------------------------------------------------------- column checks
def _as_text_array(arr, path: Path, name: str):
    """Normalise an Array or ChunkedArray to ``large_string`` (zero-copy for string data)."""
    t = arr.type
    if pa.types.is_large_string(t):
        return arr
    try:
        if pa.types.is_dictionary(t):
            arr = pc.cast(arr, t.value_type)
            t = arr.type
        if pa.types.is_null(t):
            nulls = pa.nulls(len(arr), pa.large_string())
            return pa.chunked_array([nulls]) if isinstance(arr, pa.ChunkedArray) else nulls
        if (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_string_view(t)
            or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or pa.types.is_integer(t)
        ):
            return pc.cast(arr, pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(path, f"column {name}: not text ({_short(exc, 80)})") from None
    raise DataError(path, f"column {name}: expected text, found type {t}")


def _as_text(col: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """Normalise a column to ``large_string`` (zero-copy for string data)."""
    return _as_text_array(col, path, name)


def _as_int(col: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """Normalise a column to int64; floats must be whole numbers, strings must parse."""
    t = col.type
    if t == pa.int64():
        return col
    if pa.types.is_dictionary(t):
        col, t = pc.cast(col, t.value_type), t.value_type
    if pa.types.is_null(t):
        return pa.chunked_array([pa.nulls(len(col), pa.int64())])
    if (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
    ):
        try:
            return pc.cast(col, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        if pa.types.is_string(t) or pa.types.is_large_string(t):  # "12.0" from a float column
            try:
                return pc.cast(pc.cast(col, pa.float64()), pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
    bad = ""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        valid = pc.match_substring_regex(col, r"^\s*[-+]?\d+(\.0*)?\s*$")
        first = pc.filter(col, pc.invert(pc.fill_null(valid, True)))
        if len(first):
            bad = f", e.g. {first[0].as_py()!r}"
    kind = "text" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)
    raise DataError(path, f"column {name}: expected integers, found {kind} values{bad}")


def _check_no_nulls(cols: dict[str, pa.ChunkedArray], path: Path, names: Sequence[str]) -> None:
    bad = [f"{c} ({cols[c].null_count:,})" for c in names if cols[c].null_count]
    if bad:
        raise DataError(path, f"missing values in column(s): {', '.join(bad)}")


def _check_labels(labels: pa.ChunkedArray, path: Path) -> None:
    counts = pc.value_counts(labels)
    unknown = [
        (v.as_py(), n.as_py())
        for v, n in zip(counts.field("values"), counts.field("counts"))
        if v.as_py() not in ESCI_LABELS
    ]
    if unknown:
        n_rows = sum(n for _, n in unknown)
        shown = ", ".join(repr(v) for v, _ in unknown[:_SHOW])
        more = f" and {len(unknown) - _SHOW} more" if len(unknown) > _SHOW else ""
        raise DataError(
            path,
            f"unknown esci_label value(s) {shown}{more} in {n_rows:,} row(s)"
            f" (expected one of {', '.join(ESCI_LABELS)})",
        )


def _check_unique_ids(ids: np.ndarray, path: Path) -> None:
    if len(ids) < 2 or np.all(ids[1:] > ids[:-1]):  # the release is sorted: fast path
        return
    dup = pd.Index(ids).duplicated(keep="first")
    if dup.any():
        first = pd.unique(ids[dup])[:_SHOW].tolist()
        raise DataError(
            path,
            f"duplicate example_id: {int(dup.sum()):,} repeated row(s), e.g. " + ", ".join(str(i) for i in first),
        )


def _check_queries(queries: pa.ChunkedArray, example_ids: pa.ChunkedArray, path: Path) -> None:
    """A query that is missing, empty or only whitespace cannot be ranked for: one DataError
    counting those examples and naming the first ids."""
    blank = pc.fill_null(pc.match_substring_regex(queries, pattern=r"^[\s\p{Z}]*$"), True)
    n = pc.sum(blank).as_py() or 0
    if n:
        ids = _to_int_array(example_ids)[np.asarray(blank.to_numpy(zero_copy_only=False), dtype=bool)][:_SHOW]
        more = f" and {n - len(ids):,} more" if n > len(ids) else ""
        raise DataError(
            path,
            f"{n:,} example{'' if n == 1 else 's'} with an empty or missing query "
            f"(example_id {', '.join(str(i) for i in ids)}{more})",
        )


# --------------------------------------------------------------------------- join
_B36 = np.full(256, 255, dtype=np.uint8)
_B36[48:58] = np.arange(10)
_B36[65:91] = np.arange(10, 36)


def _asin_codes(col: pa.ChunkedArray) -> np.ndarray | None:
    """int64 codes of 10-character [0-9A-Z] ids (ASINs, ISBN-10s), or None if any is not one."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.null_count or not pa.types.is_large_string(arr.type):
        return None
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    if offs[-1] - offs[0] != 10 * n or np.any(np.diff(offs) != 10):
        return None
    digits = _B36[np.frombuffer(bufs[2], dtype=np.uint8)[offs[0] : offs[-1]].reshape(n, 10)]
    if np.any(digits == 255):
        return None
    code = digits[:, 0].astype(np.int64)
    for j in range(1, 10):
        code *= 36
        code += digits[:, j]
    return code  # < 36**10 ~ 3.7e15


def _id_codes(ex_pid: pa.ChunkedArray, pr_pid: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes for product ids on both sides (-1: example id absent from products)."""
    e, p = _asin_codes(ex_pid), _asin_codes(pr_pid)
    if e is not None and p is not None:
        return e, p, 36**10
    values = pc.unique(pr_pid)
    p = pc.index_in(pr_pid, value_set=values).to_numpy(zero_copy_only=False).astype(np.int64)
    e = pc.index_in(ex_pid, value_set=values).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return e, p, max(len(values), 1)


def _join_index(
    ex: dict[str, pa.ChunkedArray], pr: dict[str, pa.ChunkedArray], ex_path: Path, pr_path: Path
) -> np.ndarray:
    """Row of the products table for each example (int64, examples order).

    Raises DataError on duplicate (product_id, product_locale) in products and on examples
    whose product is not in the products file.
    """
    e_id, p_id, id_range = _id_codes(ex["product_id"], pr["product_id"])
    locales = pa.array(
        sorted(set(pc.unique(pr["product_locale"]).to_pylist()) | set(pc.unique(ex["product_locale"]).to_pylist())),
        pa.large_string(),
    )
    n_loc = max(len(locales), 1)
    if id_range * n_loc >= 2**62:  # keys would overflow int64 (thousands of locales)
        raise DataError(pr_path, f"too many distinct product_locale values ({n_loc:,})")

    def key(ids: np.ndarray, loc: pa.ChunkedArray) -> np.ndarray:
        lc = pc.index_in(loc, value_set=locales).to_numpy(zero_copy_only=False).astype(np.int64)
        k = ids * n_loc + lc
        k[ids < 0] = -1
        return k

    p_key = pd.Index(key(p_id, pr["product_locale"]))
    if not p_key.is_unique:
        dup = np.flatnonzero(p_key.duplicated(keep="first"))
        shown = ", ".join(
            f"({pr['product_id'][int(i)].as_py()}, {pr['product_locale'][int(i)].as_py()})" for i in dup[:_SHOW]
        )
        raise DataError(
            pr_path,
            f"duplicate (product_id, product_locale): {len(dup):,} repeated row(s), e.g. {shown}",
        )
    e_key = key(e_id, ex["product_locale"])
    idx = p_key.get_indexer(e_key)
    idx[e_key < 0] = -1
    missing = np.flatnonzero(idx < 0)
    if len(missing):
        shown = ", ".join(
            f"({ex['product_id'][int(i)].as_py()}, {ex['product_locale'][int(i)].as_py()})" for i in missing[:_SHOW]
        )
        raise DataError(
            pr_path,
            f"no product row for {len(missing):,} example(s) of {ex_path.name}"
            f" (product_id, product_locale), e.g. {shown}",
        )
    return idx.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- gather
def _nulls_to_empty(arr: pa.Array) -> pa.Array:
    """Replace nulls by "" -- zero-copy when the null slots are already empty (the usual case)."""
    if arr.null_count == 0:
        return arr
    if pa.types.is_large_string(arr.type):
        bufs = arr.buffers()
        offs = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
        null = ~np.asarray(arr.is_valid())
        if not np.any(offs[1:][null] != offs[:-1][null]):
            return pa.Array.from_buffers(arr.type, len(arr), [None, bufs[1], bufs[2]], null_count=0, offset=arr.offset)
    return pc.fill_null(arr, "")


def _read_text_column(file: TableFile, name: str) -> pa.Array:
    """One product text column as a single contiguous large_string Array without nulls ("").

    Arrow's take on a string column of several chunks concatenates the chunks first (a full
    extra copy per call), and ``ParquetFile.read`` grows its buffers by reallocation; so the
    column is streamed batch by batch into one buffer sized from the parquet metadata.
    """
    offsets: list[np.ndarray] = []
    capacity = max(file.stored_size(name), 1 << 16)
    data = pa.allocate_buffer(capacity, resizable=True)
    view = np.frombuffer(data, dtype=np.uint8)
    pos = 0
    for chunk in file.iter_column(name):
        chunk = _nulls_to_empty(_as_text_array(chunk, file.path, name))
        n = len(chunk)
        if n == 0:
            continue
        bufs = chunk.buffers()
        off = np.frombuffer(bufs[1], dtype=np.int64)[chunk.offset : chunk.offset + n + 1]
        nbytes = int(off[-1] - off[0])
        if pos + nbytes > capacity:  # metadata under-estimated (dictionary-encoded pages)
            capacity = max(2 * capacity, pos + nbytes)
            data.resize(capacity)
            view = np.frombuffer(data, dtype=np.uint8)
        if nbytes:
            view[pos : pos + nbytes] = np.frombuffer(bufs[2], dtype=np.uint8)[off[0] : off[-1]]
        offsets.append(off[1:] - (off[0] - pos))
        pos += nbytes
        del chunk, bufs
    del view
    data.resize(pos, shrink_to_fit=True)
    all_offsets = np.concatenate([np.zeros(1, dtype=np.int64)] + offsets)
    del offsets
    return pa.Array.from_buffers(
        pa.large_string(),
        len(all_offsets) - 1,
        [None, pa.py_buffer(all_offsets), data],
        null_count=0,
    )


def _text_lengths(file: TableFile, name: str) -> np.ndarray:
    """int32 (products,): characters of each product's ``name`` after stripping whitespace
    (``utf8_trim_whitespace``; null -> 0), streamed one read batch at a time."""
    parts = []
    for chunk in file.iter_column(name):
        chunk = _nulls_to_empty(_as_text_array(chunk, file.path, name))
        parts.append(pc.utf8_length(pc.utf8_trim_whitespace(chunk)).to_numpy(zero_copy_only=False).astype(np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _gather_text(arr: pa.Array, idx: np.ndarray) -> pd.Series:
    """``arr[idx]`` with nulls -> "", as a pandas ``str`` Series (Arrow-backed, no copy).

    Gathered in slices of :data:`_TAKE_SLICE` rows, which bounds the take's scratch memory.
    """
    parts = []
    for i in range(0, len(idx), _TAKE_SLICE):
        got = arr.take(pa.array(idx[i : i + _TAKE_SLICE]))
        parts.append(_nulls_to_empty(got))
    return _to_str_series(pa.chunked_array(parts, type=pa.large_string()))


def _to_str_series(col: pa.ChunkedArray) -> pd.Series:
    """large_string ChunkedArray -> pandas Series of the default ``str`` dtype (shares buffers)."""
    return pd.Series(col.to_pandas(), copy=False)


def _to_int_array(col: pa.ChunkedArray) -> np.ndarray:
    """int64 ChunkedArray -> numpy (a copy only when there are several chunks)."""
    return col.to_numpy() if col.num_chunks else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- loader
def _check_task(task, where: Path) -> None:
    if task is not None and (isinstance(task, bool) or task not in (1, 2, 3)):
        raise DataError(where, f"invalid task {task!r}: must be 1, 2 or 3 (or None for all)")


def _check_text_columns(text_columns: Sequence[str] | None, where: Path) -> tuple[str, ...]:
    """The product text columns to load, in :data:`PRODUCT_TEXT_COLUMNS` order (all for None)."""
    if text_columns is None:
        return PRODUCT_TEXT_COLUMNS
    if isinstance(text_columns, str):
        text_columns = [text_columns]
    unknown = [c for c in text_columns if c not in PRODUCT_TEXT_COLUMNS]
    if unknown:
        raise DataError(
            where, f"unknown text column(s) {', '.join(map(str, unknown))} (known: {', '.join(PRODUCT_TEXT_COLUMNS)})"
        )
    return tuple(c for c in PRODUCT_TEXT_COLUMNS if c in set(text_columns))


def _filter_mask(ex: dict[str, pa.ChunkedArray], task, split, locales) -> np.ndarray:
    """bool (N,): the examples kept by the ``task`` / ``split`` / ``locales`` filters of :func:`load_esci`."""
    keep = np.ones(len(ex["example_id"]), dtype=bool)
    if task == 1:
        keep &= _to_int_array(ex["small_version"]) == 1
    elif task in (2, 3):
        keep &= _to_int_array(ex["large_version"]) == 1
    if split is not None:
        keep &= pc.equal(ex["split"], str(split)).to_numpy(zero_copy_only=False)
    if locales is not None:
        value_set = pa.array([str(x) for x in locales], pa.large_string())
        keep &= pc.is_in(ex["product_locale"], value_set=value_set).to_numpy(zero_copy_only=False)
    return keep


def _read_examples(path: Path) -> dict[str, pa.ChunkedArray]:
    """The examples file's required columns, typed and validated whole (nulls, queries, labels,
    unique ids); raises DataError as :func:`load_esci` documents."""
    ex = TableFile(path, EXAMPLE_COLUMNS).read(EXAMPLE_COLUMNS)
    for c in EXAMPLE_COLUMNS:
        ex[c] = (_as_int if c in _INT_COLUMNS else _as_text)(ex[c], path, c)
    _check_no_nulls(ex, path, [c for c in EXAMPLE_COLUMNS if c != "query"])
    _check_queries(ex["query"], ex["example_id"], path)
    _check_labels(ex["esci_label"], path)
    _check_unique_ids(_to_int_array(ex["example_id"]), path)
    return ex


def _product_text(pr_file: TableFile, text_cols: Sequence[str], idx: np.ndarray) -> dict[str, pd.Series]:
    """Each product text column gathered to the example rows ``idx`` (product row of each example)."""
    out: dict[str, pd.Series] = {}
    # product text, largest columns first, one at a time: read, gathered, released. Reading the
    # next column while gathering one held two product columns next to the growing result: at
    # the release's size the peak was 4.81 GB, one at a time 4.58 GB (plain pandas: 8.41 GB)
    for c in pr_file.size_order(text_cols):
        arr = _read_text_column(pr_file, c)
        out[c] = _gather_text(arr, idx)
        del arr
        pa.default_memory_pool().release_unused()
    return out


def load_esci(
    data_dir: str | Path,
    task: int | None = None,
    split: str | None = None,
    locales: Sequence[str] | None = None,
    text_columns: Sequence[str] | None = None,
    length_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """Load the ESCI release in ``data_dir``: examples joined to products, one row per example.

    Args:
        data_dir: folder with the official files (see :func:`find_dataset_files`).
        task: 1 keeps ``small_version == 1`` (the Task 1 subset); 2 or 3 keep
            ``large_version == 1``; None keeps all rows.
        split: "train" or "test" keeps that split; None keeps both.
        locales: keep only these ``product_locale`` values, e.g. ``["us", "es"]``.
        text_columns: the product text columns to return (a subset of
            :data:`PRODUCT_TEXT_COLUMNS`, any order); None returns all five. Only these are read
            from the products file (parquet column projection), so memory and time fall with the
            text left out (at the release's size the three short fields ``product_title``,
            ``product_brand``, ``product_color`` need about a third of the memory of all five).
            The columns returned are identical to those of a full load.
        length_columns: product text columns (of :data:`PRODUCT_TEXT_COLUMNS`) whose length is
            returned instead of their text: ``<column>_chars`` int32, the characters left after
            stripping leading/trailing whitespace (0: empty or null). Each is streamed batch by
            batch from the products file, so it costs 4 bytes a product (e.g. the stacker's
            empty-field feature without the 2-4 GB of bullet and description text at full size).

    Returns:
        DataFrame with a RangeIndex, in the order of the examples file, columns
        :data:`OUTPUT_COLUMNS` (only the chosen product text columns; ``example_id``, ``query_id``, ``small_version``,
        ``large_version``: int64; all others: pandas ``str``, Arrow-backed) plus ``source``
        (``str``, NaN for query ids absent from the sources file) when the sources CSV exists.
        Product text nulls are "".

    Raises:
        DataError: (one line ``"<path>: <problem>"``) invalid ``task``; folder or required file
            missing; unreadable or corrupt file; missing column(s); missing values in an
            examples column or in a product key; a query that is empty, only whitespace or
            missing (the count and the first example ids); an unknown name in ``text_columns``; non-integer ids; unknown
            ``esci_label`` values; duplicate ``example_id``; duplicate
            ``(product_id, product_locale)`` in products; examples whose product is missing from
            the products file; duplicate ``query_id`` in the sources file; no rows left after
            the filters; an unknown name in ``length_columns``.

    All validation applies to the whole files, before filtering: a broken file fails the same
    way whatever the filters.
    """
    _check_task(task, Path(data_dir))
    text_cols = _check_text_columns(text_columns, Path(data_dir))
    length_cols = _check_text_columns(length_columns, Path(data_dir)) if length_columns else ()
    if isinstance(locales, str):
        locales = [locales]
    files = find_dataset_files(data_dir)

    ex = _read_examples(files.examples)

    # products: keys first, text later one column at a time
    pr_file = TableFile(files.products, PRODUCT_COLUMNS)
    keys = pr_file.read(["product_id", "product_locale"])
    keys = {c: _as_text(v, files.products, c) for c, v in keys.items()}
    _check_no_nulls(keys, files.products, ["product_id", "product_locale"])
    idx = _join_index(ex, keys, files.examples, files.products)
    del keys

    # filters
    n_all = len(idx)
    if n_all == 0:
        raise DataError(files.examples, "no examples (the file has no rows)")
    keep = _filter_mask(ex, task, split, locales)
    if not keep.all():
        if not keep.any():
            applied = [
                f"{k}={v!r}" for k, v in (("task", task), ("split", split), ("locales", locales)) if v is not None
            ]
            raise DataError(
                files.examples,
                f"no examples left after filters {', '.join(applied)} (of {n_all:,} examples)",
            )
        mask = pa.array(keep)
        ex = {c: v.filter(mask) for c, v in ex.items()}  # chunk by chunk, no concatenation
        idx = idx[keep]

    out: dict[str, object] = {}
    for c in OUTPUT_COLUMNS[:9]:
        if c in _INT_COLUMNS:
            out[c] = _to_int_array(ex[c])
        elif c == "query":
            out[c] = _to_str_series(
                pa.chunked_array([_nulls_to_empty(a) for a in ex[c].chunks], type=pa.large_string())
            )
        else:
            out[c] = _to_str_series(ex[c])
    query_ids = out["query_id"]
    del ex

    out.update(_product_text(pr_file, text_cols, idx))
    for c in length_cols:
        out[f"{c}_chars"] = _text_lengths(pr_file, c)[idx]

    if files.sources is not None:
        out["source"] = _source_column(files.sources, query_ids)

    extra = [f"{c}_chars" for c in length_cols] + (["source"] if "source" in out else [])
    columns = [c for c in OUTPUT_COLUMNS if c in out] + extra
    return pd.DataFrame({c: out[c] for c in columns}, copy=False)


def _source_column(path: Path, query_ids: np.ndarray) -> pd.Series:
    """``source`` for each query id from the sources CSV (NaN where the id is absent)."""
    src = TableFile(path, SOURCE_COLUMNS)
    cols = src.read(SOURCE_COLUMNS)
    qid = _as_int(cols["query_id"], path, "query_id")
    source = _as_text(cols["source"], path, "source")
    _check_no_nulls({"query_id": qid}, path, ["query_id"])
    index = pd.Index(_to_int_array(qid))
    if not index.is_unique:
        dup = pd.unique(index[index.duplicated()])[:_SHOW].tolist()
        raise DataError(path, f"duplicate query_id, e.g. {', '.join(str(d) for d in dup)}")
    pos = index.get_indexer(query_ids)
    source = source.combine_chunks() if source.num_chunks != 1 else source.chunk(0)
    taken = source.take(pa.array(pos, mask=pos < 0)) if len(source) else pa.nulls(len(pos), pa.large_string())
    return _to_str_series(pa.chunked_array([taken], type=pa.large_string()))


# --------------------------------------------------------------------------- fingerprint
_FINGERPRINT_COLUMNS = ("example_id", "query") + PRODUCT_TEXT_COLUMNS + ("esci_label",)


def _arrow_of(values: pd.Series) -> list[pa.Array]:
    """The Arrow chunks of a Series (zero-copy for Arrow-backed dtypes)."""
    try:
        arrow = pa.array(values.array)  # __arrow_array__ of Arrow-backed arrays
    except (pa.ArrowException, TypeError, ValueError):
        arrow = pa.array(np.asarray(values, dtype=object), from_pandas=True)
    return list(arrow.chunks) if isinstance(arrow, pa.ChunkedArray) else [arrow]


def _hash_text(h_len, h_data, values: pd.Series) -> None:
    chunks = _arrow_of(values)
    for chunk in chunks:
        if not pa.types.is_large_string(chunk.type):
            chunk = pc.cast(chunk, pa.large_string())
        null = None
        if chunk.null_count:
            null = ~np.asarray(chunk.is_valid())
            chunk = pc.fill_null(chunk, "")
        n = len(chunk)
        if n == 0:
            continue
        bufs = chunk.buffers()
        offs = np.frombuffer(bufs[1], dtype=np.int64)[chunk.offset : chunk.offset + n + 1]
        lengths = np.diff(offs)
        if null is not None:
            lengths[null] = -1
        h_len.update(lengths.astype("<i8", copy=False).tobytes())
        h_data.update(memoryview(bufs[2])[offs[0] : offs[-1]])


def data_fingerprint(df: pd.DataFrame) -> str:
    """Short stable hash of a loaded ESCI frame, for use as a cache key.

    Hashes, in this order, the columns ``example_id`` (as int64), ``query``, the five product
    text columns and ``esci_label`` (as UTF-8 bytes plus per-row lengths; nulls differ from ""),
    for whichever of them ``df`` has, plus the row count. The value depends only on the
    content, not on the dtype backing (Arrow or object), chunking or index.

    Args:
        df: a frame from :func:`load_esci` (or any frame with some of those columns).

    Returns:
        16 lowercase hex characters (the first 64 bits of a SHA-1).

    Raises:
        DataError: none of the fingerprinted columns is present.
    """
    present = [c for c in _FINGERPRINT_COLUMNS if c in df.columns]
    if not present:
        raise DataError(None, "data_fingerprint: the frame has none of the columns " + ", ".join(_FINGERPRINT_COLUMNS))
    h = hashlib.sha1(f"esci-fingerprint-v1 rows={len(df)}".encode())
    for c in present:
        h.update(f"|{c}|".encode())
        if c == "example_id":
            ids = np.asarray(df[c], dtype=np.int64)
            h.update(ids.astype("<i8", copy=False).tobytes())
            continue
        h_len, h_data = hashlib.sha1(), hashlib.sha1()
        _hash_text(h_len, h_data, df[c])
        h.update(h_len.digest())
        h.update(h_data.digest())
    return h.hexdigest()[:16]
