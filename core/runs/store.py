"""runs.db: the record of every run, its metrics and artifacts (SQLite via sqlite-utils).

Concurrency model (DESIGN.md): WAL journal, ``busy_timeout``, one connection per process and
short ``BEGIN IMMEDIATE`` write transactions. The trainer writes its own metrics; UIs only read.

This module is the only one that speaks SQL: it owns the whole schema (:data:`TABLES`,
:data:`INDEXES`), versioned by ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`; an older file is
migrated when a writer opens it, see :data:`MIGRATIONS`), and every read and write of every table
is a :class:`RunStore` method.

Tables:
  runs(id, name, status, task, model, config JSON, pid, process_start_time, host, created,
       started, ended, exit_code, git_commit, run_dir, error, backend, job_id, job_state, job_reason, node,
       sweep, trial)   sweep/trial: the hyperparameter sweep and its trial number (core.runs.sweep)
  metrics(run_id, fold, step, epoch, name, value, time)   fold = -1 for run-level values
  artifacts(run_id, fold, kind, path, time)
  label_issues(run_id, example_id, given_label, suggested_label, label_quality, rank)
  label_decisions(id, example_id, decision, new_label, reviewer, time, source_run)   append-only
  ensembles(name, created, tasks, members JSON, manifest JSON, dir)
  journal_offsets(run_id, offset, events)   how much of a run's journal is ingested (core.runs.journal)
(the meaning of the label tables: :mod:`core.cleaning.labels`; of ensembles: :mod:`core.scoring.ensemble`)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlite_utils

from core.errors import ReadOnlyDatabaseError, WorkbenchError
from core.runs import metric_names as mn

DEFAULT_DB = "runs.db"
BUSY_TIMEOUT_MS = 30_000


class Status(StrEnum):
    """A run's status (the ``runs.status`` column). A str: ``Status.RUNNING == "running"``."""

    QUEUED = "queued"  # row created, process starting (or waiting to be resumed)
    RUNNING = "running"  # the trainer claimed the run
    FINISHED = "finished"  # all folds done
    PARTIAL = "partial"  # ended after the folds it was asked for (``train.run_folds``)
    FAILED = "failed"  # an error (bad data, exception): exit code and error recorded
    STOPPED = "stopped"  # ``workbench stop`` / Ctrl+C
    CRASHED = "crashed"  # killed (SIGKILL, OOM, reboot): nobody wrote a final status
    PRUNED = "pruned"  # stopped by its sweep's pruner (core.runs.sweep): partial figures kept, not resumable


#: statuses of a run whose process may still be alive
ACTIVE: tuple[Status, ...] = (Status.QUEUED, Status.RUNNING)
#: statuses nothing changes any more (unless the run is resumed)
FINAL: tuple[Status, ...] = tuple(s for s in Status if s not in ACTIVE)
#: statuses from which ``workbench resume`` may continue a run
RESUMABLE: tuple[Status, ...] = (Status.CRASHED, Status.STOPPED, Status.FAILED, Status.PARTIAL)
#: every status, in lifecycle order
RUN_STATUSES: tuple[Status, ...] = tuple(Status)


def default_db_path() -> str:
    """``$WORKBENCH_DB`` if set, else ``./runs.db``."""
    return os.environ.get("WORKBENCH_DB") or DEFAULT_DB


def now_iso() -> str:
    """UTC time as ISO-8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit(path: str | Path = ".") -> str | None:
    """The project's git commit (short hash, ``+dirty`` if modified) or None outside git."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


#: SQLite result codes (``sqlite3.Error.sqlite_errorname`` prefixes) that describe the file or the
#: disk rather than a bug in a query: they become a one-line WorkbenchError naming the database
ENV_ERRORS = (
    "SQLITE_READONLY",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_CANTOPEN",
    "SQLITE_CORRUPT",
    "SQLITE_NOTADB",
    "SQLITE_PERM",
    "SQLITE_NOLFS",
    "SQLITE_PROTOCOL",
)


def db_error(path: str, exc: sqlite3.Error, what: str) -> WorkbenchError | None:
    """``"<path>: cannot <what> the runs database (<sqlite message>)"`` for an error of the file
    or the disk (read-only, disk full, I/O error, locked, not a database), else None (a bug)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if not name.startswith(ENV_ERRORS):
        return None
    cls = ReadOnlyDatabaseError if name.startswith("SQLITE_READONLY") else WorkbenchError
    return cls(f"{path}: cannot {what} the runs database ({' '.join(str(exc).split())})")


def check_db_location(path: str | Path) -> None:
    """Refuse a runs database that a writer cannot create or change, before SQLite touches it.

    Raises:
        WorkbenchError: the path is a folder, its folder does not exist (nothing is created) or is
            a file, the database file is read-only, or its folder is not writable (WAL needs to
            create ``<name>-wal`` and ``<name>-shm`` next to it): ReadOnlyDatabaseError for these two.
    """
    p = Path(path)
    if p.is_dir():
        raise WorkbenchError(f"{p}: is a folder, not a runs database")
    folder = p.parent
    if not folder.is_dir():
        for up in (folder, *folder.parents):
            if up.exists() and not up.is_dir():
                raise WorkbenchError(f"{p}: {up} is a file, not a folder")
        raise WorkbenchError(f"{p}: folder {folder} does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise ReadOnlyDatabaseError(f"{p}: the runs database is read-only (no write permission)")
    sidecars = [Path(f"{p}-wal"), Path(f"{p}-shm")]
    if not os.access(folder, os.W_OK) and not all(s.exists() and os.access(s, os.W_OK) for s in sidecars):
        raise ReadOnlyDatabaseError(
            f"{p}: folder {folder} is not writable (SQLite needs to create {p.name}-wal and {p.name}-shm there)"
        )


def new_run_id() -> str:
    """Sortable, unique id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# --------------------------------------------------------------------------- schema
