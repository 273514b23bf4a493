"""The lifecycle of a run's process, shared by training and pre-training.

- :func:`claim_run`: the run row and folder a trainer may write into (a new run, a ``queued`` run
  started by id, or a run being resumed), refused with one line otherwise, so a finished run is
  never overwritten.
- :func:`recorded_run`: the body of a run between ``running`` and its final status, with
  SIGTERM/SIGINT turned into a *request* to stop (see below) and the exit code recorded.
- :func:`check_stop`: the points where a requested stop takes effect.
- :func:`atomic_write`: every artifact is written to a temporary file in the same folder and
  renamed over the target, so a crash or a full disk never leaves a half-written file.

Why stops are cooperative. A signal handler that raises runs between two bytecodes of *whatever*
Python code is executing, library code included. Raised inside a library's ``try: ...
except Exception`` it is converted or swallowed: transformers' ``BatchEncoding.convert_to_tensors``
turns any exception into ``ValueError("Unable to create tensor ...")``, so a SIGTERM landing in a
tokenizer call made the run exit 1 as ``failed`` instead of ``stopped`` (the flake of issue 12);
landing in a ``__del__`` it is printed and ignored; landing between ``BEGIN IMMEDIATE`` and the
end of ``__enter__`` it leaves a transaction open. So the handler only sets a flag, and the
training loops call :func:`check_stop` at the top of every step, every prediction batch and
between phases, where raising :class:`RunStopped` is safe. A second signal at least
:data:`SECOND_SIGNAL_AFTER_S` seconds after the first raises at once (the escape hatch when a phase
runs long between checks, e.g. a second Ctrl+C); sooner it is a duplicate of the same stop, as
when ``workbench stop`` signals the process group and the supervisor forwards the signal to the
trainer as well, and is ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import WorkbenchError
from core.runs.ranks import any_rank, broadcast_from_main, distributed_world, is_main_rank
from core.runs.store import RESUMABLE, RunStore, Status, now_iso

log = logging.getLogger("esci.lifecycle")


class RunStopped(WorkbenchError):
    """Raised inside the trainer (at a :func:`check_stop` point) after SIGTERM/SIGINT asked the
    run to stop."""


_stop_signal: list[tuple[int, float]] = []  # (signal, monotonic time) of the stop requested in this run

#: a second stop signal this many seconds after the first raises RunStopped at once
SECOND_SIGNAL_AFTER_S = 2.0


def stop_requested() -> bool:
    """True once SIGTERM/SIGINT was received by this process's running run."""
    return bool(_stop_signal)


def checkpoint_requested() -> bool:
    """True once SIGUSR1 asked this run to stop *after a step checkpoint* (Slurm's warning before a
    time limit or preemption, ``sbatch --signal=B:USR1@s``): the training loops write one at their
    next optimiser step, then stop there (:mod:`core.runs.slurm`)."""
    return bool(_stop_signal) and _stop_signal[0][0] == signal.SIGUSR1


def check_stop(where: str = "", collective: bool = False) -> None:
    """Raise :class:`RunStopped` if a stop was requested (call at safe points: between steps,
    prediction batches and phases).

    ``collective``: the point is reached by every rank of a data-parallel run the same number of
    times (a training step, a prediction batch, a phase); the stop is then decided for all ranks at
    once (all_reduce MAX of the flag, :func:`core.runs.ranks.any_rank`), so no rank stops while
    another waits for it in a collective operation. In a 1-process run it is the plain check.
    """
    requested = bool(_stop_signal)
    if collective and distributed_world() > 1:
        requested = any_rank(requested)
    if requested:
        why = f"stopped by signal {_stop_signal[0][0]}" if _stop_signal else "stopped by a signal to another rank"
        raise RunStopped(why + (f" ({where})" if where else ""))


def process_start_time(pid: int) -> float | None:
    """The process's create time (psutil), or None; stored with the pid so a reused pid is never
    mistaken for the run."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - best effort
        return None


def setup_file_log(run_dir: Path) -> logging.Handler:
    """Append the ``esci`` loggers to ``run_dir/train.log``; returns the handler to close."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("esci")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def claim_run(
    store: RunStore,
    name: str,
    config: dict[str, Any],
    output_dir: str | Path,
    run_id: str | None = None,
    resume: bool = False,
) -> tuple[str, Path]:
    """The run row and the absolute run folder this trainer writes into.

    - ``run_id=None``: a new run row (``queued``) and a new folder ``output_dir/<id>``.
    - ``run_id`` of a ``queued`` run (``workbench launch``): that run; its folder may hold only
      the launcher's ``console.log`` / ``launch.yaml``.
    - ``resume=True``: a ``crashed``/``stopped``/``failed``/``partial`` run (or a ``queued`` one
      that ``workbench resume --detach`` queued); its folder is kept as it is.

    With several ranks (:mod:`core.runs.ranks`), rank 0 alone claims the run and the others get its
    id and folder (or its refusal) from rank 0.

    Returns:
        (run_id, run_dir) with run_dir absolute.

    Raises:
        WorkbenchError: the run is not in a state that allows it (one line naming the run, its
        status and what to do), e.g. ``train --run-id`` on a finished run.
    """
    if distributed_world() == 1:
        return _claim_here(store, name, config, output_dir, run_id, resume)
    claimed: tuple[str, Path] | str | None = None
    error: WorkbenchError | None = None
    if is_main_rank():
        try:
            claimed = _claim_here(store, name, config, output_dir, run_id, resume)
        except WorkbenchError as exc:
            claimed, error = str(exc), exc  # the others get the message
    claimed = broadcast_from_main(claimed)
    if error is not None:
        raise error
    if isinstance(claimed, str):
        raise WorkbenchError(claimed)
    return claimed


