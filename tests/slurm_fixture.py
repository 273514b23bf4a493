"""A real Slurm cluster for tests: the session fixture ``slurm_cluster`` and small sbatch/squeue helpers.

Import the fixture into a test module (``from slurm_fixture import slurm_cluster``). As root with
apt-get (Debian, CI) it runs ``scripts/slurm-local.sh start``, which installs slurm-wlm + munge when
missing and starts a single-node cluster (a no-op when it is up); a failure there fails the test
with the script's output. Elsewhere it uses a cluster that already answers ``sinfo`` and skips the
test when there is none (no root or no apt-get to start one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
UP_STATES = {"idle", "mixed", "allocated", "completing"}
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def node_states() -> set[str]:
    """The node states ``sinfo`` reports (empty when Slurm is missing or no controller answers)."""
    if shutil.which("sinfo") is None:
        return set()
    try:
        out = _run("sinfo", "-h", "-o", "%T")
    except subprocess.TimeoutExpired:
        return set()
    return set(out.stdout.split()) if out.returncode == 0 else set()


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A Slurm cluster with a usable node; returns the default partition's node list."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            out = _run(str(SCRIPT), "start", timeout=600)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{SCRIPT.name} start timed out:\n{e.stdout or ''}{e.stderr or ''}")
        if out.returncode != 0:
            pytest.fail(f"{SCRIPT.name} start exited {out.returncode}:\n{out.stdout}{out.stderr}")
    elif not node_states() & UP_STATES:
        why = "not root" if os.geteuid() != 0 else "no apt-get"
        pytest.skip(f"no Slurm cluster answers sinfo and {SCRIPT.name} cannot start one here ({why})")
    states = node_states()
    assert states & UP_STATES, f"sinfo shows no usable node after {SCRIPT.name} start: {states or 'no answer'}"
    return _run("sinfo", "-h", "-o", "%N").stdout.strip()


def sbatch(*args: str) -> str:
    """Submit with ``sbatch --parsable ARGS``; returns the job id."""
    out = _run("sbatch", "--parsable", *args)
    assert out.returncode == 0, f"sbatch {' '.join(args)} exited {out.returncode}: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of a job from ``squeue --states=all`` (finished jobs stay listed an hour)."""
    out = _run("squeue", "--states=all", "-h", "-j", job_id, "-o", "%T|%r")
    state, _, reason = out.stdout.strip().partition("|")
    return state, reason


def wait_job(job_id: str, states: set[str] | str, timeout: float = 60) -> tuple[str, str]:
    """Poll until the job's state is one of ``states``; AssertionError (with the state seen) after
    ``timeout`` s or when it reaches a different final state."""
    want = {states} if isinstance(states, str) else set(states)
    end = time.monotonic() + timeout
    while True:
        state, reason = job_state(job_id)
        if state in want:
            return state, reason
        assert state not in FINAL_STATES, f"job {job_id} ended {state} ({reason}), wanted {sorted(want)}"
        assert time.monotonic() < end, f"job {job_id} still {state} ({reason}) after {timeout} s"
        time.sleep(0.2)
