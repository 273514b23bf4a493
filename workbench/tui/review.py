"""The label-review screen: a queue of suspected label errors, one key = decide + advance.

``ReviewScreen(store, run_id)`` is self-contained (the main app pushes it from its runs screen);
``workbench labels review RUN`` opens it in :class:`ReviewApp`. The queue is the run's
``label_issues`` ranked by label quality (lowest first). For each item: the query, the
product's title, brand, color, bullet points and description (scrollable panel), the given and
suggested label, the four OOF probabilities and how the query's other products are labelled.

Keys: ``1``-``4`` relabel E/S/C/I, ``k`` keep, ``a`` accept the suggestion, ``d`` drop, ``u``
undo; each decision is appended to ``label_decisions`` (core.cleaning.labels) and advances to the next
undecided item, so a session resumes where it stopped. ``n``/``p`` skip forward/back, ``g``/``s``
cycle the given/suggested-label filter, ``l`` the locale filter, ``/`` filters by query text.

Loading (issues, OOF probabilities, example text: ``core.cleaning.labels.load_review_data``) runs in a
thread worker with its own read-only runs.db connection (ReviewLoaded). A decision shows at once
(the screen replays its log with ``core.cleaning.labels.replay_decisions``) and is queued for a writer
worker, which appends the queue in order through its own connection (DecisionSaved); if a write
fails, the toast says so and the log is re-read from runs.db (DecisionLogLoaded). Closing the
screen waits, off the event loop, for the queued decisions to be written. Errors become
notifications. Fits 80x24: six info lines, the product panel takes the rest and scrolls.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Input, Static

from core.cleaning.labels import (
    ReviewData,
    decision_log,
    load_review_data,
    record_decision,
    replay_decisions,
    undo_target,
)
from core.runs.store import RunStore, now_iso
from core.scoring.metrics import ESCI_LABELS
from workbench.tui.messages import DecisionLogLoaded, DecisionSaved, ReviewLoaded, WorkerFailed
from workbench.tui.workers import WorkerErrors

LABEL_NAMES = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}
LABEL_STYLES = {"E": "bold green", "S": "bold yellow", "C": "bold cyan", "I": "bold red"}
_PROBS = ["p_E", "p_S", "p_C", "p_I"]
#: how long closing the screen waits for queued decisions to be written
FLUSH_TIMEOUT_S = 60.0


class ReviewScreen(WorkerErrors, Screen):
    """Review the label issues of one run.

    Args:
        store: the app's runs.db, as a RunStore (its ``path`` is used) or a path. The screen opens
            its own connections, in workers: a read-only one to load, a writable one per batch of
            queued decisions.
        run_id: the run whose ``label_issues`` to review.
        reviewer: recorded with each decision (default ``$USER``).
    """

    DEFAULT_CSS = """
    ReviewScreen { layout: vertical; }
    ReviewScreen #rv-head { height: 1; background: $primary-background; color: $text; }
    ReviewScreen #rv-info { height: 5; padding: 0 1; }
    ReviewScreen #rv-product { height: 1fr; border: round $secondary; padding: 0 1; }
    ReviewScreen #rv-query { height: 3; display: none; }
    ReviewScreen #rv-query.visible { display: block; }
    ReviewScreen #rv-keys { height: 1; background: $panel; color: $text-muted; }
    """

    WORKER_TITLES = {"review-load": "label review", "review-write": "decision not saved", "review-log": "label review"}
    BINDINGS = [
        Binding("1", "relabel('E')", "E", show=False),
        Binding("2", "relabel('S')", "S", show=False),
        Binding("3", "relabel('C')", "C", show=False),
        Binding("4", "relabel('I')", "I", show=False),
        Binding("k", "decide('keep')", "keep"),
        Binding("a", "decide('accept')", "accept"),
        Binding("d", "decide('drop')", "drop"),
        Binding("u", "undo", "undo"),
        Binding("n", "move(1)", "next", show=False),
        Binding("p", "move(-1)", "prev", show=False),
        Binding("g", "cycle_filter('given')", "given filter", show=False),
        Binding("s", "cycle_filter('suggested')", "suggested filter", show=False),
        Binding("l", "cycle_filter('locale')", "locale filter", show=False),
        Binding("slash", "query_filter", "query filter", show=False),
        Binding("escape,q", "close", "close", show=False),
    ]

    def __init__(self, store: Any, run_id: str, reviewer: str | None = None, name: str | None = None):
        super().__init__(name=name)
        self.db_path = str(getattr(store, "path", store))
        self.run_id = run_id
        self.reviewer = reviewer or os.environ.get("USER") or "unknown"
        self.data: ReviewData | None = None
        self.loaded = False
        self.filters: dict[str, str | None] = {"given": None, "suggested": None, "locale": None, "query": None}
        self.queue: np.ndarray = np.zeros(0, dtype=np.int64)  # rows of data.items under the filters
        self.pos = 0  # index into queue
        self.in_force: dict[int, dict[str, Any]] = {}
        self.active: list[dict[str, Any]] = []
        self._pending: queue.Queue[dict[str, Any]] = queue.Queue()  # decisions not yet written, in order
        self._write_lock = threading.Lock()  # one writer worker at a time

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(f" Label review - run {self.run_id} - loading...", id="rv-head")
        yield Static("", id="rv-info")
        with VerticalScroll(id="rv-product"):
            yield Static("", id="rv-text")
        yield Input(placeholder="query contains... (Enter applies, empty clears, Esc cancels)", id="rv-query")
        yield Static(" 1-4 E/S/C/I  k keep  a accept  d drop  u undo  n/p skip  g/s/l / filter  q close", id="rv-keys")

    def on_mount(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="review-load", exit_on_error=False)
    def _load(self) -> None:
        self.post_message(ReviewLoaded(load_review_data(self.db_path, self.run_id)))

    def on_review_loaded(self, message: ReviewLoaded) -> None:
        data: ReviewData = message.data
        self.data = data
        self.run_id = data.run_id
        self.in_force, self.active = replay_decisions(data.log)
        self._refilter()
        self.loaded = True

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "review-load":
            self.query_one("#rv-head", Static).update(f" Label review - run {self.run_id} - cannot load")
        elif message.group == "review-write":  # show what runs.db holds
            self._reload_log()

    # -- queue ----------------------------------------------------------------------------
    def _refilter(self, keep_example: int | None = None) -> None:
        items = self.data.items
        sel = np.ones(len(items), dtype=bool)
        if self.filters["given"]:
            sel &= (items["given_label"] == self.filters["given"]).to_numpy()
        if self.filters["suggested"]:
            sel &= (items["suggested_label"] == self.filters["suggested"]).to_numpy()
        if self.filters["locale"]:
            sel &= (items["product_locale"] == self.filters["locale"]).to_numpy()
        if self.filters["query"]:
            sel &= items["query"].str.contains(self.filters["query"], case=False, regex=False).to_numpy()
        self.queue = np.flatnonzero(sel)
        if keep_example is not None and self._locate(keep_example) is not None:
            self.pos = self._locate(keep_example)
        else:
            self.pos = self._next_undecided(0)
        self._show()

    def _locate(self, example_id: int) -> int | None:
        ids = self.data.items["example_id"].to_numpy()[self.queue]
        hit = np.flatnonzero(ids == example_id)
        return int(hit[0]) if len(hit) else None

    def _next_undecided(self, start: int) -> int:
        """First undecided queue position at or after ``start`` (wrapping); ``start`` if none."""
        ids = self.data.items["example_id"].to_numpy()[self.queue]
        n = len(ids)
        for off in range(n):
            j = (start + off) % n
            if int(ids[j]) not in self.in_force:
                return j
        return min(start, max(n - 1, 0))

    @property
    def current(self) -> dict[str, Any] | None:
        """The item under the cursor (a row of ``data.items`` as a dict) or None."""
        if self.data is None or not len(self.queue):
            return None
        return self.data.items.iloc[int(self.queue[self.pos])].to_dict()

    def decided_count(self) -> int:
        """Items of the filtered queue with a decision in force."""
        ids = self.data.items["example_id"].to_numpy()[self.queue]
        return sum(int(i) in self.in_force for i in ids)

    # -- rendering ------------------------------------------------------------------------
    def _show(self) -> None:
        head = self.query_one("#rv-head", Static)
        info = self.query_one("#rv-info", Static)
        body = self.query_one("#rv-text", Static)
        n = len(self.queue)
        decided = self.decided_count()
        flt = " ".join(f"{k}={v}" for k, v in self.filters.items() if v) or "none"
        head.update(
            Text(
                f" Label review - run {self.run_id} - {decided:,} of {n:,} decided - filter {flt}",
                no_wrap=True,
                overflow="ellipsis",
            )
        )
        item = self.current
        if item is None:
            info.update("No label issues match the filters." if self.data is not None else "")
            body.update("")
            return
        ex = int(item["example_id"])
        state = self.in_force.get(ex)
        lines = []
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f"#{self.pos + 1}/{n}  rank {int(item['rank'])}  quality {item['label_quality']:.4f}  given ")
        t.append(
            f"{item['given_label']} {LABEL_NAMES.get(item['given_label'], '?')}",
            LABEL_STYLES.get(item["given_label"], ""),
        )
        t.append("  suggested ")
        t.append(
            f"{item['suggested_label']} {LABEL_NAMES.get(item['suggested_label'], '?')}",
            LABEL_STYLES.get(item["suggested_label"], ""),
        )
        lines.append(t)
        q = Text(no_wrap=True, overflow="ellipsis")
        q.append("query ", "dim")
        q.append(str(item["query"]), "bold")
        q.append(f"  (id {item['query_id']}, {item['product_locale']}, example {ex})", "dim")
        lines.append(q)
        p = Text(no_wrap=True, overflow="ellipsis")
        p.append("OOF   ", "dim")
        for lab, col in zip(ESCI_LABELS, _PROBS):
            v = item.get(col)
            p.append(
                f"{lab} {v:.3f}  " if v is not None and v == v else f"{lab} -  ",
                LABEL_STYLES[lab] if lab == item["suggested_label"] else "",
            )
        lines.append(p)
        counts = self.data.query_labels.get(int(item["query_id"]), {}) if item["query_id"] == item["query_id"] else {}
        c = Text(no_wrap=True, overflow="ellipsis")
        c.append("query's products ", "dim")
        c.append("  ".join(f"{lab} {counts.get(lab, 0)}" for lab in ESCI_LABELS))
        c.append(f"  (of {sum(counts.values())})", "dim")
        lines.append(c)
        d = Text(no_wrap=True, overflow="ellipsis")
        d.append("decision ", "dim")
        if state is None:
            d.append("none yet", "italic")
        else:
            what = state["decision"] + (f" -> {state['new_label']}" if state.get("new_label") else "")
            d.append(f"{what} ({state['reviewer']}, {state['time']})", "bold")
        lines.append(d)
        info.update(Text("\n").join(lines))
        parts = [f"[b]{escape(item['product_title'] or '(no title)')}[/b]"]
        parts.append(
            f"[dim]brand[/] {escape(item['product_brand'] or '-')}   "
            f"[dim]color[/] {escape(item['product_color'] or '-')}   [dim]id[/] {escape(item['product_id'])}"
        )
        if item["product_bullet_point"]:
            bullets = [b.strip() for b in str(item["product_bullet_point"]).split("\n") if b.strip()]
            parts.append("[dim]bullet points[/]\n" + "\n".join(f" - {escape(b)}" for b in bullets))
        if item["product_description"]:
            parts.append("[dim]description[/]\n" + escape(item["product_description"]))
        body.update("\n".join(parts))
        self.query_one("#rv-product", VerticalScroll).scroll_home(animate=False)

    # -- decisions ------------------------------------------------------------------------
    def _append(self, decision: str, example_id: int, new_label: str | None = None) -> dict[str, Any]:
        """Add a decision to the shown log at once and queue it for the writer worker."""
        row = {
            "id": None,
            "example_id": example_id,
            "decision": decision,
            "new_label": new_label,
            "reviewer": self.reviewer,
            "time": now_iso(),
            "source_run": self.run_id,
        }
        self.data.log.append(row)
        self.in_force, self.active = replay_decisions(self.data.log)
        self._pending.put(row)
        self._write_decisions()
        return row

    @work(thread=True, group="review-write", exit_on_error=False)
    def _write_decisions(self) -> None:
        """Worker: append the queued decisions to label_decisions, oldest first, through a
        writable connection of its own. After a failure the rest of the queue is dropped (the
        screen then re-reads the log)."""
        with self._write_lock:
            if self._pending.empty():
                return
            written = False
            try:
                store = RunStore(self.db_path)
                try:
                    while not self._pending.empty():
                        row = self._pending.get()
                        try:
                            row_id = record_decision(
                                store, self.run_id, row["example_id"], row["decision"], row["new_label"], self.reviewer
                            )
                        finally:
                            self._pending.task_done()
                        self.post_message(DecisionSaved(row, row_id))
                finally:
                    store.close()
                written = True
            finally:
                while not written and not self._pending.empty():
                    self._pending.get()
                    self._pending.task_done()

    def on_decision_saved(self, message: DecisionSaved) -> None:
        message.row["id"] = message.row_id

    @work(thread=True, exclusive=True, group="review-log", exit_on_error=False)
    def _reload_log(self) -> None:
        """Worker: the source run's decision log as stored (after the queued writes ended)."""
        self._pending.join()
        store = RunStore(self.db_path, readonly=True)
        try:
            log = decision_log(store, self.run_id).to_dict("records")
        finally:
            store.close()
        self.post_message(DecisionLogLoaded(log))

    def on_decision_log_loaded(self, message: DecisionLogLoaded) -> None:
        if self.data is not None:
            self.data.log = message.log
            self.in_force, self.active = replay_decisions(self.data.log)
            self._show()

    async def on_unmount(self) -> None:
        """Wait (without blocking the event loop) until the queued decisions are written."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self._pending.unfinished_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _record(self, decision: str, new_label: str | None = None) -> None:
        item = self.current
        if item is None or not self.loaded:
            return
        self._append(decision, int(item["example_id"]), new_label)
        self.pos = self._next_undecided(self.pos + 1 if len(self.queue) else 0)
        self._show()

    def action_relabel(self, label: str) -> None:
        self._record("relabel", label)

    def action_decide(self, decision: str) -> None:
        item = self.current
        if decision == "accept":
            if item is None:
                return
            self._record("accept", item["suggested_label"])
        else:
            self._record(decision)

    def action_undo(self) -> None:
        last = undo_target(self.data.log) if self.loaded else None
        if last is None:
            self.notify("nothing to undo", title="label review")
            return
        self._append("undo", int(last["example_id"]))
        j = self._locate(int(last["example_id"]))
        if j is not None:
            self.pos = j
        self._show()
        self.notify(f"undid {last['decision']} of example {last['example_id']}", title="label review")

    # -- navigation and filters -----------------------------------------------------------
    def action_move(self, step: int) -> None:
        if self.loaded and len(self.queue):
            self.pos = (self.pos + step) % len(self.queue)
            self._show()

    def action_cycle_filter(self, which: str) -> None:
        if not self.loaded:
            return
        if which == "locale":
            values = [None, *sorted(self.data.items["product_locale"].unique())]
        else:
            values = [None, *ESCI_LABELS]
        cur = values.index(self.filters[which]) if self.filters[which] in values else 0
        self.filters[which] = values[(cur + 1) % len(values)]
        item = self.current
        self._refilter(keep_example=int(item["example_id"]) if item else None)

    def action_query_filter(self) -> None:
        box = self.query_one("#rv-query", Input)
        box.value = self.filters["query"] or ""
        box.add_class("visible")
        box.focus()

    @on(Input.Submitted, "#rv-query")
    def _query_submitted(self, event: Input.Submitted) -> None:
        self.filters["query"] = event.value.strip() or None
        self._hide_query()
        if self.loaded:
            self._refilter()

    def _hide_query(self) -> None:
        box = self.query_one("#rv-query", Input)
        box.remove_class("visible")
        self.query_one("#rv-product", VerticalScroll).focus()

    def action_close(self) -> None:
        box = self.query_one("#rv-query", Input)
        if box.has_class("visible"):
            self._hide_query()
            return
        if isinstance(self.app, ReviewApp):
            self.app.exit()
        else:  # pushed by the main app: back to its screen
            self.app.pop_screen()


class ReviewApp(App):
    """A minimal app around :class:`ReviewScreen` (``workbench labels review RUN``)."""

    TITLE = "esci-workbench label review"

    def __init__(self, db_path: str, run_id: str, reviewer: str | None = None):
        super().__init__()
        self.db_path = db_path
        self.run_id = run_id
        self.reviewer = reviewer

    def on_mount(self) -> None:
        self.push_screen(ReviewScreen(self.db_path, self.run_id, self.reviewer))


def run_review_app(db_path: str | Path, run_id: str, reviewer: str | None = None) -> None:
    """Open the review screen in its own app (blocks until closed)."""
    ReviewApp(str(db_path), run_id, reviewer).run()
