"""Errors raised by the core library.

Every user-facing error is one line that names the file (or setting) and the problem,
so that the CLI can print it and exit non-zero.
"""

from __future__ import annotations

from pathlib import Path


class WorkbenchError(Exception):
    """Base class of errors that the CLI turns into a one-line message and exit code 2."""


class DataError(WorkbenchError):
    """Bad input data: a missing file or column, unknown labels, duplicate ids, an empty selection.

    The message is ``"<path>: <problem>"`` on one line.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # force one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class ConfigError(WorkbenchError):
    """A bad config file or ``--set key=value`` override."""


class ReadOnlyDatabaseError(WorkbenchError):
    """A runs database that this process cannot write (read-only file, or a folder where SQLite
    cannot create its ``-wal``/``-shm`` files); readers may still open it read-only."""
