"""KDD Cup 2022 ESCI submission files (Tasks 1-3): atomic writers and a validator.

Formats (amazon-science/esci-data, the challenge's submission pages; DESIGN.md):

* Task 1 (ranking): CSV ``query_id,product_id``, every test (query, product) pair once, ordered
  best first within each query; a query missing from the file scores nDCG 0.
* Task 2 (4-class): CSV ``example_id,esci_label`` with labels exact / substitute / complement /
  irrelevant.
* Task 3 (substitute identification): CSV ``example_id,substitute_label`` with labels
  substitute / no_substitute.

Writers go through :func:`atomic_write` (temporary file in the destination folder, fsync,
``os.replace``), so a failed write never leaves a partial or stale-named file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core.data.esci import find_dataset_files
from core.errors import DataError
from core.scoring.metrics import ESCI_LABELS, TASK2_NAMES, TASK3_NAMES

__all__ = [
    "COLUMNS",
    "LABELS",
    "atomic_write",
    "write_task1",
    "write_task2",
    "write_task3",
    "load_test_examples",
    "validate_submission",
    "TASK_FILES",
]

COLUMNS: dict[int, tuple[str, str]] = {
    1: ("query_id", "product_id"),
    2: ("example_id", "esci_label"),
    3: ("example_id", "substitute_label"),
}
"""Exact header of each task's CSV."""
LABELS: dict[int, frozenset[str]] = {
    2: frozenset(TASK2_NAMES.values()),
    3: frozenset(TASK3_NAMES),
}
"""Allowed label values of Tasks 2 and 3."""
TASK_FILES: dict[int, str] = {1: "task1_ranking.csv", 2: "task2_esci.csv", 3: "task3_substitute.csv"}
"""File names used for a submission folder."""
_SHOW = 5


# --------------------------------------------------------------------------- writing
def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary file is fsynced and moved with ``os.replace`` (atomic on POSIX within one file
    system); if ``write`` raises, the temporary file is removed and ``path`` is untouched (absent
    or its previous content).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_csv(path: str | Path, table: pa.Table) -> Path:
    opts = pacsv.WriteOptions(include_header=True, quoting_style="needed")
    return atomic_write(path, lambda tmp: pacsv.write_csv(table, tmp, opts))


