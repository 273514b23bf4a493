"""Modal dialogs: confirm, new run (config + ``--set`` overrides), help."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select, Static, TextArea

from workbench.tui.messages import ConfigChecked, RunLaunched, WorkerFailed
from workbench.tui.workers import WorkerErrors

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no; ``y``/Enter confirm, ``n``/Escape cancel."""

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n", "answer(False)", "no"),
        Binding("escape", "answer(False)", "cancel", show=False),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; max-width: 95%; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; margin-top: 1; }
    ConfirmScreen Button { margin-right: 2; }
    """

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(escape(self.question))
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def parse_overrides(text: str) -> list[str]:
    """Override lines -> ``key=value`` list: one or more per line (shell-quoted), ``#`` comments.

    Raises:
        ValueError: an item without ``=`` or unbalanced quotes.
    """
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        for item in shlex.split(line):
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            out.append(item)
    return out


def list_configs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file()) if folder.is_dir() else []


class NewRunScreen(WorkerErrors, ModalScreen[str | None]):
    """Pick a config, edit overrides, see it validate, launch detached. Dismisses with the run id."""

    WORKER_TITLES = {"launch": "launch failed", "validate": "config check"}

    BINDINGS = [Binding("escape", "cancel", "cancel"), Binding("ctrl+s", "launch", "launch")]
    DEFAULT_CSS = """
    NewRunScreen { align: center middle; }
    NewRunScreen > Vertical { width: 90; max-width: 100%; height: auto; max-height: 100%; border: thick $primary;
                             background: $surface; padding: 0 1; }
    NewRunScreen TextArea { height: 6; }
    NewRunScreen #check { height: auto; max-height: 4; margin: 0 0 1 0; }
    NewRunScreen Horizontal { height: auto; }
    NewRunScreen Button { margin-right: 2; }
    """

    def __init__(self, services):
        super().__init__()
        self.services = services
        self.configs = list_configs(services.configs_dir)
        self.valid = False
        self.launched: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]New run[/]  config from {escape(str(self.services.configs_dir))}/")
            yield Select(
                [(p.name, str(p)) for p in self.configs],
                id="config",
                prompt="config",
                value=str(self.configs[0]) if self.configs else Select.BLANK,
                allow_blank=not self.configs,
            )
            yield Label("overrides, key=value (one or more per line), e.g. train.epochs=2")
            yield TextArea("", id="overrides")
            yield Static("", id="check")
            with Horizontal():
                yield Button("Launch (ctrl+s)", id="launch", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        if not self.configs:
            self.query_one("#check", Static).update(
                f"[red]no configs (*.yaml, *.toml) in {self.services.configs_dir}[/]"
            )
        self.validate_config()

    def _values(self) -> tuple[str | None, str]:
        sel = self.query_one("#config", Select).value
        return (None if sel is Select.BLANK else str(sel)), self.query_one("#overrides", TextArea).text

    @on(Select.Changed)
    @on(TextArea.Changed)
    def _changed(self) -> None:
        self.validate_config()

    def validate_config(self) -> None:
        """Check the picked config with the typed overrides in a worker (ConfigChecked)."""
        path, text = self._values()
        if path:
            self._check(path, text)

    @work(thread=True, exclusive=True, group="validate", exit_on_error=False)
    def _check(self, path: str, text: str) -> None:
        from core.errors import WorkbenchError
        from core.runs.launcher import load_any_config

        try:
            cfg = load_any_config(path, parse_overrides(text))
            if getattr(cfg, "kind", "train") == "pretrain":
                tasks = ", ".join(cfg.tasks.enabled())
                msg = (
                    f"[green]ok[/]: pre-training {escape(cfg.name)} · {escape(cfg.model.name)} · "
                    f"{escape(tasks)} · data {escape(str(cfg.data.dir))}"
                )
            else:
                msg = (
                    f"[green]ok[/]: {escape(cfg.name)} · {escape(cfg.model.name)} · {cfg.train.folds} folds × "
                    f"{cfg.train.epochs} epochs · data {escape(str(cfg.data.dir))}"
                )
            ok = True
        except (WorkbenchError, ValueError) as exc:  # a bad config or override is the answer, not a failure
            msg, ok = f"[red]{escape(str(exc))}[/]", False
        self.post_message(ConfigChecked(msg, ok))

    def on_config_checked(self, message: ConfigChecked) -> None:
        self.valid = message.ok
        self.query_one("#check", Static).update(message.text)

    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        path, text = self._values()
        if not path:
            self.notify("pick a config first", severity="warning")
            return
        self.query_one("#launch", Button).disabled = True
        self._launch(path, text)

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def _launch(self, path: str, text: str) -> None:
        from core.runs.launcher import launch

        run_id, pid = launch(path, parse_overrides(text), self.services.store())
        self.post_message(RunLaunched(run_id, pid, Path(path).name))

    def on_run_launched(self, message: RunLaunched) -> None:
        self.launched = message.run_id
        self.notify(f"launched {message.run_id} (pid {message.pid}) from {message.config}")
        self.dismiss(message.run_id)

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "launch":  # the toast (WorkerErrors) and the reason in the dialog
            self.query_one("#check", Static).update(f"[red]{escape(str(message.error))}[/]")
            self.query_one("#launch", Button).disabled = False

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


HELP = """\
[b]Runs[/]
  ↑/↓ j/k PgUp/PgDn Home/End  move        enter  run detail
  n  new run (config + overrides)         s      stop (confirm; SIGTERM, then SIGKILL)
  r  relaunch with the same config        space  mark / unmark
  R  resume a crashed/stopped run (same id, finished folds kept)
  c  compare marked runs                  /      filter (words, status:running, model:e5)
  1-9  sort by a column (again: reverse)  esc    clear filter
  e  ensemble of the marked runs          l      label review of this run
  ctrl+p  command palette                 q      quit (runs keep going)
[b]Run detail[/]
  m / M  next / previous metric curve     s  stop    r  relaunch    esc  back
[b]Compare[/]
  1 metrics (best ± fold std [min-max])   2 config diff (only differing keys)
  3 curves (one colour per run), m next metric    r reload    esc  back
nDCG / F1 are the best values (CV over all OOF rows when finished, else the
mean of each fold's best evaluation so far), never the last one."""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "close"),
        Binding("question_mark", "close", show=False),
        Binding("q", "close", show=False),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 80; max-width: 100%; height: auto; max-height: 100%; border: thick $primary;
                                  background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
