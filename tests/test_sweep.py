"""Hyperparameter sweeps (core.runs.sweep, `workbench sweep`) on the tiny BERT: the space is checked
before anything exists; trials are real detached runs tagged in runs.db; the median pruner stops a
real running run, which reads `pruned` with its rows kept; a killed driver is resumed without
duplicated trials; `sweep stop` leaves no trial process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import snapshot
from conftest import tiny_config as _config
from core.errors import ConfigError
from core.runs import metric_names as mn
from core.runs.launcher import process_of
from core.runs.store import RunStore, Status

SPACE = {
    "train.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "train.seed": {"type": "int", "low": 0, "high": 20},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_dataset, tiny_bert):
    """(folder, config path, space path); the config's token cache is shared by the module's runs."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = _config(tmp, small_dataset, tiny_bert, checkpoint_every=0)
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return tmp, cfg, space


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=kw.get("timeout", 240)
    )


def _popen(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "workbench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(pred, timeout=120.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _study(db: Path, name: str):
    from core.runs.sweep import open_sweep

    return open_sweep(RunStore(db), name)[0]


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({"train.nope": {"type": "float", "low": 0.1, "high": 0.2}}, ["train.nope", "unknown config key"]),
        ({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, ["train.lr", "empty range"]),
        ({"train.epochs": {"type": "float", "low": 1.0, "high": 3.0}}, ["train.epochs", "expected an integer"]),
        ({"train.epochs": {"type": "int", "low": 0, "high": 3}}, ["train.epochs=0", "must be >= 1"]),
        ({"train.epochs": {"type": "int", "low": 1, "high": "x"}}, ["train.epochs", "high must be an integer"]),
        ({"model.pooling": {"type": "categorical", "choices": ["mean", "max"]}}, ["model.pooling", "'max'"]),
        ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, ["train.lr", "type 'uniform'"]),
    ],
)
def test_space_errors_are_one_line_and_create_nothing(tmp_path, base, space, words):
    from core.runs.sweep import create_sweep

    _, cfg, _ = base
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space))
    store = RunStore(tmp_path / "runs.db")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        create_sweep(store, cfg, path, trials=2)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, (w, msg)
    assert snapshot(tmp_path) == before and not (tmp_path / "sweeps").exists()
    assert store.list_runs() == []


def test_overrides_read_back_and_grid_needs_finite_values():
    from core.config import parse_overrides
    from core.runs.sweep import Param, SweepSettings, make_sampler, override

    for value in (1e-05, 0.1, 3, "mean", "true", "", True, None, [1, 2], "a b"):
        assert parse_overrides([override("k", value)]) == [("k", value)], value
    space = [{"key": "train.lr", "type": "float", "low": 1e-5, "high": 1e-3, "log": True}]
    with pytest.raises(ConfigError, match="train.lr: the grid sampler needs int or categorical"):
        make_sampler(SweepSettings("g", "c.yaml", space, trials=2, sampler="grid"))
    grid = Param("train.seed", "int", low=0, high=6, step=3).grid()
    assert grid == [0, 3, 6]
    space = [{"key": "train.seed", "type": "int", "low": 0, "high": 6, "step": 3}]
    with pytest.raises(ConfigError, match="--trials 4: the grid has 3 points"):
        make_sampler(SweepSettings("g", "c.yaml", space, trials=4, sampler="grid"))
    make_sampler(SweepSettings("g", "c.yaml", space, trials=3, sampler="grid"))


def test_bad_space_through_the_command_exits_2(tmp_path, base):
    _, cfg, _ = base
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 0.5, "high": 0.5}}))
    res = _cli("sweep", cfg, "--space", str(path), "--trials", "2", "--db", str(tmp_path / "runs.db"))
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "empty range" in res.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs.db").exists()


