"""The typed messages the app's thread workers post with their results (harlequin's pattern).

Every database read and write of the app, every log read and NVML poll runs in a Textual thread
worker. A worker never touches a widget: it posts one of these messages to the screen (or the
app) that started it, and an ``on_<message>`` handler applies it on the event loop. A worker
that raises posts nothing; :class:`workbench.tui.workers.WorkerErrors` turns its error into a
:class:`WorkerFailed` message and an error toast, the one error handler of the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


def first_line(error: BaseException) -> str:
    """An exception as one line (its first line, or its type's name when it has no text)."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


class WorkerFailed(Message, bubble=False):
    """A worker of this screen (or app) raised: its ``group``, ``worker_name`` and ``error``.
    Handled where it was posted (it does not bubble up to the app, which would toast it again)."""

    def __init__(self, group: str, worker_name: str, error: BaseException) -> None:
        super().__init__()
        self.group = group
        self.worker_name = worker_name
        self.error = error

    @property
    def text(self) -> str:
        return first_line(self.error)


# -- Runs screen ----------------------------------------------------------------------------------
class RunsLoaded(Message):
    """The runs list as table rows, read at ``data_version``."""

    def __init__(self, rows: list[dict], data_version: int) -> None:
        super().__init__()
        self.rows = rows
        self.data_version = data_version


class RunsPaged(Message):
    """More runs than the screen reads at once: the list's ids for the screen's view and one
    window of rows (:class:`workbench.tui.runs_view.RunsPage`), read at ``data_version`` (None:
    a read for a new filter or sort only, without the totals)."""

    def __init__(self, page: Any, data_version: int | None) -> None:
        super().__init__()
        self.page = page
        self.data_version = data_version


class RunsWindow(Message):
    """The table rows ``window`` of ``rows.ids[start:]`` (``rows``: the table's PagedRows), of the
    ``asked`` ids read (fewer rows: a run vanished)."""

    def __init__(self, rows: Any, start: int, window: list[dict], asked: int) -> None:
        super().__init__()
        self.rows = rows
        self.start = start
        self.window = window
        self.asked = asked


class RunsUnchanged(Message):
    """runs.db did not change since the last read (``PRAGMA data_version``): only redraw times."""


class GpuRead(Message):
    """The top bar's GPU summary line."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line


# -- Run detail -----------------------------------------------------------------------------------
@dataclass
class SystemReadings:
    """What the system panel shows, read in the poll worker: the GPUs (and why none), the run's
    process tree (``core.runs.monitor.TreeSample`` or None) and the host's CPU %, RAM used/total GiB."""

    gpus: list
    gpu_reason: str
    tree: Any
    host: tuple[float, float, float]


class DetailPolled(Message):
    """One poll of the run detail: the run row, its new metric points ``(name, fold, x, value,
    time)`` up to metric row ``last_rowid``, the log lines appended since the last poll, the
    system readings, the run's epochs per fold (the x axis) and its best values so far
    (:meth:`core.runs.store.RunStore.best_values`)."""

    def __init__(
        self,
        run: dict,
        points: list[tuple],
        last_rowid: int,
        lines: list[str],
        readings: SystemReadings,
        epochs: float,
        best: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.best = best or {}
        self.run = run
        self.points = points
        self.last_rowid = last_rowid
        self.lines = lines
        self.readings = readings
        self.epochs = epochs


class StackFilesRead(Message):
    """A stack run's feature importance and report, read from its folder
    (:class:`workbench.tui.stack_panel.StackFiles`), as of run ``status``."""

    def __init__(self, files: Any, status: str) -> None:
        super().__init__()
        self.files = files
        self.status = status


# -- Compare --------------------------------------------------------------------------------------
class CompareLoaded(Message):
    """Everything the compare screen shows, read once."""

    def __init__(self, runs: list[dict], names: dict, summaries: dict, diff: list, curves: dict) -> None:
        super().__init__()
        self.runs = runs
        self.names = names
        self.summaries = summaries
        self.diff = diff
        self.curves = curves


class CompareDeltas(Message):
    """The compare screen's OOF differences vs its baseline run (``core.runs.compare.oof_deltas``).

    ``base_id``: the baseline; ``deltas``: run id -> {key: PairedDiff or None}, or a short reason
    ("no OOF file", "no common query") when there is nothing to show; ``metrics``: run id -> the
    per-query metrics read (kept for another baseline without reading the files again)."""

    def __init__(self, base_id: str, deltas: dict, metrics: dict) -> None:
        super().__init__()
        self.base_id = base_id
        self.deltas = deltas
        self.metrics = metrics


# -- Label review ---------------------------------------------------------------------------------
class ReviewLoaded(Message):
    """A run's issues, OOF probabilities, example text and decision log (``core.cleaning.labels.ReviewData``)."""

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.data = data


class DecisionSaved(Message):
    """A decision row (the dict in the screen's log) was appended to label_decisions as ``row_id``."""

    def __init__(self, row: dict, row_id: int) -> None:
        super().__init__()
        self.row = row
        self.row_id = row_id


class DecisionLogLoaded(Message):
    """The source run's decision log as stored (re-read after a decision could not be saved)."""

    def __init__(self, log: list[dict]) -> None:
        super().__init__()
        self.log = log


# -- Ensemble -------------------------------------------------------------------------------------
class MembersLoaded(Message):
    """The ensemble's candidate members and their OOF/test predictions (``core.scoring.ensemble.MemberSet``)."""

    def __init__(self, members: Any) -> None:
        super().__init__()
        self.members = members


class EnsembleComputed(Message):
    """An ensemble result (``core.scoring.ensemble.build_ensemble``); ``fit``: weights were fitted over
    the members that were ``marked`` when it started."""

    def __init__(self, result: Any, fit: bool, marked: list[bool]) -> None:
        super().__init__()
        self.result = result
        self.fit = fit
        self.marked = marked


class EnsembleBuilt(Message):
    """Submission files written, validated and recorded (the manifest of ``write_ensemble``)."""

    def __init__(self, result: Any, manifest: dict) -> None:
        super().__init__()
        self.result = result
        self.manifest = manifest


# -- New run and the run lifecycle ----------------------------------------------------------------
class ConfigChecked(Message):
    """The new-run dialog's config + overrides, checked: ``text`` (markup) and whether it is valid."""

    def __init__(self, text: str, ok: bool) -> None:
        super().__init__()
        self.text = text
        self.ok = ok


class SlurmProbed(Message):
    """The new-run dialog's Slurm probe: why Slurm cannot be used here (``missing``, None when it can),
    the user config's ``[slurm]`` ``defaults`` and the ``error`` reading that file (None when readable)."""

    def __init__(self, missing: str | None, defaults: dict, error: str | None = None) -> None:
        super().__init__()
        self.missing = missing
        self.defaults = defaults
        self.error = error


class RunLaunched(Message):
    """A run was launched detached from ``config`` (a file name): process ``pid`` (local), or
    submitted as Slurm job ``job_id`` (``pid`` None)."""

    def __init__(self, run_id: str, pid: int | None, config: str, job_id: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.pid = pid
        self.config = config
        self.job_id = job_id


class RunStopped(Message):
    """``stop_run`` returned: the run's ``status`` afterwards."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.status = status


class RunRelaunched(Message):
    """A run was launched again with its stored config, as ``new_id`` (process ``pid``), or submitted
    as Slurm job ``job_id`` (``pid`` None)."""

    def __init__(self, run_id: str, new_id: str, pid: int | None, job_id: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.new_id = new_id
        self.pid = pid
        self.job_id = job_id


class RunResumed(Message):
    """A run continues under its own id, detached (process ``pid``), or as Slurm job ``job_id``."""

    def __init__(self, run_id: str, pid: int | None, job_id: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.pid = pid
        self.job_id = job_id


# -- Sweeps ---------------------------------------------------------------------------------------
class SweepsLoaded(Message):
    """The Sweeps screen's rows (``workbench.tui.sweeps.read_sweeps``), read at ``keys`` (each
    journal's mtime and size, runs.db's data_version); ``rows`` None: nothing changed (or the read
    failed), nothing to redraw."""

    def __init__(self, rows: list[dict] | None, keys: tuple | None) -> None:
        super().__init__()
        self.rows = rows
        self.keys = keys


class SweepLoaded(Message):
    """One sweep as its screen shows it (``workbench.tui.sweeps.SweepView``), read at ``key``;
    ``view`` None: nothing changed (or the read failed)."""

    def __init__(self, view: Any, key: tuple | None) -> None:
        super().__init__()
        self.view = view
        self.key = key
