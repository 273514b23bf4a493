"""``workbench pretrain``: multitask pre-training of a backbone (core.pretrain.multitask)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from workbench.cli.common import DbOpt, ProcessesOpt, SetOpt, follow_ranks, open_store, with_processes, with_progress

console = Console()
err_console = Console(stderr=True)


def pretrain(
    config: Annotated[Path, typer.Argument(help="YAML/TOML pre-training config (see configs/pretrain.yaml)")],
    set_: SetOpt = None,
    db: DbOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="a queued run")] = None,
    processes: ProcessesOpt = None,
):
    """Multitask pre-training (MLM, Product2Query, Product2Brand/Color, contrastive): one summed loss per
    batch; writes runs/<id>/backbone for `model.name` of `workbench train`. With --processes N (or
    train.num_processes) the supervisor runs N data-parallel ranks; this waits for them."""
    from core.errors import ConfigError, WorkbenchError
    from core.pretrain.multitask import load_pretrain_config, run_pretraining
    from core.runs.ranks import in_ranks, is_main_rank

    overrides = with_processes(set_, processes)
    cfg = load_pretrain_config(config, overrides)
    store = open_store(db)
    if cfg.train.num_processes > 1 and not in_ranks():
        if run_id is not None:
            raise ConfigError(f"--run-id with train.num_processes={cfg.train.num_processes}: start it with launch")
        from core.runs.launcher import train_in_ranks

        record = follow_ranks(err_console, train_in_ranks, store, cfg=cfg, config_path=config, overrides=overrides)
        if record.status != "finished":
            raise WorkbenchError(f"run {record.id} {record.status}" + (f": {record.error}" if record.error else ""))
        console.print(f"run {record.id} finished: backbone {Path(record.run_dir) / 'backbone'}", soft_wrap=True)
        return
    if not is_main_rank():  # a data-parallel rank other than 0: no progress bar, nothing printed
        run_pretraining(cfg=cfg, store=store, run_id=run_id)
        return
    res = with_progress(err_console, run_pretraining, cfg=cfg, store=store, run_id=run_id)
    fmt = lambda d: ", ".join(f"{k} {v:.4f}" for k, v in d.items())  # noqa: E731
    console.print(f"run {res.run_id} finished: {res.steps} steps in {res.seconds:.0f} s", highlight=False)
    console.print(f"losses, first step(s): {fmt(res.first_losses)}", highlight=False)
    console.print(f"losses, last step(s):  {fmt(res.last_losses)}", highlight=False)
    console.print(
        f"backbone: {res.backbone_dir}  (fine-tune with --set model.name={res.backbone_dir})",
        highlight=False,
        soft_wrap=True,
    )