#: every table of runs.db: name -> ((column, SQL type), ...) in column order
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "runs": (
        ("id", "TEXT PRIMARY KEY"),
        ("name", "TEXT"),
        ("status", "TEXT"),
        ("task", "INTEGER"),
        ("model", "TEXT"),
        ("config", "TEXT"),
        ("pid", "INTEGER"),
        ("process_start_time", "REAL"),
        ("host", "TEXT"),
        ("created", "TEXT"),
        ("started", "TEXT"),
        ("ended", "TEXT"),
        ("exit_code", "INTEGER"),
        ("git_commit", "TEXT"),
        ("run_dir", "TEXT"),
        ("error", "TEXT"),
        # where the run executes (version 2): "local" (NULL in older rows) or "slurm"; for Slurm the
        # job id, its Slurm state (PENDING, RUNNING, ...), Slurm's reason and the node it runs on
        ("backend", "TEXT"),
        ("job_id", "TEXT"),
        ("job_state", "TEXT"),
        ("job_reason", "TEXT"),
        ("node", "TEXT"),
        # the hyperparameter sweep (version 3) that launched the run and its Optuna trial number
        # (NULL for runs outside a sweep; core.runs.sweep)
        ("sweep", "TEXT"),
        ("trial", "INTEGER"),
    ),
    "metrics": (
        ("run_id", "TEXT"),
        ("fold", "INTEGER"),
        ("step", "INTEGER"),
        ("epoch", "REAL"),
        ("name", "TEXT"),
        ("value", "REAL"),
        ("time", "REAL"),
    ),
    "artifacts": (("run_id", "TEXT"), ("fold", "INTEGER"), ("kind", "TEXT"), ("path", "TEXT"), ("time", "TEXT")),
    "label_issues": (
        ("run_id", "TEXT"),
        ("example_id", "INTEGER"),
        ("given_label", "TEXT"),
        ("suggested_label", "TEXT"),
        ("label_quality", "REAL"),
        ("rank", "INTEGER"),
    ),
    "label_decisions": (
        ("id", "INTEGER PRIMARY KEY"),
        ("example_id", "INTEGER"),
        ("decision", "TEXT"),
        ("new_label", "TEXT"),
        ("reviewer", "TEXT"),
        ("time", "TEXT"),
        ("source_run", "TEXT"),
    ),
    # how far each run's append-only journal (core.runs.journal) has been ingested, in bytes
    "journal_offsets": (("run_id", "TEXT PRIMARY KEY"), ("offset", "INTEGER"), ("events", "INTEGER")),
    "ensembles": (
        ("name", "TEXT PRIMARY KEY"),
        ("created", "TEXT"),
        ("tasks", "TEXT"),
        ("members", "TEXT"),
        ("manifest", "TEXT"),
        ("dir", "TEXT"),
    ),
}
#: (index name, table, columns); the names are those the tables had before the schema was versioned
INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("idx_metrics_run_id_name", "metrics", ("run_id", "name")),
    # covering index for the per-name aggregates over all runs (list_runs, best_values)
    ("idx_metrics_name_run", "metrics", ("name", "run_id", "fold", "value")),
    ("idx_artifacts_run_id", "artifacts", ("run_id",)),
    ("idx_label_issues_run_id_rank", "label_issues", ("run_id", "rank")),
    ("idx_label_decisions_source_run_id", "label_decisions", ("source_run", "id")),
    ("idx_runs_sweep_trial", "runs", ("sweep", "trial")),
    # the runs list at sweep scale (version 4): newest first without a sort, filtered on the shown
    # fields without reading the table (covering, run_index); the active runs' lookup
    ("idx_runs_list", "runs", ("created", "id", "name", "status", "model", "task", "backend")),
    ("idx_runs_status", "runs", ("status",)),
)


def _basename_sql(col: str) -> str:
    """SQL for the part of ``col`` after its last ``/`` (all of it without one; '' for NULL); the
    costly character-set trim only runs for a value with two ``/`` or more."""
    after = f"substr({col}, instr({col}, '/') + 1)"
    return (
        f"CASE WHEN coalesce(instr({col}, '/'), 0) = 0 THEN coalesce({col}, '') "
        f"WHEN instr({after}, '/') = 0 THEN {after} "
        f"ELSE substr({col}, length(rtrim({col}, replace({col}, '/', ''))) + 1) END"
    )


def _like_pattern(text: str) -> str:
    """A LIKE pattern (``ESCAPE '\\'``) matching values that contain ``text`` literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


#: the runs list's fields (the Runs screen's filter fields) as SQL text over a ``runs`` row: the
#: values the table shows, '' for none (``model`` without its folder, ``kind`` from the config)
RUN_FIELDS: dict[str, str] = {
    "id": "id",
    "name": "coalesce(name, '')",
    "status": "coalesce(status, '')",
    "task": "coalesce(CAST(task AS TEXT), '')",
    "model": _basename_sql("model"),
    "backend": "coalesce(nullif(backend, ''), 'local')",
    "job": "coalesce(job_id, '')",
    "state": "coalesce(job_state, '')",
    "node": "coalesce(node, '')",
    "sweep": "coalesce(sweep, '')",
    "trial": "coalesce(CAST(trial AS TEXT), '')",
    "kind": "CASE WHEN json_valid(config) AND json_type(config) = 'object' "
    "THEN coalesce(nullif(json_extract(config, '$.kind'), ''), 'train') ELSE 'train' END",
}
#: the fields of :data:`RUN_FIELDS` that ``idx_runs_list`` holds
LIST_INDEX_FIELDS = frozenset({"id", "name", "status", "model", "task", "backend", "created"})
LABEL_ISSUE_COLUMNS = tuple(c for c, _ in TABLES["label_issues"])
LABEL_DECISION_COLUMNS = tuple(c for c, _ in TABLES["label_decisions"])


def _create_schema(conn: sqlite3.Connection) -> None:
    """Every table and index of :data:`TABLES` / :data:`INDEXES` that is missing, and every
    missing column of an existing table (``ALTER TABLE ... ADD COLUMN``, NULL in old rows)."""
    for table, cols in TABLES.items():
        conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (' + ", ".join(f'"{c}" {t}' for c, t in cols) + ")")
        have = {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}
        for c, t in cols:
            if c not in have:
                conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{c}" {t.replace(" PRIMARY KEY", "")}')
    for name, table, cols in INDEXES:
        conn.execute(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" (' + ", ".join(f'"{c}"' for c in cols) + ")")


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Version 0 (no ``user_version``): ``runs``, ``metrics``, ``artifacts`` made by the store, the
    label tables made by :mod:`core.cleaning.labels` and ``ensembles`` by :mod:`core.scoring.ensemble` when first
    used, so an old file may lack them. Version 1: every table and index made by the store, the
    same columns; rows are kept as they are."""
    _create_schema(conn)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 2: the runs' ``backend``, ``job_id``, ``job_state``, ``job_reason`` and ``node`` columns
    (NULL in older rows: local runs) and the ``journal_offsets`` table (runs on other hosts)."""
    _create_schema(conn)


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Version 3: the runs' ``sweep`` and ``trial`` columns (NULL in older rows: no sweep) and the
    index on them (core.runs.sweep)."""
    _create_schema(conn)


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    """Version 4: the indexes of the runs list at sweep scale: ``idx_runs_list`` (the list newest
    first and filtered on its shown fields from the index alone) and ``runs(status)`` (the active
    runs); rows unchanged."""
    _create_schema(conn)


