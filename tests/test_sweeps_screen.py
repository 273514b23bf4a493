"""Pilot tests of the Sweeps screen and one sweep's screen (workbench.tui.sweeps) at 80x24, on the
fixture runs.db with a small real Optuna sweep next to it (tests/tui_fixture.add_sweep)."""

from __future__ import annotations

import pytest

from conftest import wait_until
from tui_fixture import SWEEP_NAME, add_sweep, build_fixture_db, fixture_app, sweep_run_id


@pytest.fixture
def app(tmp_path, monkeypatch):
    import core.runs.slurm

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core.runs.slurm, "refresh", lambda store: [])
    db = build_fixture_db(tmp_path)
    add_sweep(db)
    return fixture_app(db, refresh_interval=3600)


async def _open_sweeps(pilot):
    from workbench.tui.sweeps import SweepsScreen

    await wait_until(pilot, lambda: getattr(pilot.app.screen, "loaded", False), what="the runs")
    await pilot.press("w")
    await wait_until(
        pilot, lambda: isinstance(pilot.app.screen, SweepsScreen) and pilot.app.screen.loaded, what="the sweeps"
    )
    return pilot.app.screen


async def _open_sweep(pilot):
    from workbench.tui.sweeps import SweepScreen

    await _open_sweeps(pilot)
    await pilot.press("enter")
    await wait_until(
        pilot, lambda: isinstance(pilot.app.screen, SweepScreen) and pilot.app.screen.loaded, what="the sweep"
    )
    await pilot.pause()
    return pilot.app.screen


def _text(screen, wid: str) -> str:
    return str(screen.query_one(wid).render())


@pytest.mark.asyncio
async def test_sweeps_screen_shows_progress_and_best(app):
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_sweeps(pilot)
        lines = screen.table.plain_lines()
        assert lines[0].split()[:6] == ["sweep", "done", "run", "prun", "fail", "of"]
        row = lines[1].split()
        assert row[:8] == [SWEEP_NAME, "4", "1", "1", "1", "8", "0.8421", "3"]
        status = _text(screen, "#sw-status")
        assert f"sweep {SWEEP_NAME}: done 4 / running 1 / pruned 1 / failed 1 of 8, best 0.8421 (trial 3)" in status
        await pilot.press("escape")
        assert pilot.app.screen is pilot.app.runs_screen


@pytest.mark.asyncio
async def test_sweep_screen_trials_plots_and_enter_opens_the_run(app):
    from workbench.tui.detail import RunDetailScreen

    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_sweep(pilot)
        assert "best 0.8421 (trial 3)" in _text(screen, "#sw-head")
        lines = screen.table.plain_lines()
        assert lines[0].split() == ["#", "run", "status", "value", "lr", "epochs", "pooling"]
        # best first: trial 3, then 0, 5, 1; the trials without a value last, by number
        order = [int(line.split()[0]) for line in lines[1:8]]
        assert order == [3, 0, 5, 1, 2, 4, 6]
        assert lines[1].split() == ["3", sweep_run_id(3), "finished", "0.8421", "2e-05", "3", "mean"]
        assert lines[5].split()[2:4] == ["pruned", "-"]
        # history: the complete trials' values with the best so far
        assert screen.view.history == [(0, 0.8312), (1, 0.8105), (3, 0.8421), (5, 0.8268)]
        await pilot.press("2")
        assert "4 complete" in _text(screen, "#history-title")
        await pilot.press("p")  # slices, the next parameter
        assert "vs train.epochs" in _text(screen, "#slice-title")
        await pilot.press("p", "p")
        assert "vs train.lr" in _text(screen, "#slice-title")
        await pilot.press("4")
        bars = _text(screen, "#importance-bars")
        assert "fANOVA" in bars and "train.lr" in bars and "█" in bars
        # Enter on a trial: back to the trials tab, then the run's detail
        await pilot.press("enter")
        assert screen.query_one("TabbedContent").active == "trials"
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, RunDetailScreen), what="the run detail")
        assert pilot.app.screen.run_id == sweep_run_id(0)
        await wait_until(pilot, lambda: pilot.app.screen.polls >= 1, what="the detail poll")
        assert f"{SWEEP_NAME}-t0" in _text(pilot.app.screen, "#info")


@pytest.mark.asyncio
async def test_runs_filter_sweep_key(app):
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: getattr(pilot.app.screen, "loaded", False), what="the runs")
        await pilot.press("slash", *f"sweep:{SWEEP_NAME}", "enter")
        ids = {r["id"] for r in pilot.app.screen.table.rows}
        assert ids == {sweep_run_id(i) for i in range(7)}


@pytest.mark.asyncio
async def test_no_sweep_says_how_to_start_one(tmp_path, monkeypatch):
    import core.runs.slurm

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core.runs.slurm, "refresh", lambda store: [])
    app = fixture_app(build_fixture_db(tmp_path), refresh_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_sweeps(pilot)
        assert "no sweep here yet" in _text(screen, "#sw-status")
        await pilot.press("enter")  # nothing to open: a warning, no crash
        assert pilot.app.screen is screen


@pytest.mark.asyncio
async def test_both_screens_refresh_when_the_journal_changes(tmp_path, monkeypatch):
    """The running trial completes (told in the journal, its run finished in runs.db): both screens
    show it at their next periodic read, without a key."""
    import core.runs.slurm
    from core.runs.store import RunStore
    from core.runs.sweep import open_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core.runs.slurm, "refresh", lambda store: [])
    db = build_fixture_db(tmp_path)
    add_sweep(db)
    app = fixture_app(db, refresh_interval=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_sweep(pilot)
        assert [r["trial"] for r in screen.view.trials][:1] == [3]
        store = RunStore(db)
        study, _ = open_sweep(store, SWEEP_NAME)
        study.tell(6, 0.85)
        store.update_run(sweep_run_id(6), status="finished")
        store.close()
        await wait_until(pilot, lambda: screen.view.best == 0.85, what="the sweep screen's refresh")
        assert screen.table.plain_lines()[1].split()[:4] == ["6", sweep_run_id(6), "finished", "0.8500"]
        await pilot.press("escape")
        sweeps = pilot.app.screen
        await wait_until(pilot, lambda: sweeps.rows[0]["complete"] == 5, what="the sweeps screen's refresh")
        assert "done 5 / running 0" in _text(sweeps, "#sw-status")
