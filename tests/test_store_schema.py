"""runs.db's schema owned by core.runs.store: versioning, migration of old files, typed records, the
"best, not last" rule (RunStore.best_values), and the label/ensemble tables behind the store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from core.errors import WorkbenchError
from core.runs.store import (
    ACTIVE,
    FINAL,
    LABEL_DECISION_COLUMNS,
    LABEL_ISSUE_COLUMNS,
    RESUMABLE,
    SCHEMA_VERSION,
    TABLES,
    RunRecord,
    RunStore,
    Status,
)

#: a runs.db as the code before the schema was versioned made it (user_version 0): the tables
#: runs/metrics/artifacts by RunStore (sqlite-utils), label_issues/label_decisions by core.cleaning.labels
#: and ensembles by core.scoring.ensemble, each when first used; dumped from that code with one row each
V0_CORE = """
CREATE TABLE "runs" (
   "id" TEXT PRIMARY KEY, "name" TEXT, "status" TEXT, "task" INTEGER, "model" TEXT, "config" TEXT,
   "pid" INTEGER, "process_start_time" REAL, "host" TEXT, "created" TEXT, "started" TEXT, "ended" TEXT,
   "exit_code" INTEGER, "git_commit" TEXT, "run_dir" TEXT, "error" TEXT
);
INSERT INTO "runs" VALUES('20250101-000000-aaaa','old','finished',1,NULL,
  '{"data": {"task": 1}, "train": {"epochs": 1, "folds": 2}}',NULL,NULL,'vm','2025-01-01T00:00:00+00:00',
  NULL,NULL,NULL,'8c6719c','runs/r1',NULL);
CREATE TABLE "metrics" (
   "run_id" TEXT, "fold" INTEGER, "step" INTEGER, "epoch" REAL, "name" TEXT, "value" REAL, "time" REAL
);
INSERT INTO "metrics" VALUES('20250101-000000-aaaa',0,1,NULL,'eval/ndcg',0.8,1.0);
INSERT INTO "metrics" VALUES('20250101-000000-aaaa',0,2,NULL,'eval/ndcg',0.7,2.0);
INSERT INTO "metrics" VALUES('20250101-000000-aaaa',0,NULL,NULL,'fold/done',1.0,3.0);
INSERT INTO "metrics" VALUES('20250101-000000-aaaa',-1,NULL,NULL,'cv/ndcg',0.81,4.0);
CREATE TABLE "artifacts" ("run_id" TEXT, "fold" INTEGER, "kind" TEXT, "path" TEXT, "time" TEXT);
INSERT INTO "artifacts" VALUES('20250101-000000-aaaa',-1,'oof','runs/r1/oof.parquet','2025-01-01T00:00:00+00:00');
CREATE INDEX "idx_metrics_run_id_name" ON "metrics" ("run_id", "name");
CREATE INDEX "idx_metrics_name_run" ON "metrics" ("name", "run_id", "fold", "value");
CREATE INDEX "idx_artifacts_run_id" ON "artifacts" ("run_id");
"""
V0_LABELS_ENSEMBLES = """
CREATE TABLE "label_issues" (
   "run_id" TEXT, "example_id" INTEGER, "given_label" TEXT, "suggested_label" TEXT, "label_quality" REAL,
   "rank" INTEGER
);
INSERT INTO "label_issues" VALUES('20250101-000000-aaaa',11,'E','I',0.1,1);
INSERT INTO "label_issues" VALUES('20250101-000000-aaaa',12,'S','E',0.2,2);
CREATE TABLE "label_decisions" (
   "id" INTEGER PRIMARY KEY, "example_id" INTEGER, "decision" TEXT, "new_label" TEXT, "reviewer" TEXT,
   "time" TEXT, "source_run" TEXT
);
INSERT INTO "label_decisions" VALUES(1,11,'drop',NULL,'ann','2025-01-01T00:00:00+00:00','20250101-000000-aaaa');
CREATE INDEX "idx_label_issues_run_id_rank" ON "label_issues" ("run_id", "rank");
CREATE INDEX "idx_label_decisions_source_run_id" ON "label_decisions" ("source_run", "id");
CREATE TABLE ensembles (name TEXT PRIMARY KEY, created TEXT, tasks TEXT, members TEXT, manifest TEXT, dir TEXT);
INSERT INTO "ensembles" VALUES('ens1','2025-01-01T00:00:00+00:00','1','[{"name": "a"}]',
  '{"tasks": {"1": {}}, "members": [{"name": "a"}]}','/tmp/ens1');
