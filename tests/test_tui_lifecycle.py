"""Process lifecycle through the app: launch a real tiny trainer from the New-run dialog, quit
the app (the run keeps going), reopen it, find the run, stop it from the keyboard, and check that
no process of the run is left."""

from __future__ import annotations

import os
import shutil
import signal

import psutil

from conftest import tiny_config, wait_until
from core.runs.store import RunStore
from tui_fixture import fake_gpu, frozen_host
from workbench.tui.app import WorkbenchApp
from workbench.tui.detail import RunDetailScreen
from workbench.tui.dialogs import ConfirmScreen, NewRunScreen
from workbench.tui.runs import RunsScreen


def _alive(pids) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _app(db):
    return WorkbenchApp(
        str(db), gpu_probe=fake_gpu(), configs_dir="configs", refresh_interval=0.3, host_stats=frozen_host
    )


async def test_launch_quit_reopen_stop_leaves_no_process(tmp_path, monkeypatch, small_dataset, tiny_bert):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, epochs=200)  # runs until stopped
    shutil.move(cfg, tmp_path / "configs" / "tiny.yaml")
    db = tmp_path / "runs.db"
    store = RunStore(db)
    group: list[int] = []
    try:
        # 1. launch from the app, watch it start, quit
        app = _app(db)
        async with app.run_test(size=(80, 24)) as pilot:
            runs = app.screen
            await wait_until(pilot, lambda: runs.loaded, timeout=60, what="first load")
            await pilot.press("n")
            dlg = app.screen
            assert isinstance(dlg, NewRunScreen)
            await wait_until(pilot, lambda: dlg.valid, timeout=60, what="config validation")
            dlg.query_one("#overrides").text = "train.seed=11"
            await pilot.press("ctrl+s")
            await wait_until(
                pilot, lambda: isinstance(app.screen, RunsScreen) and dlg.launched, timeout=60, what="launch"
            )
            run_id = dlg.launched
            await wait_until(
                pilot,
                lambda: any(r["id"] == run_id and r["status"] == "running" for r in runs.all_rows),
                timeout=60,
                what="running status in the table",
            )
            await pilot.press("enter")  # watch it: metrics arrive from the detached trainer
            detail = app.screen
            assert isinstance(detail, RunDetailScreen)
            await wait_until(
                pilot, lambda: len(detail.series.get("train/loss", [])) >= 2, timeout=60, what="live metrics"
            )
            await wait_until(
                pilot, lambda: detail.tail is not None and len(detail.tail.lines) > 0, timeout=60, what="log lines"
            )
            await pilot.press("q")
        run = store.get_run(run_id)
        assert run["status"] == "running" and run["config"] and '"seed": 11' in run["config"]
        leader = psutil.Process(run["pid"])
        assert os.getpgid(leader.pid) == leader.pid  # its own process group and session
        group = [leader.pid] + [c.pid for c in leader.children(recursive=True)]
        assert len(_alive(group)) >= 2  # supervisor + trainer survive the app

        # 2. reopen: the app re-attaches through runs.db, stop with s + y
        app = _app(db)
        async with app.run_test(size=(80, 24)) as pilot:
            runs = app.screen
            await wait_until(pilot, lambda: runs.loaded, timeout=60, what="reload")
            assert [r["status"] for r in runs.all_rows if r["id"] == run_id] == ["running"]
            await pilot.press("home")
            assert runs.table.current_id == run_id
            await pilot.press("s")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait_until(
                pilot,
                lambda: any(n.message == f"run {run_id}: stopped" for n in app._notifications),
                timeout=60,
                what="the stop to complete",
            )  # stop_run returns once the group is gone
            await wait_until(
                pilot,
                lambda: any(r["id"] == run_id and r["status"] == "stopped" for r in runs.all_rows),
                timeout=60,
                what="stopped status in the table",
            )
        assert _alive(group) == []
        run = store.get_run(run_id)
        assert run["status"] == "stopped" and run["exit_code"] == 143

        # 3. R resumes the stopped run under the same id (detached), s + y stops it again
        app = _app(db)
        async with app.run_test(size=(80, 24)) as pilot:
            runs = app.screen
            await wait_until(pilot, lambda: runs.loaded, timeout=60, what="reload")
            await pilot.press("home")
            await pilot.press("R")
            await wait_until(
                pilot,
                lambda: any(r["id"] == run_id and r["status"] == "running" for r in runs.all_rows),
                timeout=60,
                what="the resumed run running under the same id",
            )
            resumed = store.get_run(run_id)
            group = [resumed["pid"]] + [c.pid for c in psutil.Process(resumed["pid"]).children(recursive=True)]
            await wait_until(
                pilot,
                lambda: "resumed" in (tmp_path / "runs" / run_id / "train.log").read_text(),
                timeout=60,
                what="the resumed trainer's log",
            )
            await pilot.press("s")
            await pilot.press("y")
            await wait_until(
                pilot,
                lambda: sum(n.message == f"run {run_id}: stopped" for n in app._notifications) >= 1,
                timeout=60,
                what="the second stop to complete",
            )
            await wait_until(
                pilot,
                lambda: any(r["id"] == run_id and r["status"] == "stopped" for r in runs.all_rows),
                timeout=60,
                what="stopped again",
            )
        assert _alive(group) == []
        assert len(store.list_runs()) == 1  # one run, never a copy
    finally:
        for p in _alive(group):
            os.kill(p, signal.SIGKILL)
        store.close()
