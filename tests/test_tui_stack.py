"""A stack run (``workbench stack``, ``kind: stack``) in the app: the Runs screen's row, the run
detail's feature importance bars by task, the figures line, missing files, relaunch/resume refused."""

from __future__ import annotations

import threading

import pytest

from conftest import wait_until as wait_for
from tui_fixture import STACK_IMPORTANCE, STACK_RUN, add_stack_run, build_fixture_db, fixture_app
from workbench.tui.detail import RunDetailScreen
from workbench.tui.runs import RunsScreen
from workbench.tui.stack_panel import StackFiles, bar_lines, figures_line, read_stack_files


@pytest.fixture
def stack_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = build_fixture_db(tmp_path)
    add_stack_run(db)
    return db


async def _runs(pilot) -> RunsScreen:
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.loaded)
    await pilot.pause()
    return screen


async def _open_stack(pilot) -> RunDetailScreen:
    screen = await _runs(pilot)
    await pilot.press("home")
    while screen.table.current_id != STACK_RUN:
        await pilot.press("down")
    await pilot.press("enter")
    detail = pilot.app.screen
    assert isinstance(detail, RunDetailScreen)
    await wait_for(pilot, lambda: detail.stack_files is not None, what="the stack files read")
    await pilot.pause()
    return detail


def _shares(task: str) -> list[tuple[str, float]]:
    rows = STACK_IMPORTANCE[task]
    total = sum(g for _, g in rows)
    return [(f, g / total) for f, g in sorted(rows, key=lambda r: -r[1])]


