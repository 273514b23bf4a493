"""The app never touches runs.db on the event loop: every RunStore call (opening one included) of
the Runs, detail, compare, new-run, review and ensemble screens, and of stop / relaunch, runs in a
worker thread. Every RunStore method is wrapped to record the thread it runs on; a call on the
main thread (the event loop's) while the app runs fails the test. ``close`` is left out (the app
closes its per-thread connections when it quits)."""

from __future__ import annotations

import inspect
import threading

import pytest
from textual.app import App

import core.runs.launcher
from conftest import wait_until
from core.cleaning.labels import decision_log, find_issues
from core.errors import WorkbenchError
from core.runs.store import RunStore
from test_ensemble import three_runs
from test_labels import make_labelled_run
from tui_fixture import RUNS, build_fixture_db, fixture_app
from workbench.tui.compare import CompareScreen
from workbench.tui.detail import RunDetailScreen
from workbench.tui.dialogs import ConfirmScreen, NewRunScreen
from workbench.tui.ensemble import EnsembleScreen
from workbench.tui.review import ReviewApp, ReviewScreen
from workbench.tui.runs import RunsScreen


class StoreCalls:
    """Wraps every RunStore method; ``on_main`` lists the calls made on the main thread while
    armed, ``in_workers`` the names of those made in other threads."""

    def __init__(self, monkeypatch):
        self.armed = False
        self.on_main: list[str] = []
        self.in_workers: list[str] = []
        self._lock = threading.Lock()
        for name, fn in list(vars(RunStore).items()):
            if inspect.isfunction(fn) and name != "close" and (not name.startswith("__") or name == "__init__"):
                monkeypatch.setattr(RunStore, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.armed:
                with self._lock:
                    if threading.current_thread() is threading.main_thread():
                        self.on_main.append(name)
                    else:
                        self.in_workers.append(name)
            return fn(*args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    def writes(self) -> int:
        """Write transactions opened in workers."""
        return self.in_workers.count("_tx")


@pytest.fixture
def calls(monkeypatch):
    return StoreCalls(monkeypatch)


async def test_runs_detail_compare_new_run_stop_relaunch_off_the_event_loop(tmp_path, monkeypatch, calls):
    monkeypatch.chdir(tmp_path)
    db = build_fixture_db(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("name: a\ndata: {dir: data/x}\nmodel: {name: all-MiniLM-L6-v2}\n")

    def fake_launch(path, overrides, store):  # the launcher's writes, without a process
        return store.create_run("launched", {"name": "launched"}, status="queued"), 4242

    def fake_relaunch(store, run_id):
        return store.create_run("relaunched", {"name": "relaunched"}, status="queued"), 4243

    def fake_stop(store, run_id, grace=10.0):
        store.update_run(run_id, status="stopped")
        return "stopped"

    monkeypatch.setattr(core.runs.launcher, "launch", fake_launch)
    monkeypatch.setattr(core.runs.launcher, "relaunch", fake_relaunch)
    monkeypatch.setattr(core.runs.launcher, "stop_run", fake_stop)
    running = RUNS[3][0]
    app = fixture_app(db, configs_dir="configs", refresh_interval=0.2)
    calls.armed = True
    async with app.run_test(size=(100, 30)) as pilot:
        runs = app.screen
        await wait_until(pilot, lambda: isinstance(runs, RunsScreen) and runs.loaded, what="the runs")
        await pilot.press("end", "space", "up", "space", "c")
        cmp = app.screen
        assert isinstance(cmp, CompareScreen)
        await wait_until(pilot, lambda: cmp.loaded, what="compare")
        await pilot.press("escape", "home")
        while runs.table.current_id != running:
            await pilot.press("down")
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, RunDetailScreen)
        await wait_until(pilot, lambda: detail.polls >= 2, what="two detail polls")
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(
            pilot, lambda: any(n.message == f"run {running}: stopped" for n in app._notifications), what="the stop"
        )
        await pilot.press("r")
        await wait_until(pilot, lambda: any("relaunched" in n.message for n in app._notifications), what="relaunch")
        await pilot.press("escape", "n")
        dlg = app.screen
        assert isinstance(dlg, NewRunScreen)
        await wait_until(pilot, lambda: dlg.valid, what="the config check")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: dlg.launched is not None and isinstance(app.screen, RunsScreen), what="launch")
        await wait_until(pilot, lambda: len(runs.all_rows) == len(RUNS) + 2, what="the new rows listed")
        assert not any(n.severity == "error" for n in app._notifications), [n.message for n in app._notifications]

        # the fixture runs have no OOF files and no label issues: both screens open, fail to load, say so
        def errors() -> int:
            return sum(n.severity == "error" for n in app._notifications)

        await pilot.press("e")
        await wait_until(pilot, lambda: errors() == 1, what="the ensemble screen's error")
        await pilot.press("escape", "l")
        await wait_until(pilot, lambda: errors() == 2, what="the review screen's error")
        await pilot.press("escape")
        assert errors() == 2  # one toast per failure
    calls.armed = False
    assert calls.on_main == []
    assert calls.writes() >= 3  # stop, relaunch, launch: each a write transaction in a worker
    assert {"list_runs", "get_run", "metrics_since", "create_run", "update_run"} <= set(calls.in_workers)


async def test_review_decisions_and_undo_are_written_by_a_worker(tmp_path, sample_frames, calls):
    store, run_id, _ = make_labelled_run(tmp_path, sample_frames)
    find_issues(store, run_id)
    store.close()
    db = str(tmp_path / "runs.db")
    calls.armed = True
    async with ReviewApp(db, run_id, reviewer="tester").run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ReviewScreen) and pilot.app.screen.loaded)
        s = pilot.app.screen
        await pilot.press("k", "d", "2", "a", "u")
        await wait_until(pilot, lambda: all(r["id"] is not None for r in s.data.log), what="every decision saved")
    calls.armed = False
    assert calls.on_main == []
    assert calls.writes() >= 5
    store = RunStore(db, readonly=True)
    try:
        assert decision_log(store, run_id)["decision"].tolist() == ["keep", "drop", "relabel", "accept", "undo"]
    finally:
        store.close()