def _check_frame(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(None, f"{what}: missing column(s) {', '.join(missing)}")
    for c in cols:
        n = int(df[c].isna().sum())
        if n:
            raise DataError(None, f"{what}: {n} missing value(s) in {c}")


def write_task1(path: str | Path, test: pd.DataFrame, score_col: str = "score") -> Path:
    """Write the Task 1 file: ``query_id,product_id``, queries ascending, best first within each.

    Args:
        test: T rows with ``query_id``, ``product_id``, ``score_col`` (higher = better) and
            optionally ``example_id`` (ties in score keep example_id order; else input order).

    Returns:
        the written path.

    Raises:
        DataError: missing columns or NaN values.
    """
    _check_frame(test, ["query_id", "product_id", score_col], "Task 1 predictions")
    tie = test["example_id"].to_numpy() if "example_id" in test.columns else np.arange(len(test))
    order = np.lexsort((tie, -test[score_col].to_numpy(np.float64), test["query_id"].to_numpy()))
    table = pa.table(
        {
            "query_id": pa.array(test["query_id"].to_numpy()[order]),
            "product_id": pa.array(test["product_id"].astype(str).to_numpy()[order]),
        }
    )
    return _write_csv(path, table)


def write_task2(path: str | Path, example_ids, esci_labels) -> Path:
    """Write the Task 2 file: ``example_id,esci_label`` (exact/substitute/complement/irrelevant).

    Args:
        example_ids: (T,) ints. esci_labels: (T,) E/S/C/I (or the full names).

    Raises:
        DataError: unequal lengths or unknown labels.
    """
    from core.scoring.metrics import label_codes

    ids = np.asarray(example_ids)
    try:
        codes = label_codes(np.asarray(esci_labels), "esci_labels")
    except ValueError as exc:
        raise DataError(path, f"Task 2 labels: {exc}") from None
    if len(codes) != len(ids):
        raise DataError(path, f"{len(ids)} example_ids but {len(codes)} labels")
    names = np.asarray([TASK2_NAMES[c] for c in ESCI_LABELS], dtype=object)[codes]
    return _write_csv(path, pa.table({"example_id": pa.array(ids), "esci_label": pa.array(names, pa.string())}))


def write_task3(path: str | Path, example_ids, is_substitute) -> Path:
    """Write the Task 3 file: ``example_id,substitute_label`` (substitute/no_substitute).

    Args:
        example_ids: (T,) ints. is_substitute: (T,) bool.

    Raises:
        DataError: unequal lengths.
    """
    ids = np.asarray(example_ids)
    flags = np.asarray(is_substitute, dtype=bool)
    if len(flags) != len(ids):
        raise DataError(path, f"{len(ids)} example_ids but {len(flags)} labels")
    names = np.where(flags, TASK3_NAMES[1], TASK3_NAMES[0]).astype(object)
    return _write_csv(path, pa.table({"example_id": pa.array(ids), "substitute_label": pa.array(names, pa.string())}))


# --------------------------------------------------------------------------- test examples
def load_test_examples(path: str | Path, task: int) -> pd.DataFrame:
    """The test examples a submission must cover: ``example_id, query_id, product_id``.

    Args:
        path: an official-layout data folder (its examples file is used), or an examples
            parquet/CSV file, or a run's ``test.parquet``.
        task: 1, 2 or 3. Rows are filtered to ``split == "test"`` when a ``split`` column exists,
            and to ``small_version == 1`` (Task 1) / ``large_version == 1`` (Tasks 2, 3) when those
            columns exist (the official test sets).

    Raises:
        DataError: the path does not exist or cannot be read, required columns are missing, no
            test example is left.
    """
    p = Path(path)
    if p.is_dir():
        p = find_dataset_files(p).examples
    if not p.is_file():
        raise DataError(p, "test examples file not found")
    want = ["example_id", "query_id", "product_id", "split", "small_version", "large_version"]
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(p).names
            df = pd.read_parquet(p, columns=[c for c in want if c in names])
        else:
            df = pd.read_csv(p, usecols=lambda c: c in want)
    except Exception as exc:  # noqa: BLE001 - readers raise many types
        raise DataError(p, f"cannot read: {str(exc).splitlines()[0]}") from None
    missing = [c for c in want[:3] if c not in df.columns]
    if missing:
        raise DataError(p, f"missing column(s) {', '.join(missing)}")
    keep = np.ones(len(df), dtype=bool)
    if "split" in df.columns:
        keep &= (df["split"] == "test").to_numpy()
    version = "small_version" if task == 1 else "large_version"
    if version in df.columns:
        keep &= (df[version] == 1).to_numpy()
    df = df.loc[keep, want[:3]].reset_index(drop=True)
    if df.empty:
        raise DataError(
            p,
            f"no test examples for Task {task} (split == 'test'{', ' + version + ' == 1' if version in want else ''})",
        )
    return df


# --------------------------------------------------------------------------- validation
def _read_submission(path: Path, task: int) -> tuple[pa.Table | None, list[str]]:
    if not path.is_file():
        raise DataError(path, "submission file not found")
    expected = list(COLUMNS[task])
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in expected}, strings_can_be_null=True
            ),
        )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read as CSV: {str(exc).splitlines()[0]}") from None
    if table.column_names != expected:
        raise DataError(
            path,
            f"columns must be exactly {','.join(expected)} for Task {task}, "
            f"found {','.join(table.column_names) or '(none)'}",
        )
    return table, []