def _claim_here(
    store: RunStore,
    name: str,
    config: dict[str, Any],
    output_dir: str | Path,
    run_id: str | None = None,
    resume: bool = False,
) -> tuple[str, Path]:
    """The claim itself (one process: :func:`claim_run`)."""
    if run_id is None:
        if resume:
            raise WorkbenchError("resume needs a run id")
        run_id = store.create_run(name, config)
        run_dir = Path(output_dir).resolve() / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        return run_id, run_dir
    run = store.get_run(run_id)
    run_id, status = run["id"], run["status"]
    if resume:
        require_resumable(store, run_id, status, queued=True)
    elif status != Status.QUEUED:
        hint = (
            ("resume it with `workbench resume " + run_id + "`") if status in RESUMABLE else "start a new run instead"
        )
        raise WorkbenchError(f"{store.path}: run {run_id} is {status}: only a queued run can be started by id; {hint}")
    run_dir = store.run_dir(run) or Path(output_dir).resolve() / run_id
    if not resume and run_dir.exists():
        leftovers = sorted(p.name for p in run_dir.iterdir() if p.name not in ("console.log", "launch.yaml"))
        if leftovers:
            raise WorkbenchError(
                f"{run_dir}: the folder of queued run {run_id} already holds {leftovers[:3]}; refusing to overwrite"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_id, run_dir


def require_resumable(store: RunStore, run_id: str, status: str, queued: bool = False) -> None:
    """Refuse, in one line, a run that ``resume`` may not continue (``queued``: also accept a run
    that ``resume --detach`` queued for its child).

    Raises:
        WorkbenchError: the run's status is not crashed, stopped, failed or partial.
    """
    if status not in RESUMABLE and not (queued and status == Status.QUEUED):
        raise WorkbenchError(
            f"{store.path}: run {run_id} is {status}: only a crashed, stopped, failed or partial run can be resumed"
        )


def mark_running(store: RunStore, run_id: str, run_dir: Path, **fields: Any) -> None:
    """Set the run ``running`` with this process's pid (unless a supervisor owns the pid), host,
    start time and absolute run folder; ``fields`` are further columns (config, model, task)."""
    supervised = os.environ.get("WORKBENCH_SUPERVISOR_PID") == str(os.getppid())
    pid_fields = {} if supervised else {"pid": os.getpid(), "process_start_time": process_start_time(os.getpid())}
    store.update_run(
        run_id,
        status=Status.RUNNING,
        **pid_fields,
        host=socket.gethostname(),
        started=now_iso(),
        ended=None,
        exit_code=None,
        error=None,
        run_dir=str(run_dir),
        **fields,
    )


@contextlib.contextmanager
def recorded_run(store: RunStore, run_id: str, handler: logging.Handler, final_status: str = Status.FINISHED):
    """The lifecycle of a run's body, shared by training and pre-training.

    SIGTERM/SIGINT (main thread only) set the stop flag that :func:`check_stop` turns into
    :class:`RunStopped`; a second signal raises at once. SIGUSR1 (Slurm's time-limit warning) does the
    same after a step checkpoint (:func:`checkpoint_requested`). On exit the run row gets its final
    status and exit code: ``final_status`` (``finished``, or ``partial``)/0, stopped/143 (RunStopped),
    failed/2 (any other WorkbenchError, message kept), failed/1 (anything else, type and message
    kept). The exception is re-raised; the signal handlers are restored and the file log
    ``handler`` closed.
    """

    def _on_signal(signum, frame):
        now = time.monotonic()
        if _stop_signal:
            if now - _stop_signal[0][1] >= SECOND_SIGNAL_AFTER_S:
                raise RunStopped(f"run {run_id}: stopped by a second signal {signum}")
            return  # the same stop delivered twice (process group + supervisor): already requested
        _stop_signal.append((signum, now))
        log.warning("signal %d received: the run stops at the next step", signum)

    _stop_signal.clear()
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread (e.g. a UI worker): no signal handling
        previous = {}
    try:
        yield
        check_stop("at the end")  # a stop that came during the last writes still counts as a stop
        store.update_run(run_id, status=final_status, ended=now_iso(), exit_code=0)
    except RunStopped:
        log.warning("run %s stopped", run_id)
        store.update_run(run_id, status=Status.STOPPED, ended=now_iso(), exit_code=143)
        raise
    except WorkbenchError as exc:
        log.error("run %s failed: %s", run_id, exc)
        store.update_run(run_id, status=Status.FAILED, ended=now_iso(), exit_code=2, error=str(exc))
        raise
    except BaseException as exc:
        log.exception("run %s crashed", run_id)
        store.update_run(
            run_id, status=Status.FAILED, ended=now_iso(), exit_code=1, error=f"{type(exc).__name__}: {exc}"[:500]
        )
        raise
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        _stop_signal.clear()
        logging.getLogger("esci").removeHandler(handler)
        handler.close()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp_path)`` into a temporary file of the same folder, fsync
    it, then rename it over ``path`` (POSIX ``rename`` is atomic): readers see the old file or the
    new one, never a part. On failure the temporary file is removed and the old file is intact.

    Raises:
        WorkbenchError: the write failed (full disk, file size limit, permissions), one line
        naming the file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise WorkbenchError(f"{path}: cannot write ({exc.strerror or exc}); the previous file is kept") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path
