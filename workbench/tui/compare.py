"""Compare marked runs: best value per metric with the per-fold spread, the differences of the
per-query OOF metrics against a baseline run with their paired bootstrap interval, a config diff of
only the keys that differ, overlaid curves (one colour per run)."""

from __future__ import annotations

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane
from textual_hires_canvas import HiResMode
from textual_plot import PlotWidget

from core.errors import DataError, WorkbenchError
from core.runs import metric_names as mn
from core.runs.compare import (
    COMPARE_METRICS,
    CURVE_METRICS,
    OOF_DELTAS,
    config_diff,
    curve,
    metric_summary,
    oof_deltas,
    query_metrics,
    run_configs,
)
from core.scoring.significance import DEFAULT_RESAMPLES, DEFAULT_SEED, describe
from workbench.tui.messages import CompareDeltas, CompareLoaded
from workbench.tui.workers import WorkerErrors

RUN_COLOURS = ["cyan", "magenta", "yellow", "green", "red", "blue", "bright_white", "bright_cyan"]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _delta_cell(d) -> str:
    """A difference with its interval, compact: ``+0.012 [-0.004,+0.029] noise``; or a reason."""
    if d is None:
        return "-"
    if isinstance(d, str):
        return f"[dim]{d}[/]"
    text = describe(d, 3, compact=True)
    return text if d.within_noise else f"[b]{text}[/]"


