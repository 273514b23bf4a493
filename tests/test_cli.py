"""The CLI through typer's CliRunner, bad input through the real entry point, and the
detached-process lifecycle (launch, stop, crash detection)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from conftest import tiny_config as _config
from core.runs.store import RunStore
from workbench import cli
from workbench.cli import app

runner = CliRunner()
cli.console.width = 200  # tables as on a wide terminal


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory, small_dataset, tiny_bert):
    tmp = tmp_path_factory.mktemp("cli")
    db = str(tmp / "runs.db")
    res = runner.invoke(app, ["train", _config(tmp, small_dataset, tiny_bert), "--db", db, "--set", "train.seed=3"])
    assert res.exit_code == 0, res.output
    run_id = RunStore(db).list_runs()[0]["id"]
    return db, run_id


def test_train_list_show_evaluate(trained_db):
    db, run_id = trained_db
    res = runner.invoke(app, ["runs", "list", "--json", "--db", db])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert rows[0]["id"] == run_id and rows[0]["status"] == "finished"
    assert rows[0]["config"]["train"]["seed"] == 3  # the --set override was applied and saved
    assert 0 < rows[0]["best_ndcg"] <= 1
    res = runner.invoke(app, ["runs", "list", "--db", db])
    assert res.exit_code == 0 and "finished" in res.output
    res = runner.invoke(app, ["runs", "show", run_id[:17], "--db", db])
    assert res.exit_code == 0 and "oof" in res.output and "folds" in res.output
    res = runner.invoke(app, ["evaluate", run_id, "--db", db])
    assert res.exit_code == 0, res.output
    assert f"{rows[0]['best_ndcg']:.3f}" in res.output  # recomputed from oof.parquet = logged CV


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_bad_input_one_line_error_and_exit_code(tmp_path):
    res = _cli("data", "check", str(tmp_path / "nowhere"))
    assert res.returncode == 2
    assert "nowhere" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cli("train", str(tmp_path / "missing.yaml"), "--db", str(tmp_path / "r.db"))
    assert res.returncode == 2 and "config file not found" in res.stderr
    res = _cli("runs", "show", "nope", "--db", str(tmp_path / "r.db"))
    assert res.returncode == 2 and "no run nope" in res.stderr


def _wait(pred, timeout=90.0):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        time.sleep(0.3)
    return False


def test_launch_detached_then_stop_leaves_no_process(tmp_path, small_dataset, tiny_bert):
    db = str(tmp_path / "runs.db")
    cfg = _config(tmp_path, small_dataset, tiny_bert, epochs=200)  # long enough to be stopped
    res = runner.invoke(app, ["launch", cfg, "--db", db])
    assert res.exit_code == 0, res.output
    run_id = res.output.strip().splitlines()[0]
    store = RunStore(db)
    assert _wait(lambda: store.get_run(run_id)["status"] == "running"), open(
        tmp_path / "runs" / run_id / "console.log"
    ).read()
    run = store.get_run(run_id)
    proc = psutil.Process(run["pid"])
    assert os.getpgid(proc.pid) == proc.pid  # its own process group / session
    assert os.getsid(proc.pid) != os.getsid(0)
    assert _wait(lambda: len(store.metrics(run_id, ["train/loss"])) > 0), _console(tmp_path, run_id)  # its own metrics
    group = [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    res = runner.invoke(app, ["stop", run_id, "--db", db, "--grace", "20"])
    assert res.exit_code == 0 and "stopped" in res.output, res.output + _console(tmp_path, run_id)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in group)
    run = store.get_run(run_id)
    assert run["status"] == "stopped" and run["exit_code"] == 143, _console(tmp_path, run_id)  # marked itself


def _launch_running(tmp_path, small_dataset, tiny_bert):
    """Launch a long tiny training detached; wait until it runs. Returns (db path, store, run id)."""
    db = str(tmp_path / "runs.db")
    cfg = _config(tmp_path, small_dataset, tiny_bert, epochs=200)
    res = runner.invoke(app, ["launch", cfg, "--db", db])
    assert res.exit_code == 0, res.output
    run_id = res.output.strip().splitlines()[0]
    store = RunStore(db)
    assert _wait(lambda: store.get_run(run_id)["status"] == "running"), _console(tmp_path, run_id)
    return db, store, run_id


def _console(tmp_path, run_id: str) -> str:
    """The detached trainer's stdout/stderr (runs/<id>/console.log), for assertion messages."""
    p = tmp_path / "runs" / run_id / "console.log"
    return p.read_text() if p.exists() else f"(no {p})"


def test_killed_run_is_marked_crashed(tmp_path, small_dataset, tiny_bert):
    db, store, run_id = _launch_running(tmp_path, small_dataset, tiny_bert)
    pid = store.get_run(run_id)["pid"]
    os.killpg(pid, signal.SIGKILL)
    assert _wait(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    res = runner.invoke(app, ["runs", "list", "--json", "--db", db])
    assert json.loads(res.output)[0]["status"] == "crashed"


def test_trainer_killed_by_sigkill_gets_exit_code_from_supervisor(tmp_path, small_dataset, tiny_bert):
    """The OOM-killer case: only the trainer dies by SIGKILL; its supervisor records crashed / 137."""
    db, store, run_id = _launch_running(tmp_path, small_dataset, tiny_bert)
    supervisor = psutil.Process(store.get_run(run_id)["pid"])
    trainer = supervisor.children()[0]
    assert "train" in trainer.cmdline()
    trainer.kill()
    assert _wait(lambda: store.get_run(run_id)["status"] == "crashed"), _console(tmp_path, run_id)
    run = store.get_run(run_id)
    assert run["exit_code"] == 128 + signal.SIGKILL and "137" in run["error"]
    assert _wait(lambda: not psutil.pid_exists(supervisor.pid) or supervisor.status() == psutil.STATUS_ZOMBIE)


def test_relaunch_uses_the_stored_config(tmp_path, small_dataset, tiny_bert):
    from core.runs.launcher import relaunch, stop_run

    db = str(tmp_path / "runs.db")
    cfg = _config(tmp_path, small_dataset, tiny_bert, epochs=200)
    res = runner.invoke(app, ["launch", cfg, "--db", db, "--set", "train.seed=7"])
    first = res.output.strip().splitlines()[0]
    store = RunStore(db)
    second, pid = relaunch(store, first)
    try:
        assert second != first
        a, b = (json.loads(store.get_run(r)["config"]) for r in (first, second))
        assert b == a and b["train"]["seed"] == 7
        assert (tmp_path / "runs" / second / "launch.yaml").is_file()
        assert _wait(lambda: store.get_run(second)["status"] == "running"), _console(tmp_path, second)
        assert _wait(lambda: store.get_run(first)["status"] == "running"), _console(tmp_path, first)
    finally:
        for r in (first, second):
            stop_run(store, r, grace=20)
    assert {store.get_run(r)["status"] for r in (first, second)} == {"stopped"}


def test_a_run_stopped_while_still_starting_is_stopped_not_crashed(tmp_path, small_dataset, tiny_bert):
    """SIGTERM during the trainer's imports (before its own handler): the supervisor writes stopped."""
    from core.runs.launcher import stop_run

    db = str(tmp_path / "runs.db")
    cfg = _config(tmp_path, small_dataset, tiny_bert, epochs=200)
    res = runner.invoke(app, ["launch", cfg, "--db", db])
    run_id = res.output.strip().splitlines()[0]
    store = RunStore(db)
    assert store.get_run(run_id)["status"] == "queued"
    assert stop_run(store, run_id, grace=20) == "stopped"
    assert store.get_run(run_id)["exit_code"] in (143, -9)
