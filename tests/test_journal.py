"""The append-only journal of runs on other hosts (core.runs.journal): the same rows as runs.db
written directly, idempotent ingest by offset, torn lines, bad lines, the submission snapshot."""

from __future__ import annotations

import json
import sqlite3

import pytest

from core.errors import WorkbenchError
from core.runs.journal import JOURNAL, JournalStore, ingest, write_snapshot
from core.runs.store import RunStore, Status


def _writes(store, run_id: str, run_dir) -> None:
    """What a trainer does to its store, in order (claim, metrics, a resume's deletes, artifacts, end)."""
    store.update_run(run_id, status=Status.RUNNING, pid=4242, process_start_time=1.5, host="node7", started="t0")
    store.log_metrics(run_id, [{"name": "train/loss", "value": 0.9, "fold": 0, "step": s} for s in range(1, 6)])
    store.log_metrics(run_id, [{"name": "eval/ndcg", "value": 0.8, "fold": 0, "step": 5, "epoch": 1.0}])
    store.delete_metrics(run_id, fold=0, after_step=3)
    store.log_metrics(run_id, [{"name": "train/loss", "value": 0.7, "fold": 0, "step": 4, "time": 123.0}])
    store.add_artifact(run_id, "oof", run_dir / "fold0" / "oof.parquet", fold=0)
    store.update_run(run_id, status=Status.FINISHED, ended="t1", exit_code=0)


def _rows(db_path, run_id: str) -> dict:
    conn = sqlite3.connect(db_path)
    try:
        return {
            "metrics": conn.execute(
                "SELECT fold, step, epoch, name, value, time FROM metrics WHERE run_id = ? ORDER BY rowid", [run_id]
            ).fetchall(),
            "artifacts": conn.execute(
                "SELECT fold, kind, path, time FROM artifacts WHERE run_id = ? ORDER BY rowid", [run_id]
            ).fetchall(),
            "run": conn.execute(
                "SELECT status, host, started, ended, exit_code, pid FROM runs WHERE id = ?", [run_id]
            ).fetchone(),
        }
    finally:
        conn.close()


@pytest.fixture()
def submitted(tmp_path):
    """runs.db with one queued run and its folder holding the submission snapshot."""
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create_run("remote", {"data": {"task": 1}, "model": {"name": "m"}})
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    store.update_run(run_id, run_dir=str(run_dir), backend="slurm")
    write_snapshot(store, run_id, run_dir)
    return store, run_id, run_dir


def test_journal_gives_the_rows_runs_db_gets_directly(submitted, tmp_path):
    store, run_id, run_dir = submitted
    remote = JournalStore(run_dir)
    _writes(remote, run_id, run_dir)
    remote.close()
    assert ingest(store, run_id, run_dir) == 7
    # the same writes straight into another runs.db, with the times the journal recorded
    direct = RunStore(tmp_path / "direct.db")
    direct.create_run("remote", {"data": {"task": 1}, "model": {"name": "m"}}, run_id=run_id)
    events = [json.loads(line) for line in (run_dir / JOURNAL).read_text().splitlines()]
    times = iter(a["args"].get("time") for a in events if a["op"] == "add_artifact")
    metric_times = iter(r["time"] for a in events if a["op"] == "log_metrics" for r in a["args"]["rows"])
    direct.update_run(run_id, status=Status.RUNNING, host="node7", started="t0")
    direct.log_metrics(
        run_id,
        [{"name": "train/loss", "value": 0.9, "fold": 0, "step": s, "time": next(metric_times)} for s in range(1, 6)],
    )
    direct.log_metrics(
        run_id, [{"name": "eval/ndcg", "value": 0.8, "fold": 0, "step": 5, "epoch": 1.0, "time": next(metric_times)}]
    )
    direct.delete_metrics(run_id, fold=0, after_step=3)
    direct.log_metrics(run_id, [{"name": "train/loss", "value": 0.7, "fold": 0, "step": 4, "time": 123.0}])
    direct.add_artifact(run_id, "oof", run_dir / "fold0" / "oof.parquet", fold=0, time=next(times))
    direct.update_run(run_id, status=Status.FINISHED, ended="t1", exit_code=0)
    got, want = _rows(store.path, run_id), _rows(direct.path, run_id)
    assert got == want
    assert [m[1] for m in got["metrics"] if m[3] == "train/loss"] == [1, 2, 3, 4]
    assert got["run"] == ("finished", "node7", "t0", "t1", 0, None)  # the remote pid never reaches runs.db