#: (version reached, migration from the one before), in order; a new file runs them all
MIGRATIONS: tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...] = (
    (1, _migrate_0_to_1),
    (2, _migrate_1_to_2),
    (3, _migrate_2_to_3),
    (4, _migrate_3_to_4),
)
#: ``PRAGMA user_version`` of a runs.db with this module's schema
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: sqlite3.Connection) -> int:
    """The file's ``PRAGMA user_version`` (0 for a runs.db from before versioning)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RunRecord:
    """One ``runs`` row, typed: the config parsed once, ``run_dir`` absolute.

    Built by :meth:`RunStore.get_record` / :meth:`RunStore.list_records`, or from a row of
    :meth:`RunStore.get_run` / :meth:`RunStore.list_runs` with :meth:`from_row` (extra keys such
    as ``best_ndcg`` are ignored).
    """

    id: str
    name: str
    status: Status
    config: dict[str, Any] = field(hash=False, repr=False)
    run_dir: Path | None = None
    task: int | None = None
    model: str | None = None
    pid: int | None = None
    process_start_time: float | None = None
    host: str | None = None
    created: str | None = None
    started: str | None = None
    ended: str | None = None
    exit_code: int | None = None
    git_commit: str | None = None
    error: str | None = None
    backend: str = "local"
    job_id: str | None = None
    job_state: str | None = None
    job_reason: str | None = None
    node: str | None = None
    sweep: str | None = None
    trial: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any], db: str = DEFAULT_DB) -> RunRecord:
        """The record of a runs row (its ``run_dir`` already resolved, as the store's reads give it).

        Raises:
            WorkbenchError: the stored config is not a JSON object, or the status is unknown.
        """
        try:
            config = json.loads(row.get("config") or "{}")
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise WorkbenchError(f"{db}: run {row['id']} has an unreadable config")
        try:
            status = Status(row.get("status"))
        except ValueError:
            raise WorkbenchError(f"{db}: run {row['id']} has an unknown status {row.get('status')!r}") from None
        return cls(
            id=row["id"],
            name=row.get("name") or "",
            status=status,
            config=config,
            run_dir=Path(row["run_dir"]) if row.get("run_dir") else None,
            task=row.get("task"),
            model=row.get("model"),
            pid=row.get("pid"),
            process_start_time=row.get("process_start_time"),
            host=row.get("host"),
            created=row.get("created"),
            started=row.get("started"),
            ended=row.get("ended"),
            exit_code=row.get("exit_code"),
            git_commit=row.get("git_commit"),
            error=row.get("error"),
            backend=row.get("backend") or "local",
            job_id=row.get("job_id"),
            job_state=row.get("job_state"),
            job_reason=row.get("job_reason"),
            node=row.get("node"),
            sweep=row.get("sweep"),
            trial=row.get("trial"),
        )

    @property
    def active(self) -> bool:
        """Its process may still be alive (:data:`ACTIVE`)."""
        return self.status in ACTIVE

    @property
    def kind(self) -> str:
        """``"pretrain"`` for a pre-training run, else ``"train"``."""
        return self.config.get("kind") or "train"

    @property
    def data(self) -> dict[str, Any]:
        """The config's ``data`` section (``{}`` when absent)."""
        return self.config.get("data") or {}

    @property
    def n_folds(self) -> int | None:
        """``train.folds`` of the config; None when absent (a pre-training run has no folds)."""
        return (self.config.get("train") or {}).get("folds")

    @property
    def epochs(self) -> float:
        """``train.epochs`` of the config (1 when absent or 0)."""
        return float((self.config.get("train") or {}).get("epochs", 1) or 1)


class RunStore:
    """One process's connection to runs.db.

    Args:
        path: the SQLite file (created with its schema if absent, in an existing folder only).
        readonly: open for reading only (UIs); the file must exist and hold a ``runs`` table.

    Paths stored in runs.db (``run_dir``, artifact paths) are absolute for new runs; rows read
    through :meth:`get_run`, :meth:`list_runs` and :meth:`artifacts` carry them resolved by
    :meth:`resolve_path` (older relative ones are read relative to the database's folder).

    Raises:
        WorkbenchError: one line naming the file: a folder that does not exist (nothing is created),
            a path under a regular file, a read-only database or folder (writers), not a SQLite
            file, or a SQLite file without the runs tables.
    """

    def __init__(self, path: str | Path | None = None, readonly: bool = False):
        self.path = str(path or default_db_path())
        self.readonly = readonly
        self._tx_depth = 0
        if readonly:
            if Path(self.path).is_dir():
                raise WorkbenchError(f"{self.path}: is a folder, not a runs database")
            if not Path(self.path).is_file():
                raise WorkbenchError(f"{self.path}: no runs database here (run `workbench train` first or pass --db)")
        elif self.path != ":memory:":
            check_db_location(self.path)
        conn = None
        try:
            if readonly:
                conn, tables = self._open_readonly()
            else:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
                )
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                tables = _table_names(conn)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise WorkbenchError(f"{self.path}: cannot open runs database ({' '.join(str(exc).split())})") from None
        if "runs" not in tables and (readonly or tables):
            conn.close()
            what = "no tables" if not tables else "a SQLite file without a runs table"
            raise WorkbenchError(f"{self.path}: not a runs database ({what})")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            try:
                self._ensure_schema()
            except sqlite3.Error as exc:
                conn.close()
                raise WorkbenchError(f"{self.path}: not a runs database ({' '.join(str(exc).split())})") from None
            except WorkbenchError:
                conn.close()
                raise

    def _open_readonly(self) -> tuple[sqlite3.Connection, set[str]]:
        """A ``mode=ro`` connection and the file's table names. A WAL database in a folder this
        process cannot write (no ``-shm`` to create) is opened ``immutable`` instead: nobody can
        be writing it there."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return conn, _table_names(conn)
        except sqlite3.Error as exc:
            conn.close()
            name = getattr(exc, "sqlite_errorname", "") or ""
            if not (
                name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN"))
                and not os.access(Path(self.path).parent, os.W_OK)
            ):
                raise
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        try:
            return conn, _table_names(conn)
        except sqlite3.Error:
            conn.close()
            raise

    @contextmanager
    def _guard(self, what: str = "read") -> Iterator[None]:
        """Turn a SQLite error of the file or disk into a one-line WorkbenchError naming the db."""
        try:
            yield
        except sqlite3.Error as exc:
            err = db_error(self.path, exc, what)
            if err is None:
                raise
            raise err from None

    # -- paths ----------------------------------------------------------------------------
    def resolve_path(self, path: str | Path | None) -> Path | None:
        """A path stored in runs.db as an absolute Path (None for none).

        New runs store absolute paths. Older rows hold paths relative to the trainer's working
        directory, usually the database's folder: a relative path is read relative to the
        database's folder, or to the current directory where only that one exists.
        """
        if not path:
            return None
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        near_db = Path(os.path.abspath(self.path)).parent / p
        if not near_db.exists() and p.exists():
            return Path(os.path.abspath(p))
        return near_db

    def run_dir(self, run: dict[str, Any]) -> Path | None:
        """The run's folder (``run_dir``) as an absolute Path, or None when the row has none."""
        return self.resolve_path(run.get("run_dir"))

    def _resolved(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("run_dir"):
            row["run_dir"] = str(self.run_dir(row))
        return row

    # -- schema -------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`: a new file gets every table, an older one
        runs the :data:`MIGRATIONS` it lacks, all in one write transaction (no write when the
        file is current).

        Raises:
            WorkbenchError: the file was made by a newer workbench (a higher version).
        """
        if schema_version(self.conn) == SCHEMA_VERSION:
            return
        with self._tx() as c:
            version = schema_version(c)  # another process may have migrated it meanwhile
            if version > SCHEMA_VERSION:
                raise WorkbenchError(
                    f"{self.path}: runs database schema version {version} is newer than this "
                    f"workbench's ({SCHEMA_VERSION}); upgrade the workbench"
                )
            for target, migrate in MIGRATIONS:
                if version < target:
                    migrate(c)
                    version = target
            c.execute(f"PRAGMA user_version = {int(version)}")

    def _has_table(self, name: str) -> bool:
        """Whether the file holds table ``name`` (a reader may open a version-0 file without the
        label or ensemble tables: its reads of them are empty)."""
        with self._guard():
            return (
                self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone()
                is not None
            )

    class _Tx:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; nested inside another ``_Tx`` of the same store it
        joins the outer transaction (the outer one commits or rolls back everything)."""

        def __init__(self, store: RunStore):
            self.store = store
            self.conn = store.conn
            self.path = store.path

        def _wrapped(self, exc: sqlite3.Error):
            err = db_error(self.path, exc, "write")
            if err is None:
                raise exc
            raise err from None

        def __enter__(self):
            if self.store._tx_depth == 0:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    self._wrapped(exc)
            self.store._tx_depth += 1
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            self.store._tx_depth -= 1
            if self.store._tx_depth > 0:
                return False  # the outer transaction decides
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                    return False
                except sqlite3.Error as commit_exc:
                    exc = commit_exc
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (disk full, I/O error)
            if isinstance(exc, sqlite3.Error):
                self._wrapped(exc)
            return False

    def _tx(self) -> _Tx:
        """A short ``BEGIN IMMEDIATE`` ... ``COMMIT`` write transaction. A SQLite error of the file
        or disk inside it (read-only, disk full, I/O error) becomes a one-line WorkbenchError
        naming the database, after the rollback."""
        return RunStore._Tx(self)

    def transaction(self) -> _Tx:
        """One write transaction around several writes (``with store.transaction(): ...``): every
        write method called inside joins it, so they land together or not at all.

        Raises:
            WorkbenchError: as the writes (one line naming the database); nothing is kept.
        """
        return self._tx()

    def close(self) -> None:
        self.conn.close()

    # -- writes ---------------------------------------------------------------------------
    def create_run(
        self,
        name: str,
        config: dict[str, Any],
        run_dir: str | None = None,
        run_id: str | None = None,
        status: str = Status.QUEUED,
    ) -> str:
        """Insert a run row and return its id."""
        run_id = run_id or new_run_id()
        row = {
            "id": run_id,
            "name": name,
            "status": status,
            "task": int(config.get("data", {}).get("task", 1)),
            "model": config.get("model", {}).get("name"),
            "config": json.dumps(config, sort_keys=True),
            "host": socket.gethostname(),
            "created": now_iso(),
            "git_commit": git_commit(),
            "run_dir": run_dir,
        }
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._tx() as c:
            c.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", list(row.values()))
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set columns of one run (``status``, ``pid``, ``ended``, ...).

        Raises:
            WorkbenchError: no run with this id.
        """
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as c:
            cur = c.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])
            if cur.rowcount == 0:
                raise WorkbenchError(f"{self.path}: no run {run_id}")

    def log_metrics(self, run_id: str, rows: Iterable[dict[str, Any]]) -> int:
        """Append metric rows ``{name, value, fold?, step?, epoch?}`` in one transaction.

        Returns the number of rows written.
        """
        t = time.time()
        vals = [
            (
                run_id,
                int(r.get("fold", -1)),
                r.get("step"),
                r.get("epoch"),
                str(r["name"]),
                float(r["value"]),
                float(r.get("time", t)),
            )
            for r in rows
        ]
        if vals:
            with self._tx() as c:
                c.executemany(
                    "INSERT INTO metrics (run_id, fold, step, epoch, name, value, time) VALUES (?,?,?,?,?,?,?)",
                    vals,
                )
        return len(vals)

    def delete_metrics(
        self,
        run_id: str,
        fold: int | None = None,
        teacher: bool | None = None,
        after_step: int | None = None,
        names: Sequence[str] | None = None,
        name_prefixes: Sequence[str] | None = None,
    ) -> int:
        """Delete a run's metric rows that match every given filter (a resumed run logs them again).

        Args:
            fold: only this fold (-1: run-level rows).
            teacher: True: only ``teacher/*`` rows; False: only the final pass's rows (neither
                ``teacher/*`` nor ``progress/*``).
            after_step: only rows with ``step > after_step`` or without a step.
            names / name_prefixes: only these names / names starting with one of the prefixes.

        Returns the number of rows deleted.
        """
        where: list[str] = ["run_id = ?"]
        params: list[Any] = [run_id]
        if fold is not None:
            where.append("fold = ?")
            params.append(int(fold))
        if teacher is True:
            where.append("substr(name, 1, ?) = ?")
            params += [len(mn.TEACHER_PREFIX), mn.TEACHER_PREFIX]
        elif teacher is False:
            where.append("substr(name, 1, ?) != ? AND substr(name, 1, ?) != ?")
            params += [len(mn.TEACHER_PREFIX), mn.TEACHER_PREFIX, len(mn.PROGRESS_PREFIX), mn.PROGRESS_PREFIX]
        if after_step is not None:
            where.append("(step IS NULL OR step > ?)")
            params.append(int(after_step))
        if names:
            where.append(f"name IN ({', '.join('?' for _ in names)})")
            params += list(names)
        if name_prefixes:
            where.append("(" + " OR ".join("substr(name, 1, ?) = ?" for _ in name_prefixes) + ")")
            for p in name_prefixes:
                params += [len(p), p]
        with self._tx() as c:
            return c.execute(f"DELETE FROM metrics WHERE {' AND '.join(where)}", params).rowcount

    def add_artifact(self, run_id: str, kind: str, path: str | Path, fold: int = -1, time: str | None = None) -> None:
        """Record one file the run wrote (``oof``, ``test``, ``checkpoint``, ``log``, ``config``);
        ``time``: ISO-8601 (default now)."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO artifacts (run_id, fold, kind, path, time) VALUES (?,?,?,?,?)",
                (run_id, fold, kind, str(path), time or now_iso()),
            )

    def journal_offset(self, run_id: str) -> int:
        """Bytes of ``run_id``'s journal (:mod:`core.runs.journal`) already ingested (0: none)."""
        with self._guard():
            row = self.conn.execute("SELECT offset FROM journal_offsets WHERE run_id = ?", [run_id]).fetchone()
        return int(row[0]) if row else 0

    def set_journal_offset(self, run_id: str, offset: int, events: int) -> None:
        """Record that ``run_id``'s journal is ingested up to byte ``offset`` (``events`` more events
        applied); call inside the :meth:`transaction` that applied them, so both land together."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO journal_offsets (run_id, offset, events) VALUES (?, ?, ?) ON CONFLICT(run_id) "
                "DO UPDATE SET offset = excluded.offset, events = journal_offsets.events + excluded.events",
                [run_id, int(offset), int(events)],
            )

    def replace_label_issues(self, run_id: str, rows: Iterable[Sequence[Any]]) -> None:
        """Replace ``run_id``'s rows of ``label_issues`` with ``rows`` (tuples in the order of
        :data:`LABEL_ISSUE_COLUMNS`) in one transaction."""
        cols = ", ".join(LABEL_ISSUE_COLUMNS)
        marks = ", ".join("?" for _ in LABEL_ISSUE_COLUMNS)
        with self._tx() as c:
            c.execute("DELETE FROM label_issues WHERE run_id = ?", [run_id])
            c.executemany(f"INSERT INTO label_issues ({cols}) VALUES ({marks})", rows)

    def add_label_decision(
        self, source_run: str, example_id: int, decision: str, new_label: str | None, reviewer: str
    ) -> int:
        """Append one row to ``label_decisions`` (checked by :func:`core.cleaning.labels.record_decision`)
        and return its id."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO label_decisions (example_id, decision, new_label, reviewer, time, source_run)"
                " VALUES (?,?,?,?,?,?)",
                [int(example_id), decision, new_label, reviewer, now_iso(), source_run],
            )
            return int(cur.lastrowid)

    def set_sweep_trial(self, run_id: str, sweep: str, trial: int) -> None:
        """Tag a run as trial number ``trial`` of the sweep ``sweep`` (:mod:`core.runs.sweep`).

        Raises:
            WorkbenchError: no run with this id.
        """
        self.update_run(run_id, sweep=str(sweep), trial=int(trial))

    def mark_pruned(self, run_id: str, reason: str | None = None) -> str:
        """Give a run its sweep's ``pruned`` status once its process has stopped: any status but
        ``finished`` / ``partial`` (a run that ended before the prune keeps its end) becomes
        :attr:`Status.PRUNED`, with ``reason`` as its error; metric rows and files are kept.

        Returns:
            The run's status afterwards.

        Raises:
            WorkbenchError: no run with this id.
        """
        with self._tx() as c:
            row = c.execute("SELECT status, ended FROM runs WHERE id = ?", [run_id]).fetchone()
            if row is None:
                raise WorkbenchError(f"{self.path}: no run {run_id}")
            if row[0] in (Status.FINISHED, Status.PARTIAL):
                return str(row[0])
            c.execute(
                "UPDATE runs SET status = ?, ended = ?, error = COALESCE(?, error) WHERE id = ?",
                [str(Status.PRUNED), row[1] or now_iso(), reason, run_id],
            )
        return str(Status.PRUNED)

    def sweep_runs(self, sweep: str) -> list[RunRecord]:
        """The runs of the sweep ``sweep`` (:meth:`set_sweep_trial`), by trial number."""
        if "sweep" not in {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}:
            return []  # a reader of a file from before version 3
        with self._guard():
            rows = [
                self._resolved(r)
                for r in self.db.query("SELECT * FROM runs WHERE sweep = ? ORDER BY trial, id", [str(sweep)])
            ]
        return [RunRecord.from_row(r, self.path) for r in rows]

    def sweeps(self) -> dict[str, int]:
        """{sweep name: number of its runs} of every sweep with a run in this database."""
        if "sweep" not in {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}:
            return {}
        with self._guard():
            return dict(
                self.conn.execute(
                    "SELECT sweep, COUNT(*) FROM runs WHERE sweep IS NOT NULL GROUP BY sweep ORDER BY sweep"
                ).fetchall()
            )

    def put_ensemble(self, name: str, tasks: str, members: str, manifest: str, out_dir: str) -> None:
        """Record an ensemble (``members`` and ``manifest`` are JSON text); a rebuild under the
        same name replaces its row."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO ensembles (name, created, tasks, members, manifest, dir) VALUES (?,?,?,?,?,?)",
                [name, now_iso(), tasks, members, manifest, out_dir],
            )

    # -- reads ----------------------------------------------------------------------------
    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run row as a dict (``run_dir`` absolute, see :meth:`resolve_path`); a unique id
        prefix is accepted, matched literally (``%`` and ``_`` are no wildcards).

        Raises:
            WorkbenchError: no run, or an ambiguous prefix.
        """
        if not run_id:
            raise WorkbenchError(f"{self.path}: no run {run_id!r}")
        with self._guard():
            rows = list(
                self.db.query(
                    "SELECT * FROM runs WHERE id = ? OR substr(lower(id), 1, length(?)) = lower(?) ORDER BY id",
                    [run_id, run_id, run_id],
                )
            )
        exact = [r for r in rows if r["id"] == run_id]
        if exact:
            return self._resolved(exact[0])
        if not rows:
            raise WorkbenchError(f"{self.path}: no run {run_id}")
        if len(rows) > 1:
            raise WorkbenchError(f"{self.path}: run id prefix {run_id} is ambiguous ({len(rows)} runs)")
        return self._resolved(rows[0])

    def metrics(self, run_id: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """All metric rows of a run (optionally only ``names``), in insertion order."""
        sql = "SELECT fold, step, epoch, name, value, time FROM metrics WHERE run_id = ?"
        params: list[Any] = [run_id]
        if names:
            sql += f" AND name IN ({', '.join('?' for _ in names)})"
            params += list(names)
        with self._guard():
            return list(self.db.query(sql + " ORDER BY rowid", params))

    def metrics_since(self, run_id: str, after_rowid: int = 0) -> list[dict[str, Any]]:
        """Metric rows of a run appended after ``after_rowid`` (incremental polling by a monitor),
        each with its ``rowid``, in insertion order."""
        with self._guard():
            return list(
                self.db.query(
                    "SELECT rowid, fold, step, epoch, name, value, time FROM metrics WHERE run_id = ? AND rowid > ? "
                    "ORDER BY rowid",
                    [run_id, int(after_rowid)],
                )
            )

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes whenever another connection commits, so a
        poller can skip re-reading an unchanged database."""
        with self._guard():
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        """The run's artifact rows ``{fold, kind, path, time}``, paths absolute (:meth:`resolve_path`)."""
        with self._guard():
            rows = list(
                self.db.query("SELECT fold, kind, path, time FROM artifacts WHERE run_id = ? ORDER BY rowid", [run_id])
            )
        for r in rows:
            if r.get("path"):
                r["path"] = str(self.resolve_path(r["path"]))
        return rows

    def get_record(self, run_id: str) -> RunRecord:
        """:meth:`get_run` as a :class:`RunRecord` (config parsed, ``run_dir`` a Path).

        Raises:
            WorkbenchError: as :meth:`get_run`; an unreadable config.
        """
        return RunRecord.from_row(self.get_run(run_id), self.path)

    def list_records(self, limit: int | None = None) -> list[RunRecord]:
        """All runs as :class:`RunRecord`, newest first."""
        sql = "SELECT * FROM runs ORDER BY created DESC, id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._guard():
            rows = [self._resolved(r) for r in self.db.query(sql)]
        return [RunRecord.from_row(r, self.path) for r in rows]

    def active_runs(self) -> list[dict[str, Any]]:
        """Rows of the runs whose status is :data:`ACTIVE` (their process may still be alive)."""
        marks = ", ".join("?" for _ in ACTIVE)
        with self._guard():
            return [
                self._resolved(r)
                for r in self.db.query(
                    f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY id", [str(s) for s in ACTIVE]
                )
            ]

    def watched_jobs(self, backend: str, terminal_states: Sequence[str], limit: int | None = None) -> list[RunRecord]:
        """The runs of ``backend`` (e.g. ``"slurm"``) with a job id that may still change: active, or
        their job not yet seen in one of ``terminal_states`` (at most ``limit`` of them, when given)."""
        marks = ", ".join("?" for _ in terminal_states)
        active = ", ".join("?" for _ in ACTIVE)
        sql = (
            f"SELECT * FROM runs WHERE backend = ? AND job_id IS NOT NULL AND (status IN ({active}) "
            f"OR job_state IS NULL OR job_state NOT IN ({marks})) ORDER BY id"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._guard():
            rows = [self._resolved(r) for r in self.db.query(sql, [backend, *map(str, ACTIVE), *terminal_states])]
        return [RunRecord.from_row(r, self.path) for r in rows]

    def best_values(
        self, run_ids: Sequence[str] | None = None, names: Sequence[str] = (mn.NDCG, mn.TASK2_F1, mn.FINAL_NDCG)
    ) -> dict[str, dict[str, float]]:
        """Each run's best figures, best and not last, the one place this rule is written:

        for a short name ``n`` (``ndcg``, ``task2_f1``, ...), the run-level ``cv/n`` (fold -1, over
        all OOF rows) when logged, else the mean over folds of each fold's best ``eval/n`` so far
        (a running run); absent when neither is logged.

        Args:
            run_ids: these runs (exact ids), or None for all.
            names: the short names.

        Returns:
            {run id: {short name: value}} (a run with none of the figures is absent).
        """
        if not names or (run_ids is not None and not run_ids):
            return {}
        runs_sql, run_params = "", []
        if run_ids is not None:
            runs_sql = f" AND run_id IN ({', '.join('?' for _ in run_ids)})"
            run_params = list(run_ids)
        evals = [mn.eval_name(n) for n in names]
        cvs = [mn.cv_name(n) for n in names]
        sql = f"""
        WITH fold_best AS (
            SELECT run_id, name, fold, MAX(value) AS v FROM metrics
            WHERE name IN ({", ".join("?" for _ in evals)}) AND fold >= 0{runs_sql}
            GROUP BY run_id, name, fold
        )
        SELECT run_id, name, AVG(v) AS v FROM fold_best GROUP BY run_id, name
        UNION ALL
        SELECT run_id, name, MAX(value) AS v FROM metrics
        WHERE name IN ({", ".join("?" for _ in cvs)}) AND fold = -1{runs_sql}
        GROUP BY run_id, name
        """
        with self._guard():
            rows = self.conn.execute(sql, [*evals, *run_params, *cvs, *run_params]).fetchall()
        live: dict[str, dict[str, float]] = {}
        cv: dict[str, dict[str, float]] = {}
        for run_id, name, v in rows:
            family, short = name.split("/", 1)
            (cv if family + "/" == mn.CV_PREFIX else live).setdefault(run_id, {})[short] = v
        out: dict[str, dict[str, float]] = {}
        for run_id in {*live, *cv}:
            values = {**live.get(run_id, {}), **cv.get(run_id, {})}  # cv wins
            out[run_id] = {n: values[n] for n in names if values.get(n) is not None}
        return out

    def folds_done(self, run_ids: Sequence[str] | None = None) -> dict[str, int]:
        """{run id: number of ``fold/done`` rows} for the runs with any (of ``run_ids``, or all)."""
        sql, params = "SELECT run_id, COUNT(*) FROM metrics WHERE name = ?", [mn.FOLD_DONE]
        if run_ids is not None:
            if not run_ids:
                return {}
            sql += f" AND run_id IN ({', '.join('?' for _ in run_ids)})"
            params += list(run_ids)
        with self._guard():
            return dict(self.conn.execute(sql + " GROUP BY run_id", params).fetchall())

    def list_runs(self, limit: int | None = None, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, with their best values (:meth:`best_values`: best, not last):

        ``best_ndcg``/``best_f1``: the run's final CV values if logged (``cv/ndcg``,
        ``cv/task2_f1``), else the mean over folds of each fold's best eval value so far;
        ``best_final_ndcg``: the final blended ranking's CV nDCG (``cv/final_ndcg``).
        ``folds_done``: folds with a ``fold/done`` metric; ``n_folds``: the config's ``train.folds``.

        Args:
            limit: at most this many (the newest).
            ids: only these runs (exact ids; unknown ones are left out), e.g. the window of the
                list a screen shows: their metrics are read with indexed lookups for them alone.
        """
        sql = "SELECT r.*, json_extract(r.config, '$.train.folds') AS n_folds FROM runs r"
        params: list[Any] = []
        if ids is not None:
            if not ids:
                return []
            sql += f" WHERE r.id IN ({', '.join('?' for _ in ids)})"
            params = list(ids)
        sql += " ORDER BY r.created DESC, r.id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._guard():
            rows = [self._resolved(r) for r in self.db.query(sql, params)]
        some = [r["id"] for r in rows] if len(rows) <= self.PER_RUN_LOOKUPS and (ids or limit) else None
        best, done = self.best_values(some), self.folds_done(some)
        for r in rows:
            b = best.get(r["id"], {})
            r["best_ndcg"], r["best_f1"] = b.get(mn.NDCG), b.get(mn.TASK2_F1)
            r["best_final_ndcg"], r["folds_done"] = b.get(mn.FINAL_NDCG), done.get(r["id"], 0)
            r["n_folds"] = r.pop("n_folds")  # last, as the columns always came
        return rows

    #: above this many runs, :meth:`list_runs` reads every run's metrics in one scan rather than
    #: one indexed lookup per run
    PER_RUN_LOOKUPS = 1000

    def run_index(
        self,
        terms: Sequence[tuple[str | None, str]] = (),
        any_fields: Sequence[str] = (),
        columns: Sequence[str] = (),
    ) -> list[tuple]:
        """The runs matching a filter, newest first (the order of :meth:`list_runs`), as
        ``(id, *columns)`` tuples: the runs list of a screen, filtered in SQL.

        Args:
            terms: ``(field, text)`` pairs that must all hold: the :data:`RUN_FIELDS` value of
                ``field`` contains ``text``, ignoring case (SQLite's ``LIKE``: the case of ASCII
                letters only); a None field: the value of any of ``any_fields`` contains it.
            any_fields: the :data:`RUN_FIELDS` a term without a field searches.
            columns: ``runs`` columns (as stored) or else :data:`RUN_FIELDS` names to return
                after the id.

        Raises:
            ValueError: a term's field not in :data:`RUN_FIELDS`, a column that is neither.
        """
        raw = {c for c, _ in TABLES["runs"]}

        def field(name: str) -> str:
            if name not in RUN_FIELDS:
                raise ValueError(f"runs list: no field {name!r}")
            return RUN_FIELDS[name]

        def column(name: str) -> str:
            return f'"{name}"' if name in raw else field(name)

        def contains(name: str) -> tuple[str, int]:  # SQL: the field contains the pattern; its parameters
            if name == "model":  # the costly folder-stripping only where the whole name matches
                return (
                    f"(coalesce(model, '') LIKE ? ESCAPE '\\' AND (instr(model, '/') = 0 OR {field(name)} LIKE ? ESCAPE '\\'))",
                    2,
                )
            return f"{field(name)} LIKE ? ESCAPE '\\'", 1

        where, params, used = [], [], set(columns)
        for key, text in terms:
            used |= {key} if key is not None else set(any_fields)
            names = [key] if key is not None else list(any_fields)
            parts = [contains(n) for n in names]
            where.append("(" + " OR ".join(sql for sql, _ in parts) + ")" if parts else "0")
            params += [_like_pattern(text)] * sum(k for _, k in parts)
        sql = "SELECT " + ", ".join(["id", *(column(c) for c in columns)]) + " FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if used <= LIST_INDEX_FIELDS:
            sql += " ORDER BY created DESC, id DESC"  # idx_runs_list, in order: no sort, no table read
        else:  # one scan of the table and a sort of the matches: faster than the index + a table read per run
            sql += " ORDER BY +created DESC, +id DESC"
        with self._guard():
            return self.conn.execute(sql, params).fetchall()

    def count_runs(self, status: str | None = None) -> int:
        """How many runs there are (with ``status`` only, when given)."""
        sql, params = "SELECT COUNT(*) FROM runs", []
        if status is not None:
            sql, params = sql + " WHERE status = ?", [str(status)]
        with self._guard():
            return int(self.conn.execute(sql, params).fetchone()[0])

    def existing_runs(self, run_ids: Iterable[str]) -> set[str]:
        """Those of ``run_ids`` that are runs of this database."""
        ids = list(dict.fromkeys(run_ids))
        found: set[str] = set()
        with self._guard():
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                sql = f"SELECT id FROM runs WHERE id IN ({', '.join('?' for _ in chunk)})"
                found |= {r[0] for r in self.conn.execute(sql, chunk)}
        return found

    def has_backend(self, backend: str) -> bool:
        """Whether any run executes on ``backend`` (``"slurm"``)."""
        with self._guard():
            return self.conn.execute("SELECT 1 FROM runs WHERE backend = ? LIMIT 1", [backend]).fetchone() is not None

    # -- label issues and decisions (core.cleaning.labels), ensembles (core.scoring.ensemble) --------------
    def label_issues(self, run_id: str) -> list[tuple]:
        """The stored label issues of a run (exact id), ranked (rank 1 first), as tuples in the
        order of :data:`LABEL_ISSUE_COLUMNS`; empty if none."""
        if not self._has_table("label_issues"):
            return []
        with self._guard():
            return self.conn.execute(
                f"SELECT {', '.join(LABEL_ISSUE_COLUMNS)} FROM label_issues WHERE run_id = ? ORDER BY rank", [run_id]
            ).fetchall()

    def label_decisions(self, source_run: str | None = None) -> list[tuple]:
        """All ``label_decisions`` rows (of one source run, or all), in append order, as tuples in
        the order of :data:`LABEL_DECISION_COLUMNS`."""
        if not self._has_table("label_decisions"):
            return []
        sql = f"SELECT {', '.join(LABEL_DECISION_COLUMNS)} FROM label_decisions"
        params: list[Any] = []
        if source_run is not None:
            sql += " WHERE source_run = ?"
            params.append(source_run)
        with self._guard():
            return self.conn.execute(sql + " ORDER BY id", params).fetchall()

    def runs_with_issues(self) -> list[dict[str, Any]]:
        """Runs that have stored label issues, newest first: ``{run_id, n_issues, decided}``
        (``decided``: distinct examples with a decision from that run's review)."""
        if not self._has_table("label_issues"):
            return []
        decided = (
            "(SELECT COUNT(DISTINCT example_id) FROM label_decisions d WHERE d.source_run = i.run_id)"
            if self._has_table("label_decisions")
            else "0"
        )
        with self._guard():
            rows = self.conn.execute(
                f"SELECT i.run_id, COUNT(*), {decided} FROM label_issues i GROUP BY i.run_id ORDER BY i.run_id DESC"
            ).fetchall()
        return [dict(zip(("run_id", "n_issues", "decided"), r)) for r in rows]

    def ensembles(self) -> list[dict[str, Any]]:
        """Recorded ensembles, newest first: ``{name, created, tasks, members, manifest, dir}``
        (``members``, ``manifest``: JSON text); empty if none."""
        if not self._has_table("ensembles"):
            return []
        with self._guard():
            return list(self.db.query("SELECT * FROM ensembles ORDER BY created DESC"))


def _table_names(conn: sqlite3.Connection) -> set[str]:
    """Names of the tables in the file (reading it: "file is not a database" shows here)."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
