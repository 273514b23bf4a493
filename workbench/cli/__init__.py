"""The ``workbench`` command line (Typer). Thin: every command calls a core service."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from core.config import DEFAULT_DATA_DIR, DEFAULT_SAMPLE_DIR
from core.errors import ConfigError, WorkbenchError
from core.runs import metric_names as mn
from workbench.cli.common import (
    AccountOpt,
    CpusOpt,
    DbOpt,
    GpusOpt,
    MemOpt,
    PartitionOpt,
    ProcessesOpt,
    QosOpt,
    RequeueOpt,
    SetOpt,
    TimeOpt,
    follow_ranks,
    open_store,
    slurm_options,
    with_processes,
    with_progress,
)

app = typer.Typer(
    add_completion=False,
    invoke_without_command=True,
    help="Terminal workbench for the KDD Cup 2022 ESCI product-search challenge. "
    "Without a command: open the Textual app on ./runs.db.",
)
runs_app = typer.Typer(no_args_is_help=True, help="List and inspect runs in runs.db.")
data_app = typer.Typer(no_args_is_help=True, help="Import and check ESCI data.")
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
from workbench.cli.ensemble import ensemble_app, submission_app  # noqa: E402

app.add_typer(ensemble_app, name="ensemble")
app.add_typer(submission_app, name="submission")
from workbench.cli.labels import labels_app  # noqa: E402

app.add_typer(labels_app, name="labels")
from workbench.cli.models import models_app  # noqa: E402

app.add_typer(models_app, name="models")
from workbench.cli.ablate import ablate  # noqa: E402

app.command("ablate")(ablate)
from workbench.cli.pretrain import pretrain  # noqa: E402

app.command("pretrain")(pretrain)
from workbench.cli.configs import configs_app  # noqa: E402

app.add_typer(configs_app, name="configs")
from workbench.cli.sweep import sweep_app  # noqa: E402

app.add_typer(sweep_app, name="sweep")
from workbench.cli.stack import stack  # noqa: E402

app.command("stack")(stack)
from workbench.cli.predict import export_app, predict  # noqa: E402

app.command("predict")(predict)
app.add_typer(export_app, name="export")

console = Console()
err_console = Console(stderr=True)


class RichProgress:
    """core.training.train.Progress on a rich progress bar (stderr, so --json stdout stays clean)."""

    def __init__(self, console: Console):
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def start(self, total: int, description: str) -> None:
        self.task = self.bar.add_task(description, total=total)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=n, **({"description": description} if description else {}))

    def message(self, text: str) -> None:
        self.bar.console.log(text)


def _reading_store(db: str | None):
    """The store of a reading command: a writer that first marks runs whose process is gone as
    crashed, or, for a database this process cannot write, a read-only one (statuses as stored)."""
    from core.errors import ReadOnlyDatabaseError
    from core.runs.launcher import refresh_statuses

    try:
        store = open_store(db)
    except ReadOnlyDatabaseError:
        return open_store(db, readonly=True)
    refresh_statuses(store)
    return store


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _duration(run: dict) -> str:
    from datetime import UTC, datetime

    if not run.get("started"):
        return "-"
    start = datetime.fromisoformat(run["started"])
    end = datetime.fromisoformat(run["ended"]) if run.get("ended") else datetime.now(UTC)
    s = int((end - start).total_seconds())
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@app.callback()
def _root(
    ctx: typer.Context,
    db: DbOpt = None,
    configs: Annotated[Path, typer.Option(help="folder of configs for the new-run dialog")] = Path("configs"),
):
    """Without a command: open the app."""
    if ctx.invoked_subcommand is None:
        _open_app(db, configs)


def _open_app(db: str | None, configs: Path) -> None:
    from core.runs.store import default_db_path
    from workbench.tui.app import run_app

    if configs == Path("configs") and not configs.is_dir():  # the default, outside a checkout
        from core.config import bundled_configs_dir

        configs = bundled_configs_dir()
    run_app(db or default_db_path(), configs_dir=str(configs))


@app.command()
def tui(
    db: DbOpt = None,
    configs: Annotated[Path, typer.Option(help="folder of configs for the new-run dialog")] = Path("configs"),
):
    """Open the Textual app: runs, live run detail, compare, launch/stop (same as no command)."""
    _open_app(db, configs)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML/TOML config")],
    set_: SetOpt = None,
    db: DbOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="a queued run (used by launch)")] = None,
    processes: ProcessesOpt = None,
):
    """Train a config in the foreground (k-fold CV) and record the run. With --processes N (or
    train.num_processes) the supervisor runs N data-parallel ranks; this waits for them."""
    from core.config import load_config
    from core.runs.launcher import config_kind
    from core.runs.ranks import in_ranks, is_main_rank
    from core.training.train import run_training

    if config_kind(config) == "pretrain":
        raise ConfigError(f"{config}: a pre-training config (kind: pretrain): run `workbench pretrain {config}`")
    overrides = with_processes(set_, processes)
    cfg = load_config(config, overrides)
    store = open_store(db)
    if cfg.train.num_processes > 1 and not in_ranks():
        if run_id is not None:
            raise ConfigError(f"--run-id with train.num_processes={cfg.train.num_processes}: start it with launch")
        from core.runs.launcher import train_in_ranks

        record = follow_ranks(err_console, train_in_ranks, store, cfg=cfg, config_path=config, overrides=overrides)
        _print_ranked_result(store, record)
        return
    if not is_main_rank():  # a data-parallel rank other than 0: no progress bar, nothing printed
        run_training(cfg=cfg, store=store, run_id=run_id)
        return
    result = with_progress(err_console, run_training, cfg=cfg, store=store, run_id=run_id)
    console.print(
        f"run {result.run_id} {'partial' if result.partial else 'finished'}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result.cv.items())
    )


def _print_ranked_result(store, record) -> None:
    """The end of a run whose ranks ran under a foreground supervisor, as ``train`` prints it
    (its CV figures from runs.db).

    Raises:
        WorkbenchError: the run did not finish (stopped, failed, crashed): its status and error.
    """
    from core.runs.store import Status

    if record.status not in (Status.FINISHED, Status.PARTIAL):
        raise WorkbenchError(f"run {record.id} {record.status}" + (f": {record.error}" if record.error else ""))
    if record.kind == "pretrain":
        console.print(f"run {record.id} finished: backbone {Path(record.run_dir) / 'backbone'}", soft_wrap=True)
        return
    rows = store.metrics(record.id)
    cv = {m["name"][len(mn.CV_PREFIX) :]: m["value"] for m in rows if m["name"].startswith(mn.CV_PREFIX)}
    console.print(f"run {record.id} {record.status}: " + ", ".join(f"{k} {v:.4f}" for k, v in cv.items()))


Backend = Annotated[
    str, typer.Option("--backend", help="local: a detached process here; slurm: a Slurm batch job (sbatch)")
]


@app.command()
def launch(
    config: Annotated[Path, typer.Argument(help="YAML/TOML config")],
    set_: SetOpt = None,
    db: DbOpt = None,
    processes: ProcessesOpt = None,
    backend: Backend = "local",
    partition: PartitionOpt = None,
    gpus: GpusOpt = None,
    time_limit: TimeOpt = None,
    account: AccountOpt = None,
    qos: QosOpt = None,
    cpus_per_task: CpusOpt = None,
    mem: MemOpt = None,
    requeue: RequeueOpt = None,
):
    """Start training (or pre-training, for a `kind: pretrain` config) detached (own session), or
    submit it to Slurm (--backend slurm; defaults from the [slurm] table of
    ~/.config/esci-workbench/config.toml); prints the run id."""
    if backend not in ("local", "slurm"):
        raise ConfigError(f"--backend {backend!r}: must be local or slurm")
    set_ = with_processes(set_, processes)
    if backend == "slurm":
        from core.runs import slurm
        from core.runs.launcher import load_any_config

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
        run_id, job_id = slurm.submit(load_any_config(config, set_), open_store(db), opts, config)
        console.print(run_id)
        err_console.print(f"submitted Slurm job {job_id}; follow with `workbench runs show {run_id}`")
        return
    from core.runs.launcher import launch as _launch

    run_id, pid = _launch(config, set_, open_store(db))
    console.print(run_id)
    err_console.print(f"launched pid {pid}; follow with `workbench runs show {run_id}`")


@app.command()
def resume(
    run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
    db: DbOpt = None,
    all_folds: Annotated[bool, typer.Option("--all-folds", help="also train the folds a partial run left out")] = False,
    detach: Annotated[
        bool, typer.Option("--detach", help="continue in the background (own session), like launch")
    ] = False,
    queued: Annotated[
        bool, typer.Option("--queued", hidden=True, help="the run was queued by resume --detach")
    ] = False,
    journal: Annotated[
        Path | None,
        typer.Option(
            "--journal", hidden=True, help="report through this run folder's journal, not runs.db (Slurm jobs)"
        ),
    ] = None,
):
    """Continue a crashed/stopped/failed/partial run under its id: finished folds are kept, the
    interrupted fold restarts from its last step checkpoint. A Slurm run is submitted again (--detach)."""
    from core.runs.launcher import resume_config, resume_detached
    from core.runs.ranks import in_ranks, is_main_rank, rank_store

    if journal is not None:
        from core.runs.journal import JournalStore
        from core.runs.store import Status

        store = rank_store(JournalStore(journal))  # a data-parallel rank other than 0 never writes
        if store.get_run(run)["status"] == Status.RUNNING:  # Slurm requeued a job that died running
            store.update_run(
                run, status=Status.CRASHED, error="the job's previous start ended without a final status (requeued)"
            )
    else:
        store = rank_store(open_store(db))
        if store.get_record(run).backend == "slurm" and not detach:
            raise WorkbenchError(
                f"{store.path}: run {run} ran on Slurm: resume it with `workbench resume {run} --detach` (a new job)"
            )
    if detach:
        run_id, handle = resume_detached(store, run, all_folds=all_folds)
        console.print(run_id)
        where = f"Slurm job {handle}" if store.get_record(run_id).backend == "slurm" else f"pid {handle}"
        err_console.print(f"resumed in the background, {where}; follow with `workbench runs show {run_id}`")
        return
    if not is_main_rank():  # rank 0 checks the run's status (and then marks it running) for all ranks
        from core.runs.launcher import stored_config

        record = store.get_record(run)
        run_id, cfg = record.id, stored_config(store, record, all_folds=all_folds)
    else:
        run_id, cfg = resume_config(store, run, all_folds=all_folds, queued=queued)
    if cfg.train.num_processes > 1 and not in_ranks():  # the supervisor starts the ranks; wait for them
        from core.runs.launcher import resume_in_ranks

        record = follow_ranks(err_console, resume_in_ranks, store, run_id=run_id, all_folds=all_folds)
        _print_ranked_result(store, record)
        return
    if getattr(cfg, "kind", "train") == "pretrain":
        from core.pretrain.multitask import run_pretraining

        res = run_pretraining(cfg, store, run_id=run_id, resume=True)
        if is_main_rank():
            console.print(f"run {res.run_id} finished: backbone {res.backbone_dir}")
        return
    from core.training.train import run_training

    if not is_main_rank():
        run_training(cfg=cfg, store=store, run_id=run_id, resume=True)
        return
    result = with_progress(err_console, run_training, cfg=cfg, store=store, run_id=run_id, resume=True)
    console.print(
        f"run {result.run_id} {'partial' if result.partial else 'finished'}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result.cv.items())
    )


@app.command()
def stop(run: str, db: DbOpt = None, grace: float = 10.0):
    """Stop a launched run: SIGTERM to its process group, then SIGKILL after --grace seconds."""
    from core.runs.launcher import stop_run

    console.print(stop_run(open_store(db), run, grace=grace))


@runs_app.command("list")
def runs_list(db: DbOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False, limit: int | None = None):
    """Runs, newest first, with status and best CV nDCG / F1 (best, not last)."""
    from core.runs.store import RunRecord, Status

    store = _reading_store(db)
    rows = store.list_runs(limit)
    if as_json:
        for r in rows:
            r["config"] = RunRecord.from_row(r, store.path).config if r.get("config") else None
            r["duration"] = _duration(r)
        print(json.dumps(rows, indent=1, default=str))
        return
    table = Table(
        title=f"runs in {store.path}",
        box=box.SIMPLE_HEAD,
        padding=0,
        pad_edge=False,
        show_edge=False,
        title_justify="left",
    )
    table.add_column("id", no_wrap=True, min_width=20)
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=8)
    table.add_column("model", no_wrap=True)
    for col, width in (("folds", 5), ("nDCG", 5), ("final", 5), ("F1", 5), ("time", 7)):
        table.add_column(col, justify="right", no_wrap=True, min_width=width)
    # name and model share what the fixed columns leave (id 20, status 8, numbers 27, 9 gaps)
    room = max(10, console.width - 68)
    name_w = min(max((len(r["name"] or "") for r in rows), default=4), max(6, room * 3 // 5))
    model_w = max(4, room - name_w)

    def cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    colors = {
        Status.FINISHED: "green",
        Status.PARTIAL: "yellow",
        Status.RUNNING: "cyan",
        Status.FAILED: "red",
        Status.CRASHED: "red",
        Status.STOPPED: "yellow",
        Status.PRUNED: "magenta",
    }
    for r in rows:
        n_folds = r["n_folds"]
        table.add_row(
            r["id"],
            cut(r["name"] or "", name_w),
            f"[{colors.get(r['status'], 'white')}]{r['status']}",
            cut(str(r["model"] or "").rsplit("/", 1)[-1], model_w),
            f"{r['folds_done']}/{n_folds}" if n_folds else "-",
            _fmt(r["best_ndcg"], 3),
            _fmt(r["best_final_ndcg"], 3),
            _fmt(r["best_f1"], 3),
            _duration(r),
        )
    console.print(table)
    console.print("nDCG / F1: the cross-encoder's CV (best, not last); final: the blended ranking's CV nDCG")


@runs_app.command("show")
def runs_show(run: str, db: DbOpt = None):
    """One run: status, config, per-fold best metrics, CV, artifacts."""
    store = _reading_store(db)
    r = store.get_run(run)
    where = (
        f"Slurm job {r['job_id']} {r['job_state'] or '?'}"
        + (f" ({r['job_reason']})" if r.get("job_reason") not in (None, "", "None") else "")
        + (f" on {r['node']}" if r.get("node") else "")
        if r.get("backend") == "slurm"
        else f"pid {r['pid']}"
    )
    console.print(
        f"[bold]{r['id']}[/] {r['name']}  status [bold]{r['status']}[/]  model {r['model']}  "
        f"{where}  duration {_duration(r)}  git {r['git_commit']}"
    )
    if r.get("sweep"):
        console.print(f"sweep {r['sweep']} trial {r['trial']} (`workbench sweep show {r['sweep']}`)", highlight=False)
    if r.get("error"):
        console.print(f"[red]error: {r['error']}")
    metrics = store.metrics(r["id"])
    folds = Table(title="folds (best checkpoint)")
    for col in ("fold", "nDCG", "final nDCG", "task2 F1", "task3 F1", "seconds"):
        folds.add_column(col)
    by_fold: dict[int, dict[str, float]] = {}
    for m in metrics:
        if m["name"].startswith(mn.FOLD_PREFIX):
            by_fold.setdefault(m["fold"], {})[m["name"][len(mn.FOLD_PREFIX) :]] = m["value"]
    for f, v in sorted(by_fold.items()):
        folds.add_row(
            str(f),
            _fmt(v.get("ndcg")),
            _fmt(v.get("final_ndcg")),
            _fmt(v.get("task2_f1")),
            _fmt(v.get("task3_f1")),
            _fmt(v.get("seconds"), 0),
        )
    console.print(folds)
    cv = {m["name"]: m["value"] for m in metrics if m["fold"] == -1 and not m["name"].startswith(mn.PROGRESS_PREFIX)}
    if cv:
        console.print("CV: " + "  ".join(f"{k} {_fmt(v)}" for k, v in cv.items()))
    last = [m for m in metrics if m["name"] == mn.TRAIN_LOSS][-1:]
    if last:
        console.print(f"last train loss {last[0]['value']:.4f} (fold {last[0]['fold']}, step {last[0]['step']})")
    for a in store.artifacts(r["id"]):
        console.print(f"  {a['kind']:<10} fold {a['fold']:>2}  {a['path']}")


@runs_app.command("compare")
def runs_compare(
    runs: Annotated[list[str], typer.Argument(help="run ids (or unique prefixes); the first is the baseline")],
    resamples: Annotated[int, typer.Option("--resamples", min=1, help="bootstrap resamples of queries")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="seed of the resamples")] = 0,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Each run against the first on their common OOF queries: Δ nDCG (final and cross-encoder)
    and Δ Task 2 F1, each with a paired bootstrap 95% interval; "within noise" when it covers 0."""
    from rich.markup import escape

    from core.runs.compare import OOF_DELTAS, compare_oof
    from core.scoring.significance import describe, method_note

    rows = compare_oof(open_store(db, readonly=True), runs, n_resamples=resamples, seed=seed)
    if as_json:
        out = [{**r, "deltas": {k: d.to_dict() if d else None for k, d in r["deltas"].items()}} for r in rows]
        print(json.dumps(out, indent=1))
        return
    console.print(f"[bold]baseline[/] {rows[0]['base_id']} {escape(rows[0]['base_name'])}", soft_wrap=True)
    for i, r in enumerate(rows):
        if i:
            console.print()
        n = r["deltas"]["ndcg"].n_queries
        t = Table(
            title=escape(f"{r['run_id']} {r['name']} ({n:,} common queries)"),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            pad_edge=False,
            show_edge=False,
        )
        t.add_column("metric", no_wrap=True)
        for col in ("base", "run"):
            t.add_column(col, justify="right", no_wrap=True)
        t.add_column("run - base [95% interval]", no_wrap=True)
        for key, label in OOF_DELTAS:
            d = r["deltas"][key]
            name = label.removeprefix("Δ ")
            if d is None:
                t.add_row(name, "-", "-", "- (no ce_score in an OOF file)")
            else:
                t.add_row(name, f"{d.a:.4f}", f"{d.b:.4f}", describe(d))
        console.print(t)
    console.print(
        escape(f"nDCG: final ranking (score); CE nDCG: cross-encoder (ce_score); {method_note(resamples, seed)}")
    )