def _ints(col: pa.ChunkedArray, name: str, problems: list[str]) -> np.ndarray | None:
    col = pc.drop_null(col)  # empty cells are reported separately
    try:
        return pc.cast(pc.utf8_trim_whitespace(col), pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = [v for v in col.to_pylist() if v is not None and not v.strip().lstrip("-").isdigit()][:_SHOW]
        problems.append(f"non-integer {name} values, e.g. {', '.join(map(repr, bad))}")
        return None


def _show(values) -> str:
    return ", ".join(map(str, list(values)[:_SHOW]))


def validate_submission(path: str | Path, task: int, examples: pd.DataFrame | str | Path) -> dict:
    """Check a submission file against the test examples; raise on any problem.

    Checks: the CSV reads; the header is exactly :data:`COLUMNS` [task]; no empty/NaN cell;
    integer ids; labels in :data:`LABELS` [task] (Tasks 2, 3); no duplicate ``example_id``
    (Tasks 2, 3) or (query_id, product_id) pair (Task 1); the id set equals the test examples'
    exactly (missing and extra ids are counted and the first few listed); Task 1: every test
    query present (a missing query scores 0).

    Args:
        path: the CSV file.
        task: 1, 2 or 3.
        examples: the test examples (``example_id, query_id, product_id``), or a path for
            :func:`load_test_examples`.

    Returns:
        dict ``{"task", "rows", "queries" (Task 1) , "path"}``.

    Raises:
        DataError: one line naming the file and all problems found, separated by "; ".
    """
    if task not in COLUMNS:
        raise DataError(path, f"unknown task {task!r} (expected 1, 2 or 3)")
    path = Path(path)
    ex = load_test_examples(examples, task) if not isinstance(examples, pd.DataFrame) else examples
    table, problems = _read_submission(path, task)
    n = table.num_rows
    if n == 0:
        raise DataError(path, "no rows")
    for name in table.column_names:
        col = table[name]
        empty = col.null_count + int(pc.sum(pc.equal(pc.utf8_trim_whitespace(col.fill_null("x")), "")).as_py() or 0)
        nan = int(
            pc.sum(pc.is_in(pc.utf8_lower(col.fill_null("x")), pa.array(["nan", "na", "null", "none"]))).as_py() or 0
        )
        if empty + nan:
            problems.append(f"{empty + nan} empty/NaN value(s) in {name}")
    summary = {"task": task, "rows": n, "path": str(path)}
    if task == 1:
        qid = _ints(table["query_id"], "query_id", problems)
        pid = pc.utf8_trim_whitespace(table["product_id"].fill_null("")).to_numpy(zero_copy_only=False)
        if qid is not None and len(qid) == len(pid):
            # (query_id, product_id) pairs as int64 keys: product codes shared by both sides
            codes, uniq = pd.factorize(np.concatenate([ex["product_id"].astype(str).to_numpy(), pid]))
            n_p = max(len(uniq), 1)
            want_q = ex["query_id"].to_numpy(np.int64)
            want = want_q * n_p + codes[: len(ex)]
            got = qid.astype(np.int64) * n_p + codes[len(ex) :]
            got_sorted = np.sort(got)
            dup = got_sorted[1:] == got_sorted[:-1]
            if dup.any():
                first = np.unique(got_sorted[1:][dup])[:_SHOW]
                problems.append(
                    f"{int(dup.sum())} duplicate (query_id, product_id) row(s), e.g. "
                    + _show(f"({k // n_p}, {uniq[k % n_p]})" for k in first)
                )
            want_sorted = np.sort(want)
            if len(want_sorted) != len(got_sorted) or not np.array_equal(want_sorted, got_sorted):
                missing_q = np.setdiff1d(want_q, qid)
                if len(missing_q):
                    problems.append(
                        f"{len(missing_q)} test query(ies) missing (each would score 0), e.g. {_show(missing_q)}"
                    )
                miss = np.setdiff1d(want_sorted, got_sorted)
                extra = np.setdiff1d(got_sorted, want_sorted)
                if len(miss):
                    problems.append(
                        f"{len(miss)} test (query_id, product_id) pair(s) missing, e.g. "
                        + _show(f"({k // n_p}, {uniq[k % n_p]})" for k in miss[:_SHOW])
                    )
                if len(extra):
                    problems.append(
                        f"{len(extra)} pair(s) not in the test examples, e.g. "
                        + _show(f"({k // n_p}, {uniq[k % n_p]})" for k in extra[:_SHOW])
                    )
            summary["queries"] = int(np.count_nonzero(np.diff(np.sort(qid))) + 1) if len(qid) else 0
    else:
        label_col = COLUMNS[task][1]
        labels = pc.utf8_trim_whitespace(table[label_col].fill_null(""))
        bad = pc.invert(pc.is_in(labels, pa.array(sorted(LABELS[task]))))
        n_bad = int(pc.sum(bad).as_py() or 0)
        if n_bad:
            shown = pc.unique(pc.filter(labels, bad)).to_pylist()[:_SHOW]
            problems.append(
                f"{n_bad} unknown {label_col} value(s) {', '.join(map(repr, shown))} "
                f"(allowed: {', '.join(sorted(LABELS[task]))})"
            )
        ids = _ints(table["example_id"], "example_id", problems)
        if ids is not None:
            got = np.sort(ids)
            dup = got[1:] == got[:-1]
            if dup.any():
                problems.append(f"{int(dup.sum())} duplicate example_id(s), e.g. {_show(np.unique(got[1:][dup]))}")
            want = np.sort(ex["example_id"].to_numpy(np.int64))
            if len(want) != len(got) or not np.array_equal(want, got):
                miss = np.setdiff1d(want, got)
                extra = np.setdiff1d(got, want)
                if len(miss):
                    problems.append(f"{len(miss)} test example_id(s) missing, e.g. {_show(miss)}")
                if len(extra):
                    problems.append(f"{len(extra)} example_id(s) not in the test examples, e.g. {_show(extra)}")
    if problems:
        raise DataError(path, f"Task {task} submission invalid: " + "; ".join(problems))
    return summary
