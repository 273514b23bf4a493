"""The app on a real Slurm cluster: a tiny run submitted from the New-run dialog (backend slurm), seen in
the Runs table with its job id and state, stopped with s + y (scancel), never left running."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import tiny_config, wait_until
from core.runs.store import RunStore
from slurm_fixture import slurm_cluster  # noqa: F401 - the fixture, used by name
from tui_fixture import fake_gpu, frozen_host
from workbench.tui.app import WorkbenchApp
from workbench.tui.dialogs import ConfirmScreen, NewRunScreen
from workbench.tui.runs import RunsScreen

pytestmark = pytest.mark.usefixtures("slurm_cluster")

STATES = {"PENDING", "RUNNING", "COMPLETED"}


async def test_submit_watch_and_stop_a_slurm_run_from_the_app(tmp_path, monkeypatch, small_dataset, tiny_bert):
    monkeypatch.chdir(tmp_path)
    # the user's [slurm] defaults: a small memory request, so the job can start next to others on the node
    (tmp_path / "user.toml").write_text('[slurm]\nmem = "1G"\n')
    monkeypatch.setenv("WORKBENCH_CONFIG", str(tmp_path / "user.toml"))
    (tmp_path / "configs").mkdir()
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, epochs=200)  # runs until stopped
    shutil.move(cfg, tmp_path / "configs" / "tiny.yaml")
    db = tmp_path / "runs.db"
    store = RunStore(db)
    job_id = None
    app = WorkbenchApp(
        str(db), gpu_probe=fake_gpu(), configs_dir="configs", refresh_interval=0.5, host_stats=frozen_host
    )
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            runs = app.screen
            await wait_until(pilot, lambda: runs.loaded, timeout=60, what="first load")
            await pilot.press("n")
            dlg = app.screen
            assert isinstance(dlg, NewRunScreen)
            await wait_until(pilot, lambda: dlg.valid, timeout=60, what="config validation")
            await pilot.press("tab", "tab", "enter", "down", "enter")  # backend: slurm
            assert dlg.query_one("#backend").value == "slurm"
            check = dlg.query_one("#check")
            await pilot.press("tab", "tab", "tab", "tab", *"abc")  # processes, partition, gpus, time
            assert app.focused is dlg.query_one("#time")
            await wait_until(pilot, lambda: "not a Slurm time" in str(check.render()), timeout=30, what="refusal")
            await pilot.press("ctrl+s")  # refused in the worker: the reason in the check line, nothing created
            await wait_until(pilot, lambda: not dlg.query_one("#launch").disabled, timeout=30, what="launch refused")
            assert "slurm time 'abc'" in str(check.render()) and store.list_runs() == []
            await pilot.press("backspace", "backspace", "backspace", "5")
            await wait_until(pilot, lambda: dlg.valid and "time 5" in str(check.render()), timeout=30, what="time 5")
            await pilot.press("ctrl+s")
            await wait_until(
                pilot, lambda: isinstance(app.screen, RunsScreen) and dlg.launched, timeout=60, what="submission"
            )
            run_id = dlg.launched
            job_id = store.get_run(run_id)["job_id"]
            assert job_id and any(n.message.startswith(f"submitted Slurm job {job_id}") for n in app._notifications)

            def row():
                return next((r for r in runs.all_rows if r["id"] == run_id), None)

            await wait_until(
                pilot,
                lambda: row() is not None and row()["job_state"] in STATES,
                timeout=60,
                what="the run in the table with its job state",
            )
            await pilot.pause()
            line = next(ln for ln in runs.table.plain_lines() if job_id in ln)
            assert line.split()[-1] in {"PD", "R", "CD"} or line.rstrip().endswith(job_id), line
            assert str(runs.query_one("#statusline").render()).startswith(f"Slurm job {job_id} ")

            # let the job start when the node has room (a running job is the case worth stopping); a job
            # still pending after 45 s (the node busy with other jobs) is stopped pending
            for _ in range(450):
                if row()["status"] != "queued":
                    break
                await pilot.pause(0.1)
            await pilot.press("home")
            assert runs.table.current_id == run_id
            if row()["status"] in ("queued", "running"):
                await pilot.press("s")
                confirm = app.screen
                if isinstance(confirm, ConfirmScreen):  # else it ended between the two reads: nothing to stop
                    assert f"scancel job {job_id}" in confirm.question
                    await pilot.press("y")
            await wait_until(
                pilot,
                lambda: row()["status"] in ("stopped", "finished"),
                timeout=90,
                what="stopped (or finished first) in the table",
            )
            # the run's status comes from its journal; Slurm may still say COMPLETING (the job's
            # processes exiting) for a moment: the app keeps watching a job until its state is final
            await wait_until(
                pilot,
                lambda: row()["job_state"].split()[0] in {"CANCELLED", "COMPLETED"},
                timeout=60,
                what="the job's final Slurm state in the table",
            )
    finally:
        if job_id:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
        store.close()
