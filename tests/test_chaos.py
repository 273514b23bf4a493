"""Chaos: concurrent writers on one runs.db, SIGKILL at random moments, a full disk.

Marked ``chaos`` (run by ``make test`` like every other test; ``-m "not chaos"`` skips them).
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tiny_config
from core.runs.store import RunStore

pytestmark = pytest.mark.chaos
PROBS = ["p_E", "p_S", "p_C", "p_I"]


def chaos_config(tmp: Path, data_dir: Path, model_dir: Path, cache: Path) -> str:
    """2 folds x 2 epochs of the tiny BERT, a metric row every step, a step checkpoint every 3
    steps, EMA on, one thread (bit-identical on CPU)."""
    return tiny_config(
        tmp,
        data_dir,
        model_dir,
        cache=cache,
        tricks={"ema": True, "ema_decay": 0.9},
        epochs=2,
        lr=1e-3,
        evals_per_epoch=2,
        checkpoint_every=3,
        num_threads=1,
    )


@pytest.fixture(scope="module")
def chaos_reference(tmp_path_factory, small_dataset, tiny_bert):
    """One uninterrupted run in this process: (config, cache, result, Counter of (name, fold, step), rows before the run-level ones)."""
    from core.config import load_config
    from core.training.train import run_training

    tmp = tmp_path_factory.mktemp("chaos_ref")
    cache = tmp / "cache"
    path = chaos_config(tmp, small_dataset, tiny_bert, cache)
    store = RunStore(tmp / "runs.db")
    result = run_training(load_config(path), store)
    ms = store.metrics(result.run_id)
    rows = Counter((m["name"], m["fold"], m["step"]) for m in ms)
    # rows logged before the run-level ones (blend, CV): a kill once that many rows exist lands
    # while the run still trains, writes a fold, or blends (never after its final status)
    n_before_end = len(
        [
            m
            for m in ms
            if not (m["fold"] == -1 and m["name"].split("/")[0] in ("cv", "blend")) and m["name"] != "fold/final_ndcg"
        ]
    )
    return path, cache, result, rows, n_before_end


def _rows(db: Path, run_id: str) -> Counter:
    con = sqlite3.connect(db)
    try:
        return Counter(con.execute("SELECT name, fold, step FROM metrics WHERE run_id = ?", [run_id]).fetchall())
    finally:
        con.close()


def test_concurrent_writers_lose_no_metric_row(chaos_reference, tmp_path, small_dataset, tiny_bert):
    """3 trainers + the app's reader (polling list_runs / metrics_since like the Runs and detail
    screens) + a `labels find` on one runs.db: every trainer's rows are exactly the uninterrupted
    reference run's rows (same config and seed), and the label issues are all stored."""
    path, cache, ref, ref_rows, _ = chaos_reference
    db = tmp_path / "runs.db"
    store = RunStore(db)
    # a finished run with realistic OOF probabilities for `labels find` to work on
    oof = ref.oof.copy()
    src = store.create_run("labels-src", {"data": {"dir": str(small_dataset)}})
    src_dir = tmp_path / "runs" / src
    src_dir.mkdir(parents=True)
    oof.to_parquet(src_dir / "oof.parquet", index=False)
    store.update_run(src, status="finished", run_dir=str(src_dir))
    store.add_artifact(src, "oof", src_dir / "oof.parquet")

    trainers = [
        subprocess.Popen(
            [sys.executable, "-m", "workbench", "train", str(path), "--db", str(db), "--set", f"name=chaos-{i}"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def app_reader():
        reader = RunStore(db, readonly=True)
        seen = 0
        try:
            while not stop.is_set():
                runs = reader.list_runs()
                for r in runs:
                    seen += len(reader.metrics_since(r["id"], 0))
                reads.append(len(runs))
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=app_reader)
    t.start()
    time.sleep(3)
    labels = subprocess.run(
        [sys.executable, "-m", "workbench", "labels", "find", src, "--db", str(db)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for p in trainers:
        p.wait(timeout=600)
    stop.set()
    t.join()
    assert not errors, errors
    assert labels.returncode == 0, labels.stderr
    for p in trainers:
        assert p.returncode == 0, p.stderr.read()
    runs = {r["name"]: r for r in store.list_runs()}
    for i in range(3):
        run = runs[f"chaos-{i}"]
        assert run["status"] == "finished"
        assert _rows(db, run["id"]) == ref_rows  # not one row lost or doubled
        got = pd.read_parquet(Path(run["run_dir"]) / "oof.parquet")
        np.testing.assert_array_equal(got[PROBS].to_numpy(), ref.oof[PROBS].to_numpy())
    n_issues = sqlite3.connect(db).execute("SELECT COUNT(*) FROM label_issues WHERE run_id = ?", [src]).fetchone()[0]
    assert n_issues > 0 and f"{n_issues}" in labels.stdout
    assert len(reads) > 10  # the reader really polled during the writes


def test_sigkill_at_random_moments_always_resumes_to_the_same_oof(chaos_reference, tmp_path, small_dataset, tiny_bert):
    """10 trials (seeded): a `workbench train` killed with SIGKILL at a random moment after its
    run row exists reads `crashed`, and `resume` reproduces the uninterrupted OOF bit for bit."""
    from core.runs.launcher import refresh_statuses, resume_config
    from core.training.train import run_training

    path, cache, ref, ref_rows, n_before_end = chaos_reference
    rng = random.Random(12)
    kills = []
    for trial in range(10):
        tmp = tmp_path / f"t{trial}"
        tmp.mkdir()
        cfg_path = chaos_config(tmp, small_dataset, tiny_bert, cache)
        db = tmp / "runs.db"
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", "train", str(cfg_path), "--db", str(db)],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # 1 trial in 4: while the run starts up (0-0.5 s after it reads running: tokens, model);
        # else once a random number of its metric rows exist (a random step, evaluation or fold end)
        early = rng.random() < 0.25
        target = rng.randint(1, n_before_end - 1)
        sql = "SELECT COUNT(*) FROM runs WHERE status = 'running'" if early else "SELECT COUNT(*) FROM metrics"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                con = sqlite3.connect(db)
                n = con.execute(sql).fetchone()[0]
                con.close()
                if n >= (1 if early else target):
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.005)
        delay = rng.uniform(0.0, 0.5) if early else 0.0
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: the run ended before the kill"
        store = RunStore(db)
        run = store.list_runs()[0]
        refresh_statuses(store)
        assert store.get_run(run["id"])["status"] == "crashed", f"trial {trial}"
        run_dir = Path(run["run_dir"])
        done = sorted(p.parent.name for p in run_dir.glob("fold*/result.json"))
        ckpts = sorted(p.parent.name for p in run_dir.glob("fold*/resume.pt"))
        kills.append(("start-up" if early else f"row {target}", done, ckpts))
        run_id, cfg = resume_config(store, run["id"])
        res = run_training(cfg, store, run_id=run_id, resume=True)
        assert store.get_run(run_id)["status"] == "finished"
        np.testing.assert_array_equal(res.oof[PROBS].to_numpy(), ref.oof[PROBS].to_numpy(), err_msg=f"trial {trial}")
        assert res.cv["ndcg"] == ref.cv["ndcg"]
        assert _rows(db, run_id) == ref_rows, f"trial {trial}: metric rows differ after resume"
        store.close()
    print("kills (moment, folds done, step checkpoints):", kills)
    # the random moments covered a start-up, the middle of a fold (a step checkpoint) and a finished fold
    assert any(not done and not ckpts for _, done, ckpts in kills)
    assert any(ckpts for _, _, ckpts in kills) and any(done for _, done, _ in kills)


def test_full_disk_while_writing_fold_predictions(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, the kernel's EFBIG, like a full disk's ENOSPC) while
    a fold's predictions are written: one clear line, exit 2, the previous files intact, no temp
    file left."""
    run = tmp_path / "fold0"
    run.mkdir()
    old = pd.DataFrame({"example_id": range(10), "p_E": 0.25})
    old.to_parquet(run / "oof.parquet", index=False)
    before = (run / "oof.parquet").read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np, pandas as pd
        from core.errors import WorkbenchError
        from core.runs.lifecycle import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        big = pd.DataFrame({{"example_id": np.arange(400_000), "p_E": np.random.default_rng(0).random(400_000)}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            atomic_write({str(run / "oof.parquet")!r}, lambda p: big.to_parquet(p, index=False))
        except WorkbenchError as exc:
            print(exc, file=sys.stderr)
            sys.exit(2)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "oof.parquet: cannot write (" in lines[0] and "File too large" in lines[0], out.stderr
    assert (run / "oof.parquet").read_bytes() == before
    assert [p.name for p in run.iterdir()] == ["oof.parquet"]
