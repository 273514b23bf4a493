"""Modal dialogs: confirm, new run (config + ``--set`` overrides, local or Slurm, processes), help."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static, TextArea

from workbench.tui.messages import ConfigChecked, RunLaunched, SlurmProbed, WorkerFailed, first_line
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
    """The config files (*.yaml, *.yml, *.toml) of ``folder``, sorted ([] when it is not a folder)."""
    return sorted(p for p in folder.glob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file()) if folder.is_dir() else []


#: the Slurm fields of the new-run dialog: (input id = ``slurm_options`` keyword, label, width)
SLURM_FIELDS = (
    ("partition", "partition", 10),
    ("gpus", "gpus", 4),
    ("time", "time", 10),
    ("account", "account", 10),
    ("qos", "qos", 10),
)


def slurm_missing() -> str | None:
    """Why Slurm cannot be used from here (one line), or None when ``sbatch``/``squeue``/``scancel`` are on PATH."""
    from core.errors import WorkbenchError
    from core.runs.slurm import require_slurm

    try:
        require_slurm()
    except WorkbenchError as exc:
        return str(exc)
    return None


def parse_processes(text: str) -> int:
    """The dialog's processes field -> ``train.num_processes`` (empty: 1).

    Raises:
        ConfigError: not an integer >= 1 (one line).
    """
    from core.errors import ConfigError

    text = text.strip()
    if not text:
        return 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"processes {text!r}: must be an integer >= 1 (train.num_processes)")
    return n


def launch_request(values: dict[str, str]):
    """The dialog's field values -> (config path, overrides, Slurm options or None for a local run).

    ``values``: ``config``, ``overrides`` (text), ``backend`` ("local"/"slurm"), ``processes`` and the
    :data:`SLURM_FIELDS` (empty: the user config's ``[slurm]`` default, else Slurm's). The processes
    become the override ``train.num_processes=N`` when N != 1. Reads files (the user config): call it
    in a worker.

    Raises:
        ValueError: a malformed override; ConfigError / WorkbenchError: a bad value or no Slurm (one line).
    """
    from core.errors import ConfigError, WorkbenchError
    from core.runs.slurm import slurm_options

    overrides = parse_overrides(values.get("overrides", ""))
    n = parse_processes(values.get("processes", ""))
    if n != 1:
        overrides.append(f"train.num_processes={n}")
    if values.get("backend") != "slurm":
        return values["config"], overrides, None
    missing = slurm_missing()
    if missing:
        raise WorkbenchError(missing)
    given: dict[str, object] = {}
    for key, _, _ in SLURM_FIELDS:
        text = values.get(key, "").strip()
        if not text:
            continue
        if key == "gpus":
            try:
                given[key] = int(text)
            except ValueError:
                raise ConfigError(f"slurm gpus {text!r}: must be an integer >= 1") from None
        else:
            given[key] = text
    return values["config"], overrides, slurm_options(**given)


def slurm_summary(opts) -> str:
    """Slurm options as a short text for the check line, e.g. ``partition debug, time 5, mem 1G`` (the
    dialog's fields and the user config's ``cpus_per_task``/``mem``, which the dialog does not show)."""
    keys = [k for k, _, _ in SLURM_FIELDS] + ["cpus_per_task", "mem"]
    parts = [f"{k.replace('_', '-')} {getattr(opts, k)}" for k in keys if getattr(opts, k) is not None]
    return ", ".join(parts) or "the partition's defaults"


class NewRunScreen(WorkerErrors, ModalScreen[str | None]):
    """Pick a config, edit overrides, choose where it runs (local, or a Slurm batch job with its
    partition, GPUs, time limit, account, QOS) and its data-parallel processes, see it validate,
    launch detached (local) or submit (Slurm). Dismisses with the run id.

    Everything that reads a file or runs a command (the config check, the user config's ``[slurm]``
    defaults, whether ``sbatch`` is on PATH, the launch) runs in a worker."""

    WORKER_TITLES = {"launch": "launch failed", "validate": "config check", "slurm-probe": "Slurm defaults"}

    BINDINGS = [Binding("escape", "cancel", "cancel"), Binding("ctrl+s", "launch", "launch")]
    DEFAULT_CSS = """
    NewRunScreen { align: center middle; }
    NewRunScreen > VerticalScroll { width: 90; max-width: 100%; height: auto; max-height: 100%;
                                   border: thick $primary; background: $surface; padding: 0 1; }
    NewRunScreen TextArea { height: 4; }
    NewRunScreen .row { height: 1; }
    NewRunScreen #backend-row { margin-top: 1; }
    NewRunScreen .row > Label { width: auto; padding: 0 1 0 0; }
    NewRunScreen .row > Input { margin-right: 2; background: $boost; }
    NewRunScreen .row > Input:focus { background: $primary 30%; }
    NewRunScreen #backend { width: 12; margin-right: 2; }
    NewRunScreen #processes { width: 5; }
    NewRunScreen #backend-note { width: 1fr; color: $text-muted; }
    NewRunScreen #slurm { height: auto; display: none; }
    NewRunScreen #slurm.visible { display: block; }
    NewRunScreen #slurm-note { height: 1; color: $text-muted; }
    NewRunScreen #check { height: auto; max-height: 4; margin: 1 0; }
    NewRunScreen #buttons { height: auto; }
    NewRunScreen Button { margin-right: 2; }
    """

    def __init__(self, services):
        super().__init__()
        self.services = services
        self.configs = list_configs(services.configs_dir)
        self.valid = False
        self.launched: str | None = None
        self.slurm_reason: str | None = None  # why Slurm cannot be used (None: it can, or not known yet)

    def compose(self) -> ComposeResult:
        with VerticalScroll(can_focus=False):  # the focused field scrolls into view (80x24)
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
            with Horizontal(classes="row", id="backend-row"):
                yield Label("backend")
                yield Select(
                    [("local", "local"), ("slurm", "slurm")],
                    id="backend",
                    value="local",
                    allow_blank=False,
                    compact=True,
                )
                yield Label("processes")
                yield Input("1", id="processes", type="integer", compact=True)
                yield Static("", id="backend-note")
            with Vertical(id="slurm"):
                for fields in (SLURM_FIELDS[:3], SLURM_FIELDS[3:]):
                    with Horizontal(classes="row"):
                        for key, label, width in fields:
                            yield Label(label)
                            box = Input("", id=key, compact=True)
                            box.styles.width = width
                            yield box
                yield Static(
                    "time: minutes, H:MM:SS or D-HH:MM; empty: your \\[slurm] default, else Slurm's", id="slurm-note"
                )
            yield Static("", id="check")
            with Horizontal(id="buttons"):
                yield Button("Launch (ctrl+s)", id="launch", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        if not self.configs:
            self.query_one("#check", Static).update(
                f"[red]no configs (*.yaml, *.toml) in {self.services.configs_dir}[/]"
            )
        self._probe_slurm()
        self.validate_config()

    # -- Slurm defaults (worker) ------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="slurm-probe", exit_on_error=False)
    def _probe_slurm(self) -> None:
        """Worker: whether Slurm is usable here, and the user config's ``[slurm]`` defaults."""
        from core.errors import WorkbenchError
        from core.runs.slurm import user_defaults

        try:
            defaults, error = user_defaults(), None
        except WorkbenchError as exc:  # a broken user config: said in the dialog, the fields stay empty
            defaults, error = {}, str(exc)
        self.post_message(SlurmProbed(slurm_missing(), defaults, error))

    def on_slurm_probed(self, message: SlurmProbed) -> None:
        self.slurm_reason = message.missing
        for key, _, _ in SLURM_FIELDS:
            box = self.query_one(f"#{key}", Input)
            if not box.value and message.defaults.get(key) is not None:
                box.value = str(message.defaults[key])
        note = ""
        if message.missing:
            note = "[yellow]slurm: sbatch not on PATH[/]"
        elif message.error:
            note = f"[red]{escape(message.error)}[/]"
        self.query_one("#backend-note", Static).update(note)

    # -- values, check ----------------------------------------------------------------------------
    def _values(self) -> dict[str, str]:
        sel = self.query_one("#config", Select).value
        values = {
            "config": "" if sel is Select.BLANK else str(sel),
            "overrides": self.query_one("#overrides", TextArea).text,
            "backend": str(self.query_one("#backend", Select).value),
            "processes": self.query_one("#processes", Input).value,
        }
        for key, _, _ in SLURM_FIELDS:
            values[key] = self.query_one(f"#{key}", Input).value
        return values

    @on(Select.Changed)
    @on(TextArea.Changed)
    @on(Input.Changed)
    def _changed(self) -> None:
        self.query_one("#slurm").set_class(self.query_one("#backend", Select).value == "slurm", "visible")
        self.validate_config()

    def validate_config(self) -> None:
        """Check the picked config with the typed overrides, processes and Slurm options in a worker (ConfigChecked)."""
        values = self._values()
        if values["config"]:
            self._check(values)

    @work(thread=True, exclusive=True, group="validate", exit_on_error=False)
    def _check(self, values: dict[str, str]) -> None:
        from core.errors import WorkbenchError
        from core.runs.launcher import load_any_config

        try:
            path, overrides, opts = launch_request(values)
            cfg = load_any_config(path, overrides)
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
            n = parse_processes(values.get("processes", ""))
            if n != 1:
                msg += f" · {n} processes"
            if opts is not None:
                msg += f" · on Slurm: {escape(slurm_summary(opts))}"
            ok = True
        except (WorkbenchError, ValueError) as exc:  # a bad config or override is the answer, not a failure
            msg, ok = f"[red]{escape(first_line(exc))}[/]", False
        self.post_message(ConfigChecked(msg, ok))

    def on_config_checked(self, message: ConfigChecked) -> None:
        self.valid = message.ok
        self.query_one("#check", Static).update(message.text)

    # -- launch -----------------------------------------------------------------------------------
    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        """Launch (local) or submit (Slurm) in a worker; a refusal is shown in the check line."""
        values = self._values()
        if not values["config"]:
            self.notify("pick a config first", severity="warning")
            return
        self.query_one("#launch", Button).disabled = True
        self._launch(values)

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def _launch(self, values: dict[str, str]) -> None:
        import core.runs.launcher as launcher

        path, overrides, opts = launch_request(values)
        store = self.services.store()
        if opts is None:
            run_id, pid = launcher.launch(path, overrides, store)
            self.post_message(RunLaunched(run_id, pid, Path(path).name))
            return
        from core.runs import slurm

        cfg = launcher.load_any_config(path, overrides)
        run_id, job_id = slurm.submit(cfg, store, opts, config_path=path)
        self.post_message(RunLaunched(run_id, None, Path(path).name, job_id=job_id))

    def on_run_launched(self, message: RunLaunched) -> None:
        self.launched = message.run_id
        if message.job_id is not None:
            self.notify(f"submitted Slurm job {message.job_id}: run {message.run_id} from {message.config}")
        else:
            self.notify(f"launched {message.run_id} (pid {message.pid}) from {message.config}")
        self.dismiss(message.run_id)

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "launch":  # the toast (WorkerErrors) and the reason in the dialog
            self.query_one("#check", Static).update(f"[red]{escape(message.text)}[/]")
            self.query_one("#launch", Button).disabled = False

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        """Close without launching."""
        self.dismiss(None)


HELP = """\
[b]Runs[/]
  ↑/↓ j/k PgUp/PgDn Home/End  move        enter  run detail
  n  new run: config, overrides,          s      stop (confirm): SIGTERM,
     local or Slurm, processes                   then SIGKILL; Slurm scancel
  r  relaunch with the same config        space  mark / unmark
  R  resume a crashed/stopped run (same id, finished folds kept)
  c  compare marked runs                  /      filter: words or key:value,
     keys id name status model task backend job state node sweep trial
  where: local, or a Slurm job's id + state (4242 PD); reason: status line
  1-9  sort by a column (again: reverse)  esc    clear filter
  e  ensemble of the marked runs          l      label review of this run
  w  sweeps: trials, plots, importances   ctrl+p palette  q quit, runs go on
[b]Run detail[/]
  m / M  next / previous metric curve     s  stop   r  relaunch   esc  back
[b]Compare[/]
  1 metrics (best ± fold std \\[min-max])   2 config diff (differing keys)
  3 curves (one colour per run), m next metric    r reload    esc  back
  Δ rows: run - baseline on common OOF queries \\[95% paired bootstrap];
  "noise" when the interval covers 0; b next baseline
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
