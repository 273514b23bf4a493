"""Data-parallel training on one host: N ranks under the supervisor (core.runs.ranks), gloo on CPU.

The first tests drive the supervisor with small Python stand-ins for the trainer (seconds); the
rest train the tiny BERT of conftest with 2 real ranks: the OOF rows equal a 1-process run's,
no metric row is logged twice, a stop leaves no rank, a killed rank reads ``crashed``,
pre-training finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.runs.ranks import RankExit, RankGroup, RankStore, outcome_of, rank_env
from core.runs.store import RunStore
from core.runs.supervise import supervise


# ---------------------------------------------------------------------------------- the supervisor
def test_outcome_names_the_rank_that_caused_the_end():
    ok = [RankExit(0, 10, 0), RankExit(1, 11, 0)]
    assert outcome_of(ok).rank is None and outcome_of(ok).exit_code == 0
    # rank 1 killed by SIGKILL; rank 0 then failed on its own (its gloo peer vanished): crashed, rank 1
    killed = [RankExit(1, 11, -9), RankExit(0, 10, 1)]
    out = outcome_of(killed)
    assert (out.rank, out.exit_code) == (1, 137) and "rank 1 (pid 11) was killed by SIGKILL" in out.error
    # rank 1 failed first, rank 0 was terminated by the supervisor: failed, rank 1, its code
    failed = [RankExit(1, 11, 1), RankExit(0, 10, -15, terminated=True)]
    out = outcome_of(failed)
    assert (out.rank, out.exit_code) == (1, 1) and "exited with code 1" in out.error
    # rank 0 failed first: its own record decides
    assert outcome_of([RankExit(0, 10, 2), RankExit(1, 11, -15, terminated=True)]).rank is None
    # a stop: rank 0 decides, even with a rank killed at the end of the stop
    out = outcome_of([RankExit(1, 11, -9), RankExit(0, 10, 143)], stop_signal=signal.SIGTERM)
    assert out.rank is None and out.stop_signal == signal.SIGTERM and out.exit_code == 143
    with pytest.raises(ValueError):
        outcome_of([RankExit(1, 11, 0)])


def test_rank_store_reads_pass_through_and_writes_do_nothing(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create_run("r", {"a": 1})
    ranked = RankStore(store)
    assert ranked.get_run(run_id)["status"] == "queued"  # a read
    assert ranked.update_run(run_id, status="running") is None
    ranked.log_metrics(run_id, [{"name": "train/loss", "value": 1.0, "fold": 0, "step": 1}])
    ranked.add_artifact(run_id, "oof", tmp_path / "oof.parquet")
    ranked.delete_metrics(run_id, fold=0)
    assert ranked.create_run("other", {}) is None
    assert store.get_run(run_id)["status"] == "queued" and store.metrics(run_id) == []
    assert store.artifacts(run_id) == [] and len(store.list_runs()) == 1


def test_rank_env_is_the_torchrun_contract():
    env = rank_env({"PATH": "/bin"}, 1, 2, 29555)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")} == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_PORT": "29555",
    }
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["OMP_NUM_THREADS"]) >= 1
    assert rank_env({"OMP_NUM_THREADS": "3"}, 0, 2, 1)["OMP_NUM_THREADS"] == "3"  # a setting is kept


def _stand_in(tmp_path: Path, body: str) -> list[str]:
    """A trainer stand-in: Python that knows its RANK and the run (argv[1] db, argv[2] run id)."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from core.runs.store import RunStore\n"
        "rank = int(os.environ['RANK'])\n" + textwrap.dedent(body)
    )
    return [sys.executable, str(script)]


def test_a_failed_rank_makes_the_supervisor_end_the_others(tmp_path):
    """Rank 1 exits 3; rank 0 ignores SIGTERM (blocked, as in a collective): SIGKILL after the grace."""
    cmd = _stand_in(
        tmp_path,
        """
        if rank == 1:
            sys.exit(3)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
        """,
    )
    group = RankGroup(cmd, 2, dict(os.environ), grace=0.5)
    group.start()
    exits = {e.rank: e for e in group.wait()}
    assert exits[1] == RankExit(1, group.procs[1].pid, 3)
    assert exits[0].returncode == -signal.SIGKILL and exits[0].terminated
    out = outcome_of(list(exits.values()))
    assert out.rank == 1 and out.exit_code == 3


def test_a_rank_killed_by_sigkill_makes_the_run_crashed_whatever_rank_0_recorded(tmp_path):
    """Rank 0 records ``failed`` (its peer vanished) and exits 1; rank 1 died by SIGKILL first."""
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = store.create_run("r", {})
    cmd = _stand_in(
        tmp_path,
        f"""
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1.0)
        s = RunStore({str(db)!r})
        s.update_run({run_id!r}, status="failed", exit_code=1, error="RuntimeError: Connection closed by peer")
        sys.exit(1)
        """,
    )
    assert supervise(run_id, str(db), cmd, nproc=2) == 137
    run = store.get_run(run_id)
    assert run["status"] == "crashed" and run["exit_code"] == 137
    assert "rank 1" in run["error"] and "SIGKILL" in run["error"]


def test_one_process_supervisor_is_unchanged(tmp_path):
    """nproc 1: one child without the distributed variables; its own final status stands."""
    db = tmp_path / "runs.db"
    store = RunStore(db)
    run_id = store.create_run("r", {})
    script = tmp_path / "one.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from core.runs.store import RunStore\n"
        "assert 'RANK' not in os.environ and 'WORLD_SIZE' not in os.environ\n"
        f"RunStore({str(db)!r}).update_run({run_id!r}, status='finished', exit_code=0)\n"
    )
    env_before = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        assert supervise(run_id, str(db), [sys.executable, str(script)]) == 0
    finally:
        os.environ.update(env_before)
    assert store.get_run(run_id)["status"] == "finished"
    out = subprocess.run([sys.executable, "-m", "core.runs.supervise", "--run-id", run_id, "--db", str(db),
                          "--nproc", "0", "--", "true"], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "--nproc 0: must be >= 1" in out.stderr
