"""The Slurm backend against a real single-node Slurm cluster on this machine
(scripts/slurm-local.sh; .ci/run starts it): submit, watch, stop, time limit, requeue and resume.

The job's trainer reports through the run's journal (core.runs.journal), never runs.db; the
workbench ingests it while it watches the job (core.runs.launcher.refresh_statuses)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from core.runs import journal
from core.runs import metric_names as mn
from core.runs.launcher import refresh_statuses
from core.runs.slurm import TERMINAL_STATES
from core.runs.store import RunStore, Status
from slurm_fixture import slurm_cluster  # noqa: F401 - the session fixture
from workbench.cli import app

pytestmark = pytest.mark.usefixtures("slurm_cluster")
runner = CliRunner()
#: metrics that measure time, not the model: they differ between any two runs
TIMING = ("seconds", "per_s", "pairs_s", "time")


def _cli(*args: str) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout.strip()


def _fails(*args: str, env: dict | None = None) -> str:
    """``workbench ARGS`` in a subprocess (the console entry point): exit 2 and one line on stderr."""
    import os
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "workbench", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


def _watch(store: RunStore, run_id: str, until, timeout: float = 240.0) -> list[tuple[str, str]]:
    """Refresh like the app does every second until ``until(row)``; returns the (status, job_state)
    pairs seen, in order (no repeats)."""
    seen: list[tuple[str, str]] = []
    end = time.monotonic() + timeout
    while True:
        refresh_statuses(store)
        row = store.get_run(run_id)
        pair = (row["status"], row["job_state"])
        if not seen or seen[-1] != pair:
            seen.append(pair)
        if until(row):
            return seen
        if time.monotonic() > end:
            log = Path(row["run_dir"]) / f"slurm-{row['job_id']}.out"
            raise AssertionError(f"timed out; seen {seen}; job output:\n{log.read_text() if log.exists() else '-'}")
        time.sleep(0.5)


def _model_rows(store: RunStore, run_id: str) -> list[tuple]:
    return sorted(
        (m["fold"], m["step"] or -1, m["epoch"] or -1, m["name"], round(m["value"], 6))
        for m in store.metrics(run_id)
        if not any(t in m["name"] for t in TIMING)
    )


def test_a_slurm_run_goes_pending_running_completed_with_the_rows_of_a_local_run(tmp_path, small_dataset, tiny_bert):
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, num_threads=1)
    db = str(tmp_path / "runs.db")
    local = _cli("train", cfg, "--db", db).split()[1]
    run_id = _cli("launch", cfg, "--db", db, "--backend", "slurm", "--time", "10")
    store = RunStore(db)
    row = store.get_run(run_id)
    assert row["backend"] == "slurm" and row["job_id"] and row["status"] == Status.QUEUED
    seen = _watch(store, run_id, lambda r: r["job_state"] in TERMINAL_STATES)
    states = [s for _, s in seen]
    assert states[-1] == "COMPLETED" and seen[-1][0] == Status.FINISHED, seen
    assert {"PENDING", "RUNNING"} & set(states[:-1]), seen  # watched before it ended
    row = store.get_run(run_id)
    assert row["node"] == subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert row["pid"] is None and row["exit_code"] == 0
    # the same rows as the run trained here, through the journal (the timings aside)
    assert _model_rows(store, run_id) == _model_rows(store, local)
    assert any(m["name"] == mn.cv_name(mn.NDCG) for m in store.metrics(run_id))
    oof_remote = pd.read_parquet(Path(row["run_dir"]) / "oof.parquet")
    oof_local = pd.read_parquet(Path(store.get_run(local)["run_dir"]) / "oof.parquet")
    pd.testing.assert_frame_equal(oof_remote, oof_local)
    assert {a["kind"] for a in store.artifacts(run_id)} >= {"oof", "config", "log", "slurm"}
    # ingesting again adds nothing
    n = len(store.metrics(run_id))
    assert journal.ingest(store, run_id, row["run_dir"]) == 0
    refresh_statuses(store)
    assert len(store.metrics(run_id)) == n
    shown = _cli("runs", "show", run_id, "--db", db)
    assert f"Slurm job {row['job_id']} COMPLETED" in shown


def _long_config(tmp_path, small_dataset, tiny_bert, **train) -> str:
    return tiny_config(
        tmp_path, small_dataset, tiny_bert, epochs=1000, batch_size=8, num_threads=1, checkpoint_every=50, **train
    )


def _trainers(run_id: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if run_id in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_stop_cancels_the_job_and_the_run_reads_stopped(tmp_path, small_dataset, tiny_bert):
    db = str(tmp_path / "runs.db")
    run_id = _cli("launch", _long_config(tmp_path, small_dataset, tiny_bert), "--db", db, "--backend", "slurm")
    store = RunStore(db)
    _watch(store, run_id, lambda r: any(m["name"] == mn.TRAIN_LOSS for m in store.metrics(run_id)))
    assert _cli("stop", run_id, "--db", db) == Status.STOPPED
    row = store.get_run(run_id)
    assert row["job_state"] == "CANCELLED", row
    _watch(store, run_id, lambda r: not _trainers(run_id), timeout=30)


def test_a_job_past_its_time_limit_reads_crashed_with_the_reason(tmp_path, small_dataset, tiny_bert):
    db = str(tmp_path / "runs.db")
    cfg = _long_config(tmp_path, small_dataset, tiny_bert)
    run_id = _cli("launch", cfg, "--db", db, "--backend", "slurm", "--time", "1", "--no-requeue")
    store = RunStore(db)
    t0 = time.monotonic()
    seen = _watch(store, run_id, lambda r: r["job_state"] in TERMINAL_STATES, timeout=240)
    row = store.get_run(run_id)
    assert row["status"] == Status.CRASHED and row["job_state"] == "TIMEOUT", seen
    assert "TIMEOUT" in row["error"] and "time limit" in row["error"]
    assert time.monotonic() - t0 >= 55


def test_a_signalled_job_checkpoints_requeues_itself_and_resumes(tmp_path, small_dataset, tiny_bert):
    """SIGUSR1 to the batch step is what ``--signal=B:USR1@s`` sends before the time limit; here the
    test sends it (``scancel --signal=USR1 --batch``) once the run has written step checkpoints."""
    db = str(tmp_path / "runs.db")
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, epochs=3, batch_size=8, num_threads=1, checkpoint_every=4)
    run_id = _cli("launch", cfg, "--db", db, "--backend", "slurm")
    store = RunStore(db)
    job = store.get_run(run_id)["job_id"]
    _watch(store, run_id, lambda r: any(m["step"] and m["step"] >= 6 for m in store.metrics(run_id)))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    seen = _watch(store, run_id, lambda r: r["job_state"] in TERMINAL_STATES)
    assert seen[-1][0] == Status.FINISHED, seen
    assert Status.QUEUED in [s for s, _ in seen[1:]], seen  # requeued, then running again
    log = (Path(store.get_run(run_id)["run_dir"]) / "train.log").read_text()
    assert "resumed from resume.pt" in log and "signal 10 received" in log, log[-2000:]
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in out, out
    # nothing logged twice: each (fold, step, name) once
    keys = [(m["fold"], m["step"], m["name"]) for m in store.metrics(run_id) if m["step"] is not None]
    assert len(keys) == len(set(keys))


def test_bad_options_are_refused_before_a_run_row_or_folder_exists(tmp_path, small_dataset, tiny_bert):
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert)
    db = tmp_path / "runs.db"
    for args, message in (
        (["--partition", "nosuch"], "sbatch: invalid partition specified: nosuch"),
        (["--time", "abc"], "slurm time 'abc': not a Slurm time"),
        (["--gpus", "0"], "slurm gpus 0: must be an integer >= 1"),
    ):
        assert message in _fails("launch", cfg, "--db", str(db), "--backend", "slurm", *args)
    assert not (tmp_path / "runs").exists()
    assert RunStore(db).list_runs() == []


def test_user_defaults_fill_the_job_options_and_the_command_line_wins(tmp_path, small_dataset, tiny_bert, monkeypatch):
    user = tmp_path / "config.toml"
    user.write_text('[slurm]\npartition = "debug"\ntime = "7"\nsignal_before_s = 30\nmem = "512M"\n')
    monkeypatch.setenv("WORKBENCH_CONFIG", str(user))
    db = str(tmp_path / "runs.db")
    run_id = _cli("launch", tiny_config(tmp_path, small_dataset, tiny_bert), "--db", db, "--backend", "slurm")
    store = RunStore(db)
    row = store.get_run(run_id)
    try:
        script = (Path(row["run_dir"]) / "job.sbatch").read_text()
        for line in ("--partition=debug", "--time=7", "--signal=B:USR1@30", "--requeue", "--mem=512M"):
            assert f"#SBATCH {line}\n" in script, script
        out = subprocess.run(["scontrol", "show", "job", row["job_id"]], capture_output=True, text=True).stdout
        assert "TimeLimit=00:07:00" in out and "Partition=debug" in out, out
    finally:
        subprocess.run(["scancel", row["job_id"]], check=False)
    user.write_text("[slurm]\nnodes = 3\n")
    err = _fails(
        "launch", str(tmp_path / "tiny.yaml"), "--db", db, "--backend", "slurm", env={"WORKBENCH_CONFIG": str(user)}
    )
    assert "[slurm]: unknown keys ['nodes']" in err


def test_a_pretraining_config_runs_as_a_slurm_job(tmp_path, small_dataset, tiny_bert):
    import yaml

    cfg = {
        "kind": "pretrain",
        "name": "pretrain-slurm",
        "output_dir": str(tmp_path / "runs"),
        "data": {"dir": str(small_dataset), "max_products": 96},
        "model": {"name": str(tiny_bert), "max_length": 24},
        "train": {"batch_size": 16, "max_steps": 3, "log_every": 1, "lr": 1e-3},
        "tasks": {"contrastive": {"queue_size": 20}},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    db = str(tmp_path / "runs.db")
    run_id = _cli("launch", str(path), "--db", db, "--backend", "slurm", "--time", "10")
    store = RunStore(db)
    seen = _watch(store, run_id, lambda r: r["job_state"] in TERMINAL_STATES)
    assert seen[-1] == (Status.FINISHED, "COMPLETED"), seen
    row = store.get_run(run_id)
    assert (Path(row["run_dir"]) / "backbone" / "model.safetensors").is_file()
    assert {"pretrain/mlm_loss", "train/loss"} <= {m["name"] for m in store.metrics(run_id)}
    assert any(a["kind"] == "backbone" for a in store.artifacts(run_id))


def test_a_two_process_run_as_a_slurm_job_and_its_relaunch(tmp_path, small_dataset, tiny_bert):
    """--processes 2 on Slurm: the job's supervisor starts two gloo ranks (--cpus-per-task 2); the run
    is the 1-process run's OOF rows in the same order. `r` (relaunch) submits a new job with the same
    options."""
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, num_threads=1)
    db = str(tmp_path / "runs.db")
    args = ("--db", db, "--backend", "slurm", "--time", "10", "--cpus-per-task", "2")
    run_id = _cli("launch", cfg, *args, "--processes", "2")
    store = RunStore(db)
    seen = _watch(store, run_id, lambda r: r["job_state"] in TERMINAL_STATES)
    assert seen[-1] == (Status.FINISHED, "COMPLETED"), seen
    row = store.get_run(run_id)
    assert "--nproc 2" in (Path(row["run_dir"]) / "job.sbatch").read_text()
    assert "processes 2" in (Path(row["run_dir"]) / "train.log").read_text()
    keys = [(m["fold"], m["step"], m["name"]) for m in store.metrics(run_id) if m["step"] is not None]
    assert keys and len(keys) == len(set(keys))  # rank 1 wrote nothing
    oof = pd.read_parquet(Path(row["run_dir"]) / "oof.parquet")
    assert oof["example_id"].is_unique
    from core.runs.launcher import relaunch

    new_id, job = relaunch(store, run_id)
    try:
        new = store.get_run(new_id)
        assert new["backend"] == "slurm" and new["job_id"] == str(job) and new_id != run_id
        script = (Path(new["run_dir"]) / "job.sbatch").read_text()
        assert "#SBATCH --time=10\n" in script and "#SBATCH --cpus-per-task=2\n" in script and "--nproc 2" in script
    finally:
        subprocess.run(["scancel", str(job)], check=False)
    err = _fails("launch", cfg, "--db", db, "--backend", "slurm", "--gpus", "1", "--processes", "2")
    assert "one process per GPU" in err