class CompareScreen(WorkerErrors, Screen):
    """Side by side for 2+ runs; everything is read once in workers (``r`` reloads): the runs.db
    rows in one, the OOF files and their paired bootstrap differences in another (``b`` makes the
    next run the baseline, recomputed from what was read)."""

    WORKER_TITLES = {"compare": "compare", "compare-oof": "compare: OOF differences"}

    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("m", "next_curve", "metric"),
        Binding("r", "reload", "reload"),
        Binding("b", "next_baseline", "baseline"),
        Binding("1", "tab('metrics')", "metrics", show=False),
        Binding("2", "tab('config')", "config", show=False),
        Binding("3", "tab('curves')", "curves", show=False),
    ]
    DEFAULT_CSS = """
    CompareScreen #cmp-title { height: 1; padding: 0 1; background: $primary-background; }
    CompareScreen TabbedContent { height: 1fr; }
    CompareScreen DataTable { height: 1fr; }
    CompareScreen #curve { height: 1fr; }
    CompareScreen #curve-title { height: 1; padding: 0 1; }
    CompareScreen #delta-note { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, services, run_ids: list[str]):
        super().__init__()
        self.services = services
        self.run_ids = list(run_ids)
        self.curve_index = 0
        self.curves: dict[str, dict[str, list]] = {}
        self.names: dict[str, str] = {}
        self.runs: list[dict] = []
        self.summaries: dict[str, dict] = {}
        self.loaded = False
        self.base_index = 0
        self.query_metrics: dict[str, object] = {}  # run id -> QueryMetrics or a reason (str)
        self.deltas: dict[str, object] = {}  # run id -> {key: PairedDiff | None} or a reason (str)
        self.deltas_loaded = False

    def compose(self) -> ComposeResult:
        yield Static(
            f"comparing {len(self.run_ids)} runs   [dim]1 metrics · 2 config diff · 3 curves[/]", id="cmp-title"
        )
        with TabbedContent(initial="metrics"):
            with TabPane("metrics", id="metrics"):
                yield DataTable(id="metrics-table", cursor_type="row", zebra_stripes=True)
                yield Static("Δ: reading the OOF files…", id="delta-note")
            with TabPane("config diff", id="config"):
                yield DataTable(id="config-table", cursor_type="row", zebra_stripes=True)
            with TabPane("curves", id="curves"):
                yield Static("", id="curve-title")
                plot = PlotWidget(id="curve", allow_pan_and_zoom=False)
                plot.can_focus = False
                yield plot
        yield Footer()

    def on_mount(self) -> None:
        plot = self.query_one("#curve", PlotWidget)
        plot.margin_top, plot.margin_bottom = 1, 2
        self.load()
        self.load_deltas(self.base_id)

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def load(self) -> None:
        store = self.services.store()
        runs = [store.get_run(r) for r in self.run_ids]
        names = {r["id"]: f"{r['name']} {r['id'][-4:]}" for r in runs}
        summaries = {r["id"]: metric_summary(store, r["id"]) for r in runs}
        diff = config_diff(run_configs(store, self.run_ids))
        curves = {name: {r["id"]: curve(store, r["id"], name) for r in runs} for name in CURVE_METRICS}
        self.post_message(CompareLoaded(runs, names, summaries, diff, curves))

    @property
    def base_id(self) -> str:
        """The baseline run of the differences (the first run until ``b``)."""
        return self.run_ids[self.base_index % len(self.run_ids)]

    @work(thread=True, exclusive=True, group="compare-oof", exit_on_error=False)
    def load_deltas(self, base_id: str, metrics: dict | None = None) -> None:
        """Worker: read each run's oof.parquet (unless ``metrics`` were read before), then the
        differences of every run against ``base_id`` with their paired bootstrap intervals
        (core.runs.compare.oof_deltas). On the first read, a baseline without an OOF file gives
        way to the first run (in column order) that has one."""
        if metrics is None:
            store = self.services.store()
            metrics = {}
            for rid in self.run_ids:
                try:
                    metrics[rid] = query_metrics(store, rid)
                except DataError as exc:
                    metrics[rid] = "no OOF file" if "not found" in str(exc) else "unreadable OOF"
            if isinstance(metrics[base_id], str):
                base_id = next((r for r in self.run_ids if not isinstance(metrics[r], str)), base_id)
        base = metrics[base_id]
        deltas: dict[str, object] = {}
        for rid in self.run_ids:
            if rid == base_id:
                continue
            if isinstance(base, str):
                deltas[rid] = f"baseline: {base}"
            elif isinstance(metrics[rid], str):
                deltas[rid] = metrics[rid]
            else:
                try:
                    deltas[rid] = oof_deltas(base, metrics[rid], DEFAULT_RESAMPLES, DEFAULT_SEED)
                except WorkbenchError:  # no query in common
                    deltas[rid] = "no common query"
        self.post_message(CompareDeltas(base_id, deltas, metrics))

    def on_compare_deltas(self, message: CompareDeltas) -> None:
        first = not self.query_metrics
        self.query_metrics = message.metrics
        if first:  # the worker may have picked the first run with an OOF file
            self.base_index = self.run_ids.index(message.base_id)
        elif message.base_id != self.base_id:  # an older baseline's result, overtaken by `b`
            return
        self.deltas = message.deltas
        self.deltas_loaded = True
        self._render_metrics()

    def on_compare_loaded(self, message: CompareLoaded) -> None:
        runs, names, summaries, diff = message.runs, message.names, message.summaries, message.diff
        self.names, self.curves = names, message.curves
        self.runs, self.summaries = runs, summaries
        ids = [r["id"] for r in runs]
        self._render_metrics()
        ct = self.query_one("#config-table", DataTable)
        ct.clear(columns=True)
        ct.add_column("key", key="key")
        for rid in ids:
            ct.add_column(names[rid], key=rid)
        if not diff:
            ct.add_row("(identical configs)", *["" for _ in ids])
        for key, vals in diff:
            ct.add_row(key, *[_cell(vals[rid]) for rid in ids])
        self.loaded = True
        self._plot()

    def _render_metrics(self) -> None:
        """The metrics table: best values with their spread, then (once read) the OOF differences
        against the baseline; needs the runs.db rows (the OOF worker may finish first)."""
        if not self.runs:
            return
        runs, names, summaries = self.runs, self.names, self.summaries
        ids = [r["id"] for r in runs]
        base_id = self.base_id
        mt = self.query_one("#metrics-table", DataTable)
        mt.clear(columns=True)
        mt.add_column("metric", key="metric")
        for rid in ids:
            mt.add_column(names[rid], key=rid)
        for label, *_ in COMPARE_METRICS:
            cells = []
            bests = [summaries[r][label]["best"] for r in ids]
            top = max((b for b in bests if b is not None), default=None)
            for rid in ids:
                s = summaries[rid][label]
                text = _cell(s["best"])
                if s["std"] is not None and s["n"] and s["n"] > 1:
                    text += f" ±{s['std']:.3f}"
                if s["min"] is not None:
                    text += f" [{s['min']:.3f}-{s['max']:.3f}]" if label != "fold seconds" else ""
                if top is not None and s["best"] == top and label != "fold seconds" and len(ids) > 1:
                    text = f"[b green]{text}[/]"
                cells.append(text)
            mt.add_row(label, *cells)
        mt.add_row(
            "status",
            *[f"{r['status']}" + (f" ({r['exit_code']})" if r.get("exit_code") not in (None, 0) else "") for r in runs],
        )
        note = self.query_one("#delta-note", Static)
        if not self.deltas_loaded:
            return
        for key, label in OOF_DELTAS:
            cells = []
            for rid in ids:
                if rid == base_id:
                    cells.append("[dim]baseline[/]")
                    continue
                d = self.deltas.get(rid)
                cells.append(_delta_cell(d.get(key) if isinstance(d, dict) else d))
            mt.add_row(label, *cells)
        note.update(
            f"Δ = run - baseline [b]{escape(names.get(base_id, base_id))}[/] on their common OOF queries; "
            f"\\[95% paired bootstrap interval] ({DEFAULT_RESAMPLES:,} resamples of queries, seed {DEFAULT_SEED}); "
            "noise: it covers 0"
        )

    def _plot(self) -> None:
        name = CURVE_METRICS[self.curve_index % len(CURVE_METRICS)]
        plot = self.query_one("#curve", PlotWidget)
        plot.clear()
        n = 0
        for i, (rid, pts) in enumerate(self.curves.get(name, {}).items()):
            if not pts:
                continue
            colour = RUN_COLOURS[i % len(RUN_COLOURS)]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            n += len(pts)
            if len(pts) > 1 and not name.startswith(mn.EVAL_PREFIX):
                plot.plot(xs, ys, line_style=colour, hires_mode=HiResMode.BRAILLE, label=self.names.get(rid, rid))
            else:
                plot.scatter(xs, ys, marker="●", marker_style=colour, label=self.names.get(rid, rid))
        plot.show_legend()
        legend = "  ".join(
            f"[{RUN_COLOURS[i % len(RUN_COLOURS)]}]■ {self.names.get(r, r)}[/]" for i, r in enumerate(self.run_ids)
        )
        self.query_one("#curve-title", Static).update(f"[b]{name}[/] ({n} points)  {legend}  [dim]m: next[/]")

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_next_curve(self) -> None:
        self.curve_index += 1
        self._plot()
        self.query_one(TabbedContent).active = "curves"

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_reload(self) -> None:
        self.load()
        self.deltas_loaded = False
        self.query_metrics = {}
        self.query_one("#delta-note", Static).update("Δ: reading the OOF files…")
        self.load_deltas(self.base_id)

    def action_next_baseline(self) -> None:
        """Make the next run the baseline; the differences are recomputed in a worker from the OOF
        metrics already read."""
        if len(self.run_ids) < 2:
            return
        self.base_index = (self.base_index + 1) % len(self.run_ids)
        self.deltas_loaded = False
        self.query_one("#delta-note", Static).update("Δ: computing…")
        self.load_deltas(self.base_id, self.query_metrics or None)
