"""Database, path and model-name errors are one line naming the file (issue 12, item 5).

A few go through the real command line (``python -m workbench``: exit 2, one line on stderr);
the rest call the core in-process. Nothing may be created on disk by a refused ``--db``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError, ReadOnlyDatabaseError, WorkbenchError
from core.runs.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("WORKBENCH_DB", None)
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=120,
    )


def _one_line_error(res: subprocess.CompletedProcess, *parts: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return err


def _raises_one_line(exc_type, fn, *parts: str) -> str:
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


def _oof(n_queries: int = 4) -> pd.DataFrame:
    """A small OOF table in the layout of runs/<id>/oof.parquet."""
    rng = np.random.default_rng(0)
    rows = []
    for q in range(n_queries):
        for j, label in enumerate("ESCI"):
            p = rng.dirichlet(np.ones(4))
            rows.append(
                {
                    "example_id": q * 4 + j,
                    "query_id": q,
                    "product_id": f"p{q}-{j}",
                    "esci_label": label,
                    "fold": q % 2,
                    "p_E": p[0],
                    "p_S": p[1],
                    "p_C": p[2],
                    "p_I": p[3],
                    "score": p[0] + 0.1 * p[1] + 0.01 * p[2],
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the command line
def test_not_sqlite_file_is_one_line_for_evaluate_ensemble_and_runs(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("this is a text file, not SQLite\n" * 20)
    for args in (["evaluate", "X"], ["ensemble", "list"], ["runs", "list"]):
        _one_line_error(_cli(*args, "--db", str(bad)), str(bad), "not a database")
    assert bad.read_text().startswith("this is a text file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_db_in_a_missing_folder_is_refused_and_nothing_is_created(tmp_path):
    db = tmp_path / "typo" / "sub" / "runs.db"
    _one_line_error(_cli("runs", "list", "--db", str(db)), str(db), f"folder {db.parent} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_db_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    db = tmp_path / "afile" / "runs.db"
    _one_line_error(_cli("stop", "r1", "--db", str(db)), str(db), f"{tmp_path / 'afile'} is a file, not a folder")


def test_stop_percent_stops_nothing(tmp_path):
    db = tmp_path / "runs.db"
    store = RunStore(db)
    store.create_run("only", {}, run_id="20260101-000000-abcd", status="running")
    store.update_run("20260101-000000-abcd", pid=os.getpid())  # alive: a wildcard match would stop us
    store.close()
    _one_line_error(_cli("stop", "%", "--db", str(db)), "no run %")
    assert RunStore(db, readonly=True).get_run("20260101-000000-abcd")["status"] == "running"


def test_evaluate_reads_an_old_relative_run_dir_from_another_cwd(tmp_path):
    home = tmp_path / "project"
    (home / "runs" / "r-old").mkdir(parents=True)
    _oof().to_parquet(home / "runs" / "r-old" / "oof.parquet", index=False)
    store = RunStore(home / "runs.db")
    store.create_run("old", {}, run_dir="runs/r-old", run_id="r-old", status="finished")  # as older trainers did
    store.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = _cli("evaluate", "r-old", "--db", str(home / "runs.db"), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert str(home / "runs" / "r-old" / "oof.parquet") in "".join(res.stdout.split())  # rich wraps the title
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------- in-process
def test_readonly_open_checks_the_file_at_once(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    _raises_one_line(WorkbenchError, lambda: RunStore(text, readonly=True), str(text), "not a database")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    for ro in (True, False):  # a writer does not add our tables to someone else's database
        _raises_one_line(WorkbenchError, lambda ro=ro: RunStore(other, readonly=ro), str(other), "not a runs database")
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    _raises_one_line(WorkbenchError, lambda: RunStore(empty, readonly=True), str(empty), "not a runs database")
    _raises_one_line(WorkbenchError, lambda: RunStore(tmp_path, readonly=True), str(tmp_path), "is a folder")
    _raises_one_line(WorkbenchError, lambda: RunStore(tmp_path), str(tmp_path), "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.txt", "other.sqlite"]


def test_missing_folder_and_file_parent_create_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    _raises_one_line(WorkbenchError, lambda: RunStore(tmp_path / "no" / "runs.db"), "folder", "does not exist")
    _raises_one_line(
        WorkbenchError, lambda: RunStore(tmp_path / "afile" / "deeper" / "runs.db"), "afile is a file, not a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_default_runs_db_is_still_created_in_an_existing_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORKBENCH_DB", raising=False)
    store = RunStore()
    assert store.path == "runs.db" and (tmp_path / "runs.db").is_file()
    assert store.list_runs() == []


def test_read_only_database_or_folder_is_refused_for_writers(tmp_path, monkeypatch):
    # root bypasses file modes, so the permission answer is injected; the real SQLite error path
    # is exercised in test_sqlite_write_errors_become_one_line
    db = tmp_path / "runs.db"
    RunStore(db).close()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == db and mode == os.W_OK else real_access(p, mode, **k)
    )
    _raises_one_line(ReadOnlyDatabaseError, lambda: RunStore(db), str(db), "read-only")
    assert RunStore(db, readonly=True).list_runs() == []  # readers still open it

    other = tmp_path / "ro"
    other.mkdir()
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == other and mode == os.W_OK else real_access(p, mode, **k)
    )
    _raises_one_line(ReadOnlyDatabaseError, lambda: RunStore(other / "runs.db"), f"folder {other} is not writable")
    assert list(other.iterdir()) == []


def test_reading_commands_fall_back_to_read_only(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from workbench.cli import app

    db = tmp_path / "runs.db"
    store = RunStore(db)
    store.create_run("r", {}, run_id="r1", status="running")
    store.update_run("r1", pid=2**22 + 12345)  # no such process: a writer would mark it crashed
    store.close()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == db and mode == os.W_OK else real_access(p, mode, **k)
    )
    res = CliRunner().invoke(app, ["runs", "list", "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert '"status": "running"' in res.output  # statuses as stored, nothing written


def test_sqlite_write_errors_become_one_line(tmp_path):
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = store.create_run("r", {}, run_id="r1")
    store.conn.execute("PRAGMA query_only = ON")  # SQLite itself refuses writes: SQLITE_READONLY
    for write in (
        lambda: store.create_run("r", {}),
        lambda: store.update_run(run_id, status="finished"),
        lambda: store.log_metrics(run_id, [{"name": "x", "value": 1.0}]),
        lambda: store.add_artifact(run_id, "log", tmp_path / "x.log"),
    ):
        msg = _raises_one_line(
            ReadOnlyDatabaseError, write, str(db), "cannot write the runs database", "readonly database"
        )
    assert not store.conn.in_transaction
    store.conn.execute("PRAGMA query_only = OFF")
    store.update_run(run_id, status="finished")  # the connection is still usable
    assert store.get_run(run_id)["status"] == "finished" and store.metrics(run_id) == []
    assert msg.startswith(str(db))


def test_bug_in_a_query_is_not_disguised(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    with pytest.raises(sqlite3.OperationalError):
        with store._tx() as c:
            c.execute("INSERT INTO no_such_table VALUES (1)")
    assert not store.conn.in_transaction


def test_run_id_prefixes_are_literal(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    store.create_run("a", {}, run_id="20260101-000000-ab_1")
    store.create_run("b", {}, run_id="20260101-000000-abx1")
    for prefix in ("%", "_", "2026%", "20260101-000000-ab%", ""):
        _raises_one_line(WorkbenchError, lambda prefix=prefix: store.get_run(prefix), "no run")
    assert store.get_run("20260101-000000-ab_")["id"] == "20260101-000000-ab_1"
    assert store.get_run("20260101-000000-abx")["id"] == "20260101-000000-abx1"
    _raises_one_line(WorkbenchError, lambda: store.get_run("20260101"), "ambiguous (2 runs)")


def test_runs_show_underscore_says_no_run(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    db = tmp_path / "runs.db"
    RunStore(db).create_run("only", {}, run_id="r1")
    res = CliRunner().invoke(app, ["runs", "show", "_", "--db", str(db)])
    assert res.exit_code != 0 and isinstance(res.exception, WorkbenchError) and "no run _" in str(res.exception)


def test_stored_paths_are_read_as_absolute(tmp_path, monkeypatch):
    home = tmp_path / "project"
    (home / "runs" / "old").mkdir(parents=True)
    store = RunStore(home / "runs.db")
    store.create_run("old", {}, run_dir="runs/old", run_id="old")
    store.add_artifact("old", "log", "runs/old/train.log")
    store.create_run("new", {}, run_dir=str(tmp_path / "abs" / "new"), run_id="new")
    store.create_run("none", {}, run_id="none")
    monkeypatch.chdir(tmp_path)
    assert store.get_run("old")["run_dir"] == str(home / "runs" / "old")
    assert store.run_dir(store.get_run("old")) == home / "runs" / "old"
    assert store.get_run("new")["run_dir"] == str(tmp_path / "abs" / "new")
    assert store.run_dir(store.get_run("none")) is None
    assert {r["id"]: r["run_dir"] for r in store.list_runs()}["old"] == str(home / "runs" / "old")
    assert store.artifacts("old")[0]["path"] == str(home / "runs" / "old" / "train.log")


def test_labels_and_ensemble_find_an_old_relative_run_dir(tmp_path, monkeypatch):
    from core.cleaning.labels import read_oof
    from core.scoring.ensemble import load_members

    home = tmp_path / "project"
    (home / "runs" / "r-old").mkdir(parents=True)
    _oof().to_parquet(home / "runs" / "r-old" / "oof.parquet", index=False)
    store = RunStore(home / "runs.db")
    store.create_run("old", {}, run_dir="runs/r-old", run_id="r-old", status="finished")
    monkeypatch.chdir(tmp_path)
    assert len(read_oof(store, "r-old")[1]) == 16
    assert load_members(store, ["r-old"]).members[0].source == str(home / "runs" / "r-old" / "oof.parquet")


# --------------------------------------------------------------------------- model names
@pytest.fixture
def offline_state(monkeypatch):
    """Restore the process's Hugging Face offline flags after a test that may set them."""
    import huggingface_hub.constants as hf_constants

    import core.modeling.model as model

    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE)
    hub = sys.modules.get("transformers.utils.hub")
    if hub is not None and hasattr(hub, "_is_offline_mode"):
        monkeypatch.setattr(hub, "_is_offline_mode", hub._is_offline_mode)
    monkeypatch.setattr(model, "_hub_reachable", None)
    return model


