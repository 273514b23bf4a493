"""``workbench pretrain``: multitask pre-training of a backbone (core.pretrain.multitask)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from workbench.cli.common import DbOpt, SetOpt, open_store, with_progress

console = Console()
err_console = Console(stderr=True)


def pretrain(
    config: Annotated[Path, typer.Argument(help="YAML/TOML pre-training config (see configs/pretrain.yaml)")],
    set_: SetOpt = None,
    db: DbOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="a queued run")] = None,
):
    """Multitask pre-training (MLM, Product2Query, Product2Brand/Color, contrastive): one summed loss per
    batch; writes runs/<id>/backbone for `model.name` of `workbench train`."""
    from core.pretrain.multitask import load_pretrain_config, run_pretraining

    cfg = load_pretrain_config(config, set_)
    store = open_store(db)
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
