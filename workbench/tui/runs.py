"""The Runs screen: every run in runs.db, live, sortable, filterable, with marks.

Up to :data:`~workbench.tui.runs_view.PAGED_ABOVE` runs the screen reads them all and filters and
sorts in memory; above, it holds one window of the list and filters and sorts in runs.db
(:mod:`workbench.tui.runs_view`), so a sweep's 100,000 runs paint as fast as a few.

While any run is a Slurm run, a ``where`` column says where each executes: ``local``, or the Slurm
job's id and state code (``4242 PD``); the status line names the highlighted Slurm run's job, its
state and Slurm's reason (``Slurm job 4242 PD Resources``)."""

from __future__ import annotations

import time

from rich.style import Style
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, WorkerState

from core.runs.launcher import refresh_statuses
from core.runs.store import ACTIVE, Status
from workbench.tui.messages import GpuRead, RunsLoaded, RunsPaged, RunsUnchanged, RunsWindow, WorkerFailed
from workbench.tui.runs_view import FILTER_FIELDS, KEY_FIELDS, PAGED_ABOVE, WINDOW, ViewRequest, read_page, window_rows
from workbench.tui.services import (
    STATUS_STYLES,
    fmt_duration,
    fmt_float,
    fmt_started,
    n_folds,
    run_kind,
    slurm_code,
    slurm_reason,
    stack_members,
    watched,
    where_cell,
)
from workbench.tui.table import Column, PagedRows, VirtualTable
from workbench.tui.workers import RunActions, WorkerErrors

#: sortable columns, in the order of the number keys 1..9
COLUMNS = [
    Column("mark", "", width=1, render=lambda v, r: ("", "")),
    Column("name", "name", min_width=8),
    Column("status", "status", width=8, render=lambda v, r: (v, v)),
    Column("task", "T", width=1),
    Column("model", "model", min_width=8),
    Column("folds_done", "folds", width=5, align="right", render=lambda v, r: (r["folds"], "")),
    Column("ndcg", "nDCG", width=5, align="right", render=lambda v, r: (fmt_float(v), "")),
    Column("f1", "F1", width=5, align="right", render=lambda v, r: (fmt_float(v), "")),
    Column("duration_s", "time", width=7, align="right", render=lambda v, r: (fmt_duration(v), "")),
    Column("started", "started", width=11, render=lambda v, r: (fmt_started(v), "")),
]
#: shown (last, sortable by a header click) while any run in the list is a Slurm run
WHERE = Column("where", "where", width=7, render=lambda v, r: (v, "slurm" if r["backend"] == "slurm" else ""))
SORTABLE = [c.key for c in COLUMNS if c.key != "mark"]
# FILTER_FIELDS: the fields a bare filter term searches; KEY_FIELDS: those ``key:value`` terms may
# name (``backend:slurm``, ``job:4242``, ``state:pending``, ``sweep:lr-sweep`` the trial runs of a
# sweep, ``kind:stack`` the stack runs); both in runs_view, whose SQL has the same meaning
SLURM_STYLE = "magenta"


def run_rows(raw: list[dict], services) -> list[dict]:
    """runs.db rows (``RunStore.list_runs``) -> table rows with display and sort keys."""
    rows = []
    for r in raw:
        k = r["n_folds"] if "n_folds" in r else n_folds(r)
        kind = run_kind(r)
        rows.append(
            {
                "id": r["id"],
                "name": r["name"] or "",
                "status": r["status"] or "",
                "task": r["task"],
                "model": (r["model"] or "").rsplit("/", 1)[-1],
                "folds_done": r["folds_done"] or 0,
                "folds": f"{r['folds_done'] or 0}/{k}" if k else "-",  # no folds: a pre-training run
                "ndcg": r["best_ndcg"],
                "f1": r["best_f1"],
                "final": r["best_final_ndcg"],
                "duration_s": services.duration(r),
                "started": r["started"] or r["created"],
                "created": r["created"],
                "started_at": r["started"],  # None while queued (a pending Slurm job): no running time yet
                "exit_code": r["exit_code"],
                "pid": r["pid"],
                "run_dir": r["run_dir"],
                "backend": r.get("backend") or "local",
                "job_id": r.get("job_id"),
                "job_state": r.get("job_state"),
                "job_reason": r.get("job_reason"),
                "node": r.get("node"),
                "job": r.get("job_id") or "",
                "state": r.get("job_state") or "",
                "where": where_cell(r),
                "sweep": r.get("sweep") or "",
                "trial": "" if r.get("trial") is None else str(r["trial"]),
                "kind": kind,  # train, pretrain or stack: a stack run is not relaunched (RunActions)
                "members": stack_members(r) if kind == "stack" else [],
            }
        )
    return rows


