"""``workbench sweep``: hyperparameter sweeps over ordinary runs (:mod:`core.runs.sweep`).

``workbench sweep CONFIG --space SPACE.yaml --trials N ...`` starts one (the hidden ``start``
subcommand: a first argument that names no subcommand is a config); ``resume``, ``stop``, ``show``
and ``list`` act on existing sweeps by name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from core.errors import WorkbenchError
from core.runs import metric_names as mn
from workbench.cli.common import (
    AccountOpt,
    CpusOpt,
    DbOpt,
    GpusOpt,
    MemOpt,
    PartitionOpt,
    QosOpt,
    RequeueOpt,
    SetOpt,
    TimeOpt,
    open_store,
    slurm_options,
)

console = Console()
err_console = Console(stderr=True)


class _SweepGroup(TyperGroup):
    """A group whose first argument, when it names no subcommand (nor is an option), is the config of
    ``sweep start``: ``workbench sweep CONFIG ...`` = ``workbench sweep start CONFIG ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(
    cls=_SweepGroup,
    no_args_is_help=True,
    help="Hyperparameter sweeps (Optuna): `workbench sweep CONFIG --space SPACE.yaml --trials N`, "
    "then resume/stop/show/list NAME.",
)

NameArg = Annotated[str, typer.Argument(help="the sweep's name (`workbench sweep list`)")]


def _progress_printer():
    """A callback for :func:`core.runs.sweep.drive` and a closer: a live rich line on a terminal,
    else one plain line whenever the counts change."""
    last: list[str] = [""]
    if sys.stderr.isatty():
        from rich.live import Live

        live = Live("", console=err_console, transient=False, refresh_per_second=2)
        live.start()

        def show(p) -> None:
            live.update(escape(p.line()))

        return show, live.stop

    def plain(p) -> None:
        line = p.line()
        if line != last[0]:
            err_console.print(escape(line), highlight=False, soft_wrap=True)
            last[0] = line

    return plain, lambda: None


def _drive(store, study, settings, poll_s: float) -> None:
    from core.runs.sweep import claim_driver, drive, release_driver

    claim_driver(store, settings.name)
    show, close = _progress_printer()
    try:
        progress = drive(store, study, settings, poll_s=poll_s, on_poll=show)
    except KeyboardInterrupt:
        close()
        err_console.print(
            f"driver stopped; the running trials go on. Re-attach: `workbench sweep resume {settings.name}`"
        )
        raise typer.Exit(130) from None
    finally:
        close()
        release_driver(store, settings.name)
    console.print(escape(progress.line()), highlight=False, soft_wrap=True)


