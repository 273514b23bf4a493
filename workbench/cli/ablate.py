"""``workbench ablate``: the cumulative ablation of the training techniques (core.training.ablate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from workbench.cli.common import DbOpt, SetOpt, open_store

console = Console()
err_console = Console(stderr=True)


def ablate(
    config: Annotated[Path, typer.Argument(help="YAML/TOML config: the baseline (step 0)")],
    tricks: Annotated[
        str | None,
        typer.Option(
            "--tricks",
            help="techniques added one after another, "
            "comma-separated: ema, fgm, pgd, awp, rdrop, poly1, focal, ls, "
            "msd, wlp, mixup, distill, pseudo, llrd, gc, or key=value of a "
            "config section (required unless --runs)",
        ),
    ] = None,
    set_: SetOpt = None,
    db: DbOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the planned runs and exit")] = False,
    runs: Annotated[
        str | None,
        typer.Option(
            "--runs",
            help="rebuild the table from these finished run ids (comma-separated, baseline first) instead of training",
        ),
    ] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="also print the table as Markdown")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the table as JSON rows")] = False,
):
    """Cumulative ablation: baseline, then + each technique in turn; one run per step in runs.db."""
    from core.errors import ConfigError
    from core.training.ablate import (
        ablation_table,
        interval,
        plan_ablation,
        run_ablation,
        split_items,
        to_markdown,
    )

    if not tricks and not runs:
        raise ConfigError("ablate: --tricks is required (or --runs to rebuild a table from finished runs)")
    items = split_items(tricks) if tricks else []
    steps = plan_ablation(config, items, set_) if items else []  # every config checked before anything trains
    if dry_run:
        for st in steps:
            console.print(f"step {st.step}: {st.config.name}  " + " ".join(f"--set {o}" for o in st.overrides))
        return
    store = open_store(db)
    if runs:
        ids = [r.strip() for r in runs.split(",") if r.strip()]
        # step labels from --tricks when they match the runs, else each run's name
        labels = ["baseline"] + [f"+ {s.added}" for s in steps[1:]] if tricks and len(ids) == len(steps) else None
        table = ablation_table(store, ids, labels)
    elif sys.stderr.isatty():
        from workbench.cli import RichProgress

        with RichProgress(err_console) as progress:
            steps, table = run_ablation(config, items, store, set_, progress=progress)
    else:
        steps, table = run_ablation(config, items, store, set_)
    if as_json:
        print(json.dumps(table.to_dict(orient="records"), indent=1, default=str))
        return
    t = Table(
        title=f"cumulative ablation of {config} ({len(table)} runs in {store.path})",
        title_justify="left",
        padding=(0, 1),
        collapse_padding=True,
    )
    for col in ("step", "CV nDCG", "± fold", "Δ [95%]", "± paired", "final", "T2 F1", "s/ep"):
        t.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)

    def f(v, d=4):
        return "-" if v is None or v != v else f"{v:.{d}f}"

    for _, r in table.iterrows():
        delta = (
            "-"
            if r["delta"] != r["delta"]
            else f"{r['delta']:+.4f}" + ("" if r["within_noise"] is None else " ~" if r["within_noise"] else " *")
        )
        t.add_row(
            str(r["added"]),
            f(r["cv_ndcg"]),
            f(r["fold_std"], 3),
            delta if r["ci_low"] != r["ci_low"] else f"{delta}\n{interval(r, 3).replace(', ', ',')}",
            f(r["paired_std"], 3),
            f(r["final_ndcg"]),
            f(r["task2_f1"]),
            f(r["sec_per_epoch"], 0),
        )
    console.print(t)
    console.print("runs (for --runs): " + ",".join(table["run_id"]), soft_wrap=True)
    console.print(
        "CV nDCG: cross-encoder OOF nDCG over all queries; ± fold: std of the per-fold nDCG; Δ: change "
        "from the previous step (~ within noise: its 95% interval covers 0, * outside it); [95%]: its "
        "paired bootstrap interval over the queries of both OOF files (2,000 resamples of queries, seed 0; without "
        "OOF files ~/* compare Δ with ± paired, the std of the per-fold changes); final: after the blend; "
        "T2 F1: Task 2 micro-F1; s/ep: training seconds per fold and epoch",
        markup=False,
    )
    if markdown:
        print(to_markdown(table))