@app.command()
def evaluate(run: str, db: DbOpt = None):
    """Recompute the run's metrics from its oof.parquet (independent of what the trainer logged)."""
    from core.scoring.report import argmax_labels, read_predictions, scorer_table

    store = open_store(db, readonly=True)
    r = store.get_run(run)
    run_dir = store.run_dir(r)
    if run_dir is None:
        raise WorkbenchError(f"{store.path}: run {r['id']} has no run directory")
    oof = read_predictions(run_dir / "oof.parquet")
    scorers = {"cross-encoder": "ce_score", "final": "score"} if "ce_score" in oof else {"final": "score"}
    labels = argmax_labels(oof)
    table = scorer_table(oof, scorers, {k: labels for k in scorers})
    _print_table(table, f"run {r['id']}: metrics from {run_dir / 'oof.parquet'} ({len(oof)} OOF rows)")


_SHORT = {"cv_ndcg": "CV", "fold_std": "±", "task2_f1": "T2F1", "task3_f1": "T3F1"}


def _print_table(table, title: str) -> None:
    """A scorer table (see core.scoring.report.scorer_table) that fits 80 columns: 3 decimals, short headers."""
    t = Table(title=title, title_justify="left", padding=(0, 1), collapse_padding=True)
    t.add_column("scorer", no_wrap=True)
    for col in table.columns:
        t.add_column(_SHORT.get(col, col.replace("fold", "f")), justify="right", no_wrap=True)
    for name, row in table.iterrows():
        t.add_row(str(name), *[_fmt(float(v), 3) for v in row.values])
    console.print(t)


