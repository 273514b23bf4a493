"""The Textual workbench: ``workbench`` (or ``workbench tui``) opens it on ./runs.db.

Quitting never stops a run: trainers are detached (own session, see core.runs.launcher), and a
reopened app re-attaches through runs.db (pid + process create time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from workbench.tui.runs import RunsScreen
from workbench.tui.services import Services
from workbench.tui.workers import RunLifecycle, WorkerErrors


class WorkbenchApp(WorkerErrors, RunLifecycle, App):
    """Args:
        db_path: runs.db (created if absent).
        gpu_probe: NVML probe (default real; tests pass a fake).
        clock: ``() -> unix seconds`` (tests freeze it).
        configs_dir: where ``n`` (new run) looks for configs.
        refresh_interval: seconds between database polls of the Runs screen.
        host_stats: ``() -> (CPU %, RAM used GiB, RAM total GiB)`` (tests freeze it).

    The screens read and write runs.db only in thread workers that post typed messages
    (workbench.tui.messages); a worker's error becomes one toast (WorkerErrors). Stop, relaunch
    and resume run here (RunLifecycle), so their outcome shows whichever screen is open.
    """

    TITLE = "esci-workbench"
    BINDINGS = [Binding("q", "quit", "quit"), Binding("ctrl+c", "quit", show=False, priority=True)]
    CSS = """
    Screen { background: $background; }
    """

    def __init__(
        self,
        db_path: str,
        gpu_probe=None,
        clock: Callable[[], float] | None = None,
        configs_dir: str = "configs",
        refresh_interval: float = 2.0,
        host_stats=None,
    ):
        super().__init__()
        self.services = Services(
            db_path, gpu_probe=gpu_probe, clock=clock, configs_dir=configs_dir, host_stats=host_stats
        )
        self.refresh_interval = refresh_interval
        self.runs_screen: RunsScreen | None = None

    def on_mount(self) -> None:
        self.runs_screen = RunsScreen(self.services, self.refresh_interval)
        self.push_screen(self.runs_screen)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        runs = self.runs_screen
        if runs is None:
            return
        yield SystemCommand(
            "New run", "pick a config, edit overrides, launch here or submit to Slurm", runs.action_new_run
        )
        yield SystemCommand("Compare marked runs", "metrics, config diff, curves", runs.action_compare)
        yield SystemCommand("Filter runs", "by words or key:value", runs.action_filter)
        yield SystemCommand(
            "Ensemble", "weights, OOF scores and one-key submission files for the marked runs", runs.action_ensemble
        )
        yield SystemCommand("Sweeps", "hyperparameter sweeps: progress, trials, importances", runs.action_sweeps)
        yield SystemCommand("Review label issues", "the label-error queue of the current run", runs.action_labels)
        yield SystemCommand("Reload runs", "re-read runs.db now", lambda: runs.reload(force=True))
        yield SystemCommand("Keys", "all key bindings", runs.action_help)

    def runs_changed(self) -> None:
        if self.runs_screen is not None:
            self.runs_screen.reload(force=True)

    def on_unmount(self) -> None:
        self.services.close()


def run_app(db_path: str, configs_dir: str = "configs") -> None:
    """Open the app in the terminal (blocks until quit)."""
    WorkbenchApp(db_path, configs_dir=configs_dir).run()