def slurm_status(row: dict | None) -> str:
    """The status line's words for a Slurm run's job: ``Slurm job 4242 PD Resources on node1``
    ('' for a local run or none)."""
    if not row or row.get("backend") != "slurm" or not row.get("job_id"):
        return ""
    text = f"Slurm job {row['job_id']} {slurm_code(row.get('job_state'))} {slurm_reason(row.get('job_reason'))}"
    text = " ".join(text.split())
    return text + (f" on {row['node']}" if row.get("node") else "")


def _text(value) -> str:
    return "" if value is None else str(value)


def matches(row: dict, query: str) -> bool:
    """Filter: every whitespace-separated term must match, ignoring case. ``key:value`` matches a
    field (id, name, status, model, task, backend, job, state, node, sweep, trial, kind) by
    substring; a bare term matches any of id, name, status, model, task, backend (a field with no
    value is ''). :meth:`core.runs.store.RunStore.run_index` is the same filter in SQL."""
    for term in query.lower().split():
        if ":" in term:
            key, _, val = term.partition(":")
            if key not in KEY_FIELDS or val not in _text(row.get(key)).lower():
                return False
        elif not any(term in _text(row.get(f)).lower() for f in FILTER_FIELDS):
            return False
    return True


def sort_rows(rows: list[dict], key: str | None, reverse: bool) -> list[dict]:
    """Stable sort by ``key``; None values last in either direction."""
    if not key:
        return rows
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: r[key] if not isinstance(r[key], str) else r[key].lower(), reverse=reverse)
    return present + missing


