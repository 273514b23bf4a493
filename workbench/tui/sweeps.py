"""Hyperparameter sweeps (``workbench sweep``): the Sweeps screen and one sweep's screen.

:class:`SweepsScreen` (``w`` on the Runs screen): every sweep next to runs.db (its Optuna journal in
``<folder of runs.db>/sweeps``) with its progress (done / running / pruned / failed of N) and the best
value so far, re-read every ``refresh_interval`` s in a worker when a journal changed.

:class:`SweepScreen` (Enter): one sweep: 1 its trials (best first; Enter opens the trial's run
detail), 2 the metric against the trial number with the best so far, 3 one slice plot per parameter
(value against the parameter, ``p`` the next), 4 the parameter importances as bars.

Everything that reads a journal (Optuna parses the whole file) or runs.db runs in thread workers
that post :class:`~workbench.tui.messages.SweepsLoaded` / :class:`~workbench.tui.messages.SweepLoaded`;
the study objects never reach the event loop. The API of :mod:`core.runs.sweep` used here is
``list_sweep_names``, ``open_sweep``, ``progress_of``, ``trial_rows``, ``importances``, ``journal_path``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from rich.style import Style
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane
from textual_hires_canvas import HiResMode
from textual_plot import PlotWidget
from textual_plot.axis_formatter import AxisFormatter, NumericAxisFormatter

from workbench.tui.messages import SweepLoaded, SweepsLoaded
from workbench.tui.services import STATUS_STYLES
from workbench.tui.table import Column, VirtualTable
from workbench.tui.workers import WorkerErrors

#: the Optuna trial states as the status words of runs.db (a trial without a run row)
STATE_WORDS = {"complete": "finished", "pruned": "pruned", "fail": "failed", "running": "running", "waiting": "queued"}


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def fmt_param(v: Any) -> str:
    """A parameter value, short: floats in 3 significant digits (``0.000123`` -> ``1.23e-04``)."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def journal_key(path) -> tuple[int, int] | None:
    """``(mtime_ns, size)`` of a journal file (None when absent): a changed key means new records."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class LogAxisFormatter(NumericAxisFormatter):
    """An axis of log10 values labelled with the values themselves (``-4.0`` -> ``1e-04``)."""

    def get_labels_for_ticks(self, ticks):
        return [f"{10**t:.2g}" for t in ticks]


class ChoiceAxisFormatter(AxisFormatter):
    """An axis of choice indices labelled with the choices."""

    def __init__(self, choices: list[str]):
        self.choices = choices

    def get_ticks(self, min_: float, max_: float, max_ticks: int = 8) -> list[float]:
        return [float(i) for i in range(len(self.choices)) if min_ <= i <= max_]

    def get_labels_for_ticks(self, ticks):
        return [self.choices[int(t)] if 0 <= int(t) < len(self.choices) else "" for t in ticks]


def padded(values: list[float], fraction: float = 0.08, minimum: float = 0.5) -> tuple[float, float]:
    """Axis limits around ``values`` with a margin (points on the edge of a plot are not drawn)."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * fraction or minimum
    return lo - pad, hi + pad


