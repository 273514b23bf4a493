"""What every screen shares about workers: the one error handler, and the run lifecycle keys.

- :class:`WorkerErrors` (screens and apps): a worker that raises becomes a
  :class:`~workbench.tui.messages.WorkerFailed` message and one error toast. No screen catches
  exceptions itself; a screen that must also change a widget on a failure (a title saying
  "cannot load", a button to enable again) adds its own ``on_worker_failed``.
- :class:`RunActions` (screens): ``s`` stop (after a confirm), ``r`` relaunch, ``R`` resume of the
  screen's run; :class:`RunLifecycle` (the app): the workers that do it, once for every screen.
  They run on the app, so their outcome is shown even when the screen that asked has closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.message import Message
from textual.worker import Worker, WorkerState

from core.runs.store import Status
from workbench.tui.messages import RunRelaunched, RunResumed, RunStopped, WorkerFailed


class WorkerErrors:
    """Mixin for a Screen or App: the single handler of worker errors.

    A worker started by this node that raises posts :class:`WorkerFailed` here; its default
    handler shows an error toast titled ``WORKER_TITLES[group]`` (else the worker's name). A
    subclass's own ``on_worker_failed`` runs first and may call ``message.prevent_default()`` to
    show the error some other way.
    """

    WORKER_TITLES: ClassVar[dict[str, str]] = {}

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.ERROR and worker.error is not None:
            self.post_message(WorkerFailed(worker.group, worker.name, worker.error))

    def on_worker_failed(self, message: WorkerFailed) -> None:
        title = self.WORKER_TITLES.get(message.group) or message.worker_name or message.group
        self.notify(message.text, title=title, severity="error", timeout=10)


def stop_question(run: dict) -> str:
    """The stop confirmation of a run: ``scancel`` for a Slurm job, signals to the process group else."""
    if run.get("backend") == "slurm" and run.get("job_id"):
        return (
            f"Stop run {run['id']} ({run['name']}, Slurm job {run['job_id']})?\n"
            f"scancel job {run['job_id']}: Slurm sends SIGTERM, then SIGKILL after its KillWait."
        )
    return f"Stop run {run['id']} ({run['name']}, pid {run['pid']})?\nSIGTERM to its process group, SIGKILL after 10 s."


class RunActions:
    """Screen mixin: ``s`` stop (confirm first), ``r`` relaunch, ``R`` resume.

    The screen names its run with :meth:`lifecycle_run`; the app's :class:`RunLifecycle` workers
    do the work."""

    def lifecycle_run(self) -> dict | None:
        """The run the keys act on (``id``, ``name``, ``status``, ``pid``), or None after telling
        the user why there is none."""
        raise NotImplementedError

    def action_stop(self) -> None:
        from core.runs.launcher import ACTIVE
        from workbench.tui.dialogs import ConfirmScreen

        run = self.lifecycle_run()
        if run is None:
            return
        if run["status"] not in ACTIVE:
            self.notify(f"run {run['id']} is {run['status']}, nothing to stop", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.notify(f"stopping {run['id']}…")
                self.app.stop_run(run["id"])

        self.app.push_screen(ConfirmScreen(stop_question(run)), confirmed)

    def _startable(self, what: str) -> dict | None:
        """The run to relaunch or resume, or None after a notice (no run; a stack run)."""
        from workbench.tui.services import lifecycle_refusal

        run = self.lifecycle_run()
        if run is None:
            return None
        refusal = lifecycle_refusal(run, what)
        if refusal:
            self.notify(refusal, severity="warning", timeout=8)
            return None
        return run

    def action_relaunch(self) -> None:
        run = self._startable("relaunch")
        if run is not None:
            self.app.relaunch_run(run["id"])

    def action_resume(self) -> None:
        run = self._startable("resume")
        if run is not None:
            self.app.resume_run(run["id"], all_folds=run["status"] == Status.PARTIAL)


class RunLifecycle:
    """App mixin: the stop / relaunch / resume workers (``core.runs.launcher`` through the services'
    per-thread runs.db connection). Each posts RunStopped / RunRelaunched / RunResumed; the
    handlers here show the outcome and call :meth:`runs_changed`."""

    def _lifecycle(self, what: str, run_id: str, work: Callable[[], Message]) -> None:
        self.run_worker(
            lambda: self.post_message(work()),
            thread=True,
            group="lifecycle",
            name=f"{what} {run_id}",
            exit_on_error=False,
        )

    def stop_run(self, run_id: str) -> None:
        """SIGTERM to the run's process group, SIGKILL after 10 s; ``scancel`` for a Slurm job
        (``core.runs.launcher.stop_run``)."""
        import core.runs.launcher as launcher

        self._lifecycle(
            "stop", run_id, lambda: RunStopped(run_id, launcher.stop_run(self.services.store(), run_id, grace=10.0))
        )

    def relaunch_run(self, run_id: str) -> None:
        """A new run with the run's stored config, detached (``core.runs.launcher.relaunch``)."""
        import core.runs.launcher as launcher

        def relaunch() -> RunRelaunched:
            store = self.services.store()
            new_id, handle = launcher.relaunch(store, run_id)
            if store.get_run(run_id).get("backend") == "slurm":  # a new job: the number is the job id
                return RunRelaunched(run_id, new_id, None, job_id=str(handle))
            return RunRelaunched(run_id, new_id, handle)

        self._lifecycle("relaunch", run_id, relaunch)

    def resume_run(self, run_id: str, all_folds: bool = False) -> None:
        """``workbench resume RUN --detach`` (``--all-folds`` for a partial run): the same run id
        continues in the background."""
        import core.runs.launcher as launcher

        def resume() -> RunResumed:
            store = self.services.store()
            _, pid = launcher.resume_detached(store, run_id, all_folds=all_folds)
            if store.get_run(run_id).get("backend") == "slurm":  # resubmitted: the number is the job id
                return RunResumed(run_id, None, job_id=str(pid))
            return RunResumed(run_id, pid)

        self._lifecycle("resume", run_id, resume)

    def runs_changed(self) -> None:
        """Called after a lifecycle worker ended (the app reloads its runs list)."""

    def on_run_stopped(self, message: RunStopped) -> None:
        self.notify(f"run {message.run_id}: {message.status}")
        self.runs_changed()

    def on_run_relaunched(self, message: RunRelaunched) -> None:
        where = f"Slurm job {message.job_id}" if message.job_id else f"pid {message.pid}"
        self.notify(f"relaunched {message.run_id} as {message.new_id} ({where})")
        self.runs_changed()

    def on_run_resumed(self, message: RunResumed) -> None:
        where = f"Slurm job {message.job_id}" if message.job_id else f"pid {message.pid}"
        self.notify(f"resumed {message.run_id} ({where})")
        self.runs_changed()

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "lifecycle":
            self.runs_changed()