async def test_runs_screen_lists_a_stack_run(stack_db):
    app = fixture_app(stack_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _runs(pilot)
        row = next(r for r in screen.table.rows if r["id"] == STACK_RUN)
        assert row["model"] == "lightgbm-stack" and row["kind"] == "stack" and row["folds"] == "3/3"
        assert row["ndcg"] == pytest.approx(0.8598) and row["f1"] == pytest.approx(0.7234)
        assert row["final"] == pytest.approx(0.8712)
        line = next(x for x in screen.table.plain_lines() if x.lstrip().startswith("stack "))
        # at 80 columns the model column is cut like any long model name ("multilingual-e5-sm…")
        assert "lightgbm-sta" in line and "3/3" in line and "0.860" in line and "0.723" in line
        await pilot.press("home")
        while screen.table.current_id != STACK_RUN:
            await pilot.press("down")
        await pilot.press("r")  # nothing to relaunch: a notice naming the command, no worker
        await pilot.press("R")
        await pilot.press("s")  # finished: nothing to stop
        await pilot.pause()
        notes = [n.message for n in app._notifications]
        assert sum("is a stack run: no training process to" in n for n in notes) == 2
        assert any("workbench stack --runs 20261122-090000-aaaa --runs 20261122-100000-bbbb" in n for n in notes)
        assert any("nothing to stop" in n for n in notes)
        assert not any(n.severity == "error" for n in app._notifications)
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("slash", *"kind:stack", "enter")
        assert [r["id"] for r in screen.table.rows] == [STACK_RUN]


async def test_stack_detail_shows_importance_bars_by_task(stack_db, monkeypatch):
    import workbench.tui.detail

    threads = []

    def read(run_dir):  # the files are read in a worker thread, never on the event loop
        threads.append(threading.current_thread() is threading.main_thread())
        return read_stack_files(run_dir)

    monkeypatch.setattr(workbench.tui.detail, "read_stack_files", read)
    app = fixture_app(stack_db)
    async with app.run_test(size=(80, 24)) as pilot:
        detail = await _open_stack(pilot)
        assert threads == [False]
        assert detail.stack and detail.stack_task_name == "rank"
        assert not detail.query_one("#curve").display and detail.query_one("#importance").display
        panel = detail.query_one("#importance")
        assert "rank" in str(panel.border_title) and "m: next task" in str(panel.border_title)
        title = str(detail.query_one("#curve-title").render())
        assert "CV final nDCG 0.8712" in title and "held-out nDCG 0.8655" in title and "Task 2 F1 0.7234" in title
        info = str(detail.query_one("#info").render())
        assert "lightgbm-stack" in info and "folds 3/3" in info and "final 0.871" in info
        lines = panel.plain_lines()
        assert 6 <= len(lines) < len(STACK_IMPORTANCE["rank"])  # as many as fit at 80x24, then a "more" line
        expected = _shares("rank")
        for line, (feature, share) in zip(lines[:-1], expected, strict=False):
            assert line.startswith(feature) and f"{share:.3f}" in line and "█" in line
        assert lines[0].count("█") > lines[1].count("█")  # the bars scale with the share
        assert lines[-1].startswith(f"… {len(expected) - len(lines) + 1} more features")
        assert all(len(x) <= panel.size.width for x in lines)
        await pilot.press("m")
        assert detail.stack_task_name == "esci" and "esci" in str(panel.border_title)
        lines = panel.plain_lines()
        assert [x.split()[0] for x in lines] == [f for f, _ in _shares("esci")]  # all 5 fit
        assert f"{_shares('esci')[0][1]:.3f}" in lines[0]
        await pilot.press("m")
        assert detail.stack_task_name == "substitute"
        await pilot.press("m")
        assert detail.stack_task_name == "rank"
        await pilot.press("M")
        assert detail.stack_task_name == "substitute"
        await pilot.press("r")  # the detail refuses a relaunch too
        await pilot.pause()
        assert any("is a stack run" in n.message for n in app._notifications)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_stack_detail_without_its_files_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = build_fixture_db(tmp_path)
    add_stack_run(db, files=False)
    app = fixture_app(db)
    async with app.run_test(size=(80, 24)) as pilot:
        detail = await _open_stack(pilot)
        lines = detail.query_one("#importance").plain_lines()
        assert lines == ["no feature_importance.csv in the run folder (written at the end)"]
        assert "no stack_report.json" in str(detail.query_one("#curve-title").render())
        await pilot.press("m")  # no task to cycle: nothing breaks
        assert detail.stack_task_name is None
        assert not any(n.severity == "error" for n in app._notifications)


def test_read_stack_files_turns_bad_files_into_notices(tmp_path):
    assert read_stack_files(None).importance_notice == "the run has no run folder"
    (tmp_path / "feature_importance.csv").write_text("task,feature,gain\nrank,a,1\n")
    (tmp_path / "stack_report.json").write_text("[1, 2]")
    files = read_stack_files(tmp_path)
    assert files.importance == {} and "no column share" in files.importance_notice
    assert "not a JSON object" in files.report_notice and "not a JSON object" in figures_line(files)
    (tmp_path / "feature_importance.csv").write_text("task,feature,gain,share\nesci,b,1,x\n")
    (tmp_path / "stack_report.json").write_text("{broken")
    files = read_stack_files(tmp_path)
    assert "line 2" in files.importance_notice and files.report_notice.startswith("cannot read stack_report.json")
    (tmp_path / "feature_importance.csv").write_text(
        "task,feature,gain,share\nsubstitute,s,1,0.25\nesci,b,1,0.5\nesci,a,1,0.5\nrank,z,3,0.75\n"
    )
    (tmp_path / "stack_report.json").write_text('{"cv": {"ndcg": 0.8, "task2_f1": 0.7}, "held_out": {}}')
    files = read_stack_files(tmp_path)
    assert files.tasks == ["rank", "esci", "substitute"] and files.importance_notice is None
    assert figures_line(files) == "CV final nDCG [b]0.8000[/] · Task 2 F1 [b]0.7000[/]"  # no held-out rows
    assert figures_line(StackFiles(report={"cv": {}})) == "[dim]stack_report.json has no figures[/]"
    rows = [(f"feature_{i}", 0.0, 1 / (i + 1)) for i in range(10)]
    lines = [t.plain for t in bar_lines(rows, 40, 4)]
    assert len(lines) == 4 and lines[-1].startswith("… 7 more features") and all(len(x) <= 40 for x in lines)
    assert bar_lines(rows, 40, 0) == [] and len(bar_lines(rows[:2], 40, 5)) == 2