def step_line(history: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
    """The best-so-far as a step line through the trials (x: trial numbers)."""
    xs, ys = [], []
    for (n, _), best in zip(history, best_so_far(history), strict=True):
        if ys:
            xs.append(float(n))
            ys.append(ys[-1])
        xs.append(float(n))
        ys.append(best)
    return xs, ys


# -- the Sweeps screen ----------------------------------------------------------------------------
SWEEP_COLUMNS = [
    Column("name", "sweep", min_width=10),
    Column("complete", "done", width=4, align="right"),
    Column("running", "run", width=3, align="right"),
    Column("pruned", "prun", width=4, align="right"),
    Column("failed", "fail", width=4, align="right"),
    Column("total", "of", width=3, align="right"),
    Column("best", "best", width=6, align="right", render=lambda v, r: (_num(v), "best")),
    Column("best_trial", "trial", width=5, align="right", render=lambda v, r: ("-" if v is None else str(v), "")),
    Column("metric", "metric", width=13),
    Column("sampler", "sampler", width=7),
]


def read_sweeps(store) -> list[dict]:
    """Worker side of the Sweeps screen: one row per sweep journal next to ``store`` (its settings
    and :func:`core.runs.sweep.progress_of`); a journal that cannot be read is a row with ``error``."""
    from core.runs.sweep import list_sweep_names, open_sweep, progress_of

    rows = []
    for name in list_sweep_names(store):
        row: dict[str, Any] = {"name": name, "error": None, "line": "", "metric": "", "sampler": ""}
        try:
            study, settings = open_sweep(store, name)
            p = progress_of(study, settings)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign journal: one row saying so
            from workbench.tui.messages import first_line

            row.update(error=first_line(exc), line=f"sweep {name}: cannot read: {first_line(exc)}")
            row.update(complete=None, running=None, pruned=None, failed=None, total=None, best=None, best_trial=None)
            rows.append(row)
            continue
        row.update(
            complete=p.complete,
            running=p.running,
            pruned=p.pruned,
            failed=p.failed,
            total=p.total,
            best=p.best,
            best_trial=p.best_trial,
            metric=settings.metric,
            sampler=settings.sampler,
            line=p.line(),
            settings=f"{settings.sampler} sampler · {settings.pruner} pruner · {settings.parallel} at a time · "
            f"{settings.backend}",
        )
        rows.append(row)
    return rows


class SweepsScreen(WorkerErrors, Screen):
    """Every sweep next to runs.db with its progress and best value; re-read every
    ``refresh_interval`` s in a worker when a journal changed (``r``: now)."""

    WORKER_TITLES = {"sweeps": "sweeps"}
    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("enter", "open", "open"),
        Binding("r", "reload", "reload"),
    ]
    DEFAULT_CSS = """
    SweepsScreen #sw-title { height: 1; padding: 0 1; background: $primary-background; }
    SweepsScreen #sw-status { height: auto; max-height: 3; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, services, refresh_interval: float = 2.0):
        super().__init__()
        self.services = services
        self.refresh_interval = refresh_interval
        self.rows: list[dict] = []
        self.loaded = False
        self._reading = False
        self._keys: tuple | None = None

    def compose(self) -> ComposeResult:
        yield Static("[b]sweeps[/]  [dim]reading the journals…[/]", id="sw-title")
        styles = {"best": Style.parse("bold green")}
        yield VirtualTable(SWEEP_COLUMNS, id_key="name", styles=styles, id="sweeps")
        yield Static("", id="sw-status")
        yield Footer(show_command_palette=False)

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#sweeps", VirtualTable)

    def on_mount(self) -> None:
        self.table.focus()
        self.reload(force=True)
        self.set_interval(self.refresh_interval, self.reload)

    def reload(self, force: bool = False) -> None:
        """Start a read unless one is running (``force``: even when no journal changed)."""
        if not self._reading:
            self._reading = True
            self._read(None if force else self._keys)

    @work(thread=True, exclusive=True, group="sweeps", exit_on_error=False)
    def _read(self, known: tuple | None) -> None:
        from core.runs.sweep import journal_path, list_sweep_names

        try:
            store = self.services.store()
            names = list_sweep_names(store)
            keys = (tuple((n, journal_key(journal_path(store, n))) for n in names), store.data_version())
            if keys == known:
                self.post_message(SweepsLoaded(None, keys))
                return
            self.post_message(SweepsLoaded(read_sweeps(store), keys))
        except BaseException:
            self.post_message(SweepsLoaded(None, None))  # lets the next read start; the error is toasted
            raise

    def on_sweeps_loaded(self, message: SweepsLoaded) -> None:
        self._reading = False
        if message.rows is None:
            return
        self._keys = message.keys
        self.rows = message.rows
        self.table.set_rows(self.rows)
        self.loaded = True
        self._update_bars()

    def _update_bars(self) -> None:
        n = len(self.rows)
        where = self.services.display_path()
        self.query_one("#sw-title", Static).update(
            f"[b]sweeps[/] {n} next to {escape(where)}  [dim]enter: trials · r: reload[/]"
        )
        row = self.table.current
        if row is None:
            text = "no sweep here yet: start one with `workbench sweep CONFIG --space SPACE.yaml --trials N`"
        else:
            text = escape(row["line"]) + ("" if row["error"] else f"\n[dim]{escape(row.get('settings', ''))}[/]")
        self.query_one("#sw-status", Static).update(text)

    @on(VirtualTable.CursorMoved)
    def _cursor_moved(self) -> None:
        self._update_bars()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_reload(self) -> None:
        self.reload(force=True)

    def action_open(self) -> None:
        row = self.table.current
        if row is None:
            self.notify("no sweep selected", severity="warning")
            return
        if row["error"]:
            self.notify(row["error"], title=f"sweep {row['name']}", severity="error")
            return
        self.app.push_screen(SweepScreen(self.services, row["name"], self.refresh_interval))


# -- one sweep ------------------------------------------------------------------------------------
@dataclass
class SweepView:
    """What the sweep screen shows, read in a worker.

    ``line``: the progress line; ``settings``: sampler, pruner, metric in words; ``params``: the
    parameters (``key``, ``type``, ``log``, ``choices``); ``trials``: :func:`core.runs.sweep.trial_rows`
    (best first); ``history``: ``(trial number, value)`` of the complete trials by number;
    ``importances``: ``({param: importance} or None, evaluator or why not)``; ``complete``: how many."""

    name: str
    line: str
    settings: str
    metric: str
    params: list[dict]
    trials: list[dict]
    history: list[tuple[int, float]]
    importances: tuple[dict[str, float] | None, str]
    complete: int
    best: float | None = None
    best_trial: int | None = None
    total: int = 0


def read_sweep(store, name: str, previous: SweepView | None = None) -> SweepView:
    """Worker side of the sweep screen: the study's trials, history and importances (the importances
    of ``previous`` are kept while the number of complete trials is the same: fANOVA is the slow part)."""
    from core.runs.sweep import importances, open_sweep, progress_of, trial_rows

    study, settings = open_sweep(store, name)
    p = progress_of(study, settings)
    rows = trial_rows(store, study, settings)
    history = sorted(
        (r["trial"], float(r["value"])) for r in rows if r["state"] == "complete" and r["value"] is not None
    )
    if previous is not None and previous.complete == len(history):
        imp = previous.importances
    else:
        imp = importances(study)
    return SweepView(
        name=name,
        line=p.line(),
        settings=f"maximise {settings.metric} · {settings.sampler} sampler · {settings.pruner} pruner · "
        f"{settings.parallel} at a time · {settings.backend}",
        metric=settings.metric,
        params=[
            {"key": q.key, "type": q.type, "log": q.log, "choices": list(q.choices or ())} for q in settings.params
        ],
        trials=rows,
        history=history,
        importances=imp,
        complete=len(history),
        best=p.best,
        best_trial=p.best_trial,
        total=p.total,
    )


def best_so_far(history: list[tuple[int, float]]) -> list[float]:
    """The running maximum of the values in trial order."""
    out, best = [], -math.inf
    for _, v in history:
        best = max(best, v)
        out.append(best)
    return out


def slice_points(view: SweepView, param: dict) -> tuple[list[float], list[float], str]:
    """``(x, value, x label)`` of one parameter's slice plot over the complete trials: a log
    parameter as log10, a categorical one as the index of its choice (the label says which)."""
    xs, ys = [], []
    choices = [str(c) for c in param["choices"]]
    for r in view.trials:
        if r["state"] != "complete" or r["value"] is None or param["key"] not in r["params"]:
            continue
        v = r["params"][param["key"]]
        if param["type"] == "categorical":
            x = float(choices.index(str(v))) if str(v) in choices else math.nan
        elif param["log"] and isinstance(v, (int, float)) and v > 0:
            x = math.log10(v)
        else:
            x = float(v)
        if x == x:
            xs.append(x)
            ys.append(float(r["value"]))
    label = param["key"] + (" (log scale)" if param["log"] else "")
    return xs, ys, label


def importance_text(imp: tuple[dict[str, float] | None, str], width: int = 30) -> str:
    """Importances as rich bars, largest first: ``train.lr  ██████████▌  0.62`` (markup)."""
    values, how = imp
    if not values:
        return f"[dim]no importances: {escape(how)}[/]"
    name_w = min(28, max(len(k) for k in values))
    top = max(values.values()) or 1.0
    lines = [f"[dim]parameter importances ({escape(how)}, complete trials; sum 1)[/]", ""]
    eighths = " ▏▎▍▌▋▊▉█"
    for key, v in sorted(values.items(), key=lambda kv: -kv[1]):
        cells = max(0.0, v / top) * width
        full, part = int(cells), int(round((cells - int(cells)) * 8))
        if part == 8:
            full, part = full + 1, 0
        bar = "█" * full + (eighths[part] if part else "")
        name = key if len(key) <= name_w else "…" + key[-(name_w - 1) :]
        lines.append(f"{escape(name):<{name_w}}  [cyan]{bar:<{width + 1}}[/] {v:.3f}")
    return "\n".join(lines)


def trial_columns(params: list[dict]) -> list[Column]:
    """The trials table: trial, run id, status, value, then one column per parameter (its last dotted
    part as the header)."""
    cols = [
        Column("trial", "#", width=3, align="right"),
        Column("run_id", "run", width=20, render=lambda v, r: (v or "-", "")),
        Column("shown_status", "status", width=8, render=lambda v, r: (v, v)),
        Column("value", "value", width=6, align="right", render=lambda v, r: (_num(v), "")),
    ]
    for p in params:
        key = p["key"]
        cols.append(
            Column(
                f"p:{key}",
                key.rsplit(".", 1)[-1],
                min_width=6,
                align="left" if p["type"] == "categorical" else "right",
                render=lambda v, r, k=key: (fmt_param(r["params"].get(k)) if k in r["params"] else "-", ""),
            )
        )
    return cols


class SweepScreen(WorkerErrors, Screen):
    """One sweep: trials, history, slices, importances; re-read every ``refresh_interval`` s in a
    worker when its journal or runs.db changed."""

    WORKER_TITLES = {"sweep": "sweep"}
    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("enter", "open", "run"),
        Binding("p", "next_param", "param"),
        Binding("r", "reload", "reload"),
        Binding("1", "tab('trials')", "trials", show=False),
        Binding("2", "tab('history')", "history", show=False),
        Binding("3", "tab('slices')", "slices", show=False),
        Binding("4", "tab('importance')", "importance", show=False),
    ]
    DEFAULT_CSS = """
    SweepScreen #sw-head { height: auto; max-height: 3; padding: 0 1; background: $primary-background; }
    SweepScreen TabbedContent { height: 1fr; }
    SweepScreen .plot { height: 1fr; }
    SweepScreen .plot-title { height: 1; padding: 0 1; }
    SweepScreen #importance-bars { padding: 0 1; }
    """

    def __init__(self, services, name: str, refresh_interval: float = 2.0):
        super().__init__()
        self.services = services
        self.sweep_name = name
        self.refresh_interval = refresh_interval
        self.view: SweepView | None = None
        self.param_index = 0
        self.loaded = False
        self._reading = False
        self._key: tuple | None = None

    def compose(self) -> ComposeResult:
        yield Static(f"sweep [b]{escape(self.sweep_name)}[/]: reading its journal…", id="sw-head")
        with TabbedContent(initial="trials"):
            with TabPane("1 trials", id="trials"):
                yield VirtualTable(
                    trial_columns([]),
                    id_key="trial",
                    styles={s: Style.parse(v) for s, v in STATUS_STYLES.items()},
                    id="trials-table",
                )
            with TabPane("2 history", id="history"):
                yield Static("", id="history-title", classes="plot-title")
                yield self._plot_widget("history-plot")
            with TabPane("3 slices", id="slices"):
                yield Static("", id="slice-title", classes="plot-title")
                yield self._plot_widget("slice-plot")
            with TabPane("4 importance", id="importance"):
                yield Static("", id="importance-bars")
        yield Footer(show_command_palette=False)

    @staticmethod
    def _plot_widget(wid: str) -> PlotWidget:
        plot = PlotWidget(id=wid, classes="plot", allow_pan_and_zoom=False)
        plot.can_focus = False
        return plot

    @property
    def table(self) -> VirtualTable:
        return self.query_one("#trials-table", VirtualTable)

    def on_mount(self) -> None:
        for wid in ("#history-plot", "#slice-plot"):
            plot = self.query_one(wid, PlotWidget)
            plot.margin_top, plot.margin_bottom = 1, 2
        self.table.focus()
        self.reload(force=True)
        self.set_interval(self.refresh_interval, self.reload)

    # -- reading (worker) ---------------------------------------------------------------------
    def reload(self, force: bool = False) -> None:
        if not self._reading:
            self._reading = True
            self._read(None if force else self._key, self.view)

    @work(thread=True, exclusive=True, group="sweep", exit_on_error=False)
    def _read(self, known: tuple | None, previous: SweepView | None) -> None:
        from core.runs.sweep import journal_path

        try:
            store = self.services.store()
            key = (journal_key(journal_path(store, self.sweep_name)), store.data_version())
            if key == known:
                self.post_message(SweepLoaded(None, key))
                return
            self.post_message(SweepLoaded(read_sweep(store, self.sweep_name, previous), key))
        except BaseException:
            self.post_message(SweepLoaded(None, None))
            raise

    def on_sweep_loaded(self, message: SweepLoaded) -> None:
        self._reading = False
        if message.view is None:
            return
        self._key = message.key
        self.view = view = message.view
        self.query_one("#sw-head", Static).update(f"{escape(view.line)}\n[dim]{escape(view.settings)}[/]")
        t = self.table
        rows = []
        for r in view.trials:
            status = r["status"] if r["status"] not in (None, "-") else STATE_WORDS.get(r["state"], r["state"])
            rows.append({**r, "shown_status": status})
        t.set_columns(trial_columns(view.params))
        t.set_rows(rows)
        self._plot_history()
        self._plot_slice()
        self.query_one("#importance-bars", Static).update(importance_text(view.importances))
        self.loaded = True

    # -- plots ----------------------------------------------------------------------------------
    def _plot_history(self) -> None:
        view = self.view
        plot = self.query_one("#history-plot", PlotWidget)
        plot.clear()
        xs = [float(n) for n, _ in view.history]
        ys = [v for _, v in view.history]
        plot.set_x_formatter(NumericAxisFormatter())
        if xs:
            sx, sy = step_line(view.history)
            if len(sx) > 1:
                plot.plot(sx, sy, line_style="green", hires_mode=HiResMode.BRAILLE)
            plot.scatter(xs, ys, marker="●", marker_style="cyan")
            plot.set_xlimits(*padded(xs, minimum=1.0))
            plot.set_ylimits(*padded(ys, minimum=0.01))
        plot.set_xlabel("trial")
        best = f"best {_num(view.best)} (trial {view.best_trial})" if view.best is not None else "no complete trial yet"
        self.query_one("#history-title", Static).update(
            f"[b]{escape(view.metric)}[/] by trial ({len(xs)} complete)  [cyan]● trial[/]  "
            f"[green]— best so far[/]  {best}"
        )

    def _plot_slice(self) -> None:
        view = self.view
        plot = self.query_one("#slice-plot", PlotWidget)
        plot.clear()
        title = self.query_one("#slice-title", Static)
        if not view.params:
            title.update("no parameters")
            return
        param = view.params[self.param_index % len(view.params)]
        xs, ys, label = slice_points(view, param)
        if param["type"] == "categorical":
            plot.set_x_formatter(ChoiceAxisFormatter([str(c) for c in param["choices"]]))
        elif param["log"]:
            plot.set_x_formatter(LogAxisFormatter())
        else:
            plot.set_x_formatter(NumericAxisFormatter())
        if xs:
            plot.scatter(xs, ys, marker="●", marker_style="magenta")
            if param["type"] == "categorical":
                plot.set_xlimits(-0.5, len(param["choices"]) - 0.5)
            else:
                plot.set_xlimits(*padded(xs))
            plot.set_ylimits(*padded(ys, minimum=0.01))
        plot.set_xlabel(label)
        n = len(view.params)
        title.update(
            f"[b]{escape(view.metric)}[/] vs [b]{escape(param['key'])}[/] ({len(xs)} complete)  "
            f"[dim]{self.param_index % n + 1}/{n}, p: next[/]"
        )

    # -- actions ----------------------------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_reload(self) -> None:
        self.reload(force=True)

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        if tab == "trials":
            self.table.focus()

    def action_next_param(self) -> None:
        self.param_index += 1
        if self.view is not None:
            self._plot_slice()
        self.query_one(TabbedContent).active = "slices"

    def action_open(self) -> None:
        """The highlighted trial's run detail."""
        if self.query_one(TabbedContent).active != "trials":
            self.action_tab("trials")
            return
        row = self.table.current
        if row is None:
            self.notify("no trial selected", severity="warning")
            return
        if not row.get("run_id"):
            self.notify(f"trial {row['trial']} has no run", severity="warning")
            return
        from workbench.tui.detail import RunDetailScreen

        self.app.push_screen(RunDetailScreen(self.services, row["run_id"]))
