"""The supervisor of a launched run: records the trainer's exit code, whatever kills it.

``python -m core.runs.supervise --run-id ID --db DB -- TRAINER ARGS...`` is what
:func:`core.runs.launcher.launch` starts in a new session. It is the session leader (the run's pid in
runs.db, so ``stop`` signals the whole group), starts the trainer as its child and waits. When the
trainer exits and has not written a final status itself (SIGKILL by the OOM killer, a segfault,
``os._exit``), the supervisor marks the run ``crashed`` (killed by a signal) or ``failed`` (any other exit) with the exit code (``128 + signal`` for a
signal, as a shell reports it). SIGTERM/SIGINT are passed on to the trainer, which writes
``stopped`` itself (or, if the stop came before the trainer could handle it, the supervisor
writes ``stopped``). If the machine reboots nobody writes anything; a UI then finds the pid gone
and marks the run ``crashed`` with no exit code (:func:`core.runs.launcher.refresh_statuses`).

``--nproc N`` (``train.num_processes``) starts N ranks of the trainer instead of one
(:class:`core.runs.ranks.RankGroup`: the ``torchrun`` environment, data parallel on one host) and
forwards every stop signal to each. When a rank exits non-zero or is killed, the others are
terminated (SIGTERM, a grace period, SIGKILL), so no rank is ever left. The end
(:func:`core.runs.ranks.outcome_of`): all ranks exit 0 -> what rank 0 recorded; a stop -> ``stopped``;
a rank killed by a signal nobody asked for -> ``crashed`` naming the rank and the signal (even when
rank 0 recorded ``failed`` because its peer vanished); another rank's non-zero exit first ->
``failed`` naming it. :func:`record_end` writes it into any store with ``get_run``/``update_run``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from core.runs.ranks import Outcome, RankGroup, outcome_of
from core.runs.store import FINAL, RunStore, Status, now_iso


def exit_code_of(returncode: int) -> int:
    """Shell convention: a negative Popen returncode ``-N`` (killed by signal N) becomes ``128 + N``."""
    return Outcome(returncode).exit_code


def open_store(db: str | None, journal_dir: str | None):
    """The store the end is recorded in: runs.db (``db``), or for a run on another host (a Slurm
    job) the run folder's journal (:class:`core.runs.journal.JournalStore`)."""
    if journal_dir:
        from core.runs.journal import JournalStore

        return JournalStore(journal_dir)
    return RunStore(db)


def requeue_job(store, run_id: str) -> None:
    """A Slurm job signalled before its time limit (SIGUSR1, ``--signal=B:USR1@s``) whose trainer
    stopped after a step checkpoint: mark the run ``queued`` and ``scontrol requeue`` the job, whose
    next start resumes the run (:mod:`core.runs.slurm`)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return
    store.update_run(run_id, status=Status.QUEUED, ended=None, exit_code=None, error=None)
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        store.update_run(
            run_id,
            status=Status.CRASHED,
            ended=now_iso(),
            error=f"scontrol requeue {job_id} failed: {(out.stderr or out.stdout).strip()[:300]}",
        )
    print(f"supervisor: requeued Slurm job {job_id}: rc {out.returncode} {out.stderr.strip()}", flush=True)


def supervise(run_id: str, db: str | None, cmd: list[str], journal_dir: str | None = None, nproc: int = 1) -> int:
    """Run ``cmd`` as ``nproc`` ranks (:class:`core.runs.ranks.RankGroup`; 1: one plain child), wait
    for them, record the end in ``db`` (or, for a Slurm job, the run's journal in ``journal_dir``)
    with :func:`record_end`. SIGTERM/SIGINT/SIGHUP and SIGUSR1 (Slurm's warning before the time
    limit) are passed on to every rank; after SIGUSR1 the job is requeued (:func:`requeue_job`).
    Returns the exit code (``128 + N`` for a signal)."""
    env = {**os.environ, "WORKBENCH_SUPERVISOR_PID": str(os.getpid())}
    group = RankGroup(cmd, nproc, env)
    stop_requested: list[int] = []

    def _forward(signum, frame):
        stop_requested.append(signum)
        group.send_signal(signum)  # a stop before the ranks exist: they are not started

    # the handlers first, so a stop can never land between the ranks' start and them
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, _forward)
    if not stop_requested:
        group.start()
        if stop_requested:  # the stop came while the ranks were being started: pass it on now
            group.send_signal(stop_requested[0])
    returncodes = group.wait() if group.procs else None
    stop = stop_requested[0] if stop_requested else None  # after the wait: a stop may come during it
    outcome = outcome_of(returncodes, stop) if returncodes is not None else Outcome(-signal.SIGTERM, stop)
    store = open_store(db, journal_dir)
    try:
        record_end(store, run_id, outcome)
    finally:
        store.close()
    return outcome.exit_code


def record_end(store, run_id: str, outcome: Outcome) -> None:
    """Record how the run's process(es) ended (:class:`core.runs.ranks.Outcome`) in ``store`` (a
    :class:`RunStore` or any store with its ``get_run``/``update_run``, e.g. a run's journal).

    - SIGUSR1 (Slurm) and the run not finished: requeued (:func:`requeue_job`);
    - a stop was asked for and the trainer wrote no final status (stopped before its handler was
      installed): ``stopped`` with the exit code;
    - a rank's failure that overrides rank 0's record (``outcome.rank``; a run rank 0 finished is
      kept): ``crashed`` (killed by a signal) or ``failed``, with ``outcome.error``;
    - no final status written: ``crashed`` (signal) or ``failed``, with the trainer's error, its last
      console line or the exit code;
    - else only the exit code, if the trainer did not record one.
    """
    run = store.get_run(run_id)
    code, rc = outcome.exit_code, outcome.returncode
    if outcome.stop_signal == signal.SIGUSR1 and run["status"] != Status.FINISHED:
        requeue_job(store, run_id)
    elif run["status"] not in FINAL and outcome.stop_signal is not None:
        # stopped before the trainer installed its own handler (e.g. while importing torch)
        store.update_run(run_id, status=Status.STOPPED, ended=now_iso(), exit_code=code)
    elif outcome.rank is not None and run["status"] not in (Status.FINISHED, Status.PARTIAL):
        store.update_run(
            run_id,
            status=Status.CRASHED if rc < 0 else Status.FAILED,
            ended=run.get("ended") or now_iso(),
            exit_code=code,
            error=outcome.error,
        )
    elif run["status"] not in FINAL:
        store.update_run(
            run_id,
            status=Status.CRASHED if rc < 0 else Status.FAILED,
            ended=now_iso(),
            exit_code=code,
            error=run.get("error")
            or _last_console_line(run)
            or f"trainer exited with code {code} without a final status",
        )
    elif run.get("exit_code") is None:
        store.update_run(run_id, exit_code=code)


def _last_console_line(run: dict) -> str | None:
    """The last non-empty line the trainer printed (``run_dir/console.log``): for a trainer that
    refused its input before it could record anything, that line is the one-line error."""
    from pathlib import Path

    try:
        lines = (Path(run["run_dir"]) / "console.log").read_text(errors="replace").splitlines()
    except (OSError, TypeError, KeyError):
        return None
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), None)
    return last[:500] if last else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.runs.supervise")
    parser.add_argument("--run-id", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="runs.db (a run on this host)")
    where.add_argument("--journal", help="the run folder whose journal records the run (a Slurm job)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks to start (data parallel; default 1)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: must be >= 1")
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no trainer command after --")
    return supervise(args.run_id, args.db, cmd, journal_dir=args.journal, nproc=args.nproc)


if __name__ == "__main__":
    sys.exit(main())
