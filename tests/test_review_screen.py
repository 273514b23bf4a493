"""The label-review screen, driven with Pilot on the flipped-label fixture: every key, 80x24,
decisions written to label_decisions, undo, and resume after an app restart."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Static

from conftest import wait_until
from core.cleaning.labels import decision_log, effective_decisions, find_issues, load_issues
from core.runs.store import RunStore
from test_labels import make_labelled_run
from workbench.tui.review import ReviewApp, ReviewScreen

SIZE = (80, 24)


@pytest.fixture
def review_db(tmp_path, sample_frames):
    store, run_id, info = make_labelled_run(tmp_path, sample_frames)
    find_issues(store, run_id)
    issues = load_issues(store, run_id)
    store.close()
    return str(tmp_path / "runs.db"), run_id, issues


async def opened(pilot) -> ReviewScreen:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ReviewScreen) and pilot.app.screen.loaded)
    await pilot.pause()
    return pilot.app.screen


def text(screen: ReviewScreen, wid: str) -> str:
    return str(screen.query_one(wid, Static).render())


def log_of(db: str, run_id: str):
    store = RunStore(db, readonly=True)
    try:
        return decision_log(store, run_id), effective_decisions(store, run_id)
    finally:
        store.close()


async def test_queue_is_ranked_by_quality_and_shows_the_item(review_db):
    db, run_id, issues = review_db
    async with ReviewApp(db, run_id).run_test(size=SIZE) as pilot:
        s = await opened(pilot)
        assert len(s.queue) == len(issues)
        first = issues.sort_values("label_quality").iloc[0]
        assert s.current["example_id"] == first["example_id"]
        info = text(s, "#rv-info")
        assert f"given {first['given_label']}" in info and f"suggested {first['suggested_label']}" in info
        assert s.current["query"] in info and "OOF" in info and "query's products" in info
        assert f"0 of {len(issues)} decided" in text(s, "#rv-head")
        body = text(s, "#rv-text")
        assert s.current["product_title"][:20] in body and "brand" in body and "color" in body
        # 80x24: every line fits, the product panel scrolls
        assert all(len(line) <= 80 for line in info.splitlines())
        panel = s.query_one("#rv-product")
        assert panel.region.bottom <= 24 and panel.region.height >= 8


@pytest.mark.parametrize(
    "key,decision,label",
    [
        ("1", "relabel", "E"),
        ("2", "relabel", "S"),
        ("3", "relabel", "C"),
        ("4", "relabel", "I"),
        ("k", "keep", None),
        ("d", "drop", None),
        ("a", "accept", "suggested"),
    ],
)
async def test_each_decision_key_records_and_advances(review_db, key, decision, label):
    db, run_id, issues = review_db
    async with ReviewApp(db, run_id, reviewer="tester").run_test(size=SIZE) as pilot:
        s = await opened(pilot)
        item = s.current
        await pilot.press(key)
        await pilot.pause()
        assert s.current["example_id"] != item["example_id"]  # advanced
        assert s.pos == 1
        assert f"1 of {len(issues)} decided" in text(s, "#rv-head")
    log, eff = log_of(db, run_id)
    row = log.iloc[-1]
    assert (row["example_id"], row["decision"], row["reviewer"], row["source_run"]) == (
        item["example_id"],
        decision,
        "tester",
        run_id,
    )
    expected = item["suggested_label"] if label == "suggested" else label
    assert row["new_label"] == expected


async def test_undo_restart_and_resume(review_db):
    db, run_id, issues = review_db
    async with ReviewApp(db, run_id).run_test(size=SIZE) as pilot:
        s = await opened(pilot)
        ids = [s.current["example_id"]]
        await pilot.press("k")
        ids.append(s.current["example_id"])
        await pilot.press("d")
        ids.append(s.current["example_id"])
        await pilot.press("2")
        await pilot.press("u")  # undo the relabel: back on that item, undecided
        await pilot.pause()
        assert s.current["example_id"] == ids[2]
        assert "none yet" in text(s, "#rv-info")
        assert f"2 of {len(issues)} decided" in text(s, "#rv-head")
    log, eff = log_of(db, run_id)
    assert log["decision"].tolist() == ["keep", "drop", "relabel", "undo"]  # appended, never overwritten
    assert set(eff["example_id"]) == set(ids[:2])

    # restart: the queue resumes at the first undecided item, and undo still reaches the old drop
    async with ReviewApp(db, run_id).run_test(size=SIZE) as pilot:
        s = await opened(pilot)
        assert s.current["example_id"] == ids[2]
        assert f"2 of {len(issues)} decided" in text(s, "#rv-head")
        await pilot.press("u")
        await pilot.pause()
        assert s.current["example_id"] == ids[1]
    log, eff = log_of(db, run_id)
    assert set(eff["example_id"]) == {ids[0]}


async def test_skip_and_filters(review_db):
    db, run_id, issues = review_db
    async with ReviewApp(db, run_id).run_test(size=SIZE) as pilot:
        s = await opened(pilot)
        await pilot.press("n")
        assert s.pos == 1
        await pilot.press("p")
        assert s.pos == 0
        await pilot.press("g")  # given = E
        assert s.filters["given"] == "E"
        assert len(s.queue) == (issues["given_label"] == "E").sum()
        assert all(s.data.items["given_label"].iloc[s.queue] == "E")
        await pilot.press("g", "g", "g", "g")  # S, C, I, all
        assert s.filters["given"] is None and len(s.queue) == len(issues)
        await pilot.press("s")  # suggested = E
        assert all(s.data.items["suggested_label"].iloc[s.queue] == "E")
        assert len(s.queue) == (issues["suggested_label"] == "E").sum()
        await pilot.press("s", "s", "s", "s")
        await pilot.press("l")  # locale = us (the only one)
        assert s.filters["locale"] == "us" and len(s.queue) == len(issues)
        await pilot.press("l")
        query = s.current["query"]
        await pilot.press("slash")
        box = s.query_one("#rv-query", Input)
        assert box.has_focus
        await pilot.press(*query[:12], "enter")
        await pilot.pause()
        assert s.filters["query"] == query[:12].strip()
        assert all(query[:12].strip().lower() in q.lower() for q in s.data.items["query"].iloc[s.queue])
        assert 0 < len(s.queue) < len(issues)
        assert "query=" in text(s, "#rv-head")
        await pilot.press("slash", "escape")  # cancel leaves the filter
        assert not box.has_class("visible") and s.filters["query"] == query[:12].strip()
        await pilot.press("q")
        await pilot.pause()
    assert not pilot.app.is_running


async def test_product_panel_scrolls_and_screen_pops_inside_another_app(review_db):
    from textual.app import App

    db, run_id, _ = review_db

    class Host(App):  # stands in for the main app, which pushes the screen from its runs screen
        def on_mount(self):
            self.push_screen(ReviewScreen(RunStore(db, readonly=True), run_id))

    async with Host().run_test(size=SIZE) as pilot:
        s = await opened(pilot)
        panel = s.query_one("#rv-product")
        for _ in range(len(s.queue)):  # find an item whose text is taller than the panel
            if panel.max_scroll_y > 0:
                break
            await pilot.press("n")
            await pilot.pause()
        assert panel.max_scroll_y > 0 and panel.has_focus
        await pilot.press("pagedown")
        await pilot.pause()
        assert panel.scroll_y > 0
        await pilot.press("n")  # a new item starts at the top
        await pilot.pause()
        assert panel.scroll_y == 0
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(pilot.app.screen, ReviewScreen) and pilot.app.is_running


async def test_unknown_run_becomes_a_notification(review_db):
    db, run_id, _ = review_db
    async with ReviewApp(db, "nope").run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ReviewScreen))
        s = pilot.app.screen
        await wait_until(pilot, lambda: "cannot load" in text(s, "#rv-head"))
        assert any("no run nope" in n.message for n in pilot.app._notifications)
        await pilot.press("k", "u")  # keys do nothing before data is loaded
    log, _ = log_of(db, run_id)
    assert log.empty