async def test_a_decision_that_cannot_be_written_is_a_toast_and_the_log_is_reread(tmp_path, sample_frames, monkeypatch):
    store, run_id, _ = make_labelled_run(tmp_path, sample_frames)
    find_issues(store, run_id)
    store.close()
    import workbench.tui.review as review

    def refuse(*args, **kwargs):
        raise WorkbenchError("runs.db: database is locked")

    monkeypatch.setattr(review, "record_decision", refuse)
    async with ReviewApp(str(tmp_path / "runs.db"), run_id).run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ReviewScreen) and pilot.app.screen.loaded)
        s = pilot.app.screen
        first = s.current["example_id"]
        await pilot.press("k")
        assert s.current["example_id"] != first  # shown at once
        await wait_until(
            pilot,
            lambda: any(n.title == "decision not saved" and "locked" in n.message for n in pilot.app._notifications),
            what="the toast",
        )
        await wait_until(pilot, lambda: not s.data.log, what="the log re-read")
        assert s.in_force == {} and pilot.app.is_running


async def test_ensemble_load_fit_build_off_the_event_loop(tmp_path, sample_frames, calls):
    st, _ = three_runs(tmp_path, sample_frames)
    path = st.path
    st.close()
    screen = EnsembleScreen(path, ["run-good", "run-mid"], out_dir=tmp_path / "subs")

    class Host(App):
        def on_mount(self):
            self.push_screen(screen)

    calls.armed = True
    async with Host().run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: screen.last_tasks, what="the ensemble scored")
        await pilot.press("a")
        await pilot.press("b")
        await wait_until(pilot, lambda: screen.last_paths, timeout=60, what="the build")
    calls.armed = False
    assert calls.on_main == []
    assert calls.writes() >= 1 and "__init__" in calls.in_workers
