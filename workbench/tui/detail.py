"""Run detail: live curves, the train.log tail, and a system panel (GPU, the run's processes, ETA).

A stack run (``workbench stack``, ``kind: stack``) has no training curves: its curve area shows the
stacker's feature importance as bars instead (``workbench.tui.stack_panel``), ``m`` cycles the task."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Log, Static
from textual_hires_canvas import HiResMode
from textual_plot import PlotWidget

from core.runs import metric_names as mn
from core.runs.launcher import ACTIVE, process_of, refresh_statuses
from core.runs.monitor import LogTail, TreeSampler, estimate_eta, format_seconds
from core.runs.store import RunRecord
from workbench.tui.messages import DetailPolled, StackFilesRead, SystemReadings, WorkerFailed
from workbench.tui.services import STATUS_STYLES, fmt_duration, fmt_float, job_line, n_folds, run_kind, watched
from workbench.tui.stack_panel import ImportanceBars, StackFiles, figures_line, read_stack_files
from workbench.tui.workers import RunActions, WorkerErrors

DETAIL_CURVES = [mn.TRAIN_LOSS, mn.EVAL_NDCG, mn.EVAL_TASK2_F1, mn.TRAIN_LR, mn.TRAIN_SAMPLES_PER_S, mn.EVAL_TASK3_F1]
FOLD_COLOURS = [
    "cyan",
    "magenta",
    "yellow",
    "green",
    "red",
    "blue",
    "white",
    "bright_cyan",
    "bright_magenta",
    "bright_yellow",
]


class RunDetailScreen(WorkerErrors, RunActions, Screen):
    """One run, refreshed every ``refresh_interval`` s by a worker that reads only new metric
    rows (by rowid) and only the appended bytes of the log, and posts them (DetailPolled).

    The poll worker alone touches ``tail`` and ``sampler``; the event loop alone ``series`` and
    ``run``. A poll starts only when the previous one has been applied."""

    WORKER_TITLES = {"detail-poll": "run detail", "stack-read": "stack files"}

    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("m", "next_curve", "metric"),
        Binding("M", "prev_curve", show=False),
        Binding("s", "stop", "stop"),
        Binding("r", "relaunch", "relaunch"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    DEFAULT_CSS = """
    RunDetailScreen #info { height: auto; min-height: 2; max-height: 4; padding: 0 1; background: $primary-background; }
    RunDetailScreen #curve-title { height: 1; padding: 0 1; color: $text-muted; }
    RunDetailScreen #curve { height: 1fr; min-height: 6; }
    RunDetailScreen #bottom { height: 1fr; max-height: 14; }
    RunDetailScreen #log { width: 2fr; border: round $panel; border-title-color: $text-muted; }
    RunDetailScreen #system { width: 1fr; min-width: 30; border: round $panel; padding: 0 1; }
    RunDetailScreen #importance { display: none; min-height: 4; border: round $panel; padding: 0 1;
                                  border-title-color: $text-muted; }
    RunDetailScreen.stack #importance { display: block; }
    RunDetailScreen.stack #curve { display: none; }
    RunDetailScreen.stack #bottom { max-height: 8; }
    """

    def __init__(self, services, run_id: str, refresh_interval: float = 1.5):
        super().__init__()
        self.services = services
        self.run_id = run_id
        self.refresh_interval = refresh_interval
        self.run: dict | None = None
        self.series: dict[str, list[tuple[int, float, float, float]]] = defaultdict(
            list
        )  # name -> (fold, x, value, time)
        self.last_rowid = 0
        self.curve_index = 0
        self.epochs = 1.0
        self.best: dict[str, float] = {}  # RunStore.best_values of the run, as of the last poll
        self.tail: LogTail | None = None
        self.sampler = TreeSampler()
        self._plotted: tuple | None = None
        self.polls = 0
        self._polling = False
        self.stack = False  # a stack run: feature importance bars instead of curves
        self.stack_files: StackFiles | None = None
        self.stack_task = 0
        self._stack_read: str | None = None  # the run status the stack files were (being) read at

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="info")
        yield Static("", id="curve-title")
        plot = PlotWidget(id="curve", allow_pan_and_zoom=False)
        plot.can_focus = False
        yield plot
        yield ImportanceBars(id="importance")
        with Horizontal(id="bottom"):
            log = Log(id="log", max_lines=2000, highlight=False)
            log.border_title = "train.log"
            yield log
            system = Static("", id="system")
            system.border_title = "system"
            yield system
        yield Footer()

    def on_mount(self) -> None:
        plot = self.query_one("#curve", PlotWidget)
        plot.margin_top, plot.margin_bottom = 1, 2
        self.query_one("#log", Log).focus()
        self.poll()
        self.set_interval(self.refresh_interval, self.poll)

    @property
    def curves(self) -> list[str]:
        """DETAIL_CURVES, then a pre-training run's per-task losses (``pretrain/*_loss``) once logged."""
        extra = sorted(n for n in list(self.series) if n.startswith(mn.PRETRAIN_PREFIX) and n.endswith("_loss"))
        return DETAIL_CURVES + extra

    @property
    def curve_name(self) -> str:
        curves = self.curves
        return curves[self.curve_index % len(curves)]

    # -- polling (worker thread) ----------------------------------------------------------------
    def poll(self) -> None:
        """Start a poll worker unless one is still running."""
        if not self._polling:
            self._polling = True
            self._poll(self.last_rowid, self.epochs if self.run is not None else None)

    @work(thread=True, exclusive=True, group="detail-poll", exit_on_error=False)
    def _poll(self, after_rowid: int, epochs: float | None) -> None:
        """Worker: the run row (an active run whose process vanished is marked crashed first), its
        metric rows after ``after_rowid``, the new log lines and the system readings."""
        store = self.services.store()
        run = store.get_run(self.run_id)
        if watched(run):  # active, or a Slurm job not yet reported ended
            refresh_statuses(store)
            run = store.get_run(self.run_id)
        if epochs is None:
            epochs = RunRecord.from_row(run, store.path).epochs
        new = store.metrics_since(run["id"], after_rowid)
        points = [
            (
                m["name"],
                m["fold"],
                m["fold"] * epochs + (m["epoch"] or 0.0) if m["fold"] >= 0 else (m["step"] or 0),
                m["value"],
                m["time"],
            )
            for m in new
        ]
        last = new[-1]["rowid"] if new else after_rowid
        best = store.best_values([run["id"]]).get(run["id"], {})
        self.post_message(DetailPolled(run, points, last, self._poll_log(run), self._read_system(run), epochs, best))

    def on_detail_polled(self, message: DetailPolled) -> None:
        self._polling = False
        self.epochs, self.last_rowid, self.best = message.epochs, message.last_rowid, message.best
        for name, fold, x, value, t in message.points:
            self.series[name].append((fold, x, value, t))
        run = message.run
        self._check_stack(run)
        self._apply(
            run, bool(message.points) or self.polls == 0, message.lines, self._system_text(run, message.readings)
        )
        self.polls += 1

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "detail-poll":
            self._polling = False
        elif message.group == "stack-read":
            self.stack_files = StackFiles(importance_notice=f"cannot read the stack files: {message.text}")
            self._show_stack()

    # -- a stack run's files (worker thread) -------------------------------------------------------
    def _check_stack(self, run: dict) -> None:
        """Switch to the importance panel for a stack run; (re)read its files when first seen and
        when its status changes (a running stack writes them when it finishes)."""
        if not self.stack:
            if run_kind(run) != "stack":
                return
            self.stack = True
            self.add_class("stack")
            self._plotted = None
        if run["status"] != self._stack_read:
            self._stack_read = run["status"]
            self._read_stack(run.get("run_dir"), run["status"])

    @work(thread=True, exclusive=True, group="stack-read", exit_on_error=False)
    def _read_stack(self, run_dir: str | None, status: str) -> None:
        """Worker: ``feature_importance.csv`` and ``stack_report.json`` of the run folder."""
        self.post_message(StackFilesRead(read_stack_files(Path(run_dir) if run_dir else None), status))

    def on_stack_files_read(self, message: StackFilesRead) -> None:
        self.stack_files = message.files
        self._show_stack()

    def _poll_log(self, run: dict) -> list[str]:
        if self.tail is None:
            if not run.get("run_dir"):
                return []
            run_dir = Path(run["run_dir"])
            path = run_dir / "train.log"
            if not path.exists() and (run_dir / "console.log").exists() and run["status"] not in ACTIVE:
                path = run_dir / "console.log"  # died before its log started: show the console
            self.tail = LogTail(path, max_lines=2000)
        return self.tail.poll()

    def _read_system(self, run: dict) -> SystemReadings:
        """Worker side of the system panel: NVML, the run's process tree, the host."""
        probe = self.services.gpu_probe
        gpus = probe.read()
        proc = process_of(run) if run["status"] in ACTIVE else None
        return SystemReadings(gpus, probe.reason, self.sampler.sample(proc), self.services.host_stats())

    def _system_text(self, run: dict, readings: SystemReadings) -> str:
        gpus, tree = readings.gpus, readings.tree
        cpu, ram_used, ram_total = readings.host
        out = []
        if gpus:
            for g in gpus:
                power = f" {g.power:.0f}W" if g.power is not None else ""
                out.append(
                    f"[b]GPU{g.index}[/] {g.util:.0f}% {g.mem_used / 1024:.1f}/{g.mem_total / 1024:.0f}G "
                    f"{g.temperature:.0f}°C{power}"
                )
            if tree:
                mine = sum(mem for g in gpus for pid, mem in g.processes.items() if pid in tree.pids)
                out.append(f"run GPU mem {mine / 1024:.2f} GiB")
        else:
            out.append(f"[dim]no GPU ({escape(readings.gpu_reason or 'NVML unavailable')})[/]")
        if tree:
            out.append(f"run: CPU {tree.cpu_percent:.0f}% RSS {tree.rss / 1024**3:.2f}G, {len(tree.pids)} proc")
        elif run.get("backend") == "slurm":
            node = f" on {run['node']}" if run.get("node") else ""
            out.append(f"run: a Slurm job{escape(node)}, not sampled here")
        else:
            out.append("run: no live process")
        out.append(f"host CPU {cpu:.0f}% RAM {ram_used:.1f}/{ram_total:.0f}G")
        sps = self.series.get(mn.TRAIN_SAMPLES_PER_S)
        if sps:
            out.append(f"{sps[-1][2]:.1f} pairs/s")
        total = self.series.get(mn.PROGRESS_TOTAL_STEPS)
        steps = [(t, v) for _, _, v, t in self.series.get(mn.PROGRESS_STEP, [])]
        if total and steps:
            rate, eta = estimate_eta(steps, total[-1][2])
            done = steps[-1][1] / total[-1][2] if total[-1][2] else 0.0
            eta_text = format_seconds(eta) if run["status"] in ACTIVE else "-"
            out.append(f"step {steps[-1][1]:.0f}/{total[-1][2]:.0f} {done:.0%} ETA {eta_text}")
        return "\n".join(out)

    # -- UI (event loop) -------------------------------------------------------------------------
    def _apply(self, run: dict, metrics_changed: bool, lines: list[str], system: str) -> None:
        self.run = run
        status = run["status"]
        style = STATUS_STYLES.get(status, "")
        best = self.best
        exit_code = f" exit {run['exit_code']}" if run.get("exit_code") is not None else ""
        folds_done = len(self.series.get(mn.FOLD_DONE, []))
        k = n_folds(run)
        folds = f"{folds_done}/{k}" if k else "-"  # a pre-training run has no folds
        model = escape((run["model"] or "").rsplit("/", 1)[-1])
        where = escape(job_line(run))
        # a local run: its pid ends the first line; a Slurm run: its job, state, reason and node on a line of its own
        where = f"  {where}\n" if run.get("backend") != "slurm" else f"\n[b]{where}[/]\n"
        self.query_one("#info", Static).update(
            f"[b]{escape(run['name'] or '')}[/] {run['id']}  [{style}]{status}{exit_code}[/]  {model}{where}"
            f"folds {folds}  nDCG {fmt_float(best.get('ndcg'))}  F1 {fmt_float(best.get('task2_f1'))}  "
            f"final {fmt_float(best.get('final_ndcg'))}  time {fmt_duration(self.services.duration(run))}"
            + (f"  [red]{escape(run['error'][:80])}[/]" if run.get("error") else "")
        )
        if lines:
            self.query_one("#log", Log).write_lines(lines)
        self.query_one("#system", Static).update(system)
        if metrics_changed or self._plotted is None:
            self._plot()

    def _show_stack(self) -> None:
        """The importance panel of the current task and the figures line (the curve title's place)."""
        files = self.stack_files
        panel = self.query_one("#importance", ImportanceBars)
        title = self.query_one("#curve-title", Static)
        if files is None:
            panel.border_title = "feature importance (gain)"
            title.update("[b]stack[/] [dim]reading stack_report.json…[/]")
            return
        title.update(f"[b]stack[/]  {figures_line(files)}")
        tasks = files.tasks
        if not tasks:
            panel.border_title = "feature importance (gain)"
            panel.show([], files.importance_notice or "no feature importance")
            return
        task = tasks[self.stack_task % len(tasks)]
        panel.border_title = f"[b]{escape(task)}[/] model: feature gain share · m: next task ({len(tasks)})"
        panel.show(files.importance[task])

    @property
    def stack_task_name(self) -> str | None:
        """The task whose bars are shown (a stack run with an importance file), else None."""
        tasks = self.stack_files.tasks if self.stack_files else []
        return tasks[self.stack_task % len(tasks)] if tasks else None

    def _plot(self) -> None:
        if self.stack:
            self._show_stack()
            return
        name = self.curve_name
        pts = self.series.get(name, [])
        key = (name, len(pts))
        if key == self._plotted:
            return
        self._plotted = key
        plot = self.query_one("#curve", PlotWidget)
        plot.clear()
        by_fold: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for fold, x, v, _ in pts:
            by_fold[fold][0].append(x)
            by_fold[fold][1].append(v)
        for fold, (xs, ys) in sorted(by_fold.items()):
            colour = FOLD_COLOURS[fold % len(FOLD_COLOURS)]
            if len(xs) > 1 and not name.startswith(mn.EVAL_PREFIX):
                plot.plot(xs, ys, line_style=colour, hires_mode=HiResMode.BRAILLE, label=f"fold {fold}")
            else:
                plot.scatter(xs, ys, marker="●", marker_style=colour, label=f"fold {fold}")
        title = f"[b]{name}[/] {len(pts)} pts" if pts else f"[b]{name}[/] no points yet"
        self.query_one("#curve-title", Static).update(
            f"{title}  [dim]x: epoch, folds in sequence · m/M: {' '.join(self.curves)}[/]"
        )

    # -- actions ---------------------------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_next_curve(self) -> None:
        """The next metric curve; a stack run: the next task's importance."""
        if self.stack:
            self.stack_task += 1
        else:
            self.curve_index += 1
        self._plotted = None
        self._plot()

    def action_prev_curve(self) -> None:
        """The previous metric curve; a stack run: the previous task's importance."""
        if self.stack:
            self.stack_task -= 1
        else:
            self.curve_index -= 1
        self._plotted = None
        self._plot()

    def lifecycle_run(self) -> dict | None:
        if self.run is None:
            self.notify("the run is still loading", severity="warning")
        return self.run

    def action_help(self) -> None:
        from workbench.tui.dialogs import HelpScreen

        self.app.push_screen(HelpScreen())