"""
RID = "20250101-000000-aaaa"


def _old_db(path: Path, script: str) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.close()
    return path


def _schema(path: Path) -> dict[str, list[str]]:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    finally:
        conn.close()


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_a_new_file_gets_every_table_and_the_version(tmp_path):
    RunStore(tmp_path / "runs.db").close()
    assert _version(tmp_path / "runs.db") == SCHEMA_VERSION >= 1
    assert _schema(tmp_path / "runs.db") == {t: [c for c, _ in cols] for t, cols in sorted(TABLES.items())}


@pytest.mark.parametrize("script", [V0_CORE, V0_CORE + V0_LABELS_ENSEMBLES], ids=["core-only", "with-labels"])
def test_a_version_0_file_is_migrated_and_keeps_its_rows(tmp_path, script):
    db = _old_db(tmp_path / "runs.db", script)
    assert _version(db) == 0
    # a reader does not migrate, and reads the tables an old file lacks as empty
    ro = RunStore(db, readonly=True)
    assert ro.get_run(RID)["name"] == "old"
    if "label_issues" not in script:
        assert ro.label_issues(RID) == [] and ro.label_decisions() == [] and ro.runs_with_issues() == []
        assert ro.ensembles() == []
    ro.close()
    assert _version(db) == 0

    store = RunStore(db)  # a writer migrates
    assert _version(db) == SCHEMA_VERSION
    assert _schema(db) == {t: [c for c, _ in cols] for t, cols in sorted(TABLES.items())}
    run = store.get_record(RID)
    assert (run.status, run.n_folds, run.epochs, run.data) == (Status.FINISHED, 2, 1.0, {"task": 1})
    assert run.run_dir == (tmp_path / "runs" / "r1")  # relative in the old row: resolved from the db's folder
    assert [m["name"] for m in store.metrics(RID)] == ["eval/ndcg", "eval/ndcg", "fold/done", "cv/ndcg"]
    assert store.artifacts(RID)[0]["path"] == str(tmp_path / "runs" / "r1" / "oof.parquet")
    assert store.best_values() == {RID: {"ndcg": 0.81}}
    if "label_issues" in script:
        assert [r[1] for r in store.label_issues(RID)] == [11, 12]
        assert store.label_decisions(RID) == [(1, 11, "drop", None, "ann", "2025-01-01T00:00:00+00:00", RID)]
        assert [e["name"] for e in store.ensembles()] == ["ens1"]
        assert store.runs_with_issues() == [{"run_id": RID, "n_issues": 2, "decided": 1}]
    # the migrated file takes the new writes
    store.replace_label_issues(RID, [(RID, 13, "C", "E", 0.05, 1)])
    assert store.add_label_decision(RID, 13, "keep", None, "bob") >= 1
    store.put_ensemble("ens2", "1", "[]", "{}", "/tmp/ens2")
    assert [r[1] for r in store.label_issues(RID)] == [13]
    assert {e["name"] for e in store.ensembles()} == {"ens2"} | ({"ens1"} if "label_issues" in script else set())
    store.close()
    RunStore(db).close()  # opening a current file again changes nothing
    assert _version(db) == SCHEMA_VERSION


def test_a_missing_column_is_added_by_the_migration(tmp_path):
    db = _old_db(
        tmp_path / "runs.db", V0_CORE.replace(', "error" TEXT', "").replace(",'runs/r1',NULL);", ",'runs/r1');")
    )
    store = RunStore(db)
    assert store.get_run(RID)["error"] is None
    store.update_run(RID, error="boom")
    assert store.get_record(RID).error == "boom"


def test_a_file_from_a_newer_workbench_is_refused_by_a_writer(tmp_path):
    db = _old_db(tmp_path / "runs.db", V0_CORE + f"PRAGMA user_version = {SCHEMA_VERSION + 1};")
    with pytest.raises(WorkbenchError, match="newer than this workbench"):
        RunStore(db)
    RunStore(db, readonly=True).close()


def test_a_version_2_file_gets_the_sweep_columns(tmp_path):
    db = _old_db(tmp_path / "runs.db", V0_CORE)
    RunStore(db).close()
    conn = sqlite3.connect(db)  # back to version 2: no sweep columns, no index on them
    conn.executescript(
        'DROP INDEX "idx_runs_sweep_trial"; ALTER TABLE runs DROP COLUMN sweep; ALTER TABLE runs DROP COLUMN trial;'
        "PRAGMA user_version = 2;"
    )
    conn.close()
    assert "sweep" not in _schema(db)["runs"]
    store = RunStore(db)
    assert _version(db) == SCHEMA_VERSION >= 3
    assert _schema(db)["runs"][-2:] == ["sweep", "trial"]
    rec = store.get_record(RID)
    assert (rec.sweep, rec.trial, rec.status) == (None, None, Status.FINISHED)
    rid = store.create_run("t", {"train": {"folds": 2}})
    store.set_sweep_trial(rid, "sw", 4)
    assert (store.get_record(rid).sweep, store.get_record(rid).trial) == ("sw", 4)
    assert [r.id for r in store.sweep_runs("sw")] == [rid] and store.sweeps() == {"sw": 1}
    store.update_run(rid, status=Status.STOPPED, exit_code=143)
    assert store.mark_pruned(rid, "pruned at fold 0") == Status.PRUNED
    rec = store.get_record(rid)
    assert (rec.status, rec.exit_code, rec.error, rec.active) == (Status.PRUNED, 143, "pruned at fold 0", False)
    assert store.mark_pruned(RID) == Status.FINISHED  # a finished run keeps its end


def _indexes(path: Path) -> dict[str, list[str]]:
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")]
        return {n: [r[2] for r in conn.execute(f'PRAGMA index_info("{n}")')] for n in names}
    finally:
        conn.close()


def test_a_version_3_file_gets_the_runs_list_indexes(tmp_path):
    db = _old_db(tmp_path / "runs.db", V0_CORE)
    RunStore(db).close()
    conn = sqlite3.connect(db)  # back to version 3: the runs table without the list's indexes
    conn.executescript('DROP INDEX "idx_runs_list"; DROP INDEX "idx_runs_status"; PRAGMA user_version = 3;')
    conn.close()
    assert "idx_runs_list" not in _indexes(db) and "idx_runs_status" not in _indexes(db)
    RunStore(db, readonly=True).close()  # a reader does not migrate
    assert _version(db) == 3 and "idx_runs_list" not in _indexes(db)
    store = RunStore(db)
    assert _version(db) == SCHEMA_VERSION == 4
    idx = _indexes(db)
    assert idx["idx_runs_list"] == ["created", "id", "name", "status", "model", "task", "backend"]
    assert idx["idx_runs_status"] == ["status"]
    assert store.get_run(RID)["name"] == "old" and store.count_runs() == 1  # rows kept
    # the list's queries use them: newest first from the covering index, the active runs by status
    plan = " ".join(
        str(r) for r in store.conn.execute("EXPLAIN QUERY PLAN SELECT id FROM runs ORDER BY created DESC, id DESC")
    )
    assert "COVERING INDEX idx_runs_list" in plan
    plan = " ".join(
        str(r) for r in store.conn.execute("EXPLAIN QUERY PLAN SELECT * FROM runs WHERE status = 'running'")
    )
    assert "idx_runs_status" in plan
    assert [r[0] for r in store.run_index([("name", "OL")], ())] == [RID]


def test_status_groups():
    assert [str(s) for s in Status] == [
        "queued",
        "running",
        "finished",
        "partial",
        "failed",
        "stopped",
        "crashed",
        "pruned",
    ]
    assert ACTIVE == ("queued", "running")
    assert FINAL == ("finished", "partial", "failed", "stopped", "crashed", "pruned")
    assert RESUMABLE == ("crashed", "stopped", "failed", "partial")
    assert set(ACTIVE) | set(FINAL) == set(Status) and not set(ACTIVE) & set(FINAL)
    assert Status.RUNNING == "running" and f"{Status.CRASHED}" == "crashed"


def test_run_record(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    rid = store.create_run("r", {"data": {"dir": "d", "task": 2}, "train": {"folds": 3}}, run_dir=str(tmp_path / "x"))
    rec = store.get_record(rid[:12])
    assert (rec.id, rec.name, rec.status, rec.task, rec.n_folds, rec.epochs, rec.kind) == (
        rid,
        "r",
        Status.QUEUED,
        2,
        3,
        1.0,
        "train",
    )
    assert rec.run_dir == tmp_path / "x" and rec.active
    with pytest.raises(AttributeError):
        rec.status = Status.RUNNING  # frozen
    store.update_run(rid, status=Status.RUNNING, config=json.dumps({"kind": "pretrain"}))
    assert [r.id for r in store.list_records()] == [rid]
    assert store.get_record(rid).kind == "pretrain" and store.get_record(rid).n_folds is None
    assert [r["id"] for r in store.active_runs()] == [rid]
    store.update_run(rid, config="{not json")
    with pytest.raises(WorkbenchError, match="unreadable config"):
        store.get_record(rid)


def test_best_values_best_not_last(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    a, b, c = (store.create_run(n, {}) for n in "abc")
    store.log_metrics(
        a,
        [{"name": "eval/ndcg", "value": v, "fold": f} for f, v in ((0, 0.7), (0, 0.9), (0, 0.8), (1, 0.5))]
        + [{"name": "eval/task2_f1", "value": 0.4, "fold": 0}],
    )
    store.log_metrics(
        b,
        [
            {"name": "eval/ndcg", "value": 0.9, "fold": 0},
            {"name": "cv/ndcg", "value": 0.6, "fold": -1},
            {"name": "cv/final_ndcg", "value": 0.65, "fold": -1},
            {"name": "eval/ndcg", "value": 0.99, "fold": -1},
        ],
    )  # run-level eval rows: ignored
    store.log_metrics(c, [{"name": "train/loss", "value": 1.0, "fold": 0}])
    assert store.best_values() == {
        a: {"ndcg": pytest.approx(0.7), "task2_f1": 0.4},
        b: {"ndcg": 0.6, "final_ndcg": 0.65},
    }
    assert store.best_values([b], ["final_ndcg"]) == {b: {"final_ndcg": 0.65}}
    assert store.best_values([]) == {}
    rows = {r["id"]: r for r in store.list_runs()}
    assert rows[a]["best_ndcg"] == pytest.approx(0.7) and rows[b]["best_final_ndcg"] == 0.65
    assert rows[c]["best_ndcg"] is None and rows[c]["folds_done"] == 0


def test_label_and_ensemble_rows_round_trip(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    rid = store.create_run("r", {})
    store.replace_label_issues(rid, [(rid, 5, "E", "I", 0.1, 1), (rid, 6, "S", "E", 0.3, 2)])
    assert [dict(zip(LABEL_ISSUE_COLUMNS, r))["example_id"] for r in store.label_issues(rid)] == [5, 6]
    i1 = store.add_label_decision(rid, 5, "relabel", "C", "ann")
    i2 = store.add_label_decision("other", 6, "drop", None, "ann")
    assert [dict(zip(LABEL_DECISION_COLUMNS, r))["id"] for r in store.label_decisions()] == [i1, i2]
    assert [r[0] for r in store.label_decisions(rid)] == [i1]
    assert store.runs_with_issues() == [{"run_id": rid, "n_issues": 2, "decided": 1}]
    store.put_ensemble("e", "1,2", "[]", '{"x": 1}', "/out/e")
    store.put_ensemble("e", "1", "[]", '{"x": 2}', "/out/e")  # a rebuild replaces the row
    assert [(e["name"], e["tasks"], e["manifest"]) for e in store.ensembles()] == [("e", "1", '{"x": 2}')]


def test_record_from_a_list_runs_row(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    store.create_run("r", {"train": {"folds": 4, "epochs": 2}})
    row = store.list_runs()[0]
    assert row["n_folds"] == 4
    rec = RunRecord.from_row(row)
    assert (rec.n_folds, rec.epochs) == (4, 2.0)
