"""runs.db: the record of every run, its metrics and artifacts (SQLite via sqlite-utils).

Concurrency model (DESIGN.md): WAL journal, ``busy_timeout``, one connection per process and
short ``BEGIN IMMEDIATE`` write transactions. The trainer writes its own metrics; UIs only read.

Tables:
  runs(id, name, status, task, model, config JSON, pid, process_start_time, host, created,
       started, ended, exit_code, git_commit, run_dir, error)
  metrics(run_id, fold, step, epoch, name, value, time)   fold = -1 for run-level values
  artifacts(run_id, fold, kind, path, time)
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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from core.errors import ReadOnlyDatabaseError, WorkbenchError

DEFAULT_DB = "runs.db"
BUSY_TIMEOUT_MS = 30_000

RUN_STATUSES = ("queued", "running", "finished", "partial", "failed", "stopped", "crashed")


def default_db_path() -> str:
    """``$WORKBENCH_DB`` if set, else ``./runs.db``."""
    return os.environ.get("WORKBENCH_DB") or DEFAULT_DB


def now_iso() -> str:
    """UTC time as ISO-8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit(path: str | Path = ".") -> str | None:
    """The project's git commit (short hash, ``+dirty`` if modified) or None outside git."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


#: SQLite result codes (``sqlite3.Error.sqlite_errorname`` prefixes) that describe the file or the
#: disk rather than a bug in a query: they become a one-line WorkbenchError naming the database
ENV_ERRORS = ("SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED",
              "SQLITE_CANTOPEN", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_PERM", "SQLITE_NOLFS",
              "SQLITE_PROTOCOL")


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
        raise ReadOnlyDatabaseError(f"{p}: folder {folder} is not writable (SQLite needs to create "
                             f"{p.name}-wal and {p.name}-shm there)")


def new_run_id() -> str:
    """Sortable, unique id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


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
        if readonly:
            if Path(self.path).is_dir():
                raise WorkbenchError(f"{self.path}: is a folder, not a runs database")
            if not Path(self.path).is_file():
                raise WorkbenchError(f"{self.path}: no runs database here (run `workbench train` first or pass --db)")
        else:
            check_db_location(self.path)
        conn = None
        try:
            if readonly:
                conn, tables = self._open_readonly()
            else:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
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

    def _open_readonly(self) -> tuple[sqlite3.Connection, set[str]]:
        """A ``mode=ro`` connection and the file's table names. A WAL database in a folder this
        process cannot write (no ``-shm`` to create) is opened ``immutable`` instead: nobody can
        be writing it there."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return conn, _table_names(conn)
        except sqlite3.Error as exc:
            conn.close()
            name = getattr(exc, "sqlite_errorname", "") or ""
            if not (name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN"))
                    and not os.access(Path(self.path).parent, os.W_OK)):
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
        with self._tx():
            self.db["runs"].create(
                {
                    "id": str, "name": str, "status": str, "task": int, "model": str, "config": str,
                    "pid": int, "process_start_time": float, "host": str, "created": str,
                    "started": str, "ended": str, "exit_code": int, "git_commit": str,
                    "run_dir": str, "error": str,
                },
                pk="id", if_not_exists=True,
            )
            self.db["metrics"].create(
                {"run_id": str, "fold": int, "step": int, "epoch": float, "name": str,
                 "value": float, "time": float},
                if_not_exists=True,
            )
            self.db["artifacts"].create(
                {"run_id": str, "fold": int, "kind": str, "path": str, "time": str},
                if_not_exists=True,
            )
            self.db["metrics"].create_index(["run_id", "name"], if_not_exists=True)
            # covering index for list_runs' per-name aggregates over all runs
            self.db["metrics"].create_index(["name", "run_id", "fold", "value"], index_name="idx_metrics_name_run",
                                            if_not_exists=True)
            self.db["artifacts"].create_index(["run_id"], if_not_exists=True)

    class _Tx:
        def __init__(self, conn: sqlite3.Connection, path: str = "runs.db"):
            self.conn = conn
            self.path = path

        def _wrapped(self, exc: sqlite3.Error):
            err = db_error(self.path, exc, "write")
            if err is None:
                raise exc
            raise err from None

        def __enter__(self):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._wrapped(exc)
            return self.conn

        def __exit__(self, exc_type, exc, tb):
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

    def _tx(self) -> "_Tx":
        """A short ``BEGIN IMMEDIATE`` ... ``COMMIT`` write transaction. A SQLite error of the file
        or disk inside it (read-only, disk full, I/O error) becomes a one-line WorkbenchError
        naming the database, after the rollback."""
        return RunStore._Tx(self.conn, self.path)

    def close(self) -> None:
        self.conn.close()

    # -- writes ---------------------------------------------------------------------------
    def create_run(self, name: str, config: dict[str, Any], run_dir: str | None = None,
                   run_id: str | None = None, status: str = "queued") -> str:
        """Insert a run row and return its id."""
        run_id = run_id or new_run_id()
        row = {
            "id": run_id, "name": name, "status": status,
            "task": int(config.get("data", {}).get("task", 1)),
            "model": config.get("model", {}).get("name"),
            "config": json.dumps(config, sort_keys=True),
            "host": socket.gethostname(), "created": now_iso(), "git_commit": git_commit(),
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
            (run_id, int(r.get("fold", -1)), r.get("step"), r.get("epoch"), str(r["name"]),
             float(r["value"]), float(r.get("time", t)))
            for r in rows
        ]
        if vals:
            with self._tx() as c:
                c.executemany(
                    "INSERT INTO metrics (run_id, fold, step, epoch, name, value, time) VALUES (?,?,?,?,?,?,?)",
                    vals,
                )
        return len(vals)

    def delete_metrics(self, run_id: str, fold: int | None = None, teacher: bool | None = None,
                       after_step: int | None = None, names: Sequence[str] | None = None,
                       name_prefixes: Sequence[str] | None = None) -> int:
        """Delete a run's metric rows that match every given filter (a resumed run logs them again).

        Args:
            fold: only this fold (-1: run-level rows).
            teacher: True: only ``teacher/*`` rows; False: only the final pass's rows (neither
                ``teacher/*`` nor ``progress/*``).
            after_step: only rows with ``step > after_step`` or without a step.
            names / name_prefixes: only these names / names starting with one of the prefixes.

        Returns the number of rows deleted.
        """
        where, params = ["run_id = ?"], [run_id]
        if fold is not None:
            where.append("fold = ?")
            params.append(int(fold))
        if teacher is True:
            where.append("substr(name, 1, 8) = 'teacher/'")
        elif teacher is False:
            where.append("substr(name, 1, 8) != 'teacher/' AND substr(name, 1, 9) != 'progress/'")
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

    def add_artifact(self, run_id: str, kind: str, path: str | Path, fold: int = -1) -> None:
        """Record one file the run wrote (``oof``, ``test``, ``checkpoint``, ``log``, ``config``)."""
        with self._tx() as c:
            c.execute("INSERT INTO artifacts (run_id, fold, kind, path, time) VALUES (?,?,?,?,?)",
                      (run_id, fold, kind, str(path), now_iso()))

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
            rows = list(self.db.query(
                "SELECT * FROM runs WHERE id = ? OR substr(lower(id), 1, length(?)) = lower(?) ORDER BY id",
                [run_id, run_id, run_id]))
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
            return list(self.db.query(
                "SELECT rowid, fold, step, epoch, name, value, time FROM metrics WHERE run_id = ? AND rowid > ? "
                "ORDER BY rowid", [run_id, int(after_rowid)]))

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes whenever another connection commits, so a
        poller can skip re-reading an unchanged database."""
        with self._guard():
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        """The run's artifact rows ``{fold, kind, path, time}``, paths absolute (:meth:`resolve_path`)."""
        with self._guard():
            rows = list(self.db.query("SELECT fold, kind, path, time FROM artifacts WHERE run_id = ? ORDER BY rowid",
                                      [run_id]))
        for r in rows:
            if r.get("path"):
                r["path"] = str(self.resolve_path(r["path"]))
        return rows

    def list_runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, with their best values (best, not last):

        ``best_ndcg``/``best_f1``: the run's final CV values if logged (``cv/ndcg``,
        ``cv/task2_f1``), else the mean over folds of each fold's best eval value so far;
        ``best_final_ndcg``: the final blended ranking's CV nDCG (``cv/final_ndcg``).
        ``folds_done``: folds with a ``fold/done`` metric; ``n_folds``: the config's ``train.folds``.
        """
        sql = """
        WITH fold_best AS (
            SELECT run_id, fold, name, MAX(value) AS v FROM metrics
            WHERE name IN ('eval/ndcg', 'eval/task2_f1') AND fold >= 0
            GROUP BY run_id, fold, name
        ), live AS (
            SELECT run_id,
                   AVG(CASE WHEN name = 'eval/ndcg' THEN v END) AS live_ndcg,
                   AVG(CASE WHEN name = 'eval/task2_f1' THEN v END) AS live_f1
            FROM fold_best GROUP BY run_id
        ), cv AS (
            SELECT run_id,
                   MAX(CASE WHEN name = 'cv/ndcg' THEN value END) AS cv_ndcg,
                   MAX(CASE WHEN name = 'cv/task2_f1' THEN value END) AS cv_f1,
                   MAX(CASE WHEN name = 'cv/final_ndcg' THEN value END) AS final_ndcg,
                   SUM(CASE WHEN name = 'fold/done' THEN 1 ELSE 0 END) AS folds_done
            FROM metrics WHERE name IN ('cv/ndcg', 'cv/task2_f1', 'cv/final_ndcg', 'fold/done')
                  AND (fold = -1 OR name = 'fold/done') GROUP BY run_id
        )
        SELECT r.*, COALESCE(cv.cv_ndcg, live.live_ndcg) AS best_ndcg,
               COALESCE(cv.cv_f1, live.live_f1) AS best_f1,
               cv.final_ndcg AS best_final_ndcg, COALESCE(cv.folds_done, 0) AS folds_done,
               json_extract(r.config, '$.train.folds') AS n_folds
        FROM runs r LEFT JOIN live ON live.run_id = r.id LEFT JOIN cv ON cv.run_id = r.id
        ORDER BY r.created DESC, r.id DESC
        """
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._guard():
            return [self._resolved(r) for r in self.db.query(sql)]


def _table_names(conn: sqlite3.Connection) -> set[str]:
    """Names of the tables in the file (reading it: "file is not a database" shows here)."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
