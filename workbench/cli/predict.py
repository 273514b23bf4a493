"""``workbench predict`` and ``workbench export onnx`` (core.inference)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from workbench.cli.common import DbOpt, with_progress

console = Console()
err_console = Console(stderr=True)

export_app = typer.Typer(no_args_is_help=True, help="Export a finished run's fold models.")

RunArg = Annotated[
    str, typer.Argument(help="a run folder (runs/<id>, possibly copied from elsewhere) or a run id in runs.db")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="replace the run's model.name (architecture + tokenizer; weights from the checkpoints)"
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="intra-op threads (default: the library's)")]


def resolve_run_dir(run: str, db: str | None) -> Path:
    """A run folder: ``run`` itself when it is a folder, else the run ``run`` (an id or id prefix)
    of runs.db (``--db`` / ``WORKBENCH_DB`` / ``./runs.db``, opened read-only).

    Raises:
        WorkbenchError: neither a folder nor a run of the database (one line).
    """
    from core.errors import WorkbenchError
    from core.runs.store import default_db_path

    p = Path(run)
    if p.is_dir():
        return p
    path = Path(db) if db else default_db_path()
    if not Path(path).is_file():
        raise WorkbenchError(f"{run}: no such run folder (and no runs database at {path})")
    from workbench.cli.common import open_store

    store = open_store(db, readonly=True)
    record = store.get_run(run)
    run_dir = store.run_dir(record)
    if run_dir is None:
        raise WorkbenchError(f"{store.path}: run {record['id']} has no run directory")
    return Path(run_dir)


def predict(
    run: RunArg,
    data: Annotated[Path, typer.Option("--data", help="folder in the official layout (examples + products parquet)")],
    split: Annotated[str, typer.Option(help="test, train or all")] = "test",
    backend: Annotated[str, typer.Option(help="torch (checkpoints) or onnx (`workbench export onnx` first)")] = "torch",
    out: Annotated[Path | None, typer.Option("--out", help="parquet (or .csv) to write")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="pairs per batch (default train.eval_batch_size)")
    ] = None,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    db: DbOpt = None,
):
    """Score DATA's examples with a finished run's fold checkpoints: fold-averaged p_E..p_I, the
    expected gain, the run's blend; the columns of the run's test.parquet."""
    from core.errors import WorkbenchError
    from core.inference.predict import BACKENDS, load_frame, open_run, predict_frame, write_predictions

    if backend not in BACKENDS:
        raise WorkbenchError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    t0 = time.time()
    tr = open_run(resolve_run_dir(run, db), model_name=model, need="onnx" if backend == "onnx" else "checkpoint")
    out = out or Path(f"predictions-{tr.run_id}-{split}.parquet")
    if not out.parent.is_dir():
        raise WorkbenchError(f"{out}: folder {out.parent} does not exist")
    df, rows = load_frame(tr, data, split)
    frame = with_progress(
        err_console, predict_frame, run=tr, df=df, rows=rows, backend=backend, batch_size=batch_size, threads=threads
    )  # a rich progress bar on stderr when it is a terminal
    write_predictions(frame, out)
    dt = time.time() - t0
    console.print(
        f"{len(frame)} pairs of {data} ({split}) scored by run {tr.run_id} ({len(tr.folds)} folds, {backend}) "
        f"in {dt:.1f} s -> {out}",
        soft_wrap=True,
    )


@export_app.command("onnx")
def export_onnx(
    run: RunArg,
    opset: Annotated[int, typer.Option(min=14, help="ONNX opset")] = 17,
    data: Annotated[
        Path | None, typer.Option("--data", help="pairs for the check (default: the run's data.dir)")
    ] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="also write model.fp16.onnx (GPU machines, CUDA provider)")
    ] = False,
    fuse: Annotated[
        bool, typer.Option("--fuse/--no-fuse", help="ONNX Runtime's BERT fusions (Attention, SkipLayerNorm, ...)")
    ] = True,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    db: DbOpt = None,
):
    """Export each fold's model to fold<k>/model.onnx, checked against torch on real pairs (the max
    abs difference of the probabilities is printed; above 1e-4 the fold fails and nothing is written)."""
    from core.inference.onnx_export import TOL_FP32, export_run
    from core.inference.predict import open_run

    tr = open_run(resolve_run_dir(run, db), model_name=model)

    def show(res) -> None:
        console.print(
            f"fold {res.fold}: {res.path} ({'fused' if res.fused else 'plain'} graph)  max abs diff vs torch: "
            f"probabilities {res.max_abs_diff:.2e}, logits {res.max_abs_diff_logits:.2e} (limit {TOL_FP32:.0e})",
            soft_wrap=True,
        )

    with err_console.status("exporting"):
        export_run(tr, data, opset=opset, fp16=fp16, threads=threads, fuse=fuse, on_fold=show)
