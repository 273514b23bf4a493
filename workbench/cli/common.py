"""What the command groups share: the ``--db`` and ``--set`` options and opening runs.db.

Each command module keeps its own ``console`` / ``err_console``: tests set one module's width
(``workbench.cli.console.width = 200``) without changing the others' output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from core.runs.store import RunStore

DbOpt = Annotated[str | None, typer.Option("--db", envvar="WORKBENCH_DB", help="runs database (default ./runs.db)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="config override key=value (repeatable)")]

# the Slurm job options of `launch` and `sweep` (core.runs.slurm.SlurmOptions; None: the [slurm] defaults)
PartitionOpt = Annotated[str | None, typer.Option(help="Slurm --partition", rich_help_panel="Slurm")]
GpusOpt = Annotated[int | None, typer.Option(help="Slurm --gpus", rich_help_panel="Slurm")]
TimeOpt = Annotated[
    str | None, typer.Option("--time", help="Slurm --time: minutes, H:MM:SS or D-HH:MM", rich_help_panel="Slurm")
]
AccountOpt = Annotated[str | None, typer.Option(help="Slurm --account", rich_help_panel="Slurm")]
QosOpt = Annotated[str | None, typer.Option(help="Slurm --qos", rich_help_panel="Slurm")]
CpusOpt = Annotated[int | None, typer.Option(help="Slurm --cpus-per-task", rich_help_panel="Slurm")]
MemOpt = Annotated[str | None, typer.Option(help="Slurm --mem, e.g. 32G", rich_help_panel="Slurm")]
RequeueOpt = Annotated[
    bool | None,
    typer.Option(
        "--requeue/--no-requeue",
        help="checkpoint and requeue the job when Slurm signals its time limit (default: yes)",
        rich_help_panel="Slurm",
    ),
]


def slurm_options(**given: Any):
    """:func:`core.runs.slurm.slurm_options` of the Slurm options a command was given (``time_limit``
    is ``--time``).

    Raises:
        ConfigError: a bad value or an unknown ``[slurm]`` key in the user config (one line).
    """
    from core.runs import slurm

    given["time"] = given.pop("time_limit", None)
    return slurm.slurm_options(**given)


def open_store(db: str | None, readonly: bool = False) -> RunStore:
    """The runs database of a command: ``--db`` / ``WORKBENCH_DB``, else ``./runs.db``.

    Raises:
        WorkbenchError (and subclasses): the path or the database is unusable (one line, exit 2).
    """
    from core.runs.store import RunStore, default_db_path  # lazy: `workbench --help` stays fast

    return RunStore(db or default_db_path(), readonly=readonly)


def spinner(console) -> Any:
    """A transient rich spinner with elapsed time on ``console`` (stderr): ``with spinner(c) as
    bar: bar.add_task("what", total=None)`` for work of unknown length."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console, transient=True
    )


def with_progress(err_console, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs, progress=bar)`` with a rich progress bar on stderr when it is a terminal,
    else ``fn(**kwargs)`` (logs and CI stay free of control characters)."""
    if not sys.stderr.isatty():
        return fn(**kwargs)
    from workbench.cli import RichProgress

    with RichProgress(err_console) as progress:
        return fn(**kwargs, progress=progress)


ProcessesOpt = Annotated[
    int | None,
    typer.Option(
        "--processes",
        min=1,
        help="data-parallel processes on this host (one per GPU; gloo on CPU): sets train.num_processes",
    ),
]


def with_processes(set_: list[str] | None, processes: int | None) -> list[str]:
    """The ``--set`` overrides plus ``train.num_processes=N`` for ``--processes N``."""
    return [*(set_ or []), *([f"train.num_processes={processes}"] if processes else [])]


def follow_ranks(err_console, fn: Callable[..., Any], store: RunStore, **kwargs: Any) -> Any:
    """``fn(store=store, **kwargs, poll=...)`` for a run whose supervisor and ranks run in the
    foreground (:func:`core.runs.launcher.run_in_foreground`), with a rich progress bar on stderr
    (when it is a terminal) fed by the run's ``progress/*`` rows in runs.db. Returns what ``fn`` does."""
    if not sys.stderr.isatty():
        return fn(store=store, **kwargs)
    from core.runs import metric_names as mn
    from workbench.cli import RichProgress

    with RichProgress(err_console) as bar:
        done = [0.0]

        def poll(run_id: str) -> None:
            rows = store.metrics(run_id, [mn.PROGRESS_TOTAL_STEPS, mn.PROGRESS_STEP])
            total = [r["value"] for r in rows if r["name"] == mn.PROGRESS_TOTAL_STEPS]
            step = [r["value"] for r in rows if r["name"] == mn.PROGRESS_STEP]
            if total and bar.task is None:
                bar.start(int(total[-1]), f"run {run_id}")
            if step and step[-1] > done[0]:
                bar.advance(int(step[-1] - done[0]))
                done[0] = step[-1]

        return fn(store=store, **kwargs, poll=poll)