@data_app.command("import-opensearch")
def data_import_opensearch(
    src: Path,
    out: Path,
    sources: Annotated[Path | None, typer.Option(help="shopping_queries_dataset_sources.csv")] = None,
    test_fraction: Annotated[float, typer.Option(help="fraction of queries marked split=test (0: none)")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed of the held-out query draw")] = 0,
):
    """Convert the OpenSearch ESCI sample (judgments + NDJSON products) into the official layout."""
    from core.data.opensearch import import_opensearch

    summary = import_opensearch(src, out, sources_csv=sources, test_fraction=test_fraction, seed=seed)
    console.print(summary)


@data_app.command("check")
def data_check(
    data_dir: Path,
    task: int | None = None,
    split: str | None = None,
    locale: Annotated[list[str] | None, typer.Option()] = None,
):
    """Load and validate an official-layout folder; print counts."""
    from core.data.esci import load_esci

    df = load_esci(data_dir, task=task, split=split, locales=locale)
    console.print(f"{len(df)} examples, {df['query_id'].nunique()} queries, {df['product_id'].nunique()} products")
    console.print(df.groupby(["split", "esci_label"]).size().unstack(fill_value=0))


SampleOpt = Annotated[Path, typer.Option(help="the OpenSearch ESCI sample folder")]
ImportDirOpt = Annotated[Path, typer.Option(help="where the imported official-layout files go")]


@app.command()
def demo(
    data: SampleOpt = Path(DEFAULT_SAMPLE_DIR),
    data_dir: ImportDirOpt = Path(DEFAULT_DATA_DIR),
    config: Annotated[
        Path | None, typer.Option(help="config (default demo.yaml: ./configs/demo.yaml, else the bundled one)")
    ] = None,
    set_: SetOpt = None,
    db: DbOpt = None,
):
    """Import the real ESCI sample, train a 5-fold cross-encoder, compare with BM25 and random."""
    from core.demo import DEFAULT_CONFIG, run_demo

    store = open_store(db)
    t0 = time.time()
    with RichProgress(err_console) as progress:
        report = run_demo(
            data, store, data_dir=data_dir, config_path=config or DEFAULT_CONFIG, overrides=set_, progress=progress
        )
    res = report.result
    if report.backbone:
        console.print(f"cross-encoder fine-tuned from the pre-trained backbone {report.backbone}", soft_wrap=True)
    _print_table(
        report.table,
        f"run {res.run_id}: OOF nDCG per fold (f0..), CV = over all "
        f"{res.oof['query_id'].nunique()} queries, ± = fold std, Task 2/3 micro-F1",
    )
    console.print(
        "final = per-query standardised blend, weights fitted on the other folds; weights on all OOF: "
        + ", ".join(f"{k} {v:.2f}" for k, v in res.blend_weights.items())
    )
    if report.stack_run:
        from workbench.cli.stack import print_importance

        console.print(
            f"stack = LightGBM (run {report.stack_run}) over the cross-encoder's OOF probabilities, query-group, "
            "lexical and zero-shot features; fold k scored by a stacker fitted on the other folds",
            soft_wrap=True,
        )
        print_importance(report.stack, top=10, tasks=("rank",))
    console.print(f"recorded in {store.path} as run {res.run_id}; artifacts in {res.run_dir}; {time.time() - t0:.0f} s")


@app.command()
def recipe(
    data: SampleOpt = Path(DEFAULT_SAMPLE_DIR),
    data_dir: ImportDirOpt = Path(DEFAULT_DATA_DIR),
    config: Annotated[
        Path | None, typer.Option(help="config (default recipe.yaml: ./configs/recipe.yaml, else the bundled one)")
    ] = None,
    set_: SetOpt = None,
    db: DbOpt = None,
):
    """The best CPU recipe end to end on the real sample: multitask pre-training (model.pretrain; reused
    when runs.db has a finished identical one), the 5-fold cross-encoder from that backbone, the blend,
    the LightGBM stacker; figures next to BM25 and e5 zero-shot (`demo` with configs/recipe.yaml)."""
    demo(data=data, data_dir=data_dir, config=config or Path("recipe.yaml"), set_=set_, db=db)


def _exit_code(exc: WorkbenchError) -> int:
    """2 for bad input or a failed run; 143 for a stopped run inside data-parallel ranks, so their
    supervisor tells a rank that stopped with the others from one that failed
    (:data:`core.runs.ranks.STOPPED_EXIT`)."""
    from core.runs.lifecycle import RunStopped
    from core.runs.ranks import STOPPED_EXIT, in_ranks

    return STOPPED_EXIT if isinstance(exc, RunStopped) and in_ranks() else 2


def main() -> None:
    """Console-script entry point: one-line errors and exit code 2 for bad input."""
    try:
        app(standalone_mode=False)
    except WorkbenchError as exc:
        from rich.markup import escape

        # escaped: a message may hold brackets ("[slurm]", a list) that rich would read as markup
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(_exit_code(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # usage errors: click's ClickException, or (typer >= 0.2x) the same class
        # from typer's vendored click (not click's); both have show() and exit_code. Anything else re-raises.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
