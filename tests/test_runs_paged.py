"""The Runs screen at sweep scale (issue 16, part 4): above PAGED_ABOVE runs the screen holds one
window of the list and filters and sorts in runs.db. Its SQL is checked against the in-memory
meaning (``matches``, ``sort_rows``) over every run, and the screen is driven with Pilot on 5,000
runs: page-down shows the next runs in order, a filter shows exactly the runs a plain Python filter
over the file keeps, the totals, a new run appearing on refresh, a sort, marks."""

from __future__ import annotations

import sqlite3

import pytest

from conftest import wait_until
from core.runs.store import RunStore
from tui_fixture import NOW, build_many_runs, fixture_app
from workbench.tui.runs import SORTABLE, RunsScreen, matches, run_rows, sort_rows
from workbench.tui.runs_view import FILTER_FIELDS, PAGED_ABOVE, WINDOW, parse_filter, view_ids
from workbench.tui.services import Services
from workbench.tui.table import PagedRows

N = 5000
QUERIES = [
    "",
    "sweep-7",
    "SWEEP-7-",
    "status:fail",
    "status:fin minilm",
    "mpnet",
    "sentence-transformers",  # the model's folder is not shown, so it does not match
    "backend:slurm",
    "local",
    "job:40",
    "state:pend",
    "sweep:sw3",
    "trial:12",
    "kind:stack",
    "kind:train e5",
    "task:2 status:run",
    "none",  # a run without a task does not match "none"
    "%",
    "_",
    "nosuchkey:1",
    "2026110",
]


@pytest.fixture(scope="module")
def many_db(tmp_path_factory):
    return build_many_runs(tmp_path_factory.mktemp("many") / "runs.db", N)


@pytest.fixture
def no_slurm(monkeypatch):
    import core.runs.slurm

    monkeypatch.setattr(core.runs.slurm, "refresh", lambda store: [])


def _all_rows(db) -> list[dict]:
    store = RunStore(db, readonly=True)
    try:
        return run_rows(store.list_runs(), Services(str(db), clock=lambda: NOW))
    finally:
        store.close()


def newest_first(db) -> list[tuple]:
    """(id, name, status, task, model, backend) of every run, newest first, straight from the file."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT id, name, status, task, model, backend FROM runs ORDER BY created DESC, id DESC"
        ).fetchall()
    finally:
        conn.close()


def plain_filter(db, word: str, status: str | None = None) -> list[str]:
    """A bare ``word`` (and ``status:<status>``), filtered by hand in Python over the file's rows."""
    out = []
    for rid, name, st, task, model, backend in newest_first(db):
        shown = [rid, name or "", st or "", "" if task is None else str(task)]
        shown += [(model or "").split("/")[-1], backend or "local"]
        if any(word in v.lower() for v in shown) and (status is None or status in (st or "")):
            out.append(rid)
    return out


def test_the_sql_filter_and_sorts_mean_what_the_in_memory_ones_do(many_db):
    rows = _all_rows(many_db)
    assert len(rows) == N
    store = RunStore(many_db, readonly=True)
    services = Services(str(many_db), clock=lambda: NOW)
    for q in QUERIES:
        want = [r["id"] for r in rows if matches(r, q)]
        assert view_ids(store, services, q, None, False) == want, q
    assert view_ids(store, services, "sentence-transformers", None, False) == []
    assert view_ids(store, services, "nosuchkey:1", None, False) == [] and parse_filter("nosuchkey:1") is None
    assert len(view_ids(store, services, "kind:stack", None, False)) == len(range(0, N, 97))
    for key in [*SORTABLE, "where"]:
        for reverse in (False, True):
            want = [r["id"] for r in sort_rows([r for r in rows if matches(r, "sweep-1")], key, reverse)]
            assert view_ids(store, services, "sweep-1", key, reverse) == want, (key, reverse)
    with pytest.raises(ValueError, match="cannot sort"):
        view_ids(store, services, "", "nope", False)
    with pytest.raises(ValueError, match="no field"):
        store.run_index([("config", "x")], FILTER_FIELDS)
    store.close()


def test_list_runs_of_some_ids_reads_their_best_values_alone(many_db):
    store = RunStore(many_db, readonly=True)
    every = {r["id"]: r for r in store.list_runs()}
    some = [r[0] for r in newest_first(many_db)[1000:1200:7]]
    got = store.list_runs(ids=some + ["no-such-run"])
    assert [r["id"] for r in got] == some  # newest first, the unknown id left out
    for r in got:
        assert r == every[r["id"]]
    assert store.list_runs(ids=[]) == [] and store.folds_done([]) == {}
    store.close()


async def _paged(pilot) -> RunsScreen:
    screen = pilot.app.screen
    await wait_until(pilot, lambda: screen.loaded, what="the first page")
    await pilot.pause()
    return screen


def drawn(screen: RunsScreen) -> list[str]:
    """The names drawn in the table's body (the first word of each line after the header)."""
    return [line.split()[0] if line.strip() else "" for line in screen.table.plain_lines()[1:]]


