"""``workbench ensemble ...`` and ``workbench submission ...``: thin commands over core.scoring.ensemble and
core.scoring.submission."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workbench.cli.common import DbOpt, open_store

ensemble_app = typer.Typer(no_args_is_help=True, help="Combine runs and baseline scorers; write submissions.")
submission_app = typer.Typer(no_args_is_help=True, help="Check KDD Cup 2022 ESCI submission files.")

console = Console()
err_console = Console(stderr=True)


def parse_tasks(task: str) -> tuple[int, ...]:
    """``1``, ``2``, ``3``, ``all`` or ``1,3`` -> tuple of tasks."""
    from core.errors import WorkbenchError

    if task.strip().lower() == "all":
        return (1, 2, 3)
    try:
        out = tuple(sorted({int(t) for t in task.split(",")}))
    except ValueError:
        raise WorkbenchError(f"--task {task!r}: expected 1, 2, 3, all or a list like 1,3") from None
    if not out or any(t not in (1, 2, 3) for t in out):
        raise WorkbenchError(f"--task {task!r}: expected 1, 2, 3, all or a list like 1,3")
    return out


def _short(name: str) -> str:
    return name if len(name) <= 23 else name[:12] + "…" + name[-10:]


def print_result(res, names: list[str]) -> None:
    """Per-member OOF scores and weights per task, the ensemble's, and the correlation matrix
    (fits 80 columns)."""
    console.print("[bold]OOF scores (T1 nDCG, T2/T3 micro-F1) and weights")
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    t.add_column("member", no_wrap=True)
    for task in sorted(res.tasks):
        t.add_column(f"T{task}", justify="right")
        t.add_column(f"w{task}", justify="right")
    for name in names:
        row = [_short(name)]
        for task in sorted(res.tasks):
            info = res.tasks[task]
            if name in info["members"]:
                row += [f"{info['oof_member'][name]:.4f}", f"{info['weights'][info['members'].index(name)]:.2f}"]
            else:
                row += ["-", "-"]
        t.add_row(*row)
    t.add_section()
    t.add_row(
        "[bold]ensemble",
        *[c for task in sorted(res.tasks) for c in (f"[bold]{res.tasks[task]['oof_ensemble']:.4f}", "")],
    )
    console.print(t)
    print_vs_best(res)
    held = [task for task in sorted(res.tasks) if "test_member" in res.tasks[task]]
    if held:
        console.print("[bold]held-out test rows (labelled; nothing fitted on them)")
        h = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        h.add_column("member", no_wrap=True)
        for task in held:
            h.add_column(f"T{task}", justify="right")
        for name in names:
            h.add_row(
                _short(name),
                *[
                    f"{res.tasks[k]['test_member'][name]:.4f}" if name in res.tasks[k]["test_member"] else "-"
                    for k in held
                ],
            )
        h.add_section()
        h.add_row("[bold]ensemble", *[f"[bold]{res.tasks[k]['test_ensemble']:.4f}" for k in held])
        console.print(h)
    if 3 in res.tasks:
        console.print(
            f"Task 3: substitute iff p(S) >= {res.tasks[3]['threshold']:.4f} (tuned on OOF; "
            f"argmax rule {res.tasks[3]['oof_argmax']:.4f})"
        )
    if 2 in res.tasks and any(res.tasks[2]["log_prior_bias"].values()):
        b = res.tasks[2]["log_prior_bias"]
        console.print(
            "Task 2 log-prior bias: "
            + ", ".join(f"{k} {v:+.2f}" for k, v in b.items())
            + f" (argmax without: {res.tasks[2]['oof_argmax']:.4f})"
        )
    if res.corr is not None and len(names) > 1:
        console.print("[bold]correlation of per-query standardised OOF ranking scores")
        c = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        c.add_column("", no_wrap=True)
        for j in range(len(names)):
            c.add_column(f"m{j + 1}", justify="right")
        for i, name in enumerate(names):
            c.add_row(f"m{i + 1} {_short(name)}", *[f"{v:.2f}" for v in res.corr.iloc[i].to_numpy()])
        console.print(c)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print("OOF ensemble figures use weights/threshold fitted on the same OOF rows (slightly optimistic).")


def print_vs_best(res) -> None:
    """The ensemble minus its best member per task on OOF, with the paired bootstrap 95% interval
    (``res.tasks[t]["vs_best"]`` from :func:`core.scoring.ensemble.compare_with_best_member`)."""
    from rich.markup import escape

    from core.scoring.significance import PairedDiff, describe

    rows = [(task, res.tasks[task]["vs_best"]) for task in sorted(res.tasks) if "vs_best" in res.tasks[task]]
    if not rows:
        return
    n, r, seed = rows[0][1]["n_queries"], rows[0][1]["n_resamples"], rows[0][1]["seed"]
    console.print("[bold]ensemble - best member on OOF[/], 95% paired bootstrap interval")
    for task, v in rows:
        d = PairedDiff(**{k: v[k] for k in PairedDiff.__dataclass_fields__})
        console.print(f"  T{task} vs {escape(_short(v['member']))}: {describe(d)}")
    console.print(f"  ({n:,} queries resampled {r:,} times, seed {seed}; within noise: it covers 0)")


@ensemble_app.command("build", context_settings={"allow_extra_args": True})
def ensemble_build(
    ctx: typer.Context,
    runs: Annotated[list[str], typer.Option("--runs", help="members: run ids (or RUN:ce), bm25, dense")],
    task: Annotated[str, typer.Option(help="1, 2, 3 or all")] = "all",
    weights: Annotated[str, typer.Option(help="auto (fitted on OOF), equal, or w1,w2,...")] = "auto",
    method: Annotated[str, typer.Option(help="Task 1 combination: zscore | rank | prob")] = "zscore",
    shrink: Annotated[float | None, typer.Option(help="shrink weights of members correlated >= this")] = None,
    prior_adjust: Annotated[
        bool, typer.Option("--prior-adjust", help="Task 2: tune class log-prior bias on OOF")
    ] = False,
    name: Annotated[str | None, typer.Option(help="submission name (default: ens-<time>)")] = None,
    out: Annotated[Path, typer.Option(help="folder of submission folders")] = Path("submissions"),
    examples: Annotated[
        Path | None, typer.Option(help="validate against these test examples (data dir or file)")
    ] = None,
    no_write: Annotated[bool, typer.Option("--no-write", help="only print the OOF figures")] = False,
    db: DbOpt = None,
):
    """Combine runs (and bm25/dense scorers for Task 1), print OOF figures, write + validate the
    submission files under OUT/NAME with a manifest, and record the ensemble in runs.db."""
    import time

    from core.errors import WorkbenchError
    from core.scoring.ensemble import (
        build_ensemble,
        compare_with_best_member,
        load_members,
        parse_weights,
        write_ensemble,
    )

    # --runs A B C (the extra words), --runs A --runs B, or --runs A,B,C
    specs = [s for r in [*runs, *ctx.args] for s in re.split(r"[,\s]+", r) if s]
    stray = [s for s in specs if s.startswith("-")]
    if stray:
        raise WorkbenchError(f"unknown option(s) {', '.join(stray)}")
    tasks = parse_tasks(task)
    name = name or time.strftime("ens-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise WorkbenchError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    store = open_store(db)
    steps = 4 if no_write else 5
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        job = bar.add_task("loading members", total=steps)
        ms = load_members(store, specs)
        bar.update(job, advance=1, description="parsing weights")
        mode = parse_weights(weights, len(ms.members))
        bar.update(job, advance=1, description=f"fitting weights ({weights})" if mode == "auto" else "combining")
        res = build_ensemble(ms, tasks, mode, method=method, shrink=shrink, prior_adjust=prior_adjust)
        bar.update(job, advance=1, description="ensemble vs best member (bootstrap)")
        compare_with_best_member(res, ms)  # before writing: the manifest records it too
        bar.update(job, advance=1, description="writing + validating files")
        manifest = None
        if not no_write:
            manifest = write_ensemble(
                res,
                ms,
                out / name,
                name,
                store=store,
                examples=examples,
                extra={
                    "options": {"weights": weights, "method": method, "shrink": shrink, "prior_adjust": prior_adjust}
                },
            )
            bar.update(job, advance=1)
    console.print(
        f"[bold]{len(ms.members)} members[/], {len(ms.oof)} OOF rows"
        + (f", {len(ms.test)} test rows" if ms.test is not None else ", no test rows")
    )
    print_result(res, ms.names)
    if manifest is not None:
        for t, f in manifest["files"].items():
            console.print(f"Task {t}: {f['path']} ({f['rows']} rows, valid)")
        console.print(f"manifest: {out / name / 'manifest.json'}; recorded in {store.path} as ensemble {name}")


@ensemble_app.command("list")
def ensemble_list(db: DbOpt = None):
    """Ensembles recorded in runs.db, newest first."""
    import json

    store = open_store(db, readonly=True)
    rows = store.ensembles()
    if not rows:
        console.print("no ensembles recorded yet")
        return
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for col in ("name", "created", "tasks", "members", "T1 nDCG"):
        t.add_column(col, overflow="fold")
    for r in rows:
        m = json.loads(r["manifest"])
        t1 = m.get("tasks", {}).get("1", {}).get("oof_ensemble")
        t.add_row(
            r["name"],
            r["created"],
            r["tasks"],
            str(len(json.loads(r["members"]))),
            f"{t1:.4f}" if t1 is not None else "-",
        )
    console.print(t)


@submission_app.command("validate")
def submission_validate(
    file: Annotated[Path, typer.Argument(help="the submission CSV")],
    task: Annotated[int, typer.Option(help="1, 2 or 3")],
    examples: Annotated[
        Path, typer.Option(help="test examples: an official data dir, an examples file or a run's test.parquet")
    ],
):
    """Check columns, the exact id set against the test examples, duplicates, NaN, labels, and
    (Task 1) that every test query is present. Exit 2 with one line on any problem."""
    from core.scoring.submission import validate_submission

    summary = validate_submission(file, task, examples)
    extra = f", {summary['queries']} queries" if "queries" in summary else ""
    console.print(f"{file}: valid Task {task} submission ({summary['rows']} rows{extra})", soft_wrap=True)
