"""``workbench configs``: the configs shipped with the package (core/bundled_configs/).

A bare config name (``workbench train demo.yaml`` or ``demo``) that is not a file in the current
folder or in ``./configs/`` resolves to the bundled config of that name
(:func:`core.config.resolve_config_path`); ``configs copy`` puts one in the current folder to edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

configs_app = typer.Typer(no_args_is_help=True, help="List the bundled configs; copy one to edit it.")

console = Console()
err_console = Console(stderr=True)


def first_comment(path: Path) -> str:
    """The first ``#`` comment line of a config file, without the ``#`` ("" when there is none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""


@configs_app.command("list")
def configs_list():
    """The bundled configs: name, file and the first line of its header comment."""
    from core.config import bundled_configs, bundled_configs_dir

    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, title=f"bundled configs in {bundled_configs_dir()}")
    for col in ("name", "file", "about"):
        t.add_column(col, overflow="fold")
    for name, path in bundled_configs().items():
        t.add_row(name, path.name, first_comment(path))
    console.print(t)


@configs_app.command("copy")
def configs_copy(
    name: Annotated[str, typer.Argument(help="a bundled config: demo, demo.yaml, ...")],
    dest: Annotated[Path | None, typer.Argument(help="file or folder (default: here)")] = None,
):
    """Copy a bundled config into the current folder (or DEST) to edit it; never overwrites."""
    from core.config import bundled_configs
    from core.errors import ConfigError, WorkbenchError

    bundled = bundled_configs()
    src = bundled.get(Path(name).stem) if Path(name).name == name else None
    if src is None or (Path(name).suffix and Path(name).name != src.name):
        raise ConfigError(f"{name}: no bundled config of that name (bundled: {', '.join(bundled) or 'none'})")
    target = Path(dest) if dest is not None else Path(src.name)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise WorkbenchError(f"{target}: already exists; not overwritten")
    if not target.parent.is_dir():
        raise WorkbenchError(f"{target.parent}: no such folder")
    try:
        with open(target, "xb") as fh:  # "x": a file created meanwhile is not overwritten either
            fh.write(src.read_bytes())
    except OSError as exc:
        raise WorkbenchError(f"{target}: cannot write: {exc.strerror or exc}") from None
    console.print(f"{src.name} -> {target}")
