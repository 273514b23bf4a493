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
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from core.errors import WorkbenchError

DEFAULT_DB = "runs.db"
BUSY_TIMEOUT_MS = 30_000

RUN_STATUSES = ("queued", "running", "finished", "failed", "stopped", "crashed")


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


def new_run_id() -> str:
    """Sortable, unique id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunStore:
    """One process's connection to runs.db.

    Args:
        path: the SQLite file (created with its schema if absent).
        readonly: open for reading only (UIs).

    Raises:
        WorkbenchError: the file cannot be opened as a SQLite database.
    """

    def __init__(self, path: str | Path | None = None, readonly: bool = False):
        self.path = str(path or default_db_path())
        try:
            if readonly:
                if not Path(self.path).is_file():
                    raise WorkbenchError(f"{self.path}: no runs database here (run `workbench train` first or pass --db)")
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None, check_same_thread=False)
            else:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            raise WorkbenchError(f"{self.path}: cannot open runs database ({exc})") from None
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            try:
                self._ensure_schema()
            except sqlite3.DatabaseError as exc:
                raise WorkbenchError(f"{self.path}: not a runs database ({exc})") from None

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
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _tx(self) -> "_Tx":
        """A short ``BEGIN IMMEDIATE`` ... ``COMMIT`` write transaction."""
        return RunStore._Tx(self.conn)

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

    def add_artifact(self, run_id: str, kind: str, path: str | Path, fold: int = -1) -> None:
        """Record one file the run wrote (``oof``, ``test``, ``checkpoint``, ``log``, ``config``)."""
        with self._tx() as c:
            c.execute("INSERT INTO artifacts (run_id, fold, kind, path, time) VALUES (?,?,?,?,?)",
                      (run_id, fold, kind, str(path), now_iso()))

    # -- reads ----------------------------------------------------------------------------
    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run row as a dict; a unique id prefix is accepted.

        Raises:
            WorkbenchError: no run, or an ambiguous prefix.
        """
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ? OR id LIKE ? ORDER BY id",
                                  [run_id, run_id + "%"]))
        exact = [r for r in rows if r["id"] == run_id]
        if exact:
            return exact[0]
        if not rows:
            raise WorkbenchError(f"{self.path}: no run {run_id}")
        if len(rows) > 1:
            raise WorkbenchError(f"{self.path}: run id prefix {run_id} is ambiguous ({len(rows)} runs)")
        return rows[0]

    def metrics(self, run_id: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """All metric rows of a run (optionally only ``names``), in insertion order."""
        sql = "SELECT fold, step, epoch, name, value, time FROM metrics WHERE run_id = ?"
        params: list[Any] = [run_id]
        if names:
            sql += f" AND name IN ({', '.join('?' for _ in names)})"
            params += list(names)
        return list(self.db.query(sql + " ORDER BY rowid", params))

    def metrics_since(self, run_id: str, after_rowid: int = 0) -> list[dict[str, Any]]:
        """Metric rows of a run appended after ``after_rowid`` (incremental polling by a monitor),
        each with its ``rowid``, in insertion order."""
        return list(self.db.query(
            "SELECT rowid, fold, step, epoch, name, value, time FROM metrics WHERE run_id = ? AND rowid > ? ORDER BY rowid",
            [run_id, int(after_rowid)]))

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes whenever another connection commits, so a
        poller can skip re-reading an unchanged database."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT fold, kind, path, time FROM artifacts WHERE run_id = ? ORDER BY rowid",
                                  [run_id]))

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
        return list(self.db.query(sql))
