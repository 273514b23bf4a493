"""The Runs screen at sweep scale: the list filtered and sorted in runs.db, one window of rows read.

Above :data:`PAGED_ABOVE` runs the screen no longer reads every run. A worker reads the ids of the
runs the filter keeps, in the table's order (:func:`view_ids`: the filter in SQL over the
``idx_runs_list`` covering index, a sort by a column on a light projection), and the full rows
with their best values and folds for one window of them only (:func:`window_rows`, one indexed
query per table for the window's ids). The table (:class:`workbench.tui.table.PagedRows`) holds
the ids and that window; scrolling near its edge reads the next window in a worker.

The filter's meaning is :func:`workbench.tui.runs.matches`, the one the screen applies in memory
below the threshold; :meth:`core.runs.store.RunStore.run_index` is its SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.runs import metric_names as mn
from core.runs.store import RunStore, Status

#: above this many runs in runs.db, the Runs screen holds one window of the list (this module)
PAGED_ABOVE = 2000
#: rows per window (a few pages; the next window is read when the cursor nears an edge)
WINDOW = 200

#: the fields a bare filter term searches (:func:`workbench.tui.runs.matches`)
FILTER_FIELDS = ("id", "name", "status", "model", "task", "backend")
#: the fields ``key:value`` terms may name
KEY_FIELDS = (*FILTER_FIELDS, "job", "state", "node", "sweep", "trial", "kind")
#: sort keys read as best values: the table's column -> the metric's short name
METRIC_SORTS = {"ndcg": mn.NDCG, "f1": mn.TASK2_F1, "final": mn.FINAL_NDCG}
#: sort keys read from runs.db columns: the table's column -> (columns, row -> sort value)
COLUMN_SORTS = {
    "name": (("name",), lambda r, s: r["name"] or ""),
    "status": (("status",), lambda r, s: r["status"] or ""),
    "task": (("task",), lambda r, s: r["task"]),
    "model": (("model",), lambda r, s: (r["model"] or "").rsplit("/", 1)[-1]),
    "started": (("started", "created"), lambda r, s: r["started"] or r["created"]),
    "duration_s": (("started", "ended"), lambda r, s: s.duration(r)),
}


@dataclass(frozen=True)
class ViewRequest:
    """What the screen shows: its filter and sort, the run the cursor is on (``focus_id``; else
    the row ``focus_index``), rows per window, the marked runs (to drop those gone)."""

    filter_text: str = ""
    sort_key: str | None = None
    sort_reverse: bool = False
    focus_id: str | None = None
    focus_index: int = 0
    window: int = WINDOW
    marked: frozenset[str] = frozenset()

    @property
    def view(self) -> tuple[str, str | None, bool]:
        """(filter, sort key, descending): two requests with the same view list the same runs."""
        return self.filter_text, self.sort_key, self.sort_reverse


@dataclass
class RunsPage:
    """One read of the list: the ids the view keeps, in order, the table rows of ``ids[start:]``
    (``rows``), and, unless the read was for a new filter or sort only (None then): the number of
    runs in runs.db and of running ones, whether any is a Slurm run, whether any may still change
    (:func:`any_watched`), and which marked runs still exist."""

    request: ViewRequest
    ids: list[str]
    start: int
    rows: list[dict]
    total: int | None = None
    running: int | None = None
    slurm: bool | None = None
    watched: bool | None = None
    marked: set[str] | None = None


def parse_filter(text: str) -> list[tuple[str | None, str]] | None:
    """A filter as ``(field or None, text)`` terms in lower case (None: a bare term); None when a
    ``key:value`` term names no field of :data:`KEY_FIELDS` (it matches no run)."""
    terms: list[tuple[str | None, str]] = []
    for term in text.lower().split():
        if ":" in term:
            key, _, val = term.partition(":")
            if key not in KEY_FIELDS:
                return None
            terms.append((key, val))
        else:
            terms.append((None, term))
    return terms


def view_ids(store: RunStore, services, filter_text: str, sort_key: str | None, reverse: bool) -> list[str]:
    """The ids of the runs ``filter_text`` keeps, in the table's order: newest first, or sorted by
    ``sort_key`` as :func:`workbench.tui.runs.sort_rows` does (stable, None last).

    A sort by nDCG/F1 or folds reads every run's best values (:meth:`RunStore.best_values`, a
    scan of the metrics index: seconds at 100,000 runs); the others read one or two columns.

    Raises:
        ValueError: an unknown sort key.
    """
    from workbench.tui.runs import sort_rows
    from workbench.tui.services import where_cell

    terms = parse_filter(filter_text)
    if terms is None:
        return []
    if sort_key is None:
        return [r[0] for r in store.run_index(terms, FILTER_FIELDS)]
    if sort_key in METRIC_SORTS:
        short = METRIC_SORTS[sort_key]
        best = store.best_values(names=(short,))
        rows = [{"id": r[0], sort_key: best.get(r[0], {}).get(short)} for r in store.run_index(terms, FILTER_FIELDS)]
    elif sort_key == "folds_done":
        done = store.folds_done()
        rows = [{"id": r[0], sort_key: done.get(r[0], 0)} for r in store.run_index(terms, FILTER_FIELDS)]
    elif sort_key == "where":
        cols = ("backend", "job_id", "job_state")
        rows = [
            {"id": r[0], "where": where_cell(dict(zip(cols, r[1:])))}
            for r in store.run_index(terms, FILTER_FIELDS, cols)
        ]
    elif sort_key in COLUMN_SORTS:
        cols, value = COLUMN_SORTS[sort_key]
        rows = [
            {"id": r[0], sort_key: value(dict(zip(cols, r[1:])), services)}
            for r in store.run_index(terms, FILTER_FIELDS, cols)
        ]
    else:
        raise ValueError(f"runs list: cannot sort by {sort_key!r}")
    return [r["id"] for r in sort_rows(rows, sort_key, reverse)]


def window_start(index: int, n: int, size: int) -> int:
    """The first row of a window of ``size`` rows of ``n`` that has row ``index`` in its middle."""
    return max(0, min(index - size // 2, n - size))


def window_rows(store: RunStore, services, ids: list[str]) -> list[dict]:
    """The table rows (:func:`workbench.tui.runs.run_rows`) of ``ids``, in their order (ids of runs
    no longer in runs.db are left out)."""
    from workbench.tui.runs import run_rows

    by_id = {r["id"]: r for r in run_rows(store.list_runs(ids=ids), services)}
    return [by_id[i] for i in ids if i in by_id]


def any_watched(store: RunStore) -> bool:
    """Whether any run may still change by itself (:func:`workbench.tui.services.watched`): an
    active status, or a Slurm job not yet seen ended."""
    from core.runs.slurm import TERMINAL_STATES

    if store.count_runs(Status.RUNNING) or store.count_runs(Status.QUEUED):
        return True
    return store.has_backend("slurm") and bool(store.watched_jobs("slurm", TERMINAL_STATES, limit=1))


def read_page(store: RunStore, services, request: ViewRequest, totals: bool = True) -> RunsPage:
    """The list as ``request`` asks for it, with the window around its focus run (or row), and the
    totals (``totals``; a read for a new filter or sort alone leaves them to the next refresh).

    Raises:
        ValueError: an unknown sort key.
        WorkbenchError: runs.db cannot be read.
    """
    ids = view_ids(store, services, request.filter_text, request.sort_key, request.sort_reverse)
    index = request.focus_index
    if request.focus_id is not None:
        try:
            index = ids.index(request.focus_id)
        except ValueError:
            pass
    start = window_start(min(index, max(0, len(ids) - 1)), len(ids), request.window)
    rows = window_rows(store, services, ids[start : start + request.window])
    if len(rows) < min(request.window, len(ids) - start):  # a run vanished between the two reads
        known = {r["id"] for r in rows}
        ids = ids[:start] + [r["id"] for r in rows] + [i for i in ids[start + request.window :] if i not in known]
    if not totals:
        return RunsPage(request, ids, start, rows)
    return RunsPage(
        request=request,
        ids=ids,
        start=start,
        rows=rows,
        total=store.count_runs(),
        running=store.count_runs(Status.RUNNING),
        slurm=store.has_backend("slurm"),
        watched=any_watched(store),
        marked=store.existing_runs(request.marked) if request.marked else set(),
    )
