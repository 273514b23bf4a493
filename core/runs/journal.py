"""Runs on other hosts: an append-only journal in the run folder instead of runs.db.

SQLite may be opened from one host only: its WAL needs shared memory, and its locks are unreliable on
network file systems. A run that executes on another host (a Slurm job) therefore never opens
runs.db. Its trainer writes through a :class:`JournalStore`, which has :class:`core.runs.store.RunStore`'s
methods and appends every write as one JSON line to ``<run>/journal.jsonl`` on the shared file
system; the workbench, on its own host, applies those lines to runs.db with :func:`ingest`.

- **The same rows either way.** A journal line is the write method's name and its arguments with
  every value the store would compute filled in (metric and artifact times), and :func:`ingest` calls
  the same RunStore method with them, so a run reported through its journal leaves the rows it would
  have written to runs.db directly (tested).
- **Idempotent.** runs.db keeps, per run, the byte offset up to which its journal is applied
  (``journal_offsets``), updated in the same transaction as the rows: ingesting twice adds nothing,
  and a crash mid-ingest applies nothing of that batch.
- **Torn lines.** Only complete lines (ending in ``\\n``) are applied; a last line still being
  written is left for the next ingest. A killed writer's torn last line is never completed: the next
  attempt cuts it off before it appends.
- **Reads on the remote host.** A trainer also reads the store (the run's row when it claims it, the
  metric rows of a finished fold when it resumes). A JournalStore answers from an in-memory SQLite
  copy (on its own host) built from the run's *submission snapshot* ``<run>/run.json`` (the runs row
  and label tables the workbench wrote when it submitted the job) and the journal's lines: every
  metric and artifact line, and the row updates written since the snapshot (a resubmitted job is
  ``queued`` again there, whatever its previous job wrote; a job requeued by its supervisor reads the
  ``queued`` the supervisor wrote).

Host-local columns (``pid``, ``process_start_time``) are never journalled: they mean nothing on the
workbench's host.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from core.errors import WorkbenchError
from core.runs.store import LABEL_DECISION_COLUMNS, LABEL_ISSUE_COLUMNS, TABLES, RunStore, now_iso

#: the journal's file name in the run folder
JOURNAL = "journal.jsonl"
#: the submission snapshot's file name in the run folder
SNAPSHOT = "run.json"
#: runs columns a journal may set (``pid`` and ``process_start_time`` are host-local)
JOURNAL_RUN_FIELDS = frozenset(
    {"status", "started", "ended", "exit_code", "error", "host", "run_dir", "config", "model", "task", "node"}
)
#: the write methods a journal line may name
OPS = ("update_run", "log_metrics", "delete_metrics", "add_artifact")


def write_snapshot(store: RunStore, run_id: str, run_dir: Path) -> Path:
    """Write ``run_dir/run.json``: the run's runs row and the label tables its config may read
    (``label_decisions``; ``label_issues`` of the run named by ``labels.issues_run``), atomically.

    Called by the workbench when it submits (or resubmits) the run to another host.

    Raises:
        WorkbenchError: unknown run; the file cannot be written.
    """
    from core.runs.lifecycle import atomic_write

    run = store.get_run(run_id)
    run = {k: v for k, v in run.items() if k not in ("pid", "process_start_time")}
    issues_run = (json.loads(run.get("config") or "{}").get("labels") or {}).get("issues_run")
    snapshot = {
        "run": run,
        # the journal's events from here on belong to this submission: their row updates count
        "journal_offset": os.path.getsize(run_dir / JOURNAL) if (run_dir / JOURNAL).exists() else 0,
        "label_decisions": [list(r) for r in store.label_decisions()],
        "label_issues": [list(r) for r in store.label_issues(store.get_run(issues_run)["id"])] if issues_run else [],
    }
    text = json.dumps(snapshot, sort_keys=True)
    return atomic_write(run_dir / SNAPSHOT, lambda p: p.write_text(text))


def read_lines(path: Path, offset: int = 0) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """The complete journal lines of ``path`` from byte ``offset``.

    Returns:
        ([(byte offset of the line, event dict), ...], byte offset after the last complete line);
        a torn last line (no ``\\n`` yet) is left out.

    Raises:
        WorkbenchError: the file cannot be read, is shorter than ``offset`` (it was replaced), or
        holds a complete line that is not a JSON object (one line naming the file and the offset).
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < offset:
                raise WorkbenchError(f"{path}: journal is {size} bytes but {offset} were already ingested (replaced?)")
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        if offset:
            raise WorkbenchError(f"{path}: journal is gone but {offset} bytes were already ingested") from None
        return [], 0
    except OSError as exc:
        raise WorkbenchError(f"{path}: cannot read the journal ({exc.strerror or exc})") from None
    end = data.rfind(b"\n") + 1
    events, pos = [], offset
    for raw in data[:end].split(b"\n")[:-1]:
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("op") not in OPS or not isinstance(event.get("args"), dict):
            raise WorkbenchError(f"{path}: byte {pos}: not a journal event: {raw[:80]!r}")
        events.append((pos, event))
        pos += len(raw) + 1
    return events, offset + end


def apply_event(store: RunStore, event: dict[str, Any]) -> None:
    """Apply one journal event to ``store`` with the RunStore method it names.

    Raises:
        WorkbenchError: the store refuses it (e.g. no such run).
    """
    op, args = event["op"], dict(event["args"])
    if op == "update_run":
        fields = {k: v for k, v in args.pop("fields").items() if k in JOURNAL_RUN_FIELDS}
        store.update_run(args["run_id"], **fields)
    else:
        getattr(store, op)(**args)


