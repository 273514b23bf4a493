"""A sweep whose trials are Slurm jobs on the real local cluster (tests/slurm_fixture.py): the trials
are submitted with the sweep's options, tagged in runs.db, and told their run's CV figure."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_config as _config
from core.runs import metric_names as mn
from core.runs.slurm import slurm_options
from core.runs.store import RunStore, Status
from slurm_fixture import slurm_cluster  # noqa: F401 - the session fixture

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def test_a_sweep_of_slurm_jobs(tmp_path, small_dataset, tiny_bert):
    from core.runs.sweep import create_sweep, drive

    cfg = _config(tmp_path, small_dataset, tiny_bert, checkpoint_every=0)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.seed": {"type": "categorical", "choices": [1, 2]}}))
    db = tmp_path / "runs.db"
    store = RunStore(db)
    study, settings = create_sweep(
        store, cfg, space, trials=2, parallel=2, backend="slurm", sampler="grid", pruner="none", name="sl",
        slurm_opts=slurm_options(time="5"),
    )  # fmt: skip
    progress = drive(store, study, settings, poll_s=0.5)
    assert (progress.complete, progress.failed) == (2, 0), progress
    runs = store.sweep_runs("sl")
    assert sorted(r.trial for r in runs) == [0, 1]
    assert all(r.backend == "slurm" and r.job_id and r.status == Status.FINISHED for r in runs)
    assert "--time=5" in (runs[0].run_dir / "job.sbatch").read_text()
    assert sorted(r.config["train"]["seed"] for r in runs) == [1, 2]
    cv = {r.id: store.best_values([r.id])[r.id][mn.NDCG] for r in runs}
    assert study.best_value == pytest.approx(max(cv.values()))
