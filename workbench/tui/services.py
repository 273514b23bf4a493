"""What the app's screens share: per-thread runs.db connections, the clock, the GPU probe.

Workers run in threads; each thread gets its own :class:`core.runs.store.RunStore` connection (SQLite
connections are not shared across threads here). The clock and the GPU probe are injectable so
tests and snapshots run with a frozen time and a fake NVML (``tests/tui_fixture.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from core.errors import ReadOnlyDatabaseError, WorkbenchError
from core.runs.monitor import GpuProbe
from core.runs.monitor import host_stats as psutil_host_stats
from core.runs.store import ACTIVE, RunRecord, RunStore, Status

STATUS_STYLES = {
    Status.RUNNING: "bold cyan",
    Status.QUEUED: "cyan",
    Status.FINISHED: "green",
    Status.FAILED: "bold red",
    Status.CRASHED: "bold red",
    Status.STOPPED: "yellow",
    Status.PARTIAL: "yellow",
    Status.PRUNED: "magenta",
}


class Services:
    """Shared state of one app instance.

    Args:
        db_path: runs.db path.
        gpu_probe: object with ``read() -> list[GpuStats]``, ``available``, ``reason``
            (default: a real NVML :class:`core.runs.monitor.GpuProbe`, created lazily in a worker).
        clock: ``() -> unix seconds`` (default ``time.time``).
        configs_dir: where the New-run dialog finds configs.
        host_stats: ``() -> (CPU %, RAM used GiB, RAM total GiB)`` (default psutil; tests freeze it).
    """

    def __init__(
        self,
        db_path: str,
        gpu_probe=None,
        clock: Callable[[], float] | None = None,
        configs_dir: str | Path = "configs",
        host_stats: Callable[[], tuple[float, float, float]] | None = None,
    ):
        self.db_path = db_path
        self.host_stats = host_stats or psutil_host_stats
        self._probe = gpu_probe
        self._probe_lock = threading.Lock()
        self.clock = clock or time.time
        self.configs_dir = Path(configs_dir)
        self._local = threading.local()
        self._stores: list[tuple[threading.Thread, RunStore]] = []
        self._stores_lock = threading.Lock()

    def store(self) -> RunStore:
        """This thread's runs.db connection (opened on first use; creates the db if absent; a
        database this process cannot write is opened read-only)."""
        st = getattr(self._local, "store", None)
        if st is None:
            try:
                st = RunStore(self.db_path)
            except ReadOnlyDatabaseError:
                st = RunStore(self.db_path, readonly=True)
            self._local.store = st
            with self._stores_lock:
                self._stores.append((threading.current_thread(), st))
        return st

    @property
    def gpu_probe(self):
        with self._probe_lock:
            if self._probe is None:
                self._probe = GpuProbe()
            return self._probe

    def close(self) -> None:
        """Close the connections of this thread and of finished worker threads; a worker thread
        still reading has its query interrupted and its connection closes when the thread ends
        (closing a connection another thread is using can crash SQLite's Python module)."""
        with self._stores_lock:
            for thread, st in self._stores:
                try:
                    if thread is threading.current_thread() or not thread.is_alive():
                        st.close()
                    else:
                        st.conn.interrupt()
                except Exception:  # noqa: BLE001 - closing from another thread
                    pass
            self._stores.clear()
        if self._probe is not None:
            self._probe.close()

    # -- formatting helpers shared by the screens -----------------------------------------------
    def duration(self, run: dict) -> float | None:
        """Seconds from ``started`` to ``ended`` (or now for an active run), None if never started."""
        if not run.get("started"):
            return None
        start = datetime.fromisoformat(run["started"]).timestamp()
        end = datetime.fromisoformat(run["ended"]).timestamp() if run.get("ended") else self.clock()
        return max(0.0, end - start)

    def display_path(self) -> str:
        try:
            return str(Path(self.db_path).resolve().relative_to(Path.cwd()))
        except ValueError:
            return self.db_path


def fmt_float(v, digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_started(iso: str | None) -> str:
    """``MM-DD HH:MM`` in UTC."""
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%m-%d %H:%M")


def n_folds(run: dict) -> int | None:
    """``train.folds`` of a runs row's config (None when absent or unreadable)."""
    try:
        return RunRecord.from_row(run).n_folds
    except WorkbenchError:
        return None


def run_kind(run: dict) -> str:
    """A runs row's kind: ``train``, ``pretrain`` or ``stack`` (``RunRecord.kind``; a table row's
    ``kind``); ``train`` when the config is unreadable."""
    if "kind" in run:
        return run["kind"] or "train"
    try:
        return RunRecord.from_row(run).kind
    except WorkbenchError:
        return "train"


def stack_members(run: dict) -> list[str]:
    """The member run ids of a stack run's config (``config["members"]``; a table row's ``members``)."""
    if "members" in run:
        return list(run["members"] or [])
    try:
        members = RunRecord.from_row(run).config.get("members")
    except WorkbenchError:
        return []
    return [str(m) for m in members] if isinstance(members, list) else []


def lifecycle_refusal(run: dict, what: str) -> str | None:
    """Why ``what`` (relaunch, resume) cannot be done to ``run``, or None when it can: a stack run
    (``workbench stack``) has no training process or config to start again."""
    if run_kind(run) != "stack":
        return None
    runs = " ".join(f"--runs {m}" for m in stack_members(run)) or "--runs RUN ..."
    return f"run {run['id']} is a stack run: no training process to {what}. Fit it again with: workbench stack {runs}"


#: squeue's compact job state codes (``%t``), https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES
SLURM_STATE_CODES = {
    "BOOT_FAIL": "BF",
    "CANCELLED": "CA",
    "COMPLETED": "CD",
    "COMPLETING": "CG",
    "CONFIGURING": "CF",
    "DEADLINE": "DL",
    "FAILED": "F",
    "NODE_FAIL": "NF",
    "OUT_OF_MEMORY": "OOM",
    "PENDING": "PD",
    "PREEMPTED": "PR",
    "REQUEUED": "RQ",
    "REQUEUE_FED": "RF",
    "REQUEUE_HOLD": "RH",
    "RESIZING": "RS",
    "RESV_DEL_HOLD": "RD",
    "REVOKED": "RV",
    "RUNNING": "R",
    "SIGNALING": "SI",
    "SPECIAL_EXIT": "SE",
    "STAGE_OUT": "SO",
    "STOPPED": "ST",
    "SUSPENDED": "S",
    "TIMEOUT": "TO",
}


def slurm_code(state: str | None) -> str:
    """A Slurm job state as squeue's short code (``PENDING`` -> ``PD``; ``CANCELLED by 0`` -> ``CA``;
    an unknown state as it is; '' when unknown)."""
    if not state:
        return ""
    word = state.split()[0].upper()
    return SLURM_STATE_CODES.get(word, word)


def slurm_reason(reason: str | None) -> str:
    """Slurm's reason, '' when it gives none (``None``)."""
    return "" if not reason or reason == "None" else reason


def watched(run: dict) -> bool:
    """Whether a run may still change without the app doing anything: an active status, or a Slurm job
    that Slurm has not yet reported ended (a trainer records ``finished`` before its job completes)."""
    from core.runs.slurm import TERMINAL_STATES

    if run.get("status") in ACTIVE:
        return True
    state = (run.get("job_state") or "").split()
    return run.get("backend") == "slurm" and bool(run.get("job_id")) and (not state or state[0] not in TERMINAL_STATES)


def where_cell(run: dict, width: int = 7) -> str:
    """The Runs table's ``where`` cell: ``local``, or a Slurm run's job id and state code
    (``4242 PD``), the job id alone when both do not fit in ``width``, ``slurm`` before it has one."""
    if run.get("backend") != "slurm":
        return "local"
    job = str(run.get("job_id") or "")
    if not job:
        return "slurm"
    text = f"{job} {slurm_code(run.get('job_state'))}".strip()
    return text if len(text) <= width else job if len(job) <= width else "…" + job[-(width - 1) :]


def job_line(run: dict) -> str:
    """Where a run executes, in words: ``Slurm job 4242 PENDING (Resources) on node1`` for a Slurm
    run (no reason when Slurm gives none, no node until it has one), ``pid 123`` for a local one."""
    if run.get("backend") != "slurm":
        return f"pid {run.get('pid') or '-'}"
    if not run.get("job_id"):
        return "Slurm job (not submitted)"
    text = f"Slurm job {run['job_id']}"
    if run.get("job_state"):
        text += f" {run['job_state']}"
    reason = slurm_reason(run.get("job_reason"))
    if reason:
        text += f" ({reason})"
    if run.get("node"):
        text += f" on {run['node']}"
    return text
