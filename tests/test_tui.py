"""The Textual app, driven with Pilot: every key of every screen, on a fixture runs.db."""

from __future__ import annotations

import os

import pytest

from conftest import wait_until as wait_for
from tui_fixture import NOW, RUNS, SLURM_JOB, SLURM_RUN, add_slurm_run, build_fixture_db, fixture_app
from workbench.tui.compare import CompareScreen
from workbench.tui.detail import RunDetailScreen
from workbench.tui.dialogs import ConfirmScreen, HelpScreen, NewRunScreen, parse_overrides
from workbench.tui.runs import RunsScreen, matches, sort_rows


@pytest.fixture
def fixture_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return build_fixture_db(tmp_path)


async def loaded(pilot) -> RunsScreen:
    screen = pilot.app.screen
    assert isinstance(screen, RunsScreen)
    await wait_for(pilot, lambda: screen.loaded)
    await pilot.pause()
    return screen


async def goto(pilot, screen: RunsScreen, pred) -> None:
    """Move the cursor with the keyboard to the first row matching ``pred``."""
    await pilot.press("home")
    for _ in range(len(screen.table.rows)):
        if pred(screen.table.current):
            return
        await pilot.press("down")
    raise AssertionError("no such row")


def ids(screen: RunsScreen) -> list[str]:
    return [r["id"] for r in screen.table.rows]


def test_filter_and_sort_helpers():
    rows = [
        {"id": "a", "name": "x", "status": "running", "model": "minilm", "task": 1, "ndcg": 0.8},
        {"id": "b", "name": "y", "status": "finished", "model": "e5", "task": 1, "ndcg": None},
        {"id": "c", "name": "z", "status": "finished", "model": "minilm", "task": 1, "ndcg": 0.9},
    ]
    assert [r["id"] for r in rows if matches(r, "status:fin minilm")] == ["c"]
    assert [r["id"] for r in rows if matches(r, "nosuchkey:1")] == []
    assert [r["id"] for r in sort_rows(rows, "ndcg", True)] == ["c", "a", "b"]  # None last either way
    assert [r["id"] for r in sort_rows(rows, "ndcg", False)] == ["a", "c", "b"]
    assert parse_overrides("train.lr=1e-4 train.seed=3\n# comment\nname='a b'") == [
        "train.lr=1e-4",
        "train.seed=3",
        "name=a b",
    ]
    with pytest.raises(ValueError):
        parse_overrides("train.lr")


