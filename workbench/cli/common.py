"""What the command groups share: the ``--db`` and ``--set`` options and opening runs.db.

Each command module keeps its own ``console`` / ``err_console``: tests set one module's width
(``workbench.cli.console.width = 200``) without changing the others' output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from core.runs.store import RunStore

DbOpt = Annotated[str | None, typer.Option("--db", envvar="WORKBENCH_DB", help="runs database (default ./runs.db)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="config override key=value (repeatable)")]


def open_store(db: str | None, readonly: bool = False) -> RunStore:
    """The runs database of a command: ``--db`` / ``WORKBENCH_DB``, else ``./runs.db``.

    Raises:
        WorkbenchError (and subclasses): the path or the database is unusable (one line, exit 2).
    """
    from core.runs.store import RunStore, default_db_path  # lazy: `workbench --help` stays fast

    return RunStore(db or default_db_path(), readonly=readonly)