def test_empty_model_folder_is_one_line_at_once(tmp_path, offline_state):
    from core.modeling.model import load_backbone, load_tokenizer

    (tmp_path / "empty").mkdir()
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    t = time.perf_counter()
    for fn in (load_tokenizer, load_backbone):
        _raises_one_line(
            ConfigError,
            lambda fn=fn: fn(str(tmp_path / "empty")),
            f"model.name={tmp_path / 'empty'}: folder has no config.json (not a Hugging Face model folder)",
        )
    _raises_one_line(ConfigError, lambda: load_tokenizer(str(only_config)), "folder has no tokenizer files")
    _raises_one_line(ConfigError, lambda: load_backbone(str(tmp_path / "missing" / "model")), "no such folder")
    _raises_one_line(ConfigError, lambda: load_backbone("./nope"), "no such folder")
    assert time.perf_counter() - t < 1.0


def test_unknown_hub_name_offline_is_one_line_at_once(offline_state, monkeypatch):
    from core.modeling.model import load_backbone, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    for fn in (load_tokenizer, load_backbone):
        _raises_one_line(
            ConfigError,
            lambda fn=fn: fn("no-such-org/no-such-model-xyz"),
            "model.name=no-such-org/no-such-model-xyz: not a local folder, not in the Hugging Face "
            "cache, and the hub is unreachable (offline",
        )
    assert time.perf_counter() - t < 3.0


def test_unreachable_hub_sets_offline_mode(offline_state, monkeypatch):
    import huggingface_hub.constants as hf_constants

    model = offline_state
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    t = time.perf_counter()
    _raises_one_line(
        ConfigError,
        lambda: model.resolve_model_path("some-org/some-model"),
        "hub is unreachable (offline: cannot connect to 127.0.0.1:9)",
    )
    assert time.perf_counter() - t < 3.0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hf_constants.HF_HUB_OFFLINE is True


def test_minilm_alias_and_local_folders_still_resolve(tiny_bert, offline_state):
    from core.modeling.model import resolve_model_path

    assert Path(resolve_model_path("all-MiniLM-L6-v2"), "config.json").is_file()
    assert resolve_model_path(str(tiny_bert)) == str(tiny_bert)
    assert resolve_model_path(str(tiny_bert), need="tokenizer") == str(tiny_bert)
