"""``workbench stack``: the LightGBM stacker over finished runs (core.scoring.stack), recorded as a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workbench.cli.common import DbOpt, SetOpt, open_store

console = Console()
err_console = Console(stderr=True)


def stack_settings(config: Path | None, scorers: str | None, set_: list[str] | None):
    """The :class:`core.config.StackConfig` of a command: the ``stack:`` section of ``config`` (a
    stack file, or a training config that has one), then ``--scorers``, then ``--set stack.key=v``.

    Raises:
        ConfigError: unreadable file, unknown key, bad value (one line naming the key).
    """
    from core.config import StackConfig, build_section, parse_overrides, read_config_file, set_dotted
    from core.errors import ConfigError

    data: dict = {"stack": dict(read_config_file(config).get("stack") or {})} if config is not None else {"stack": {}}
    if scorers is not None:
        data["stack"]["scorers"] = [s.strip() for s in scorers.split(",") if s.strip()]
    for key, value in parse_overrides(set_):
        if not key.startswith("stack."):
            raise ConfigError(f"--set {key}: expected stack.KEY=VALUE")
        set_dotted(data, key, value)
    return build_section(StackConfig, data["stack"], "stack.")


def stack(
    runs: Annotated[list[str], typer.Option("--runs", help="member run id (repeatable; finished training runs)")],
    scorers: Annotated[
        str | None, typer.Option("--scorers", help="comma-separated: bm25, dense, dense-e5 (default: all three)")
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="1, 2, 3 or all: the models fitted (default: stack.tasks)")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with a 'stack:' section")] = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="the run's name")] = "stack",
    seed: Annotated[int, typer.Option(help="LightGBM base seed")] = 0,
    db: DbOpt = None,
    top: Annotated[int, typer.Option(help="features shown per task")] = 15,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
):
    """Fit the LightGBM stacker on the runs' OOF rows (fold k by a stacker fitted on the other folds)
    and record it as a run (kind stack): LambdaRank for Task 1, multiclass for Task 2, binary for Task 3."""
    from core.scoring.stack import load_stack_data, record_stack

    if task is not None:
        set_ = [*(set_ or []), f"stack.tasks=[{'1, 2, 3' if task == 'all' else task}]"]
    cfg = stack_settings(config, scorers, set_)
    store = open_store(db)
    with console.status("loading the member runs and the scorers (BM25, zero-shot cosines)"):
        data = load_stack_data(store, runs, cfg.scorers)
    run_id, res = record_stack(store, data, cfg, name=name, seed=seed, progress=lambda m: err_console.log(m))
    if as_json:
        print(
            json.dumps({"run": run_id, "cv": res.cv, "held_out": res.held_out, "members": res.members}, default=float)
        )
        return
    _print_figures(run_id, res)
    print_importance(res, top)


def _print_figures(run_id: str, res) -> None:
    t = Table(title=f"stack run {run_id}", title_justify="left", padding=(0, 1), collapse_padding=True)
    for col in ("scorer", "OOF nDCG", "held-out nDCG", "T2 F1 OOF", "T2 F1 held-out"):
        t.add_column(col, justify="left" if col == "scorer" else "right", no_wrap=True)
    ho = res.held_out

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    for name, fig in res.members.items():
        label = f"{name} ({fig['run']})" if "run" in fig else name
        t.add_row(escape(label), f(fig.get("oof_ndcg")), f(fig.get("held_out_ndcg")), "-", "-")
    t.add_row("[b]stack[/]", f(res.cv["ndcg"]), f(ho.get("ndcg")), f(res.cv["task2_f1"]), f(ho.get("task2_f1")))
    console.print(t)
    folds = ", ".join(f"f{k} {v:.4f}" for k, v in res.cv["folds"].items())
    console.print(
        f"per fold (OOF): {folds}; Task 3 F1 {res.cv['task3_f1']:.4f}; majority-class F1 {res.cv['majority_f1']:.4f}"
    )
    if ho:
        console.print(
            f"held out: Task 3 F1 {ho['task3_f1']:.4f}; majority-class F1 {ho['majority_f1']:.4f}", highlight=False
        )


def print_importance(res, top: int, tasks: tuple[str, ...] = ("rank", "esci", "substitute")) -> None:
    """The top ``top`` features by gain share of each task's model, with bars."""
    for task, g in res.importance.groupby("task", sort=False):
        if task not in tasks:
            continue
        t = Table(title=f"{task} model: feature gain", title_justify="left", padding=(0, 1), collapse_padding=True)
        t.add_column("feature", no_wrap=True)
        t.add_column("share", justify="right")
        t.add_column("", no_wrap=True)
        for _, r in g.head(top).iterrows():
            t.add_row(escape(str(r["feature"])), f"{r['share']:.3f}", "█" * max(1, round(30 * r["share"])))
        console.print(t)