class RunsScreen(WorkerErrors, RunActions, Screen):
    """All runs. Refreshes every ``refresh_interval`` s in a worker; skips the query when the
    database did not change (``PRAGMA data_version``) and only redraws durations."""

    WORKER_TITLES = {"runs-db": "runs.db"}

    BINDINGS = [
        Binding("enter", "detail", "open"),
        Binding("n", "new_run", "new"),
        Binding("s", "stop", "stop"),
        Binding("r", "relaunch", "rerun"),
        Binding("R", "resume", "resume", show=False),
        Binding("space", "mark", "mark", key_display="␣"),
        Binding("c", "compare", "cmp"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("e", "ensemble", "ens"),
        Binding("l", "labels", "labels", show=False),
        Binding("w", "sweeps", "sweeps", show=False),
        Binding("question_mark", "help", "keys", key_display="?"),
        Binding("escape", "clear_filter", "clear", show=False),
        *[Binding(str(i + 1), f"sort({i})", show=False) for i in range(len(SORTABLE))],
    ]

    DEFAULT_CSS = """
    RunsScreen #topbar { height: 1; background: $primary-background; color: $text; padding: 0 1; }
    RunsScreen #filter { dock: bottom; display: none; height: 3; }
    RunsScreen #filter.visible { display: block; }
    RunsScreen #statusline { height: 1; color: $text-muted; padding: 0 1; }
    """

    #: above this many runs, one window of the list is held and it is filtered and sorted in SQL
    PAGED_ABOVE = PAGED_ABOVE
    #: rows per window of the list read at a time (paged)
    WINDOW = WINDOW

    def __init__(self, services, refresh_interval: float = 2.0):
        super().__init__()
        self.services = services
        self.refresh_interval = refresh_interval
        self.all_rows: list[dict] = []  # every run; paged: the rows of the window read
        self.filter_text = ""
        self.gpu_line = "GPU: …"
        self._data_version: int | None = None
        self.loaded = False
        self.paged = False  # holding one window of the list (more than PAGED_ABOVE runs)
        self.counts = (0, 0)  # paged: (runs in runs.db, running ones)
        self.first_paint_s: float | None = None
        self._select_id: str | None = None  # a run just launched: the cursor goes to it once it is listed
        self._watching = False  # a run may change by itself: each refresh checks processes and jobs
        self._reading = False  # a read of the list is under way
        self._queued: tuple[bool, bool, bool] | None = None  # (force, check, full) of a read asked for meanwhile
        self._window_at: tuple[int, int] | None = None  # (id of the PagedRows, first row) being read
        self._mark_keys: dict[str, tuple[str, str]] = {}  # paged: marked run -> (created, id), for order
        self._last_cursor = 0  # paged: where the cursor was (the direction it moves)
        self._t0 = time.perf_counter()

    def compose(self) -> ComposeResult:
        yield Static("", id="topbar")
        styles = {s: Style.parse(v) for s, v in {**STATUS_STYLES, "slurm": SLURM_STYLE}.items()}
        yield VirtualTable(COLUMNS, styles=styles, id="runs")
        yield Static("loading runs…", id="statusline")
        yield Input(
            placeholder="filter: words or key:value (status:running backend:slurm); Enter keeps, Esc clears",
            id="filter",
        )
        yield Footer(show_command_palette=False)

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#runs", VirtualTable)

    def on_mount(self) -> None:
        self.table.focus()
        self.reload(force=True)
        self.poll_gpu()
        self.set_interval(self.refresh_interval, self.reload)
        self.set_interval(self.refresh_interval, self.poll_gpu)

    # -- data ---------------------------------------------------------------------------------
    def reload(self, force: bool = False, check: bool | None = None, full: bool = True) -> None:
        """Re-read runs.db in a worker (every ``refresh_interval`` s; ``force``: even if unchanged;
        ``check``: first mark vanished processes crashed, by default when a run may still change or
        ``force``; not ``full``: paged, only the list for a new filter or sort, no totals). One read
        at a time: a reload asked for meanwhile runs when it ends."""
        check = (self._watching or force) if check is None else check
        if self._reading:
            f, c, a = self._queued or (False, False, False)
            self._queued = (f or force, c or check, a or full)
            return
        self._reading = True
        full = full or not self.loaded
        self._read_runs(force or not self.loaded, check, self._data_version, self._request(), full)

    def _request(self) -> ViewRequest:
        t = self.table
        return ViewRequest(
            self.filter_text,
            t.sort_key,
            t.sort_reverse,
            self._select_id or t.current_id,
            t.cursor,
            self.window_size,
            frozenset(t.marked),
        )

    @work(thread=True, exclusive=True, group="runs-db", exit_on_error=False)
    def _read_runs(
        self, force: bool, check_processes: bool, known_version: int | None, request: ViewRequest, full: bool = True
    ) -> None:
        """Worker: mark runs whose processes vanished ``crashed`` and read Slurm jobs' states (a write,
        ``check_processes``), then the runs list unless the database is still at ``known_version``:
        every run (up to ``PAGED_ABOVE``), else the ``request``'s view and one window of it (with
        the totals when ``full``; without, the data version is not reported: the next refresh
        reads them)."""
        store = self.services.store()
        changed = refresh_statuses(store) if check_processes else []
        # data_version moves with other connections' commits only: this worker's own writes are ``changed``
        if not force and not changed and store.data_version() == known_version:
            self.post_message(RunsUnchanged())
            return
        if store.count_runs() <= self.PAGED_ABOVE:
            rows = run_rows(store.list_runs(), self.services)
            self.post_message(RunsLoaded(rows, store.data_version()))
        else:
            page = read_page(store, self.services, request, totals=full)
            self.post_message(RunsPaged(page, store.data_version() if full else None))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        super().on_worker_state_changed(event)
        if event.worker.group == "runs-db" and event.state in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            self._reading = False
            if self._queued is not None:
                (force, check, full), self._queued = self._queued, None
                self.reload(force, check, full)
        elif event.worker.group == "runs-window" and event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self._window_at = None

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        self._data_version = message.data_version
        self.paged = False
        self._watching = any(watched(r) for r in message.rows)
        self._apply_rows(message.rows)

    def on_runs_paged(self, message: RunsPaged) -> None:
        page, t = message.page, self.table
        if message.data_version is not None:
            self._data_version = message.data_version
        if page.request.view != (self.filter_text, t.sort_key, t.sort_reverse):
            self.reload(force=True, check=False, full=False)  # the filter or sort changed meanwhile
            return
        self.paged = True
        self.all_rows = page.rows
        if page.total is not None:  # a full read (else a new filter or sort: the totals as they were)
            self.counts = (page.total, page.running)
            self._watching = page.watched
            t.marked -= page.request.marked - page.marked  # runs gone from runs.db
            t.set_columns(COLUMNS + [WHERE] if page.slurm else COLUMNS)
        self._window_at = None
        t.set_rows(PagedRows(page.ids, page.start, page.rows))
        self._after_rows()

    def on_runs_unchanged(self, message: RunsUnchanged) -> None:
        self._retime()

    # -- the window of a paged list ------------------------------------------------------------
    @on(VirtualTable.RowsNeeded)
    def _rows_needed(self, event: VirtualTable.RowsNeeded) -> None:
        self._read_window(event.index + self.table.body_height // 2)

    @property
    def window_size(self) -> int:
        """Rows per window read: ``WINDOW``, or six pages on a tall terminal."""
        return max(self.WINDOW, 6 * self.table.body_height)

    def _ensure_window(self) -> None:
        """Paged: read ahead. When the page before or after the one in view is not read, or the
        three pages ahead in the direction the cursor moves, read the window that starts a page
        behind the view in that direction (so most of it lies ahead)."""
        t = self.table
        rows, body, size = t.rows, t.body_height, self.window_size
        step, self._last_cursor = t.cursor - self._last_cursor, t.cursor
        if not isinstance(rows, PagedRows):
            return
        if step > 0 and not rows.covers(t.top - body, t.top + 4 * body):
            self._read_window(t.top - body + size // 2)
        elif step < 0 and not rows.covers(t.top - 3 * body, t.top + 2 * body):
            self._read_window(t.top + 2 * body - size // 2)
        elif not rows.covers(t.top - body, t.top + 2 * body):
            self._read_window(t.cursor)

    def _read_window(self, center: int) -> None:
        from workbench.tui.runs_view import window_start

        rows = self.table.rows
        if not isinstance(rows, PagedRows):
            return
        start = window_start(center, len(rows), self.window_size)
        at = (id(rows), start)
        if at == self._window_at or (rows.start == start and rows.window):
            return
        self._window_at = at
        self._fetch_window(rows, start, self.window_size)

    @work(thread=True, exclusive=True, group="runs-window", exit_on_error=False)
    def _fetch_window(self, rows: PagedRows, start: int, size: int) -> None:
        """Worker: the table rows of ``rows.ids[start:start + size]``."""
        ids = rows.ids[start : start + size]
        self.post_message(RunsWindow(rows, start, window_rows(self.services.store(), self.services, ids), len(ids)))

    def on_runs_window(self, message: RunsWindow) -> None:
        t = self.table
        if message.rows is not t.rows:
            return  # the list was read again meanwhile
        self._window_at = None
        if len(message.window) < message.asked:
            self.reload(force=True, check=False)  # a run vanished: read the list again
        message.rows.start, message.rows.window = message.start, message.window
        self.all_rows = message.window
        t.refresh()
        self._update_bars()

    @work(thread=True, exclusive=True, group="gpu", exit_on_error=False)
    def poll_gpu(self) -> None:
        from core.runs.monitor import gpu_summary

        probe = self.services.gpu_probe
        self.post_message(GpuRead(gpu_summary(probe.read(), "" if probe.available else "no GPU")))

    def on_gpu_read(self, message: GpuRead) -> None:
        self._set_gpu(message.line)

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "gpu":  # shown in the top bar, not as a toast every refresh
            message.prevent_default()
            self._set_gpu(f"GPU: error {message.error}")

    def _set_gpu(self, line: str) -> None:
        self.gpu_line = line
        self._update_bars()

    def _retime(self) -> None:
        changed = False
        for r in self.all_rows:
            if r["status"] in ACTIVE:
                r["duration_s"] = self.services.duration({"started": r["started_at"], "ended": None})
                changed = True
        if changed:
            self.table.refresh()

    def _apply_rows(self, rows: list[dict]) -> None:
        self.all_rows = rows
        self._show()

    def _after_rows(self) -> None:
        """After new rows: the cursor to a run just launched, the bars, the first paint's time."""
        t = self.table
        if self._select_id is not None:
            index = (
                t.rows.index_of(self._select_id)
                if isinstance(t.rows, PagedRows)
                else next((i for i, r in enumerate(t.rows) if r["id"] == self._select_id), None)
            )
            if index is not None:
                self._select_id = None
                t.move_to(index)
        self._update_bars()
        if not self.loaded:
            self.loaded = True
            self.first_paint_s = time.perf_counter() - self._t0

    def _show(self) -> None:
        """Show the rows for the filter and sort: in memory, or (paged) a read of runs.db."""
        t = self.table
        if self.paged:
            self.reload(force=True, check=False, full=False)
            t.refresh()  # the sort arrow
            self._update_bars()
            return
        view = [r for r in self.all_rows if matches(r, self.filter_text)] if self.filter_text else list(self.all_rows)
        view = sort_rows(view, t.sort_key, t.sort_reverse)
        t.marked &= {r["id"] for r in self.all_rows}
        t.set_columns(COLUMNS + [WHERE] if any(r["backend"] == "slurm" for r in self.all_rows) else COLUMNS)
        t.set_rows(view)
        self._after_rows()

    def _update_bars(self) -> None:
        if self.paged:
            total, running = self.counts
        else:
            total, running = len(self.all_rows), sum(r["status"] == Status.RUNNING for r in self.all_rows)
        self.query_one("#topbar", Static).update(
            f"[b]{self.services.display_path()}[/b]  runs {running} running / {total} total  {self.gpu_line}"
        )
        t = self.table
        parts = [f"{len(t.rows)} shown"]
        job = slurm_status(t.current)
        if job:
            parts.insert(0, job)
        if self.filter_text:
            parts.append(f"filter '{self.filter_text}'")
        if t.marked:
            parts.append(f"{len(t.marked)} marked")
        if t.sort_key:
            parts.append(f"sorted by {t.sort_key}{' desc' if t.sort_reverse else ''}")
        parts.append("nDCG/F1: best CV, not last")
        self.query_one("#statusline", Static).update(" · ".join(parts))

    @on(VirtualTable.CursorMoved)
    def _cursor_moved(self) -> None:
        self._ensure_window()
        self._update_bars()

    # -- actions ------------------------------------------------------------------------------
    def action_sort(self, index: int) -> None:
        self._sort_by(SORTABLE[index])

    @on(VirtualTable.HeaderClicked)
    def _header_clicked(self, event: VirtualTable.HeaderClicked) -> None:
        if event.key in SORTABLE or event.key == WHERE.key:
            self._sort_by(event.key)

    def _sort_by(self, key: str) -> None:
        t = self.table
        if t.sort_key == key:
            t.sort_reverse = not t.sort_reverse
        else:
            t.sort_key, t.sort_reverse = key, key in ("ndcg", "f1", "final", "duration_s", "started", "folds_done")
        self._show()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.value = self.filter_text
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._show()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.query_one("#filter", Input).remove_class("visible")
        self.table.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("visible")
        self.filter_text = ""
        self._show()
        self.table.focus()

    def action_mark(self) -> None:
        row = self.table.current
        if row is not None:
            self._mark_keys[row["id"]] = (row.get("created") or "", row["id"])
        self.table.toggle_mark()
        self.table.action_cursor(1)
        self._update_bars()

    def _current(self) -> dict | None:
        row = self.table.current
        if row is None:
            self.notify("no run selected", severity="warning")
        return row

    def action_detail(self) -> None:
        row = self._current()
        if row:
            from workbench.tui.detail import RunDetailScreen

            self.app.push_screen(RunDetailScreen(self.services, row["id"]))

    def marked_ids(self) -> list[str]:
        """The marked runs, newest first (the list's own order)."""
        marked = self.table.marked
        if not self.paged:
            return [r["id"] for r in self.all_rows if r["id"] in marked]
        return sorted(marked, key=lambda i: self._mark_keys.get(i, ("", i)), reverse=True)

    def action_compare(self) -> None:
        ids = self.marked_ids()
        if len(ids) < 2:
            self.notify("mark at least two runs with space, then press c", severity="warning")
            return
        from workbench.tui.compare import CompareScreen

        self.app.push_screen(CompareScreen(self.services, ids))

    def action_ensemble(self) -> None:
        """Ensemble screen over the marked runs (or the current one)."""
        ids = self.marked_ids()
        if not ids and self.table.current:
            ids = [self.table.current_id]
        if not ids:
            self.notify("mark runs with space, then press e", severity="warning")
            return
        from workbench.tui.ensemble import EnsembleScreen

        self.app.push_screen(EnsembleScreen(self.services.db_path, ids))

    def action_labels(self) -> None:
        """Label-review queue of the current run (after `workbench labels find RUN`)."""
        row = self._current()
        if row:
            from workbench.tui.review import ReviewScreen

            self.app.push_screen(ReviewScreen(self.services.db_path, row["id"]))

    def action_sweeps(self) -> None:
        """The Sweeps screen: every sweep next to runs.db, its progress and best value."""
        from workbench.tui.sweeps import SweepsScreen

        self.app.push_screen(SweepsScreen(self.services, self.refresh_interval))

    def action_new_run(self) -> None:
        from workbench.tui.dialogs import NewRunScreen

        def done(run_id: str | None) -> None:
            if run_id:
                self._select_id = run_id
                self.reload(force=True)

        self.app.push_screen(NewRunScreen(self.services), done)

    def lifecycle_run(self) -> dict | None:
        return self._current()

    def action_help(self) -> None:
        from workbench.tui.dialogs import HelpScreen

        self.app.push_screen(HelpScreen())