def ingest(store: RunStore, run_id: str, run_dir: str | Path) -> int:
    """Apply the new complete lines of ``run_dir/journal.jsonl`` to ``store`` (runs.db), together
    with the new offset, in one transaction. Idempotent: lines already applied are skipped by offset.

    Returns:
        The number of events applied (0 when nothing is new, or no journal exists yet).

    Raises:
        WorkbenchError: an unreadable or replaced journal, a line that is not an event or names
        another run (one line naming the file and byte offset); nothing of the batch is applied.
    """
    path = Path(run_dir) / JOURNAL
    offset = store.journal_offset(run_id)
    events, end = read_lines(path, offset)
    if not events:
        return 0
    with store.transaction():
        for pos, event in events:
            if event["args"].get("run_id") != run_id:
                raise WorkbenchError(f"{path}: byte {pos}: an event of run {event['args'].get('run_id')}, not {run_id}")
            apply_event(store, event)
        store.set_journal_offset(run_id, end, len(events))
    return len(events)


class JournalStore(RunStore):
    """The store of a trainer on a host that must not open runs.db (see the module's docstring).

    Args:
        run_dir: the run folder on the shared file system, holding ``run.json`` (written by
            :func:`write_snapshot`) and, after a first attempt, ``journal.jsonl``.

    Writes (``update_run``, ``log_metrics``, ``delete_metrics``, ``add_artifact``) are appended to the
    journal (flushed; fsync'ed when they change the run's row) and applied to the in-memory copy;
    reads come from that copy. ``self.path`` names the journal, so errors name the file.

    Raises:
        WorkbenchError: no readable snapshot in ``run_dir``; the journal cannot be read or opened.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir_path = Path(run_dir).expanduser().resolve()
        super().__init__(":memory:")
        snap_path = self.run_dir_path / SNAPSHOT
        try:
            snapshot = json.loads(snap_path.read_text())
            run = snapshot["run"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WorkbenchError(f"{snap_path}: no readable run snapshot ({exc})") from None
        self.run_id = run["id"]
        with self.conn:
            cols = [c for c in run if c in _RUN_COLUMNS]
            self.conn.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", [run[c] for c in cols]
            )
            self.conn.executemany(
                f"INSERT INTO label_decisions ({', '.join(LABEL_DECISION_COLUMNS)}) VALUES "
                f"({', '.join('?' for _ in LABEL_DECISION_COLUMNS)})",
                snapshot.get("label_decisions", []),
            )
            self.conn.executemany(
                f"INSERT INTO label_issues ({', '.join(LABEL_ISSUE_COLUMNS)}) VALUES "
                f"({', '.join('?' for _ in LABEL_ISSUE_COLUMNS)})",
                snapshot.get("label_issues", []),
            )
        self.path = str(self.run_dir_path / JOURNAL)
        events, end = read_lines(Path(self.path))
        since = int(snapshot.get("journal_offset") or 0)
        for pos, event in events:
            if event["op"] != "update_run" or pos >= since:  # older row updates: the snapshot's row wins
                apply_event(super(), event)
        try:
            if Path(self.path).exists() and os.path.getsize(self.path) > end:
                # the torn last line of a killed attempt: never complete, never ingested; cut it off
                os.truncate(self.path, end)
            self._fh = open(self.path, "ab")
        except OSError as exc:
            raise WorkbenchError(f"{self.path}: cannot open the journal ({exc.strerror or exc})") from None

    #: this store reports from another host: it never decides other runs' statuses
    remote = True

    def _append(self, op: str, sync: bool = False, **args: Any) -> None:
        line = json.dumps({"op": op, "args": args}, default=str, sort_keys=True).encode() + b"\n"
        try:
            self._fh.write(line)
            self._fh.flush()
            if sync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            raise WorkbenchError(f"{self.path}: cannot append to the journal ({exc.strerror or exc})") from None

    def create_run(self, *args: Any, **kwargs: Any) -> str:
        """Refused: a run on another host is created by the workbench that submitted it.

        Raises:
            WorkbenchError: always.
        """
        raise WorkbenchError(f"{self.path}: a run on another host cannot create runs (submit it from the workbench)")

    def update_run(self, run_id: str, **fields: Any) -> None:
        """:meth:`RunStore.update_run`, journalled (host-local columns are kept out of the journal)."""
        shared = {k: v for k, v in fields.items() if k in JOURNAL_RUN_FIELDS}
        super().update_run(run_id, **fields)
        if shared:
            self._append("update_run", sync=True, run_id=run_id, fields=shared)

    def log_metrics(self, run_id: str, rows) -> int:
        """:meth:`RunStore.log_metrics`, journalled with each row's time filled in."""
        t = time.time()
        rows = [{**r, "time": float(r.get("time", t))} for r in rows]
        n = super().log_metrics(run_id, rows)
        if rows:
            self._append("log_metrics", run_id=run_id, rows=rows)
        return n

    def delete_metrics(self, run_id: str, **filters: Any) -> int:
        """:meth:`RunStore.delete_metrics`, journalled."""
        n = super().delete_metrics(run_id, **filters)
        self._append("delete_metrics", run_id=run_id, **filters)
        return n

    def add_artifact(self, run_id: str, kind: str, path, fold: int = -1, time: str | None = None) -> None:
        """:meth:`RunStore.add_artifact`, journalled with its time filled in."""
        time = time or now_iso()
        super().add_artifact(run_id, kind, path, fold=fold, time=time)
        self._append("add_artifact", run_id=run_id, kind=kind, path=str(path), fold=fold, time=time)

    def close(self) -> None:
        """Close the journal and the in-memory copy."""
        try:
            self._fh.close()
        finally:
            super().close()


#: the runs table's columns (a snapshot's row may come from a newer or older schema)
_RUN_COLUMNS = frozenset(c for c, _ in TABLES["runs"])
