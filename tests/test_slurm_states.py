"""Slurm job states -> run statuses (core.runs.slurm.run_fields) and the job options, without a cluster."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.runs.slurm import GONE, JobInfo, SlurmOptions, job_command, run_fields, slurm_options
from core.runs.store import Status

Q, R, F, S, C, X = Status.QUEUED, Status.RUNNING, Status.FINISHED, Status.STOPPED, Status.CRASHED, Status.FAILED


@pytest.mark.parametrize(
    ("status", "state", "reason", "requeue", "want"),
    [
        (Q, "PENDING", "Resources", True, None),  # waiting: stays queued, the reason is shown
        (R, "PENDING", "BeginTime", True, Q),  # requeued (preempted, node failure): queued again
        (S, "PENDING", "BeginTime", True, Q),  # requeued by its supervisor after SIGUSR1
        (Q, "RUNNING", "None", True, R),  # started; the journal's "running" may come later
        (F, "RUNNING", "None", True, None),  # the trainer finished, the job is still exiting
        (F, "COMPLETED", "None", True, None),
        (R, "COMPLETED", "None", True, C),  # the job ended without a final status
        (R, "CANCELLED", "None", True, S),  # scancel before the trainer could record it
        (S, "CANCELLED", "None", True, None),
        (R, "TIMEOUT", "TimeLimit", False, C),
        (S, "TIMEOUT", "TimeLimit", False, C),  # Slurm's SIGTERM at the limit is no stop anyone asked for
        (R, "OUT_OF_MEMORY", "OutOfMemory", True, C),
        (R, "NODE_FAIL", "NodeDown", True, C),
        (X, "FAILED", "NonZeroExitCode", True, None),  # the trainer recorded why it failed
        (R, "PREEMPTED", "None", True, Q),
        (R, "PREEMPTED", "None", False, C),
    ],
)
def test_job_states_map_onto_run_statuses(status, state, reason, requeue, want):
    fields = run_fields(status, JobInfo(state, reason, "node1"), requeue)
    assert fields["job_state"] == state and fields["job_reason"] == reason and fields["node"] == "node1"
    assert fields.get("status") == want
    if want == C:
        assert state in fields["error"]
        if state == "TIMEOUT":
            assert fields["error"] == "Slurm job TIMEOUT: time limit reached (TimeLimit)"


def test_a_job_slurm_forgot_is_gone_and_its_active_run_crashed():
    assert run_fields(R, None, True)["status"] == C and run_fields(R, None, True)["job_state"] == GONE
    assert run_fields(F, None, True) == {"job_state": GONE}


def test_options_validate_and_render_as_sbatch_arguments():
    opts = SlurmOptions(partition="gpu", gpus=2, time="1-02:00:00", account="a1", qos="high", mem="32G")
    opts.validate()
    assert opts.sbatch_args() == [
        "--partition=gpu",
        "--gpus=2",
        "--time=1-02:00:00",
        "--account=a1",
        "--qos=high",
        "--mem=32G",
        "--requeue",
        "--signal=B:USR1@90",
    ]
    assert SlurmOptions(requeue=False).sbatch_args() == ["--no-requeue"]
    for good in ("60", "30:00", "2:00:00", "1-0", "1-02:00", "UNLIMITED"):
        SlurmOptions(time=good).validate()
    for bad, match in (
        ({"time": "1h"}, "not a Slurm time"),
        ({"partition": "a b"}, "not a valid Slurm name"),
        ({"partition": "x;rm -rf"}, "not a valid Slurm name"),
        ({"cpus_per_task": 0}, ">= 1"),
        ({"signal_before_s": -1}, "0..65535"),
    ):
        with pytest.raises(ConfigError, match=match):
            SlurmOptions(**bad).validate()


def test_user_defaults_and_bad_toml(tmp_path, monkeypatch):
    user = tmp_path / "c.toml"
    monkeypatch.setenv("WORKBENCH_CONFIG", str(user))
    assert slurm_options() == SlurmOptions()  # no file: Slurm's own defaults
    user.write_text('[slurm]\npartition = "gpu"\ngpus = 1\n')
    assert slurm_options(gpus=4) == SlurmOptions(partition="gpu", gpus=4)
    user.write_text("[slurm\n")
    with pytest.raises(ConfigError, match="c.toml: not a readable TOML file"):
        slurm_options()


def test_the_job_runs_the_supervisor_around_resume_with_the_journal(tmp_path):
    cmd = job_command("RUN", tmp_path, nproc=2)
    sep = cmd.index("--")
    assert cmd[1:3] == ["-m", "core.runs.supervise"] and "--journal" in cmd[:sep] and cmd[:sep][-2:] == ["--nproc", "2"]
    assert cmd[sep + 1 :][1:] == ["-m", "workbench", "resume", "RUN", "--journal", str(tmp_path), "--queued"]
