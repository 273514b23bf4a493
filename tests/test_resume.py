"""A crash loses no finished work: per-fold files, step checkpoints, `workbench resume`.

The reference is an uninterrupted run of the same config in this process; the interrupted run is
a `workbench train` subprocess killed with SIGKILL in the middle of fold 1 (after a step
checkpoint), then `workbench resume`. On CPU with one thread and the same seed the resumed run's
OOF probabilities are bit-identical to the reference's, and so is the CV figure.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from core.runs.store import RunStore

PROBS = ["p_E", "p_S", "p_C", "p_I"]


def resume_config(tmp_path: Path, data_dir: Path, model_dir: Path, cache: Path, **train) -> str:
    """3 folds x 3 epochs of the tiny BERT, a step checkpoint every 5 steps, EMA and R-Drop on
    (their state must survive the restart too), one thread (bit-identical on CPU)."""
    return tiny_config(
        tmp_path,
        data_dir,
        model_dir,
        cache=cache,
        tricks={"ema": True, "ema_decay": 0.9, "rdrop": True, "rdrop_alpha": 0.5},
        folds=3,
        epochs=3,
        lr=1e-3,
        evals_per_epoch=2,
        checkpoint_every=5,
        num_threads=1,
        **train,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_dataset, tiny_bert):
    """The uninterrupted run: (config path, cache dir, result, metric rows)."""
    from core.config import load_config
    from core.training.train import run_training

    tmp = tmp_path_factory.mktemp("resume_ref")
    cache = tmp / "cache"
    path = resume_config(tmp, small_dataset, tiny_bert, cache)
    store = RunStore(tmp / "runs.db")
    result = run_training(load_config(path), store)
    return path, cache, result, store.metrics(result.run_id)


def _metric_rows(db: Path, run_id: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT name, fold, step FROM metrics WHERE run_id = ?", [run_id]).fetchall()
    finally:
        con.close()


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited (rc {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _run_id(db: Path) -> str | None:
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(db)
        row = con.execute("SELECT id FROM runs").fetchone()
        con.close()
        return row[0] if row else None
    except sqlite3.Error:
        return None


def _fold_step(db: Path, run_id: str, fold: int) -> int:
    try:
        con = sqlite3.connect(db)
        row = con.execute(
            "SELECT MAX(step) FROM metrics WHERE run_id = ? AND fold = ? AND name = 'train/loss'", [run_id, fold]
        ).fetchone()
        con.close()
        return row[0] or 0
    except sqlite3.Error:
        return 0


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_sigkill_in_fold_1_then_resume_gives_the_same_oof(reference, tmp_path, small_dataset, tiny_bert):
    ref_path, cache, ref, ref_metrics = reference
    path = resume_config(tmp_path, small_dataset, tiny_bert, cache)
    db = tmp_path / "runs.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench", "train", str(path), "--db", str(db)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _run_id(db) is not None, 120, "the run row", proc)
        run_id = _run_id(db)
        # fold 1 past its second step checkpoint (steps 5 and 10), well before its end (~78 steps)
        _wait_for(lambda: _fold_step(db, run_id, 1) >= 12, 120, "fold 1 step 12", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = tmp_path / "runs" / run_id
    # fold 0 is on disk, fold 1 has a step checkpoint and no result, nothing run-level yet
    assert (run_dir / "fold0" / "result.json").is_file() and (run_dir / "fold0" / "oof.parquet").is_file()
    assert (run_dir / "fold1" / "resume.pt").is_file() and not (run_dir / "fold1" / "result.json").exists()
    assert not (run_dir / "oof.parquet").exists()

    from core.runs.launcher import refresh_statuses

    store = RunStore(db)
    assert refresh_statuses(store) == [run_id]
    assert store.get_run(run_id)["status"] == "crashed"
    # a crashed run cannot be restarted by id (that would overwrite it): resume is the way
    out = _cli("train", str(path), "--db", str(db), "--run-id", run_id, cwd=tmp_path)
    assert out.returncode == 2 and "only a queued run" in out.stderr and "workbench resume" in out.stderr, out.stderr

    out = _cli("resume", run_id[:10], "--db", str(db), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["exit_code"] == 0
    oof = pd.read_parquet(run_dir / "oof.parquet")
    want = ref.oof
    assert list(oof["example_id"]) == list(want["example_id"])
    # bit-identical on CPU: same seed, one thread, every RNG and the sampler position restored
    np.testing.assert_array_equal(oof[PROBS].to_numpy(), want[PROBS].to_numpy())
    np.testing.assert_array_equal(oof["score"].to_numpy(), want["score"].to_numpy())
    cv = {m["name"]: m["value"] for m in store.metrics(run_id) if m["name"].startswith("cv/")}
    assert cv["cv/ndcg"] == ref.cv["ndcg"] and cv["cv/final_ndcg"] == ref.cv["final_ndcg"]
    # no metric row duplicated, and the same rows as the uninterrupted run
    rows = [r for r in _metric_rows(db, run_id)]
    dup = [k for k, n in Counter(rows).items() if n > 1 and not k[0].startswith("progress/total")]
    assert not dup, dup[:5]
    ref_rows = Counter((m["name"], m["fold"], m["step"]) for m in ref_metrics)
    assert Counter(rows) == ref_rows
    log = (run_dir / "train.log").read_text()
    assert "fold 1 resumed from resume.pt" in log and "fold 0 already done" in log
    assert not list(run_dir.glob("fold*/resume.pt"))  # checkpoints go once their fold is done
    assert store.list_runs()[0]["folds_done"] == 3


def test_only_a_queued_run_starts_by_id_and_finished_runs_are_not_resumed(reference, tmp_path):
    from core.config import load_config
    from core.errors import WorkbenchError
    from core.runs.launcher import resume_config as stored_config
    from core.training.train import run_training

    path, cache, ref, _ = reference
    store = RunStore(tmp_path / "runs.db")
    cfg = load_config(path, [f"output_dir={tmp_path / 'runs'}", "train.epochs=1"])
    done = run_training(cfg, store)
    before = {p: p.stat().st_mtime_ns for p in done.run_dir.rglob("*")}
    n_metrics = len(store.metrics(done.run_id))
    with pytest.raises(WorkbenchError, match="is finished: only a queued run can be started by id"):
        run_training(cfg, store, run_id=done.run_id)
    with pytest.raises(WorkbenchError, match="is finished: only a crashed, stopped, failed or partial run"):
        stored_config(store, done.run_id)
    with pytest.raises(WorkbenchError, match="is finished"):
        run_training(cfg, store, run_id=done.run_id, resume=True)
    assert {p: p.stat().st_mtime_ns for p in done.run_dir.rglob("*")} == before
    assert len(store.metrics(done.run_id)) == n_metrics and store.get_run(done.run_id)["status"] == "finished"


def test_run_folds_alone_is_partial_and_resume_all_folds_completes_it(reference, tmp_path):
    from core.config import load_config
    from core.runs.launcher import resume_config as stored_config
    from core.training.train import run_training

    path, cache, ref, _ = reference
    store = RunStore(tmp_path / "runs.db")
    cfg = load_config(path, [f"output_dir={tmp_path / 'runs'}", "train.run_folds=[1]"])
    part = run_training(cfg, store)
    run = store.list_runs()[0]
    assert part.partial and run["status"] == "partial" and run["folds_done"] == 1
    assert not (part.run_dir / "oof.parquet").exists()  # no run-level OOF from one fold of three
    assert (part.run_dir / "fold1" / "oof.parquet").is_file()
    assert not [m for m in store.metrics(part.run_id) if m["name"].startswith("cv/")]
    run_id, cfg2 = stored_config(store, part.run_id, all_folds=True)
    assert cfg2.train.run_folds is None
    full = run_training(cfg2, store, run_id=run_id, resume=True)
    assert store.get_run(run_id)["status"] == "finished" and not full.partial
    # fold 1 was kept, folds 0 and 2 trained now: the same OOF as the uninterrupted run
    np.testing.assert_array_equal(full.oof[PROBS].to_numpy(), ref.oof[PROBS].to_numpy())
    assert (part.run_dir / "oof.parquet").is_file()


def test_fold_files_are_written_at_once_and_assembled(reference):
    """Each finished fold left oof/test parquet + result.json; the run's OOF is their union."""
    _, _, ref, _ = reference
    parts = [pd.read_parquet(ref.run_dir / f"fold{k}" / "oof.parquet") for k in range(3)]
    assembled = pd.concat(parts).set_index("example_id").loc[ref.oof["example_id"]]
    np.testing.assert_array_equal(assembled[PROBS].to_numpy(), ref.oof[PROBS].to_numpy())
    test_mean = sum(pd.read_parquet(ref.run_dir / f"fold{k}" / "test.parquet")[PROBS].to_numpy() for k in range(3)) / 3
    np.testing.assert_allclose(test_mean, ref.test[PROBS].to_numpy(), rtol=1e-6)
    for k in range(3):
        assert (ref.run_dir / f"fold{k}" / "result.json").is_file()


def test_resume_detached_checks_the_stored_config_and_data_before_starting(tmp_path, small_dataset):
    """`R` / `resume --detach` on a run whose data folder is gone: one line at once, the run stays
    crashed, no process is started (the child would only have failed in the background)."""
    from core.errors import DataError
    from core.runs.launcher import resume_detached

    store = RunStore(tmp_path / "runs.db")
    cfg = {"name": "gone", "data": {"dir": str(tmp_path / "moved-away")}, "train": {"folds": 2}}
    run_id = store.create_run("gone", cfg)
    store.update_run(run_id, status="crashed", exit_code=137, run_dir=str(tmp_path / "runs" / run_id))
    with pytest.raises(DataError, match="moved-away") as info:
        resume_detached(store, run_id)
    assert "\n" not in str(info.value)
    run = store.get_run(run_id)
    assert run["status"] == "crashed" and run["exit_code"] == 137 and run["pid"] is None
    assert not (tmp_path / "runs").exists()