def shown_in_view(screen: RunsScreen) -> list[str]:
    t = screen.table
    return [t.rows.id_at(i) for i in range(t.top, min(len(t.rows), t.top + t.body_height))]


async def test_page_down_shows_the_next_runs_in_order(many_db, no_slurm):
    assert N > PAGED_ABOVE
    order = newest_first(many_db)
    app = fixture_app(many_db, refresh_interval=3600)
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await _paged(pilot)
        t = screen.table
        assert screen.paged and isinstance(t.rows, PagedRows)
        assert len(t.rows) == N and len(t.rows.window) == WINDOW < N  # one window read, not every run
        top = str(screen.query_one("#topbar").render())
        assert f"4 running / {N} total" in top
        assert str(screen.query_one("#statusline").render()).startswith(f"{N} shown")
        assert drawn(screen) == [name for _, name, *_ in order[: t.body_height]]
        pages = 3 * WINDOW // t.body_height  # well past the first window
        for page in range(1, pages + 1):
            await pilot.press("pagedown")
            await wait_until(pilot, lambda: "…" not in drawn(screen), what=f"page {page} read")
            assert t.cursor == page * t.body_height
            assert t.current["id"] == order[t.cursor][0]
            assert drawn(screen) == [name for _, name, *_ in order[t.top : t.top + t.body_height]]
        assert t.top > WINDOW and len(t.rows.window) == WINDOW  # still one window, a later one
        await pilot.press("end")
        await wait_until(pilot, lambda: t.current is not None, what="the last window")
        assert t.current["id"] == order[-1][0] and drawn(screen)[t.cursor - t.top] == order[-1][1]
        await pilot.press("home")
        await wait_until(pilot, lambda: t.current is not None, what="the first window again")
        assert t.current["id"] == order[0][0]


async def test_filter_shows_exactly_the_matching_runs_and_a_new_run_appears(many_db, no_slurm, tmp_path):
    import shutil

    db = tmp_path / "runs.db"
    shutil.copy(many_db, db)
    app = fixture_app(db, refresh_interval=0.3)
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await _paged(pilot)
        t = screen.table
        await pilot.press("slash", *"sweep-7")
        want = plain_filter(db, "sweep-7")
        assert 0 < len(want) < N
        await wait_until(pilot, lambda: len(t.rows) == len(want), what="the filtered list")
        assert t.rows.ids == want
        await pilot.press("enter")
        await pilot.pause()
        assert str(screen.query_one("#statusline").render()).startswith(f"{len(want)} shown · filter 'sweep-7'")
        assert f"/ {N} total" in str(screen.query_one("#topbar").render())  # the total is every run
        assert drawn(screen)[: len(want)] == [r["name"] for r in t.rows.window[: t.body_height]]
        await pilot.press("slash", "ctrl+u", *"status:fail sweep-1", "enter")
        want = plain_filter(db, "sweep-1", status="fail")
        await wait_until(pilot, lambda: t.rows.ids == want, what="the second filter")
        assert {r["status"] for r in t.rows.window} == {"failed"}
        await pilot.press("escape")
        await wait_until(pilot, lambda: len(t.rows) == N, what="the filter cleared")

        store = RunStore(db)  # another process starts a run: the next refresh lists it first
        new = store.create_run("late-run", {"train": {"folds": 5}}, run_id="20261201-000000-ffff", status="running")
        store.update_run(new, created="2026-12-01T00:00:00+00:00")
        await wait_until(pilot, lambda: t.rows.id_at(0) == new, timeout=30, what="the new run listed")
        await wait_until(pilot, lambda: f"5 running / {N + 1} total" in str(screen.query_one("#topbar").render()))
        await pilot.press("home")
        await pilot.pause()
        assert drawn(screen)[0] == "late-run" and t.current["status"] == "running"
        store.close()


async def test_sort_and_marks_in_a_paged_list(many_db, no_slurm):
    rows = _all_rows(many_db)
    app = fixture_app(many_db, refresh_interval=3600)
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await _paged(pilot)
        t = screen.table
        await pilot.press("6")  # nDCG, best first
        want = [r["id"] for r in sort_rows(list(rows), "ndcg", True)]
        await wait_until(pilot, lambda: t.rows.ids == want, timeout=30, what="the sorted list")
        assert "sorted by ndcg desc" in str(screen.query_one("#statusline").render())
        assert [r["ndcg"] for r in t.rows.window] == sorted((r["ndcg"] for r in t.rows.window), reverse=True)
        assert t.current_id == rows[0]["id"]  # the cursor stayed on its run, wherever it went
        await pilot.press("home")
        await wait_until(pilot, lambda: t.current is not None, what="the first window")
        await pilot.press("space", "space", "c")  # two marks, then compare: newest first
        marked = want[:2]
        from workbench.tui.compare import CompareScreen

        assert isinstance(app.screen, CompareScreen)
        by_id = {r["id"]: r for r in rows}
        assert app.screen.run_ids == sorted(marked, key=lambda i: (by_id[i]["created"], i), reverse=True)