def test_six_trials_two_at_a_time(tmp_path, base):
    _, cfg, space = base
    db = tmp_path / "runs.db"
    res = _cli(
        "sweep", cfg, "--space", str(space), "--trials", "6", "--parallel", "2", "--name", "six", "--seed", "1",
        "--db", str(db), "--poll", "0.5",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "of 6" in res.stdout
    store = RunStore(db)
    runs = store.sweep_runs("six")
    assert sorted(r.trial for r in runs) == list(range(6))
    assert all(r.status in (Status.FINISHED, Status.PRUNED) for r in runs)
    study = _study(db, "six")
    assert len(study.trials) == 6 and len({t.number for t in study.trials}) == 6
    by_run = {t.user_attrs["run_id"]: t for t in study.trials}
    assert set(by_run) == {r.id for r in runs}
    for r in runs:  # each run has its trial's values in its config
        t = by_run[r.id]
        assert r.config["train"]["lr"] == pytest.approx(t.params["train.lr"])
        assert r.config["train"]["seed"] == t.params["train.seed"]
    cv = {r.id: store.best_values([r.id])[r.id][mn.NDCG] for r in runs if r.status == Status.FINISHED}
    assert study.best_value == pytest.approx(max(cv.values()))
    assert study.best_trial.user_attrs["run_id"] == max(cv, key=cv.get)
    res = _cli("sweep", "show", "six", "--db", str(db))
    assert res.returncode == 0, res.stderr
    assert f"{study.best_value:.4f}" in res.stdout and "--set train.lr=" in res.stdout
    assert "importances (" in res.stdout
    best = yaml.safe_load((tmp_path / "sweeps" / "six.best.yaml").read_text())
    assert best["train"]["lr"] == pytest.approx(study.best_params["train.lr"])
    res = _cli("runs", "show", runs[0].id, "--db", str(db))
    assert res.returncode == 0 and f"sweep six trial {runs[0].trial}" in res.stdout
    res = _cli("sweep", "list", "--db", str(db))
    assert res.returncode == 0 and "six" in res.stdout and f"{study.best_value:.4f}" in res.stdout


def test_median_pruner_prunes_a_real_running_run(tmp_path, base):
    """A completed trial with intermediate values of 1.0 at every fold makes any real run worse than
    the median at fold 0: the driver stops the run (3 folds, 3 epochs: still training) and it reads
    pruned, its fold-0 rows kept, no process left."""
    import optuna
    from optuna.trial import TrialState

    from core.runs.sweep import create_sweep, drive, open_sweep

    _, cfg, space = base
    db = tmp_path / "runs.db"
    store = RunStore(db)
    study, settings = create_sweep(
        store, cfg, space, trials=2, name="prune", overrides=["train.folds=3", "train.epochs=3"]
    )
    study.add_trial(
        optuna.trial.create_trial(
            params={"train.lr": 1e-4, "train.seed": 0},
            distributions={p.key: p.distribution() for p in settings.params},
            value=1.0,
            intermediate_values={0: 1.0, 1: 1.0, 2: 1.0},
        )
    )
    study, settings = open_sweep(store, "prune", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    progress = drive(store, study, settings, poll_s=0.2)
    assert (progress.complete, progress.pruned, progress.failed) == (1, 1, 0)
    trial = study.trials[1]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    run = store.get_record(trial.user_attrs["run_id"])
    assert run.status == Status.PRUNED and run.sweep == "prune" and run.trial == 1
    assert "pruned by sweep prune after fold 0" in run.error and not run.active
    rows = store.metrics(run.id, [mn.FOLD_NDCG])
    assert [r["fold"] for r in rows] == [0] and rows[0]["value"] == pytest.approx(trial.intermediate_values[0])
    assert process_of(store.get_run(run.id)) is None
    from core.runs.launcher import refresh_statuses

    refresh_statuses(store)
    assert store.get_record(run.id).status == Status.PRUNED  # final: nobody marks it crashed


def test_killed_driver_resumes_without_duplicates(tmp_path, base):
    _, cfg, space = base
    db = tmp_path / "runs.db"
    driver = _popen(
        "sweep", cfg, "--space", str(space), "--trials", "3", "--parallel", "2", "--name", "k", "--pruner", "none",
        "--db", str(db), "--poll", "0.3",
    )  # fmt: skip
    try:
        _wait(lambda: db.exists() and len(RunStore(db).sweep_runs("k")) >= 2, what="two trials launched")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    store = RunStore(db)
    first = store.sweep_runs("k")
    assert len(first) == 2
    _wait(lambda: all(not store.get_record(r.id).active for r in first), what="the first trials to end")
    assert all(store.get_record(r.id).status == Status.FINISHED for r in first)  # the kill left them running
    res = _cli("sweep", "resume", "k", "--db", str(db), "--poll", "0.3")
    assert res.returncode == 0, res.stderr[-2000:]
    study = _study(db, "k")
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in study.trials)
    runs = store.sweep_runs("k")
    assert sorted(r.trial for r in runs) == [0, 1, 2] and len({r.id for r in runs}) == 3
    assert {t.user_attrs["run_id"] for t in study.trials} == {r.id for r in runs}


def test_sweep_stop_leaves_no_trial_process(tmp_path, base):
    _, cfg, space = base
    db = tmp_path / "runs.db"
    driver = _popen(
        "sweep", cfg, "--space", str(space), "--trials", "4", "--parallel", "2", "--name", "st", "--db", str(db),
        "--poll", "0.3", "--set", "train.epochs=500",
    )  # fmt: skip
    try:
        _wait(
            lambda: db.exists() and sum(r.status == Status.RUNNING for r in RunStore(db).sweep_runs("st")) == 2,
            what="two running trials",
        )
        store = RunStore(db)
        procs = []
        for r in store.sweep_runs("st"):
            p = process_of(store.get_run(r.id))
            procs += [p, *p.children(recursive=True)] if p else []
        assert procs
        res = _cli("sweep", "stop", "st", "--db", str(db))
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("stopped") == 2
        assert driver.wait(30) == 0  # the driver launches nothing more and ends
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    runs = store.sweep_runs("st")
    assert len(runs) == 2 and all(r.status == Status.STOPPED for r in runs)
    study = _study(db, "st")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert os.path.exists(tmp_path / "sweeps" / "st.journal")


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruners_on_stub_runs(tmp_path, base, pruner):
    """Stub runs (rows only, no process) whose per-fold figure is train.seed / 20: the median pruner
    prunes a trial below the median of the complete ones at the same fold, and Hyperband drives to the
    end; the pruned runs read pruned and keep their rows."""
    from optuna.trial import TrialState

    from core.runs.sweep import create_sweep, drive

    _, cfg, space = base
    store = RunStore(tmp_path / "runs.db")
    study, settings = create_sweep(
        store, cfg, space, trials=12, parallel=2, pruner=pruner, sampler="random", seed=0, name=pruner,
        overrides=["train.folds=3"],
    )  # fmt: skip
    fake: dict[str, list] = {}

    def launch_fn(store, settings, overrides):
        seed = int(next(o for o in overrides if o.startswith("train.seed=")).split("=")[1])
        run_id = store.create_run("stub", {"train": {"folds": 3}}, status=Status.RUNNING)
        fake[run_id] = [seed / 20, 0]
        return run_id

    def advance(_progress):  # one fold per poll for every running stub
        for run_id, st in fake.items():
            if store.get_record(run_id).status != Status.RUNNING:
                continue
            value, fold = st
            if fold < 3:
                store.log_metrics(run_id, [{"name": mn.FOLD_NDCG, "fold": fold, "value": value}])
                st[1] += 1
            else:
                store.log_metrics(run_id, [{"name": mn.CV_NDCG, "fold": -1, "value": value}])
                store.update_run(run_id, status=Status.FINISHED)

    progress = drive(store, study, settings, poll_s=0, on_poll=advance, launch_fn=launch_fn)
    assert progress.done == 12 and progress.failed == 0
    assert len(study.trials) == 12
    runs = {r.id: r for r in store.sweep_runs(pruner)}
    for t in study.trials:
        run = runs[t.user_attrs["run_id"]]
        want = {TrialState.COMPLETE: Status.FINISHED, TrialState.PRUNED: Status.PRUNED}[t.state]
        assert run.status == want and run.trial == t.number
        if t.state == TrialState.PRUNED:  # rows kept up to the prune
            assert len(store.metrics(run.id, [mn.FOLD_NDCG])) == len(t.intermediate_values) >= 1
    if pruner == "median":
        assert progress.pruned >= 1
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        for t in study.trials:
            if t.state == TrialState.PRUNED:
                step = max(t.intermediate_values)
                before = [c.intermediate_values[step] for c in complete if c.number < t.number]
                assert t.intermediate_values[step] < sorted(before)[len(before) // 2] + 1e-9


def test_a_run_launched_but_never_tagged_is_found_again(tmp_path, base):
    """A driver killed between launching a trial's run and tagging it: the next driver finds the run by
    its config (the sampled values), tags it and watches it; no second run is launched."""
    from core.config import load_config
    from core.runs.sweep import create_sweep, drive, override

    _, cfg, space = base
    store = RunStore(tmp_path / "runs.db")
    study, settings = create_sweep(store, cfg, space, trials=1, pruner="none", name="untagged")
    trial = study.ask({p.key: p.distribution() for p in settings.params})
    sampled = load_config(settings.config, [override(k, v) for k, v in trial.params.items()])
    other = load_config(settings.config, ["train.seed=999"])
    store.create_run(other.name, other.to_dict(), status=Status.RUNNING)  # not the trial's values
    run_id = store.create_run(sampled.name, sampled.to_dict(), status=Status.RUNNING)

    def finish(_progress):
        if store.get_record(run_id).status == Status.RUNNING:
            store.log_metrics(run_id, [{"name": mn.CV_NDCG, "fold": -1, "value": 0.5}])
            store.update_run(run_id, status=Status.FINISHED)

    def no_launch(*_args):
        raise AssertionError("a second run was launched")

    progress = drive(store, study, settings, poll_s=0, on_poll=finish, launch_fn=no_launch)
    assert (progress.complete, progress.best) == (1, 0.5)
    rec = store.get_record(run_id)
    assert (rec.sweep, rec.trial) == ("untagged", 0)
    assert study.trials[0].user_attrs["run_id"] == run_id and len(study.trials) == 1


def test_show_gives_the_best_trial_against_a_baseline_with_its_interval(tmp_path):
    """`sweep show NAME --baseline RUN`: the best trial is partly the luckiest one, so its difference
    from the default config's run comes with a paired bootstrap interval over the common queries."""
    from typer.testing import CliRunner

    from core.scoring.significance import ndcg_diff
    from oof_fixture import oof_frame, oof_run
    from tui_fixture import add_sweep, sweep_run_id
    from workbench.cli import app

    runner = CliRunner()

    db = tmp_path / "runs.db"
    name = add_sweep(db)
    best = oof_frame(noise=0.2, seed=1)
    (tmp_path / "runs" / sweep_run_id(3)).mkdir(parents=True)
    best.to_parquet(tmp_path / "runs" / sweep_run_id(3) / "oof.parquet", index=False)  # trial 3 is the best
    store = RunStore(db)
    base_frame = oof_frame(noise=0.8, seed=2)
    base = oof_run(store, tmp_path, "default", base_frame)
    res = runner.invoke(app, ["sweep", "show", name, "--db", str(db), "--baseline", base])
    assert res.exit_code == 0, res.output
    assert f"best trial 3 ({sweep_run_id(3)}) - baseline {base}" in res.output
    want = ndcg_diff(base_frame, best)  # the same seed and resamples as the command
    line = next(ln for ln in res.output.splitlines() if "Δ nDCG" in ln and "CE" not in ln)
    assert f"{want.diff:+.4f} [{want.low:+.4f}, {want.high:+.4f}]" in line, line
    res = runner.invoke(app, ["sweep", "show", name, "--db", str(db), "--baseline", "nosuchrun"])
    assert res.exit_code != 0