async def test_runs_screen_shows_best_values_and_header(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        assert ids(screen) == [r[0] for r in reversed(RUNS)]  # newest first
        by_id = {r["id"]: r for r in screen.table.rows}
        # best, not last: the finished run shows its CV value, the running one the mean of its folds' best evals
        assert by_id["20261122-090000-aaaa"]["ndcg"] == pytest.approx(0.82)
        assert by_id["20261122-113000-dddd"]["ndcg"] == pytest.approx((0.82 + 0.006 + 0.82 + 0.004 + 0.003) / 2)
        assert by_id["20261122-113000-dddd"]["folds"] == "1/3"
        assert by_id["20261122-113000-dddd"]["duration_s"] == pytest.approx(1200)  # frozen clock
        top = str(screen.query_one("#topbar").render())
        assert "runs.db" in top and "1 running / 5 total" in top and "1x NVIDIA H100" in top
        lines = screen.table.plain_lines()
        assert lines[0].split()[:3] == ["name", "status", "T"]
        assert all(len(line) <= 80 for line in lines)


async def test_cursor_keys_sort_keys_and_marks(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        t = screen.table
        await pilot.press("down", "down")
        assert t.cursor == 2
        await pilot.press("k")
        assert t.cursor == 1
        await pilot.press("j", "end")
        assert t.cursor == 4
        await pilot.press("home")
        assert t.cursor == 0
        await pilot.press("pagedown")
        assert t.cursor == 4
        await pilot.press("pageup")
        assert t.cursor == 0
        # 6 = nDCG (name, status, T, model, folds, nDCG): descending first, None last
        await pilot.press("6")
        nd = [r["ndcg"] for r in t.rows]
        assert t.sort_key == "ndcg" and nd[:-1] == sorted(nd[:-1], reverse=True) and nd[-1] is None
        await pilot.press("6")
        assert [r["ndcg"] for r in t.rows][:-1] == sorted(nd[:-1])
        await pilot.press("1")  # name ascending
        assert [r["name"] for r in t.rows] == sorted(r["name"] for r in t.rows)
        await pilot.press("2")
        assert [r["status"] for r in t.rows] == sorted(r["status"] for r in t.rows)
        for key, col in zip("345789", ["task", "model", "folds_done", "f1", "duration_s", "started"]):
            await pilot.press(key)
            assert t.sort_key == col
        assert t.sort_reverse is True  # started: newest first
        await pilot.press("9")
        assert t.sort_key == "started" and t.sort_reverse is False  # a second press flips
        # the cursor stays on its run across a sort
        await pilot.press("home", "down")
        current = t.current_id
        await pilot.press("1")
        assert t.current_id == current
        await pilot.press("space")  # marks and moves down
        assert t.marked == {current} and t.current_id != current
        await pilot.press("space")
        assert current in t.marked and len(t.marked) == 2
        await pilot.press("up", "space")  # unmark
        assert current in t.marked and len(t.marked) == 1
        assert "1 marked" in str(screen.query_one("#statusline").render())


async def test_filter_key(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("slash")
        await pilot.press(*"status:finished")
        assert {r["status"] for r in screen.table.rows} == {"finished"} and len(screen.table.rows) == 2
        await pilot.press("enter")
        assert screen.table.has_focus and len(screen.table.rows) == 2
        await pilot.press("slash", *" minilm-lr3", "enter")
        assert ids(screen) == ["20261122-100000-bbbb"]
        await pilot.press("escape")
        assert len(screen.table.rows) == 5 and screen.filter_text == ""


async def test_enter_opens_detail_with_curves_log_and_system(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        target = "20261122-113000-dddd"  # running
        await goto(pilot, screen, lambda r: r["id"] == target)
        await pilot.press("enter")
        detail = app.screen
        assert isinstance(detail, RunDetailScreen)
        await wait_for(pilot, lambda: detail.run is not None and detail.tail is not None and detail.tail.lines)
        await pilot.pause()
        info = str(detail.query_one("#info").render())
        assert "minilm-seed3" in info and "running" in info and "folds 1/3" in info
        listed = next(r for r in app.services.store().list_runs() if r["id"] == target)  # one best-not-last rule
        assert listed["best_ndcg"] is not None and f"nDCG {listed['best_ndcg']:.3f}" in info
        assert len(detail.series["train/loss"]) == 80 and len(detail.tail.lines) == 12
        assert detail.query_one("#log").line_count == 12
        system = str(detail.query_one("#system").render())
        assert "GPU0 87%" in system and "412W" in system and "host CPU 37%" in system
        assert "step 80/120 67%" in system and "ETA 2:00" in system  # 40 steps left at 1 step / 3 s
        assert detail.curve_name == "train/loss"
        await pilot.press("m")
        assert detail.curve_name == "eval/ndcg" and "eval/ndcg" in str(detail.query_one("#curve-title").render())
        await pilot.press("M")
        assert detail.curve_name == "train/loss"
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("s")  # no live process behind this fixture run: a confirm dialog still guards it
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(app.screen, RunDetailScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_detail_log_follows_a_growing_file(fixture_db, tmp_path):
    app = fixture_app(fixture_db)
    RunDetailScreen_interval = 0.1
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        rid = RUNS[3][0]
        app.push_screen(RunDetailScreen(app.services, rid, refresh_interval=RunDetailScreen_interval))
        detail = app.screen
        await wait_for(pilot, lambda: detail.tail is not None and len(detail.tail.lines) == 12)
        with open(tmp_path / "runs" / rid / "train.log", "a") as fh:
            fh.write("2026-11-22 12:00:01 INFO fold 1 step 10 epoch 0.25 loss 0.9000\npartial line without newline")
        await wait_for(pilot, lambda: len(detail.tail.lines) == 13)
        assert detail.tail.lines[-1].endswith("loss 0.9000")
        with open(tmp_path / "runs" / rid / "train.log", "a") as fh:
            fh.write(" completed\n")
        await wait_for(pilot, lambda: len(detail.tail.lines) == 14)
        assert detail.tail.lines[-1] == "partial line without newline completed"
        assert detail.query_one("#log").line_count == 14


async def test_stop_key_on_a_finished_run_warns(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await goto(pilot, screen, lambda r: r["status"] == "finished")
        await pilot.press("s")
        assert isinstance(app.screen, RunsScreen)
        assert any("nothing to stop" in n.message for n in app._notifications)


async def test_compare_needs_two_marks_then_shows_metrics_diff_curves(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("c")
        assert isinstance(app.screen, RunsScreen) and any("at least two" in n.message for n in app._notifications)
        for rid in ("20261122-090000-aaaa", "20261122-100000-bbbb"):
            await goto(pilot, screen, lambda r, rid=rid: r["id"] == rid)
            await pilot.press("space")
        await pilot.press("c")
        cmp = app.screen
        assert isinstance(cmp, CompareScreen)
        await wait_for(pilot, lambda: cmp.loaded)
        from textual.widgets import DataTable, TabbedContent

        mt = cmp.query_one("#metrics-table", DataTable)
        first = [str(c) for c in mt.get_row_at(0)]
        assert first[0] == "CV nDCG"
        # runs in table order (newest first): bbbb (CV 0.84, best) then aaaa (0.82); fold std of 0.006+0.004*k
        assert first[1].startswith("[b green]0.84 ±0.003") and first[2].startswith("0.82 ±0.003")
        ct = cmp.query_one("#config-table", DataTable)
        keys = [str(ct.get_row_at(i)[0]) for i in range(ct.row_count)]
        assert keys == ["name", "train.lr", "train.seed"]  # only what differs
        await pilot.press("2")
        assert cmp.query_one(TabbedContent).active == "config"
        await pilot.press("3")
        assert cmp.query_one(TabbedContent).active == "curves"
        assert "train/loss (240 points)" in str(cmp.query_one("#curve-title").render())
        await pilot.press("m")
        assert "eval/ndcg (12 points)" in str(cmp.query_one("#curve-title").render())
        await pilot.press("1")
        assert cmp.query_one(TabbedContent).active == "metrics"
        await pilot.press("r")
        await wait_for(pilot, lambda: cmp.loaded)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_compare_shows_oof_differences_with_intervals_and_cycles_the_baseline(fixture_db, tmp_path):
    from textual.widgets import DataTable

    from core.scoring.significance import describe, f1_diff, ndcg_diff
    from tui_fixture import add_oof_files, oof_frame_of

    a, b = add_oof_files(tmp_path)  # the two finished runs; the crashed run has no OOF file
    crashed = "20261122-110000-cccc"
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        for rid in (b, a, crashed):
            await goto(pilot, screen, lambda r, rid=rid: r["id"] == rid)
            await pilot.press("space")
        await pilot.press("c")
        cmp = app.screen
        assert isinstance(cmp, CompareScreen)
        await wait_for(pilot, lambda: cmp.loaded and cmp.deltas_loaded, what="the compare screen and its Δ rows")
        mt = cmp.query_one("#metrics-table", DataTable)
        cols = [str(c.key.value) for c in mt.columns.values()]
        rows = {str(mt.get_row_at(i)[0]): [str(c) for c in mt.get_row_at(i)[1:]] for i in range(mt.row_count)}

        # columns in the Runs table's order (newest first); the crashed run, first, has no OOF
        # file, so the baseline is the next run that has one
        assert cols[1:] == [crashed, b, a] and cmp.base_id == b
        fb, fa = oof_frame_of(b), oof_frame_of(a)  # the same OOF frames the files hold
        want = {
            "Δ nDCG": ndcg_diff(fb, fa),
            "Δ CE nDCG": ndcg_diff(fb, fa, "ce_score"),
            "Δ Task 2 F1": f1_diff(fb, fa),
        }
        for label, d in want.items():
            cells = dict(zip(cols[1:], rows[label], strict=True))
            assert "baseline" in cells[b] and "no OOF file" in cells[crashed]
            assert describe(d, 3, compact=True) in cells[a], (label, cells[a])
        assert want["Δ nDCG"].diff < 0  # a's predictions are noisier
        note = str(cmp.query_one("#delta-note").render())
        assert "2,000 resamples of queries, seed 0" in note and "minilm-lr3e-5 bbbb" in note
        await pilot.press("b")  # the next run is the baseline: the signs flip
        await wait_for(pilot, lambda: cmp.deltas_loaded, what="the differences against the new baseline")
        assert cmp.base_id == a
        rows = {str(mt.get_row_at(i)[0]): [str(c) for c in mt.get_row_at(i)[1:]] for i in range(mt.row_count)}
        cells = dict(zip(cols[1:], rows["Δ nDCG"], strict=True))
        assert describe(ndcg_diff(fa, fb), 3, compact=True) in cells[b] and "baseline" in cells[a]
        await pilot.press("b")  # the crashed run: nothing to compare against
        await wait_for(pilot, lambda: cmp.deltas_loaded, what="the crashed baseline")
        rows = {str(mt.get_row_at(i)[0]): [str(c) for c in mt.get_row_at(i)[1:]] for i in range(mt.row_count)}
        assert all("baseline: no OOF file" in c for c in rows["Δ nDCG"][1:]) and "baseline" in rows["Δ nDCG"][0]
        assert not any(n.severity == "error" for n in app._notifications)


async def test_new_run_dialog_validates_overrides(fixture_db, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.yaml").write_text("name: a\ndata: {dir: data/x}\nmodel: {name: all-MiniLM-L6-v2}\n")
    app = fixture_app(fixture_db, configs_dir=str(configs))
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("n")
        dlg = app.screen
        assert isinstance(dlg, NewRunScreen)
        check = dlg.query_one("#check")
        await wait_for(pilot, lambda: "ok" in str(check.render()))
        dlg.query_one("#overrides").text = "train.nosuchkey=3"
        await wait_for(pilot, lambda: "nosuchkey" in str(check.render()))
        assert dlg.valid is False
        dlg.query_one("#overrides").text = "train.epochs=3"
        await wait_for(pilot, lambda: "3 epochs" in str(check.render()))
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_help_and_command_palette(fixture_db):
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        commands = [c.title for c in app.get_system_commands(app.screen)]
        assert {"New run", "Compare marked runs", "Filter runs"} <= set(commands)
        await pilot.press("ctrl+p")
        await pilot.pause()
        from textual.command import CommandPalette

        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"Filter runs", "enter")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen) and app.screen.query_one("#filter").has_focus


async def test_a_broken_database_becomes_a_notification(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "runs.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    app = fixture_app(bad)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(
            pilot,
            lambda: any("not a runs database" in n.message or "cannot open" in n.message for n in app._notifications),
        )
        assert app.is_running and isinstance(app.screen, RunsScreen)


def test_first_paint_and_frozen_clock_do_not_depend_on_wall_time(fixture_db):
    # the fixture's durations are computed from the injected clock, not time.time()
    from workbench.tui.services import Services

    s = Services(str(fixture_db), clock=lambda: NOW + 60)
    assert s.duration({"started": "2026-11-22T11:59:00+00:00", "ended": None}) == pytest.approx(120)
    assert os.path.basename(s.display_path()) == "runs.db"


async def test_relaunch_key_calls_the_launcher_with_the_current_run(fixture_db, monkeypatch):
    import core.runs.launcher

    calls = []

    def fake_relaunch(store, run_id):
        calls.append(run_id)
        return "20261122-120000-ffff", 99999

    monkeypatch.setattr(core.runs.launcher, "relaunch", fake_relaunch)
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await goto(pilot, screen, lambda r: r["name"] == "minilm-lr3e-5")
        await pilot.press("r")
        await wait_for(pilot, lambda: any("relaunched" in n.message for n in app._notifications))
        assert calls == ["20261122-100000-bbbb"]
        assert any("as 20261122-120000-ffff (pid 99999)" in n.message for n in app._notifications)


async def test_ensemble_and_label_keys_open_their_screens(fixture_db):
    from workbench.tui.ensemble import EnsembleScreen
    from workbench.tui.review import ReviewScreen

    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("end", "space", "up", "space", "e")
        assert isinstance(app.screen, EnsembleScreen)
        assert sorted(app.screen.run_ids) == ["20261122-090000-aaaa", "20261122-100000-bbbb"]
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen))
        await pilot.press("l")
        assert isinstance(app.screen, ReviewScreen)


async def test_detail_of_a_pretraining_run_cycles_through_its_task_losses(tmp_path):
    """A pre-training run (no folds) logs pretrain/<task>_loss: `m` reaches those curves."""
    from core.runs.store import RunStore
    from workbench.tui.detail import DETAIL_CURVES

    db = tmp_path / "runs.db"
    store = RunStore(db)
    rid = store.create_run("pretrain-x", {"kind": "pretrain", "train": {"epochs": 1}}, status="finished")
    rows = []
    for step in (1, 2, 3):
        for task, v in (("mlm", 9.0), ("brand", 6.0), ("contrastive", 0.1)):
            rows.append(
                {"name": f"pretrain/{task}_loss", "value": v - step, "fold": 0, "step": step, "epoch": step / 10}
            )
        rows.append({"name": "train/loss", "value": 15.0 - step, "fold": 0, "step": step, "epoch": step / 10})
    store.log_metrics(rid, rows)
    store.close()
    app = fixture_app(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        app.push_screen(RunDetailScreen(app.services, rid, refresh_interval=0.2))
        detail = app.screen
        await wait_for(pilot, lambda: detail.run is not None, what="the run loaded")
        assert "folds -  nDCG -" in str(detail.query_one("#info").render())
        assert detail.curves == DETAIL_CURVES + [
            "pretrain/brand_loss",
            "pretrain/contrastive_loss",
            "pretrain/mlm_loss",
        ]
        seen = []
        for _ in range(len(detail.curves)):
            seen.append(detail.curve_name)
            await pilot.press("m")
        assert seen[-1] == "pretrain/mlm_loss"
        await pilot.press("M")  # back from train/loss to the last curve
        assert "pretrain/mlm_loss 3 pts" in str(detail.query_one("#curve-title").render())


# -- Slurm runs in the app, without Slurm: fake rows, Slurm's refresh patched away ----------------------
@pytest.fixture
def no_slurm_refresh(monkeypatch, tmp_path):
    """Slurm is never asked about the fake job (its refresh would mark it crashed); no user [slurm] defaults."""
    import core.runs.slurm

    monkeypatch.setattr(core.runs.slurm, "refresh", lambda store: [])
    monkeypatch.setenv("WORKBENCH_CONFIG", str(tmp_path / "no-user-config.toml"))


async def test_a_pending_slurm_run_shows_its_job_state_and_reason_at_80x24(fixture_db, no_slurm_refresh):
    add_slurm_run(fixture_db)
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        assert screen.table.current_id == SLURM_RUN  # the newest
        lines = screen.table.plain_lines()
        assert lines[0].split()[-1] == "where" and all(len(line) <= 80 for line in lines)
        row = next(line for line in lines if "minilm-sl" in line)
        assert row.split()[1] == "queued" and row.rstrip().endswith(f"{SLURM_JOB} PD")
        assert sum(line.rstrip().endswith("local") for line in lines) == len(RUNS)
        status = str(screen.query_one("#statusline").render())
        assert status.startswith(f"Slurm job {SLURM_JOB} PD Resources · 6 shown")
        await pilot.press("down")  # a local run: no job in the status line
        assert "Slurm job" not in str(screen.query_one("#statusline").render())
        await pilot.press("slash", *"backend:slurm", "enter")
        assert ids(screen) == [SLURM_RUN]
        await pilot.press("slash", "ctrl+a", "ctrl+k", *"backend:local", "enter")
        assert SLURM_RUN not in ids(screen) and len(ids(screen)) == len(RUNS)
        await pilot.press("escape", "home", "enter")
        detail = app.screen
        assert isinstance(detail, RunDetailScreen)
        await wait_for(pilot, lambda: detail.polls >= 1)
        await pilot.pause()
        info = str(detail.query_one("#info").render()).splitlines()
        assert info[1] == f"Slurm job {SLURM_JOB} PENDING (Resources)"
        assert info[0].startswith("minilm-slurm") and "queued" in info[0] and info[2].startswith("folds 0/3")
        assert "a Slurm job, not sampled here" in str(detail.query_one("#system").render())
        await pilot.press("s")
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and f"scancel job {SLURM_JOB}" in confirm.question
        await pilot.press("n")


async def test_a_running_slurm_run_names_its_node(fixture_db, no_slurm_refresh):
    add_slurm_run(fixture_db, job_state="RUNNING", job_reason="None", node="gpu-node-07")
    app = fixture_app(fixture_db)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        assert screen.table.current["where"] == f"{SLURM_JOB} R"
        assert str(screen.query_one("#statusline").render()).startswith(f"Slurm job {SLURM_JOB} R on gpu-node-07 ·")
        await pilot.press("enter")
        detail = app.screen
        await wait_for(pilot, lambda: detail.polls >= 1)
        await pilot.pause()
        info = str(detail.query_one("#info").render()).splitlines()
        assert info[1] == f"Slurm job {SLURM_JOB} RUNNING on gpu-node-07"  # Slurm's reason "None": none shown


def test_where_cell_and_job_line():
    from workbench.tui.services import job_line, where_cell

    assert where_cell({"backend": None}) == "local" and where_cell({"backend": "slurm"}) == "slurm"
    assert where_cell({"backend": "slurm", "job_id": "1234", "job_state": "CANCELLED by 0"}) == "1234 CA"
    assert where_cell({"backend": "slurm", "job_id": "1234567", "job_state": "PENDING"}) == "1234567"
    assert where_cell({"backend": "slurm", "job_id": "123456789", "job_state": "PENDING"}) == "…456789"
    assert job_line({"backend": "local", "pid": 42}) == "pid 42"
    assert job_line({"backend": "slurm", "job_id": "7", "job_state": "PENDING", "job_reason": "Priority"}) == (
        "Slurm job 7 PENDING (Priority)"
    )


async def _slurm_dialog(pilot, app) -> NewRunScreen:
    await loaded(pilot)
    await pilot.press("n")
    dlg = app.screen
    assert isinstance(dlg, NewRunScreen)
    await wait_for(pilot, lambda: dlg.valid, what="the config check")
    await pilot.press("tab", "tab")  # config -> overrides -> backend
    assert app.focused is dlg.query_one("#backend")
    await pilot.press("enter", "down", "enter")  # open the list, pick slurm
    assert dlg.query_one("#backend").value == "slurm"
    return dlg


@pytest.fixture
def configs_a(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.yaml").write_text("name: a\ndata: {dir: data/x}\nmodel: {name: all-MiniLM-L6-v2}\n")
    return configs


async def test_new_run_dialog_refuses_bad_slurm_values_and_creates_nothing(
    fixture_db, configs_a, tmp_path, no_slurm_refresh, monkeypatch
):
    import core.runs.slurm
    import workbench.tui.dialogs as dialogs

    monkeypatch.setattr(dialogs, "slurm_missing", lambda: None)
    submitted = []
    monkeypatch.setattr(core.runs.slurm, "submit", lambda *a, **kw: submitted.append(a) or ("x", "1"))
    (tmp_path / "user.toml").write_text('[slurm]\npartition = "debug"\ntime = "30"\n')
    monkeypatch.setenv("WORKBENCH_CONFIG", str(tmp_path / "user.toml"))
    app = fixture_app(fixture_db, configs_dir=str(configs_a))
    async with app.run_test(size=(80, 24)) as pilot:
        dlg = await _slurm_dialog(pilot, app)
        check = dlg.query_one("#check")
        assert dlg.query_one("#slurm").display
        await wait_for(pilot, lambda: dlg.query_one("#partition").value == "debug", what="the [slurm] defaults")
        assert dlg.query_one("#time").value == "30"
        await wait_for(pilot, lambda: "on Slurm: partition debug, time 30" in str(check.render()))
        for field, value, error in [
            ("time", "abc", "slurm time 'abc': not a Slurm time"),
            ("processes", "0", "processes '0': must be an integer >= 1"),
            ("gpus", "two", "slurm gpus 'two': must be an integer >= 1"),
        ]:
            box = dlg.query_one(f"#{field}")
            old, box.value = box.value, value
            await wait_for(pilot, lambda e=error: e in str(check.render()) and not dlg.valid, what=error)
            assert len(str(check.render()).splitlines()) <= 2
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: not dlg.query_one("#launch").disabled, what="the launch to be refused")
            assert error in str(check.render()) and isinstance(app.screen, NewRunScreen)
            box.value = old
        assert submitted == [] and len(app.services.store().list_runs()) == len(RUNS)


async def test_new_run_dialog_without_sbatch_says_why(fixture_db, configs_a, no_slurm_refresh, monkeypatch):
    import workbench.tui.dialogs as dialogs

    monkeypatch.setattr(dialogs, "slurm_missing", lambda: "Slurm: sbatch, squeue, scancel not found on PATH")
    app = fixture_app(fixture_db, configs_dir=str(configs_a))
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("n")
        dlg = app.screen
        await wait_for(pilot, lambda: "sbatch not on PATH" in str(dlg.query_one("#backend-note").render()))
        dlg.query_one("#backend").value = "slurm"
        await wait_for(pilot, lambda: "not found on PATH" in str(dlg.query_one("#check").render()))
        assert dlg.valid is False


async def test_new_run_dialog_launches_local_with_processes_and_submits_to_slurm(
    fixture_db, configs_a, no_slurm_refresh, monkeypatch
):
    import core.runs.launcher
    import core.runs.slurm
    import workbench.tui.dialogs as dialogs

    calls = []

    def fake_launch(path, overrides, store):
        calls.append(("local", overrides))
        return store.create_run("a", {"name": "a"}, status="queued"), 4242

    def fake_submit(cfg, store, opts, config_path=None):
        calls.append(("slurm", opts.time, opts.partition, cfg.name))
        return store.create_run("a", {"name": "a"}, status="queued"), "777"

    monkeypatch.setattr(core.runs.launcher, "launch", fake_launch)
    monkeypatch.setattr(core.runs.slurm, "submit", fake_submit)
    monkeypatch.setattr(dialogs, "slurm_missing", lambda: None)
    app = fixture_app(fixture_db, configs_dir=str(configs_a))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("n")
        dlg = app.screen
        await wait_for(pilot, lambda: dlg.valid)
        dlg.query_one("#processes").value = "2"
        await wait_for(pilot, lambda: "2 processes" in str(dlg.query_one("#check").render()), what="2 processes")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen) and dlg.launched, what="the local launch")
        await wait_for(pilot, lambda: screen.table.current_id == dlg.launched, what="the cursor on the new run")
        assert calls == [("local", ["train.num_processes=2"])]
        assert any(n.message.startswith(f"launched {dlg.launched} (pid 4242)") for n in app._notifications)

        # Slurm, at 80x24: the dialog scrolls; the Launch button is reached with the keyboard and clicked
        dlg = await _slurm_dialog(pilot, app)
        dlg.query_one("#time").value = "5"
        await wait_for(pilot, lambda: dlg.valid and "time 5" in str(dlg.query_one("#check").render()))
        launch_button = dlg.query_one("#launch")
        for _ in range(12):
            if app.focused is launch_button:
                break
            await pilot.press("tab")
        assert app.focused is launch_button
        await pilot.pause()
        assert app.screen.region.contains_region(launch_button.region)
        await pilot.click("#launch")
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen) and dlg.launched, what="the submission")
        assert calls[1] == ("slurm", "5", None, "a")
        assert any(n.message.startswith("submitted Slurm job 777: run ") for n in app._notifications)


async def test_a_finished_slurm_run_is_watched_until_its_job_ends(monkeypatch, tmp_path):
    """The trainer records ``finished`` before Slurm reports the job COMPLETED: the table keeps reading
    the job's state (found driving the app: the job stayed ``R`` after it had completed)."""
    import core.runs.slurm
    from core.runs.store import RunStore

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "slurm.db"  # the only run: nothing else active
    add_slurm_run(db, job_state="RUNNING", job_reason="None", node="vm")
    store = RunStore(db)
    store.update_run(SLURM_RUN, status="finished", ended="2026-11-22T11:59:30+00:00")
    store.close()
    asked = []
    completed = []  # set by the test once it has seen R: a loaded machine may refresh twice before that

    def fake_refresh(store):  # still RUNNING until the test says so; then Slurm says the job has completed
        asked.append(1)
        if not completed:
            return []
        store.update_run(SLURM_RUN, job_state="COMPLETED", job_reason="None")
        return [SLURM_RUN]

    monkeypatch.setattr(core.runs.slurm, "refresh", fake_refresh)
    app = fixture_app(db, refresh_interval=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        assert screen.table.rows[0]["status"] == "finished" and screen.table.rows[0]["where"] == f"{SLURM_JOB} R"
        n = len(asked)
        await wait_for(pilot, lambda: len(asked) > n, what="the finished run's job asked again")
        completed.append(1)
        await wait_for(pilot, lambda: screen.table.rows[0]["where"] == f"{SLURM_JOB} CD", what="CD in the table")
        n = len(asked)
        await pilot.pause(0.8)  # every job ended, no run active: Slurm is not asked again
        assert len(asked) == n


def test_watched():
    from workbench.tui.services import watched

    assert watched({"status": "queued"}) and not watched({"status": "finished"})
    slurm = {"status": "finished", "backend": "slurm", "job_id": "7"}
    assert watched({**slurm, "job_state": "RUNNING"}) and watched({**slurm, "job_state": None})
    assert not watched({**slurm, "job_state": "COMPLETED"}) and not watched({**slurm, "job_state": "CANCELLED by 0"})