@sweep_app.command("start", hidden=True)
def start(
    config: Annotated[Path, typer.Argument(help="YAML/TOML training config")],
    space: Annotated[Path, typer.Option("--space", help="search space: {dotted.key: {type, low, high, ...}}")],
    trials: Annotated[int, typer.Option("--trials", help="trials in all (complete, pruned or failed)")],
    parallel: Annotated[int, typer.Option("--parallel", help="trials running at once")] = 1,
    backend: Annotated[str, typer.Option("--backend", help="local or slurm (each trial a Slurm job)")] = "local",
    sampler: Annotated[str, typer.Option("--sampler", help="tpe, random or grid")] = "tpe",
    pruner: Annotated[str, typer.Option("--pruner", help="median, hyperband or none (on the per-fold figures)")] = (
        "median"
    ),
    metric: Annotated[str, typer.Option("--metric", help="cv/ndcg, cv/task2_f1 or cv/final_ndcg (maximised)")] = (
        mn.CV_NDCG
    ),
    name: Annotated[str | None, typer.Option("--name", help="the sweep's name (default: config name + time)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="the sampler's seed")] = None,
    set_: SetOpt = None,
    db: DbOpt = None,
    poll: Annotated[float, typer.Option("--poll", help="seconds between looks at runs.db")] = 2.0,
    partition: PartitionOpt = None,
    gpus: GpusOpt = None,
    time_limit: TimeOpt = None,
    account: AccountOpt = None,
    qos: QosOpt = None,
    cpus_per_task: CpusOpt = None,
    mem: MemOpt = None,
    requeue: RequeueOpt = None,
):
    """Start a sweep and drive it in the foreground: each trial is an ordinary detached run (or Slurm
    job) with the sampled values as --set overrides. Ctrl+C leaves the trials running."""
    from core.runs.sweep import create_sweep

    opts = None
    if backend == "slurm":
        opts = slurm_options(
            partition=partition,
            gpus=gpus,
            time_limit=time_limit,
            account=account,
            qos=qos,
            cpus_per_task=cpus_per_task,
            mem=mem,
            requeue=requeue,
        )
    from core.runs.store import default_db_path

    study, settings = create_sweep(
        db or default_db_path(),  # runs.db is opened (created) once the sweep is accepted
        config,
        space,
        trials,
        parallel=parallel,
        backend=backend,
        sampler=sampler,
        pruner=pruner,
        metric=metric,
        name=name,
        seed=seed,
        overrides=set_,
        slurm_opts=opts,
    )
    store = open_store(db)
    err_console.print(f"sweep {settings.name}: {trials} trials, {parallel} at a time, maximising {metric}")
    _drive(store, study, settings, poll)


@sweep_app.command("resume")
def resume(
    name: NameArg,
    db: DbOpt = None,
    poll: Annotated[float, typer.Option("--poll", help="seconds between looks at runs.db")] = 2.0,
):
    """Re-attach to a sweep (its running trials are watched again) and drive it to its number of trials."""
    from core.runs.sweep import resume_sweep

    store = open_store(db)
    study, settings = resume_sweep(store, name)
    _drive(store, study, settings, poll)


@sweep_app.command("stop")
def stop(name: NameArg, db: DbOpt = None, grace: float = 10.0):
    """Stop every running trial of a sweep (and tell its driver to launch no more)."""
    from core.runs.sweep import stop_sweep

    stopped = stop_sweep(open_store(db), name, grace=grace)
    for trial, run_id, status in stopped:
        console.print(f"trial {trial} run {run_id}: {status}")
    if not stopped:
        console.print(f"sweep {name}: no trial was running")


def _value(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@sweep_app.command("show")
def show(
    name: NameArg,
    db: DbOpt = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            help="a run (e.g. the default config) to compare the best trial with, on their common OOF queries",
        ),
    ] = None,
):
    """A sweep's trials by value, the best config (--set line and YAML file), the parameter importances,
    and (--baseline RUN) the best trial against that run with paired bootstrap intervals."""
    from core.runs.launcher import refresh_statuses
    from core.runs.sweep import best_config, importances, open_sweep, progress_of, trial_rows

    store = open_store(db)
    refresh_statuses(store)
    study, settings = open_sweep(store, name)
    console.print(escape(progress_of(study, settings).line()), highlight=False, soft_wrap=True)
    table = Table(title=f"trials by {settings.metric}", box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left")
    for col in ("trial", "run", "status", settings.metric, "params"):
        table.add_column(col, no_wrap=col != "params", justify="right" if col in ("trial", settings.metric) else "left")
    for r in trial_rows(store, study, settings):
        status = r["status"] if r["status"] != "-" else r["state"]
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        table.add_row(str(r["trial"]), r["run_id"] or "-", status, _value(r["value"]), escape(params))
    console.print(table)
    best = best_config(store, study, settings)
    if best is None:
        console.print("no complete trial yet: no best config")
    else:
        sets, path = best
        console.print("best: " + escape(" ".join(f"--set {s}" for s in sets)), highlight=False, soft_wrap=True)
        console.print(f"best config: {path}", highlight=False, soft_wrap=True)
    values, how = importances(study)
    if values is None:
        console.print(f"importances: {escape(how)}")
    else:
        console.print(f"importances ({how}): " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    if baseline is not None:
        _best_vs_baseline(store, trial_rows(store, study, settings), baseline)


def _best_vs_baseline(store, rows: list[dict], baseline: str) -> None:
    """The best trial's run against ``baseline``: the differences of its OOF figures on their common
    queries with paired bootstrap 95% intervals (:func:`core.runs.compare.compare_oof`); the best trial
    is partly the luckiest one, so "within noise" is said when the interval covers 0."""
    from core.errors import WorkbenchError
    from core.runs.compare import OOF_DELTAS, compare_oof
    from core.scoring.significance import describe, method_note

    best = next((r for r in rows if r["value"] is not None and r["run_id"]), None)
    if best is None:
        raise WorkbenchError("sweep show --baseline: no complete trial with a run yet")
    (row,) = compare_oof(store, [baseline, best["run_id"]])
    console.print(
        f"best trial {best['trial']} ({row['run_id']}) - baseline {row['base_id']} {escape(row['base_name'] or '')}:",
        highlight=False,
    )
    for key, label in OOF_DELTAS:
        d = row["deltas"].get(key)
        if d is not None:
            console.print(f"  {label:<12} {d.a:.4f} -> {d.b:.4f}  {describe(d)}", highlight=False)
    console.print(escape(method_note()), highlight=False, soft_wrap=True)


@sweep_app.command("list")
def list_(db: DbOpt = None):
    """The sweeps next to runs.db with their progress and best value."""
    from core.runs.sweep import list_sweep_names, open_sweep, progress_of

    store = open_store(db)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("sweep", "metric", "complete", "running", "pruned", "failed", "of", "best", "trial"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("sweep", "metric") else "right")
    names = list_sweep_names(store)
    for name in names:
        try:
            study, settings = open_sweep(store, name)
        except WorkbenchError as exc:
            console.print(f"[red]{escape(str(exc))}")
            continue
        p = progress_of(study, settings)
        table.add_row(
            name,
            settings.metric,
            *(str(x) for x in (p.complete, p.running, p.pruned, p.failed, p.total)),
            _value(p.best),
            "-" if p.best_trial is None else str(p.best_trial),
        )
    if names:
        console.print(table)
    else:
        console.print(f"no sweeps next to {store.path}")
