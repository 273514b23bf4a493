"""``workbench labels``: find label issues (confident learning), review them, export the cleaned data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from workbench.cli.common import DbOpt, open_store, spinner

labels_app = typer.Typer(
    no_args_is_help=True, help="Label errors: find them from a run's OOF probabilities, review, export."
)

console = Console()
err_console = Console(stderr=True)


@labels_app.command("find")
def find(
    run: Annotated[str, typer.Argument(help="run id (or unique prefix) with OOF probabilities")],
    filter_by: Annotated[str, typer.Option(help="cleanlab find_label_issues filter_by")] = "prune_by_noise_rate",
    rank_by: Annotated[
        str, typer.Option(help="ranking: self_confidence, normalized_margin, confidence_weighted_entropy")
    ] = "self_confidence",
    n_jobs: Annotated[int | None, typer.Option(help="cleanlab worker processes")] = None,
    db: DbOpt = None,
):
    """Find label issues in RUN's OOF probabilities (cleanlab) and store them in runs.db."""
    from core.cleaning.labels import find_issues

    store = open_store(db)
    with spinner(err_console) as bar:
        task = bar.add_task("labels find", total=None)
        res = find_issues(
            store,
            run,
            filter_by=filter_by,
            rank_by=rank_by,
            n_jobs=n_jobs,
            progress=lambda msg: bar.update(task, description=msg),
        )
    console.print(
        f"run {res.run_id}: {len(res.issues):,} label issues in {res.n_examples:,} OOF examples "
        f"({100 * res.share:.1f}%), filter_by={filter_by}, ranked by {rank_by}"
    )
    table = Table(title="issues: given (rows) vs suggested (columns)", box=box.SIMPLE)
    table.add_column("given")
    for c in res.crosstab.columns:
        table.add_column(str(c), justify="right")
    table.add_column("total", justify="right")
    for g, row in res.crosstab.iterrows():
        table.add_row(str(g), *[f"{int(v):,}" for v in row], f"{int(row.sum()):,}")
    console.print(table)
    console.print(f"stored in {store.path} (label_issues); review with `workbench labels review {res.run_id}`")


@labels_app.command("review")
def review(
    run: Annotated[str | None, typer.Argument(help="run whose issues to review (default: newest)")] = None,
    reviewer: Annotated[str | None, typer.Option(help="name recorded with decisions (default $USER)")] = None,
    db: DbOpt = None,
):
    """Open the review queue: 1-4 set E/S/C/I, k keep, a accept, d drop, u undo."""
    from core.cleaning.labels import default_issues_run
    from workbench.tui.review import run_review_app

    store = open_store(db)
    run_id = store.get_run(run)["id"] if run else default_issues_run(store)
    store.close()
    run_review_app(db or _default_db(), run_id, reviewer=reviewer)


def _default_db() -> str:
    from core.runs.store import default_db_path

    return default_db_path()


@labels_app.command("export")
def export(
    out: Annotated[Path, typer.Argument(help="new folder for the cleaned release (official layout)")],
    run: Annotated[
        str | None,
        typer.Option("--run", help="apply decisions reviewed on this run's issues (default: newest run with issues)"),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="official-layout folder (default: the run's data.dir)")] = None,
    auto_drop_fraction: Annotated[
        float, typer.Option(help="also drop this fraction of training examples: the top-ranked issues")
    ] = 0.0,
    db: DbOpt = None,
):
    """Write the cleaned examples (drops removed, relabels applied, original_esci_label) plus products."""
    from core.cleaning.labels import default_issues_run, export_cleaned
    from core.config import DEFAULT_DATA_DIR

    store = open_store(db)
    run_id = store.get_run(run)["id"] if run else default_issues_run(store)
    if data is None:
        data = Path(store.get_record(run_id).data.get("dir", DEFAULT_DATA_DIR))
    with spinner(err_console) as bar:
        bar.add_task(f"exporting {data} -> {out}", total=None)
        counts = export_cleaned(
            store, out, data, decisions_from=run_id, auto_drop_fraction=auto_drop_fraction, issues_run=run_id
        )
    console.print(
        f"wrote {out}: {counts['examples']:,} examples, {counts['dropped']:,} dropped, "
        f"{counts['relabelled']:,} relabelled (decisions of run {run_id}); test examples untouched"
    )


@labels_app.command("compare")
def compare(
    base: Annotated[str, typer.Argument(help="run trained on the labels as released")],
    cleaned: Annotated[str, typer.Argument(help="run trained with labels.* cleaning, same data and folds")],
    resamples: Annotated[int, typer.Option("--resamples", min=1, help="bootstrap resamples of queries")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="seed of the resamples")] = 0,
    db: DbOpt = None,
):
    """Per-fold nDCG of BASE and CLEANED on the original labels of all examples, and the difference
    with its paired bootstrap 95% interval over queries."""
    from rich.markup import escape

    from core.cleaning.labels import compare_runs
    from core.scoring.significance import describe, method_note

    table = compare_runs(open_store(db, readonly=True), base, cleaned, n_resamples=resamples, seed=seed)
    folds = [c for c in table.columns if c.startswith("fold") and c != "fold_std"]
    runs = list(table.index.get_level_values(0).unique())
    out = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0, 0, 1),
        title=f"OOF nDCG, original labels of all examples, same folds\nbase = {runs[0].split()[-1]}, "
        f"cleaned = {runs[1].split()[-1]}; CE = cross-encoder",
    )
    for col in ["run", "", *[f"f{c[4:]}" for c in folds], "CV", "sd"]:
        out.add_column(col, justify="left" if col in ("run", "") else "right", no_wrap=True)

    def f(v, signed, digits=4):
        return "-" if v != v else (f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}")

    for (run, scorer), row in table.iterrows():
        signed = run.startswith("cleaned -")
        out.add_row(
            "diff" if signed else run.split()[0].replace("cleaned", "clean"),
            "CE" if scorer == "cross-encoder" else scorer,
            *[f(row[c], signed) for c in folds],
            f(row["cv_ndcg"], signed),
            f"{row['fold_std']:.4f}",
        )
    console.print(out)
    diffs = table.attrs["differences"]
    n = diffs[("final", "cv_ndcg")].n_queries
    t = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0, 0, 1),
        title=f"clean - base over all {n:,} OOF queries, 95% paired bootstrap interval",
    )
    for col in ("", "base", "clean", "clean - base [95% interval]"):
        t.add_column(col, justify="right" if col in ("base", "clean") else "left", no_wrap=True)
    rows = (
        ("nDCG CE", ("cross-encoder", "cv_ndcg")),
        ("nDCG final", ("final", "cv_ndcg")),
        ("Task 2 micro-F1 CE", ("cross-encoder", "task2_f1")),
        ("Task 3 micro-F1 CE", ("cross-encoder", "task3_f1")),
    )
    for label, key in rows:
        d = diffs[key]
        t.add_row(label, f"{d.a:.4f}", f"{d.b:.4f}", describe(d))
    console.print(t)
    console.print(
        escape(
            "diff = clean - base; sd = std over folds (for diff: of the paired per-fold differences); "
            f"F1 of the cross-encoder's argmax; {method_note(resamples, seed)}"
        )
    )