def test_ingest_is_idempotent_and_incremental(submitted):
    store, run_id, run_dir = submitted
    remote = JournalStore(run_dir)
    remote.log_metrics(run_id, [{"name": "train/loss", "value": 1.0, "step": 1}])
    assert ingest(store, run_id, run_dir) == 1
    assert ingest(store, run_id, run_dir) == 0
    remote.log_metrics(run_id, [{"name": "train/loss", "value": 0.5, "step": 2}])
    assert ingest(store, run_id, run_dir) == 1
    assert ingest(store, run_id, run_dir) == 0
    assert [m["step"] for m in store.metrics(run_id)] == [1, 2]
    # a second workbench connection on the same file sees the offset too
    assert ingest(RunStore(store.path), run_id, run_dir) == 0


def test_a_torn_last_line_waits_until_it_is_complete(submitted):
    store, run_id, run_dir = submitted
    line = json.dumps({"op": "log_metrics", "args": {"run_id": run_id, "rows": [{"name": "x", "value": 1.0}]}})
    with open(run_dir / JOURNAL, "w") as fh:
        fh.write(line + "\n" + line[:17])
    assert ingest(store, run_id, run_dir) == 1
    with open(run_dir / JOURNAL, "a") as fh:
        fh.write(line[17:] + "\n")
    assert ingest(store, run_id, run_dir) == 1
    assert len(store.metrics(run_id)) == 2


def test_a_new_attempt_cuts_off_the_torn_line_of_a_killed_one(submitted):
    store, run_id, run_dir = submitted
    remote = JournalStore(run_dir)
    remote.log_metrics(run_id, [{"name": "train/loss", "value": 1.0, "step": 1}])
    remote.close()
    with open(run_dir / JOURNAL, "a") as fh:
        fh.write('{"op": "log_metrics", "args": {"run_id"')  # killed mid-line
    again = JournalStore(run_dir)
    assert [m["step"] for m in again.metrics(run_id)] == [1]  # the mirror replays the complete lines
    again.log_metrics(run_id, [{"name": "train/loss", "value": 0.5, "step": 2}])
    again.close()
    assert ingest(store, run_id, run_dir) == 2
    assert [m["step"] for m in store.metrics(run_id)] == [1, 2]


def test_a_bad_line_applies_nothing_of_its_batch_and_names_the_file(submitted):
    store, run_id, run_dir = submitted
    good = json.dumps({"op": "log_metrics", "args": {"run_id": run_id, "rows": [{"name": "x", "value": 1.0}]}})
    (run_dir / JOURNAL).write_text(good + "\nnot json\n")
    with pytest.raises(WorkbenchError, match=rf"{JOURNAL}: byte {len(good) + 1}: not a journal event"):
        ingest(store, run_id, run_dir)
    assert store.metrics(run_id) == [] and store.journal_offset(run_id) == 0
    other = json.dumps({"op": "log_metrics", "args": {"run_id": "someone-else", "rows": []}})
    (run_dir / JOURNAL).write_text(good + "\n" + other + "\n")
    with pytest.raises(WorkbenchError, match="an event of run someone-else"):
        ingest(store, run_id, run_dir)
    assert store.metrics(run_id) == []


def test_a_replaced_journal_is_refused(submitted):
    store, run_id, run_dir = submitted
    remote = JournalStore(run_dir)
    remote.log_metrics(run_id, [{"name": "x", "value": 1.0}] * 3)
    remote.close()
    ingest(store, run_id, run_dir)
    (run_dir / JOURNAL).write_text("")
    with pytest.raises(WorkbenchError, match="already ingested"):
        ingest(store, run_id, run_dir)


def test_the_remote_store_reads_the_snapshot_row_and_refuses_to_create_runs(submitted):
    store, run_id, run_dir = submitted
    remote = JournalStore(run_dir)
    remote.update_run(run_id, status=Status.STOPPED)  # an earlier job's end ...
    remote.close()
    write_snapshot(store, run_id, run_dir)  # ... then the workbench resubmits (queued again)
    again = JournalStore(run_dir)
    assert again.get_run(run_id)["status"] == Status.QUEUED
    assert again.get_run(run_id)["backend"] == "slurm"
    again.update_run(run_id, status=Status.QUEUED, error=None)  # a supervisor's requeue in this job
    again.close()
    assert JournalStore(run_dir).get_run(run_id)["status"] == Status.QUEUED
    with pytest.raises(WorkbenchError, match="cannot create runs"):
        JournalStore(run_dir).create_run("x", {})
    assert JournalStore(run_dir).remote


def test_the_snapshot_carries_the_label_decisions_a_run_reads(submitted):
    store, run_id, run_dir = submitted
    store.add_label_decision(run_id, 17, "relabel", "S", "me")
    write_snapshot(store, run_id, run_dir)
    assert JournalStore(run_dir).label_decisions() == store.label_decisions()


def test_no_snapshot_is_one_line(tmp_path):
    with pytest.raises(WorkbenchError, match=r"run\.json: no readable run snapshot"):
        JournalStore(tmp_path)
