"""Detached training subprocesses: launch, check, stop.

A run started with :func:`launch` is ``workbench train CONFIG --run-id ID`` in its own session
(``start_new_session=True``: its own process group, no controlling terminal), so a UI can quit
and come back. runs.db keeps its pid and the process's create time, so a restarted UI never
mistakes a reused pid for the run. Stop = SIGTERM to the process group, a grace period, then
SIGKILL. Processes are started from argument lists, never through a shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from core.config import config_from_dict, load_config, read_config_file, save_config
from core.errors import ConfigError, WorkbenchError
from core.runs.lifecycle import process_start_time, require_resumable
from core.runs.store import ACTIVE, RunRecord, RunStore, Status, now_iso


def config_kind(path: str | Path) -> str:
    """``"pretrain"`` when the config file's top level says ``kind: pretrain``, else ``"train"``.

    An unreadable file gives ``"train"``: the loader then raises its own one-line ConfigError."""
    try:
        data = read_config_file(path)
    except ConfigError:
        return "train"
    return "pretrain" if data.get("kind") == "pretrain" else "train"


def load_any_config(path: str | Path, overrides: list[str] | None = None):
    """Load a training config (:class:`core.config.RunConfig`) or, for ``kind: pretrain``, a
    pre-training config (:class:`core.pretrain.multitask.PretrainConfig`); the result's ``kind`` attribute
    (``getattr(cfg, "kind", "train")``) tells them apart.

    Raises:
        ConfigError: as :func:`core.config.load_config` / :func:`core.pretrain.multitask.load_pretrain_config`.
    """
    if config_kind(path) == "pretrain":
        from core.pretrain.multitask import load_pretrain_config

        return load_pretrain_config(path, overrides)
    return load_config(path, overrides)


def trainer_command(
    config_path: str | Path, run_id: str, db_path: str, overrides: list[str], command: str = "train", nproc: int = 1
) -> list[str]:
    """The argument list of a detached trainer under its supervisor (same interpreter as the caller):
    ``python -m core.runs.supervise --run-id ID --db DB [--nproc N] -- python -m workbench train CONFIG
    --run-id ID ...`` (``command="pretrain"``: ``workbench pretrain``; ``nproc``: data-parallel ranks)."""
    if command not in ("train", "pretrain"):
        raise ValueError(f"unknown trainer command {command!r}")
    cmd = [sys.executable, "-m", "workbench", command, str(config_path), "--run-id", run_id, "--db", db_path]
    for o in overrides:
        cmd += ["--set", o]
    return supervised(run_id, db_path, cmd, nproc)


def supervised(run_id: str, db_path: str, cmd: list[str], nproc: int = 1) -> list[str]:
    """``cmd`` under its supervisor (:mod:`core.runs.supervise`), which records its exit code;
    ``nproc`` > 1: the supervisor starts that many data-parallel ranks of ``cmd``."""
    ranks = ["--nproc", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "core.runs.supervise", "--run-id", run_id, "--db", db_path, *ranks, "--", *cmd]


def num_processes(cfg) -> int:
    """``train.num_processes`` of a training or pre-training config (1 when absent)."""
    return int(getattr(cfg.train, "num_processes", 1) or 1)


def check_processes(cfg) -> None:
    """On a host with GPUs, one rank per GPU: refuse more ranks than GPUs (accelerate would put two
    ranks on one GPU, which nccl refuses only after the run started). CPU-only hosts take any N (gloo).

    Raises:
        ConfigError: ``train.num_processes`` > the number of visible GPUs (one line).
    """
    n = num_processes(cfg)
    if n == 1:
        return
    import torch

    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise ConfigError(
            f"train.num_processes={n}: this host has {torch.cuda.device_count()} GPU(s) and runs one process per GPU"
        )


def launch(config_path: str | Path, overrides: list[str] | None, store: RunStore) -> tuple[str, int]:
    """Create a queued run and start its trainer detached.

    The config and its data selection are validated here first (:func:`validate_any`: bad input
    fails in the caller, nothing is created or started).
    The run's pid is its supervisor (:mod:`core.runs.supervise`), the leader of a new session; the
    child's stdout/stderr go to ``runs/<id>/console.log``.

    Returns:
        (run_id, pid).

    Raises:
        ConfigError: bad config or override; DataError: the data selection (e.g. fewer training
            queries than ``train.folds``).
    """
    overrides = list(overrides or [])
    cfg = load_any_config(config_path, overrides)
    return _start(cfg, config_path, overrides, store)


def relaunch(store: RunStore, run_id: str) -> tuple[str, int]:
    """Launch a new run with exactly the resolved config of ``run_id`` (its runs.db config JSON,
    overrides included), written to ``runs/<new id>/launch.yaml``.

    A Slurm run is submitted again as a new Slurm job with its last job's options
    (:func:`core.runs.slurm.submit`).

    Returns:
        (new run_id, pid), or (new run_id, Slurm job id) for a Slurm run.

    Raises:
        WorkbenchError: unknown run, or a run without a stored config; sbatch refuses the job.
        ConfigError / DataError: the stored config or its data no longer validates (nothing is created).
    """
    run = store.get_record(run_id)
    cfg = stored_config(store, run)
    if run.backend == "slurm":
        from core.runs import slurm

        new_id, job_id = slurm.submit(cfg, store, slurm.options_of(run.run_dir))
        return new_id, int(job_id)
    return _start(cfg, None, [], store)


def stored_config(store: RunStore, run: RunRecord, all_folds: bool = False):
    """A run's stored config as a :class:`core.config.RunConfig` or, for a pre-training run, a
    :class:`core.pretrain.multitask.PretrainConfig`; ``all_folds`` drops ``train.run_folds`` (training).

    Raises:
        WorkbenchError: the run has no stored config, or is a stack run (``workbench stack`` refits it).
        ConfigError: it no longer validates (one line naming the run).
    """
    if not run.config:
        raise WorkbenchError(f"{store.path}: run {run.id} has no stored config")
    if run.kind == "stack":  # a second-level fit over other runs' files: no training process to start
        members = " ".join(f"--runs {m}" for m in run.config.get("members", []))
        raise WorkbenchError(
            f"run {run.id} is a stack run: nothing to relaunch or resume; fit it again with `workbench stack {members}`"
        )
    try:
        if run.kind == "pretrain":
            from core.pretrain.multitask import pretrain_config_from_dict

            return pretrain_config_from_dict(run.config)
        data = run.config
        if all_folds:
            data = {**data, "train": {**data.get("train", {}), "run_folds": None}}
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{store.path}: run {run.id}: {exc}") from None


def validate_any(cfg) -> None:
    """Check a config and its data before a run exists: :func:`core.training.validate.validate_run` for a
    training config, :func:`core.pretrain.multitask.validate_pretrain` for a pre-training one.

    Raises:
        ConfigError / DataError: one line (nothing is created).
    """
    if getattr(cfg, "kind", "train") == "pretrain":
        from core.pretrain.multitask import validate_pretrain

        validate_pretrain(cfg)
    else:
        from core.training.validate import validate_run

        validate_run(cfg)


def _start(cfg, config_path: str | Path | None, overrides: list[str], store: RunStore) -> tuple[str, int]:
    run_id, run_dir, cmd = _queue(cfg, config_path, overrides, store)
    proc = _spawn(cmd, run_dir)
    store.update_run(run_id, pid=proc.pid, process_start_time=process_start_time(proc.pid))
    store.add_artifact(run_id, "console", run_dir / "console.log")
    return run_id, proc.pid


def _queue(cfg, config_path: str | Path | None, overrides: list[str], store: RunStore) -> tuple[str, Path, list[str]]:
    """Validate ``cfg``, create its queued run and folder; returns (run id, run folder, the
    supervised trainer command)."""
    if getattr(cfg, "kind", "train") != "pretrain":
        from core.training.backbone import with_backbone

        cfg = with_backbone(cfg, store)  # model.pretrain: the backbone's folder, saved with the queued run
    validate_any(cfg)  # a bad config or data selection fails here, in the caller: no run row, no folder
    check_processes(cfg)
    run_id = store.create_run(cfg.name, cfg.to_dict(), status=Status.QUEUED)
    run_dir = Path(cfg.output_dir).expanduser().resolve() / run_id  # absolute: readable from any cwd
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_path is None:
        config_path = run_dir / "launch.yaml"
        save_config(cfg, config_path)
    cmd = trainer_command(
        config_path,
        run_id,
        os.path.abspath(store.path),
        overrides,
        command=getattr(cfg, "kind", "train"),
        nproc=num_processes(cfg),
    )
    store.update_run(run_id, run_dir=str(run_dir))
    return run_id, run_dir, cmd


def run_in_foreground(
    store: RunStore, run_id: str, run_dir: Path, cmd: list[str], poll: Callable[[str], None] | None = None
) -> RunRecord:
    """Run a supervised command (:func:`supervised`) as a child of this process, in its process
    group (so Ctrl+C reaches the supervisor and every rank, which stop the run), its output in
    ``run_dir/console.log``; the run's pid is the supervisor's, as with :func:`launch`. Waits for it,
    calling ``poll(run_id)`` about once a second (a progress display); Ctrl+C is ignored here while
    the supervisor and the ranks stop. Returns the run's record afterwards.

    ``workbench train/resume/pretrain`` with ``train.num_processes`` > 1: the ranks need the
    supervisor, and the command still returns when the run ends.
    """
    proc = _spawn(cmd, run_dir, detach=False)
    store.update_run(run_id, pid=proc.pid, process_start_time=process_start_time(proc.pid))
    if not any(a["kind"] == "console" for a in store.artifacts(run_id)):
        store.add_artifact(run_id, "console", run_dir / "console.log")
    try:  # Ctrl+C reaches the supervisor and the ranks (same process group): this one waits for their stop
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if poll is not None:
                    poll(run_id)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return store.get_record(run_id)


def train_in_ranks(
    cfg, config_path: str | Path, overrides: list[str], store: RunStore, poll: Callable[[str], None] | None = None
) -> RunRecord:
    """``workbench train/pretrain CONFIG`` with ``train.num_processes`` > 1: ``cfg`` (loaded from
    ``config_path`` with ``overrides``) as a queued run as :func:`launch` makes it, its supervisor and
    ranks in the foreground (:func:`run_in_foreground`). Returns the run's record when it has ended.

    Raises:
        ConfigError / DataError: as :func:`launch` (nothing is created or started).
    """
    run_id, run_dir, cmd = _queue(cfg, config_path, list(overrides), store)
    return run_in_foreground(store, run_id, run_dir, cmd, poll)


def resume_config(store: RunStore, run_id: str, all_folds: bool = False, queued: bool = False):
    """The stored config of a run that ``workbench resume`` may continue.

    Args:
        run_id: a crashed, stopped, failed or partial run (id or unique prefix).
        all_folds: drop ``train.run_folds`` so a partial run trains its remaining folds too.
        queued: also accept a ``queued`` run (the one :func:`resume_detached` queued for its child).

    Returns:
        (run id, config): a :class:`core.config.RunConfig` or, for a pre-training run, a
        :class:`core.pretrain.multitask.PretrainConfig`.

    Raises:
        WorkbenchError: unknown run, a run that is not resumable (one line with its status), no
        stored config.
        ConfigError: the stored config no longer validates.
    """
    refresh_statuses(store)  # a run whose process vanished reads crashed first
    run = store.get_record(run_id)
    require_resumable(store, run.id, run.status, queued=queued)
    return run.id, stored_config(store, run, all_folds=all_folds)


def resume_detached(store: RunStore, run_id: str, all_folds: bool = False) -> tuple[str, int]:
    """``workbench resume RUN`` in the background under a supervisor (own session), like
    :func:`launch`: the run goes back to ``queued`` with the supervisor's pid.

    A Slurm run is submitted again instead (:func:`core.runs.slurm.resubmit`).

    Returns:
        (run_id, pid), or (run_id, Slurm job id) for a Slurm run.

    Raises:
        WorkbenchError / ConfigError: as :func:`resume_config`; ConfigError / DataError: the stored
        config or its data no longer validate (:func:`validate_any`). Nothing is started.
    """
    run_id, cfg = resume_config(store, run_id, all_folds=all_folds)
    validate_any(cfg)  # a config or data that no longer validates fails here, in one line, nothing started
    if store.get_record(run_id).backend == "slurm":
        from core.runs import slurm

        if all_folds:
            store.update_run(run_id, config=cfg.to_json())  # the job reads the config from the snapshot
        return run_id, int(slurm.resubmit(store, run_id))
    run_dir, cmd = _queue_resume(store, run_id, cfg, all_folds)
    proc = _spawn(cmd, run_dir)
    store.update_run(run_id, pid=proc.pid, process_start_time=process_start_time(proc.pid))
    return run_id, proc.pid


def resume_in_ranks(
    store: RunStore, run_id: str, all_folds: bool = False, poll: Callable[[str], None] | None = None
) -> RunRecord:
    """``workbench resume RUN`` of a run with ``train.num_processes`` > 1: queued again as
    :func:`resume_detached` does, its supervisor and ranks in the foreground
    (:func:`run_in_foreground`). Returns the run's record when it has ended.

    Raises:
        WorkbenchError / ConfigError / DataError: as :func:`resume_detached` (nothing is started).
    """
    run_id, cfg = resume_config(store, run_id, all_folds=all_folds)
    validate_any(cfg)
    check_processes(cfg)
    run_dir, cmd = _queue_resume(store, run_id, cfg, all_folds)
    return run_in_foreground(store, run_id, run_dir, cmd, poll)


def _queue_resume(store: RunStore, run_id: str, cfg, all_folds: bool) -> tuple[Path, list[str]]:
    """Put a resumable run back to ``queued``; returns (its folder, the supervised ``workbench resume``
    command with the config's ranks)."""
    db = os.path.abspath(store.path)
    cmd = [sys.executable, "-m", "workbench", "resume", run_id, "--db", db, "--queued"]
    if all_folds:
        cmd.append("--all-folds")
    store.update_run(run_id, status=Status.QUEUED, ended=None, exit_code=None, error=None)
    return Path(store.get_record(run_id).run_dir), supervised(run_id, db, cmd, num_processes(cfg))


def _spawn(cmd: list[str], run_dir: Path, detach: bool = True) -> subprocess.Popen:
    """Start ``cmd`` in a new session (``detach``; else in this process's group), stdout/stderr
    appended to ``run_dir/console.log``; returns the process."""
    run_dir.mkdir(parents=True, exist_ok=True)
    console = open(run_dir / "console.log", "ab")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        console.close()
    return proc


def process_of(run: dict) -> psutil.Process | None:
    """The live process of a run row, or None (gone, or the pid was reused by another process)."""
    pid, started = run.get("pid"), run.get("process_start_time")
    if not pid:
        return None
    try:
        proc = psutil.Process(int(pid))
        if started is not None and abs(proc.create_time() - float(started)) > 1.0:
            return None  # pid reused
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def refresh_statuses(store: RunStore) -> list[str]:
    """Mark local runs ``crashed`` whose status says active but whose process is gone (SIGKILL, OOM,
    reboot: no one wrote a final status), and bring Slurm runs up to date (their journals ingested,
    their job states read: :func:`core.runs.slurm.refresh`). Returns the ids of the runs changed;
    nothing on a store opened read-only (statuses as stored)."""
    if getattr(store, "readonly", False) or getattr(store, "remote", False):
        return []
    from core.runs import slurm

    crashed = slurm.refresh(store)
    for run in store.active_runs():
        if run.get("backend") == "slurm":
            continue
        if run.get("pid") and process_of(run) is None:
            store.update_run(run["id"], status=Status.CRASHED, ended=run.get("ended") or now_iso())
            crashed.append(run["id"])
    return crashed


def stop_run(store: RunStore, run_id: str, grace: float = 10.0) -> str:
    """Stop a run: SIGTERM to its process group, wait ``grace`` seconds, then SIGKILL.

    Returns the run's status afterwards.

    A Slurm run is cancelled with ``scancel`` instead (:func:`core.runs.slurm.cancel`).

    Raises:
        WorkbenchError: unknown run id; scancel failed.
    """
    run = store.get_run(run_id)
    if run.get("backend") == "slurm":
        from core.runs import slurm

        return slurm.cancel(store, run["id"], grace=max(grace, 30.0))
    proc = process_of(run)
    if proc is None:
        refresh_statuses(store)
        return store.get_run(run["id"])["status"]
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    members = [proc] + proc.children(recursive=True)
    try:
        if pgid is not None and pgid == proc.pid:
            os.killpg(pgid, signal.SIGTERM)
        else:
            proc.terminate()
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(members, timeout=grace)
    if alive:
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        if pgid is not None and pgid == proc.pid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        psutil.wait_procs(alive, timeout=5)
    run = store.get_run(run["id"])
    if run["status"] in ACTIVE:  # killed before it could write its own status
        store.update_run(run["id"], status=Status.STOPPED, ended=now_iso(), exit_code=-9 if alive else 143)
    return store.get_run(run["id"])["status"]
