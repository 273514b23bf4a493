"""Translation augmentation from a user-supplied file (``data.augment_translations``).

The Task 1 winner of the Amazon KDD Cup 2022 ESCI challenge augmented its training data with
machine-translated queries and product text (a translation API; back-translation style
augmentation, Sennrich et al. 2016, arXiv:1511.06709). No translation service is reachable here,
so the translations come from a parquet file the user makes with any tool:

* one row per (``example_id``, ``locale``): the example of ``data.dir`` it translates and the
  target locale (``es``, ``jp``, ...); both required, no nulls, each pair at most once;
* any subset of the text columns :data:`TEXT_COLUMNS` (at least one); a column left out, or a
  null cell, is taken from the source example.

Each row becomes a training example with the source's label, query group and fold
(:func:`load_translations`); the trainer uses it only as a training row of the folds that train on
the source's fold, never as a validation, test or metric row. Translations of test-split examples
are refused (they would train on the rows that are scored); translations of training examples
left out by the selection (``data.task``, ``data.locales``, ``data.max_queries``) are ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from core.data.esci import TableFile, data_fingerprint, find_dataset_files
from core.errors import DataError, WorkbenchError

#: translated text columns a file may hold (those of :func:`core.data.esci.load_esci`'s frame)
TEXT_COLUMNS = (
    "query",
    "product_title",
    "product_brand",
    "product_color",
    "product_bullet_point",
    "product_description",
)
#: the ``split`` of a translated row in the trainer's frame (neither ``train`` nor ``test``)
AUGMENT_SPLIT = "augment"
#: the run folder's record of the translations a run trains on (checked again on resume)
RECORD_FILE = "augment_translations.json"
_SHOW = 5  # offending example ids an error message lists


@dataclass
class Translations:
    """The translated training examples of a frame ``df``.

    ``rows``: (M, df's columns) one per kept file row, sorted by (source row, locale): the
    source's ids, label and query with the translated text, ``product_locale`` = the target
    locale and ``split`` = :data:`AUGMENT_SPLIT`. ``source``: int64 (M,) the row of ``df`` each
    translates. ``ignored``: file rows whose source is a training example outside the selection.
    """

    rows: pd.DataFrame
    source: np.ndarray
    ignored: int

    def fingerprint(self) -> str:
        """16 hex characters over the rows' text, ids, labels and sources (a resume compares it)."""
        h = hashlib.sha1(data_fingerprint(self.rows).encode())
        h.update(self.rows["product_locale"].astype(str).str.cat(sep="\x00").encode())
        h.update(self.source.astype("<i8").tobytes())
        return h.hexdigest()[:16]


def _ids_sample(ids) -> str:
    ids = list(dict.fromkeys(int(i) for i in ids))
    return ", ".join(map(str, ids[:_SHOW])) + (", ..." if len(ids) > _SHOW else "")


def _read_file(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The file's rows (``example_id`` int64, ``locale`` str) and its text columns; DataError else."""
    if not path.is_file():
        raise DataError(path, "translations file not found (data.augment_translations)")
    try:
        t = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(path, f"cannot read the translations file: {first}") from None
    missing = [c for c in ("example_id", "locale") if c not in t.columns]
    if missing:
        raise DataError(path, f"missing column(s): {', '.join(missing)} (a translations file is keyed by both)")
    text = [c for c in TEXT_COLUMNS if c in t.columns]
    if not text:
        raise DataError(path, f"no text column: a translations file needs at least one of {', '.join(TEXT_COLUMNS)}")
    locale = t["locale"].astype("string").str.strip()
    if t["example_id"].isna().any() or (locale.isna() | (locale == "")).any():
        raise DataError(path, "missing example_id or locale values")
    if not pd.api.types.is_integer_dtype(t["example_id"]):
        raise DataError(path, f"example_id must be integers, got {t['example_id'].dtype}")
    t = t.assign(example_id=t["example_id"].astype(np.int64), locale=locale.astype(str))
    dup = t.duplicated(["example_id", "locale"], keep=False)
    if dup.any():
        raise DataError(
            path,
            f"{int(t[dup].duplicated(['example_id', 'locale']).sum())} duplicate (example_id, locale) row(s) "
            f"(example_id {_ids_sample(t.loc[dup, 'example_id'])})",
        )
    return t, text


def load_translations(path: str | Path, df: pd.DataFrame, data_dir: str | Path) -> Translations:
    """Read and check the translations file ``path`` against the examples of ``data_dir`` and
    build its training rows for the training frame ``df`` (:func:`core.training.validate.load_training_frame`).

    Args:
        path: the parquet file (format in this module's docstring and ``DataConfig``).
        df: N rows, the selected examples (``split`` train or test), RangeIndex.
        data_dir: ``data.dir``: example ids are looked up in its whole examples file.

    Returns:
        :class:`Translations` with M <= len(file) rows (M may be 0).

    Raises:
        DataError: one line ``"<path>: <problem>"``: file missing or unreadable; no
            ``example_id`` or ``locale`` column, or missing values in them; non-integer ids; no
            text column; a duplicate (example_id, locale); an example_id that is not in the
            examples file; an example of the test split (refused: test rows are never trained on).
    """
    path = Path(path)
    t, text = _read_file(path)
    files = find_dataset_files(data_dir)
    known = TableFile(files.examples, ["example_id", "split"]).read(["example_id", "split"])
    all_ids = np.asarray(known["example_id"].to_numpy(), dtype=np.int64)
    split_of = pd.Series(known["split"].to_numpy(zero_copy_only=False).astype(str), index=all_ids)
    split = t["example_id"].map(split_of)
    if split.isna().any():
        raise DataError(
            path,
            f"{int(split.isna().sum())} row(s) with an example_id not in {files.examples} "
            f"(example_id {_ids_sample(t.loc[split.isna(), 'example_id'])})",
        )
    if (split == "test").any():
        raise DataError(
            path,
            f"{int((split == 'test').sum())} row(s) translate test-split examples "
            f"(example_id {_ids_sample(t.loc[split == 'test', 'example_id'])}): only training examples may be "
            "augmented",
        )
    is_train = (df["split"] == "train").to_numpy()
    row_of = pd.Series(np.flatnonzero(is_train), index=df["example_id"].to_numpy()[is_train])
    src = t["example_id"].map(row_of)
    keep = src.notna().to_numpy()
    t = t[keep].assign(_src=src[keep].astype(np.int64)).sort_values(["_src", "locale"], kind="stable")
    source = t["_src"].to_numpy(np.int64)
    rows = df.iloc[source].reset_index(drop=True)
    for c in text:
        mine = t[c].reset_index(drop=True)
        rows[c] = pd.Series(np.where(mine.notna(), mine.astype(object), rows[c].astype(object)), dtype=df[c].dtype)
    rows["product_locale"] = pd.Series(t["locale"].to_numpy(), dtype=df["product_locale"].dtype)
    rows["split"] = pd.Series([AUGMENT_SPLIT] * len(rows), dtype=df["split"].dtype)
    return Translations(rows, source, int((~keep).sum()))


def check_unchanged(run_dir: Path, path: str | Path, tr: Translations, write: bool) -> None:
    """A resumed run trains on the same translated rows as its start: the first start records
    their fingerprint in ``<run_dir>/augment_translations.json`` (when ``write``: rank 0), a
    later start compares.

    Raises:
        WorkbenchError: the translations (or the data they index) changed since the run started.
    """
    record = Path(run_dir) / RECORD_FILE
    mine = {"file": str(path), "rows": len(tr.rows), "fingerprint": tr.fingerprint()}
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("fingerprint") != mine["fingerprint"]:
            raise WorkbenchError(
                f"{path}: the translated rows differ from those the run started with "
                f"({saved.get('rows', '?')} rows then, {mine['rows']} now; see {record})"
            )
        return
    if write:
        from core.runs.lifecycle import atomic_write

        atomic_write(record, lambda p: p.write_text(json.dumps(mine, indent=1)))
