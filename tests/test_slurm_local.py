"""The single-node cluster of scripts/slurm-local.sh really schedules: a batch job runs to
COMPLETED and writes its --output file; scancel makes a running job CANCELLED."""

from __future__ import annotations

import subprocess

import pytest

from slurm_fixture import sbatch, slurm_cluster, wait_job  # noqa: F401 - slurm_cluster: the fixture, used by name

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def test_batch_job_completes_and_writes_its_output(tmp_path):
    out = tmp_path / "job.out"
    job = sbatch("--mem=64M", f"--output={out}", "--wrap", "echo job-$SLURM_JOB_ID on $(hostname -s)")
    wait_job(job, "COMPLETED", timeout=60)
    assert out.read_text().startswith(f"job-{job} on ")


def test_scancel_makes_a_running_job_cancelled():
    job = sbatch("--mem=64M", "--output=/dev/null", "--wrap", "sleep 120")
    wait_job(job, "RUNNING", timeout=60)
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert wait_job(job, "CANCELLED", timeout=20)[0] == "CANCELLED"
