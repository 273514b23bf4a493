"""Snapshot tests of every screen at 80x24 and 160x48: fixture runs.db, frozen clock, fake NVML.

Update after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and
look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import pytest

from conftest import wait_until
from tui_fixture import STACK_RUN, add_oof_files, add_slurm_run, add_stack_run, add_sweep, build_fixture_db, fixture_app

SIZES = [(80, 24), (160, 48)]


@pytest.fixture
def app(tmp_path, monkeypatch):
    import core.runs.slurm
    import workbench.tui.dialogs

    monkeypatch.chdir(tmp_path)
    # the same shots with or without Slurm here: sbatch "found", Slurm never asked, fixed [slurm] defaults
    monkeypatch.setattr(workbench.tui.dialogs, "slurm_missing", lambda: None)
    monkeypatch.setattr(core.runs.slurm, "refresh", lambda store: [])
    (tmp_path / "user.toml").write_text('[slurm]\npartition = "debug"\ntime = "30"\n')
    monkeypatch.setenv("WORKBENCH_CONFIG", str(tmp_path / "user.toml"))
    db = build_fixture_db(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text(
        "name: demo-minilm\ndata: {dir: data/esci_us_150q}\nmodel: {name: all-MiniLM-L6-v2}\ntrain: {folds: 5}\n"
    )
    return fixture_app(db, configs_dir="configs", refresh_interval=3600)  # no refresh during the shot


async def _settle(pilot, pred) -> None:
    await wait_until(pilot, pred, what="the screen to load")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def _runs_loaded(pilot) -> None:
    await _settle(pilot, lambda: getattr(pilot.app.screen, "loaded", False))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_runs_screen(snap_compare, app, size):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("down", "space", "down")

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_run_detail_screen(snap_compare, app, size):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("down", "enter")  # the running run
        await _settle(pilot, lambda: getattr(pilot.app.screen, "polls", 0) >= 1)

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("tab", ["1", "2", "3"], ids=["metrics", "config", "curves"])
def test_compare_screen(snap_compare, app, tab, tmp_path):
    add_oof_files(tmp_path)  # the finished runs' OOF files: the Δ rows against the first of them

    async def before(pilot):
        await _runs_loaded(pilot)
        table = pilot.app.screen.table
        for rid in ("20261122-110000-cccc", "20261122-100000-bbbb", "20261122-090000-aaaa"):
            await pilot.press("home")  # the two finished runs and the crashed one, newest first
            while table.current_id != rid:
                await pilot.press("down")
            await pilot.press("space")
        await pilot.press("c")
        await _settle(
            pilot,
            lambda: getattr(pilot.app.screen, "loaded", False) and getattr(pilot.app.screen, "deltas_loaded", False),
        )
        await pilot.press(tab)

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_help_screen(snap_compare, app):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("question_mark")

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_filter_screen(snap_compare, app):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("slash", *"minilm")

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_new_run_dialog(snap_compare, app):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("n")
        await _settle(pilot, lambda: "ok" in str(pilot.app.screen.query_one("#check").render()))
        await pilot.press("tab", *"train.epochs=2")
        await _settle(pilot, lambda: "2 epochs" in str(pilot.app.screen.query_one("#check").render()))

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_new_run_dialog_slurm(snap_compare, app):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("n")
        await _settle(pilot, lambda: "ok" in str(pilot.app.screen.query_one("#check").render()))
        await pilot.press("tab", "tab", "enter", "down", "enter")  # backend: slurm
        await _settle(
            pilot, lambda: "on Slurm: partition debug, time 30" in str(pilot.app.screen.query_one("#check").render())
        )

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


@pytest.fixture
def slurm_app(app):
    add_slurm_run(app.services.db_path)  # queued, job 4242 PENDING (Resources)
    return app


def test_runs_screen_with_a_pending_slurm_job(snap_compare, slurm_app):
    async def before(pilot):
        await _runs_loaded(pilot)

    assert snap_compare(slurm_app, terminal_size=(80, 24), run_before=before)


def test_run_detail_of_a_pending_slurm_job(snap_compare, slurm_app):
    async def before(pilot):
        await _runs_loaded(pilot)
        await pilot.press("enter")  # the newest run: the Slurm one
        await _settle(pilot, lambda: getattr(pilot.app.screen, "polls", 0) >= 1)

    assert snap_compare(slurm_app, terminal_size=(80, 24), run_before=before)


def test_run_detail_of_a_stack_run(snap_compare, app):
    add_stack_run(app.services.db_path)  # finished, 3 folds, feature_importance.csv and stack_report.json

    async def before(pilot):
        await _runs_loaded(pilot)
        assert pilot.app.screen.table.current_id == STACK_RUN  # the newest run
        await pilot.press("enter")
        await _settle(pilot, lambda: getattr(pilot.app.screen, "stack_files", None) is not None)

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


@pytest.fixture
def sweep_app(app):
    add_sweep(app.services.db_path)  # a real Optuna journal: 4 complete, 1 running, 1 pruned, 1 failed of 8
    return app


async def _sweeps_loaded(pilot) -> None:
    await _runs_loaded(pilot)
    await pilot.press("w")
    await _settle(pilot, lambda: type(pilot.app.screen).__name__ == "SweepsScreen" and pilot.app.screen.loaded)


def test_sweeps_screen(snap_compare, sweep_app):
    assert snap_compare(sweep_app, terminal_size=(80, 24), run_before=_sweeps_loaded)


@pytest.mark.parametrize("tab", ["1", "2", "3", "4"], ids=["trials", "history", "slices", "importance"])
def test_sweep_screen(snap_compare, sweep_app, tab):
    async def before(pilot):
        await _sweeps_loaded(pilot)
        await pilot.press("enter")
        await _settle(pilot, lambda: type(pilot.app.screen).__name__ == "SweepScreen" and pilot.app.screen.loaded)
        await pilot.press(tab)
        await pilot.pause()

    assert snap_compare(sweep_app, terminal_size=(80, 24), run_before=before)
