"""Compare marked runs: best value per metric with the per-fold spread, a config diff of only the
keys that differ, overlaid curves (one colour per run)."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane
from textual_hires_canvas import HiResMode
from textual_plot import PlotWidget

from core.runs import metric_names as mn
from core.runs.compare import COMPARE_METRICS, CURVE_METRICS, config_diff, curve, metric_summary, run_configs
from workbench.tui.messages import CompareLoaded
from workbench.tui.workers import WorkerErrors

RUN_COLOURS = ["cyan", "magenta", "yellow", "green", "red", "blue", "bright_white", "bright_cyan"]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class CompareScreen(WorkerErrors, Screen):
    """Side by side for 2+ runs; everything is read once in a worker (``r`` reloads)."""

    WORKER_TITLES = {"compare": "compare"}

    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("m", "next_curve", "metric"),
        Binding("r", "reload", "reload"),
        Binding("1", "tab('metrics')", "metrics", show=False),
        Binding("2", "tab('config')", "config", show=False),
        Binding("3", "tab('curves')", "curves", show=False),
    ]
    DEFAULT_CSS = """
    CompareScreen #cmp-title { height: 1; padding: 0 1; background: $primary-background; }
    CompareScreen DataTable { height: 1fr; }
    CompareScreen #curve { height: 1fr; }
    CompareScreen #curve-title { height: 1; padding: 0 1; }
    """

    def __init__(self, services, run_ids: list[str]):
        super().__init__()
        self.services = services
        self.run_ids = list(run_ids)
        self.curve_index = 0
        self.curves: dict[str, dict[str, list]] = {}
        self.names: dict[str, str] = {}
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static(
            f"comparing {len(self.run_ids)} runs   [dim]1 metrics · 2 config diff · 3 curves[/]", id="cmp-title"
        )
        with TabbedContent(initial="metrics"):
            with TabPane("metrics", id="metrics"):
                yield DataTable(id="metrics-table", cursor_type="row", zebra_stripes=True)
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

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def load(self) -> None:
        store = self.services.store()
        runs = [store.get_run(r) for r in self.run_ids]
        names = {r["id"]: f"{r['name']} {r['id'][-4:]}" for r in runs}
        summaries = {r["id"]: metric_summary(store, r["id"]) for r in runs}
        diff = config_diff(run_configs(store, self.run_ids))
        curves = {name: {r["id"]: curve(store, r["id"], name) for r in runs} for name in CURVE_METRICS}
        self.post_message(CompareLoaded(runs, names, summaries, diff, curves))

    def on_compare_loaded(self, message: CompareLoaded) -> None:
        runs, names, summaries, diff = message.runs, message.names, message.summaries, message.diff
        self.names, self.curves = names, message.curves
        ids = [r["id"] for r in runs]
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
