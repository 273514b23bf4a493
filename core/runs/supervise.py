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
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from core.runs.store import FINAL, RunStore, Status, now_iso


def exit_code_of(returncode: int) -> int:
    """Shell convention: a negative Popen returncode ``-N`` (killed by signal N) becomes ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


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


def supervise(run_id: str, db: str | None, cmd: list[str], journal_dir: str | None = None) -> int:
    """Run ``cmd`` as a child, wait for it, record its end in ``db`` (or, for a Slurm job, the run's
    journal in ``journal_dir``). SIGUSR1 (Slurm's warning before the time limit) is passed on too; when
    it came, the job is requeued (:func:`requeue_job`). Returns the exit code."""
    env = {**os.environ, "WORKBENCH_SUPERVISOR_PID": str(os.getpid())}
    stop_requested: list[int] = []
    children: list[subprocess.Popen] = []

    def _forward(signum, frame):
        stop_requested.append(signum)
        for child in children:  # a stop before the child exists: the child is not started
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    # the handlers first, so a stop can never land between the child's start and them
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, _forward)
    if not stop_requested:
        children.append(subprocess.Popen(cmd, env=env))
        if stop_requested:  # the stop came while the child was being started: pass it on now
            children[0].send_signal(stop_requested[0])
    if not children:
        rc = -signal.SIGTERM
    child = children[0] if children else None
    while child is not None:
        try:
            rc = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
    code = exit_code_of(rc)
    store = open_store(db, journal_dir)
    try:
        run = store.get_run(run_id)
        if stop_requested and stop_requested[0] == signal.SIGUSR1 and run["status"] != Status.FINISHED:
            requeue_job(store, run_id)
        elif run["status"] not in FINAL and stop_requested:
            # stopped before the trainer installed its own handler (e.g. while importing torch)
            store.update_run(run_id, status=Status.STOPPED, ended=now_iso(), exit_code=code)
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
    finally:
        store.close()
    return code


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
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no trainer command after --")
    return supervise(args.run_id, args.db, cmd, journal_dir=args.journal)


if __name__ == "__main__":
    sys.exit(main())
