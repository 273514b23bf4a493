"""Pilot tests of the Ensemble screen (workbench.tui.ensemble) inside a tiny test App, 80x24."""

from __future__ import annotations

import json

import numpy as np
import pytest
from textual.app import App
from textual.widgets import DataTable, Static

from core.runs.store import RunStore
from core.scoring.submission import validate_submission
from test_ensemble import three_runs
from workbench.tui.ensemble import EnsembleScreen


class _Host(App):
    def __init__(self, screen):
        super().__init__()
        self._screen = screen
        self.errors: list[str] = []

    def on_mount(self) -> None:
        self.push_screen(self._screen)

    def notify(self, message, *, severity="information", **kw):  # record toasts for the test
        if severity == "error":
            self.errors.append(str(message))
        super().notify(message, severity=severity, **kw)


async def _settle(pilot) -> None:
    for _ in range(50):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        if not any(w.is_running for w in pilot.app.workers):
            break
    await pilot.pause()


@pytest.fixture()
def store(tmp_path, sample_frames):
    return three_runs(tmp_path, sample_frames)


@pytest.mark.asyncio
async def test_one_key_build_writes_three_valid_files(store, tmp_path):
    st, ex = store
    screen = EnsembleScreen(
        RunStore(st.path, readonly=True), ["run-good", "run-mid", "run-weak"], out_dir=tmp_path / "subs"
    )
    app = _Host(screen)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot)
        table = screen.query_one(DataTable)
        names = [table.get_row_at(i)[1] for i in range(table.row_count)]
        assert names == ["run-good", "run-mid", "run-weak", "bm25", "ensemble"]  # bm25 offered, unmarked
        assert screen.marked == [True, True, True, False]
        assert np.allclose(screen.weights, [1 / 3, 1 / 3, 1 / 3, 0])
        equal_t1 = screen.last_tasks[1]["oof_ensemble"]
        assert "OOF ensemble: T1" in str(screen.query_one("#ens-score", Static).render())

        # weights change -> the ensemble's OOF figures update
        await pilot.press("down", "down", "minus", "minus", "minus", "minus")  # run-weak down to 0
        await _settle(pilot)
        assert screen.weights[2] == pytest.approx(0.0, abs=1e-9)
        assert screen.last_tasks[1]["weights"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
        assert set(screen.last_tasks[1]["oof_member"]) == {"run-good", "run-mid", "run-weak", "bm25"}
        bm25_cell = screen.query_one(DataTable).get_row_at(3)[3]
        assert bm25_cell != "-"  # unmarked members still show their own OOF figure
        assert screen.last_tasks[1]["oof_ensemble"] != equal_t1
        await pilot.press("a")  # fit on OOF
        await _settle(pilot)
        assert screen.weights[0] == max(screen.weights)
        assert screen.last_tasks[1]["oof_ensemble"] >= equal_t1 - 1e-12

        await pilot.press("b")
        await _settle(pilot)
        assert app.errors == []
        assert len(screen.last_paths) == 3
        test = ex[ex["split"] == "test"]
        for task, path in zip((1, 2, 3), screen.last_paths):
            assert validate_submission(path, task, test)["rows"] == len(test)
        assert "written + valid" in str(screen.query_one("#ens-status", Static).render())
        rows = list(RunStore(st.path).db.query("SELECT name, manifest FROM ensembles"))
        assert len(rows) == 1 and json.loads(rows[0]["manifest"])["options"]["source"] == "tui"


@pytest.mark.asyncio
async def test_load_error_becomes_an_error_toast(store, tmp_path):
    st, ex = store
    screen = EnsembleScreen(st, ["run-good", "no-such-run"], out_dir=tmp_path / "subs")
    app = _Host(screen)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot)
        assert any("no run no-such-run" in e for e in app.errors)
        assert "cannot load" in str(screen.query_one("#ens-title", Static).render())
        await pilot.press("b")  # nothing loaded: a warning, no crash, no file
        await _settle(pilot)
    assert not (tmp_path / "subs").exists()
