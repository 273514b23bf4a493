"""The Slurm backend: a run submitted as a batch job, watched and stopped from the workbench's host.

- :func:`submit` checks the config, its data and the job options (``sbatch --test-only``) before a run
  row or folder exists, then creates the ``queued`` run (``backend = "slurm"``), writes its submission
  snapshot (:func:`core.runs.journal.write_snapshot`) and ``job.sbatch``, and submits it with ``sbatch``.
- The job runs ``python -m core.runs.supervise --journal RUN_DIR -- python -m workbench resume RUN
  --journal RUN_DIR --queued`` on its node: the trainer reports through the run's append-only journal,
  never runs.db (:mod:`core.runs.journal`), so the node may be another host sharing only the run folder.
- :func:`refresh` (called by every reader that may write, through
  :func:`core.runs.launcher.refresh_statuses`) reads the jobs' states from Slurm (``squeue``, then
  ``sacct`` for jobs squeue no longer lists), ingests the journals, and maps the state onto the run:
  PENDING -> queued (with Slurm's reason, e.g. ``Resources``), RUNNING -> running, COMPLETED -> what the
  trainer recorded, FAILED / OUT_OF_MEMORY / NODE_FAIL / BOOT_FAIL / DEADLINE -> crashed, CANCELLED ->
  stopped, TIMEOUT -> crashed (``TIMEOUT``), PREEMPTED -> queued when Slurm requeues it, else crashed.
  A final status the trainer wrote itself wins over the job's state, except that a job that died
  without one is crashed.
- Time limits and preemption: the job is submitted with ``--requeue --signal=B:USR1@<s>``. Slurm sends
  SIGUSR1 to the batch step ``s`` seconds before the limit; the supervisor passes it on, the trainer
  writes a step checkpoint and stops, and the supervisor marks the run ``queued`` and calls ``scontrol
  requeue``: the requeued job resumes from the checkpoint instead of starting over.
- :func:`cancel` is ``scancel``.

Slurm's own documentation: https://slurm.schedmd.com/sbatch.html (``--signal``, ``--requeue``),
https://slurm.schedmd.com/squeue.html (job state codes and reasons).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError, WorkbenchError
from core.runs import journal
from core.runs.store import ACTIVE, RunStore, Status, now_iso

log = logging.getLogger("esci.slurm")

#: Slurm job states after which the job never runs again (unless requeued)
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "REVOKED",
        "GONE",
    }
)
#: the ``job_state`` the workbench records for a job Slurm no longer knows (neither squeue nor sacct)
GONE = "GONE"
#: job states in which the job waits to start (again)
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING"})
#: job states in which the trainer may be running
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"})

#: the user config file with a ``[slurm]`` table of defaults (``$WORKBENCH_CONFIG`` overrides the path)
USER_CONFIG = Path("~/.config/esci-workbench/config.toml")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,:=+@-]*$")


def user_config_path() -> Path:
    """``$WORKBENCH_CONFIG``, else ``~/.config/esci-workbench/config.toml``."""
    return Path(os.environ.get("WORKBENCH_CONFIG") or USER_CONFIG).expanduser()


@dataclass(frozen=True)
class SlurmOptions:
    """The job's resources and limits (``sbatch`` options; None: Slurm's or the partition's default).

    Attributes:
        partition: ``--partition``.
        gpus: ``--gpus`` (GPUs for the job; with ``train.num_processes`` > 1, one rank per GPU).
        time: ``--time`` in Slurm's format: ``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``,
            ``days-hours[:minutes[:seconds]]`` (``"60"`` = one hour, ``"2:00:00"`` = two hours).
        account / qos: ``--account`` / ``--qos``.
        cpus_per_task: ``--cpus-per-task``; mem: ``--mem`` (e.g. ``"16G"``).
        requeue: submit with ``--requeue`` and requeue the job itself when signalled before its limit.
        signal_before_s: seconds before the time limit at which Slurm sends SIGUSR1 (``--signal``);
            Slurm may send it up to 60 s earlier than asked.
    """

    partition: str | None = None
    gpus: int | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    requeue: bool = True
    signal_before_s: int = 90

    def validate(self) -> None:
        """Refuse bad values before anything is submitted.

        Raises:
            ConfigError: one line naming the option and the problem.
        """
        if self.time is not None and not _TIME_RE.match(str(self.time)):
            raise ConfigError(f"slurm time {self.time!r}: not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])")
        for name in ("partition", "account", "qos", "mem"):
            value = getattr(self, name)
            if value is not None and (not str(value) or not _NAME_RE.match(str(value))):
                raise ConfigError(f"slurm {name} {value!r}: not a valid Slurm name")
        for name in ("gpus", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"slurm {name} {value!r}: must be an integer >= 1")
        if not isinstance(self.signal_before_s, int) or not 0 <= self.signal_before_s <= 65535:
            raise ConfigError(f"slurm signal_before_s {self.signal_before_s!r}: must be 0..65535 seconds")

    def sbatch_args(self) -> list[str]:
        """The ``#SBATCH`` options of these settings (argument form, e.g. ``["--time=60"]``)."""
        args = []
        for name, flag in (
            ("partition", "--partition"),
            ("gpus", "--gpus"),
            ("time", "--time"),
            ("account", "--account"),
            ("qos", "--qos"),
            ("cpus_per_task", "--cpus-per-task"),
            ("mem", "--mem"),
        ):
            value = getattr(self, name)
            if value is not None:
                args.append(f"{flag}={value}")
        if self.requeue:
            args += ["--requeue", f"--signal=B:USR1@{self.signal_before_s}"]
        else:
            args.append("--no-requeue")
        return args


def slurm_options(**given: Any) -> SlurmOptions:
    """The job options: the user config's ``[slurm]`` table (:func:`user_defaults`) overridden by the
    ``given`` values that are not None (the command line, the new-run dialog), validated.

    Raises:
        ConfigError: an unknown key in ``[slurm]``, or a bad value (one line).
    """
    names = {f.name for f in dataclasses.fields(SlurmOptions)}
    defaults = user_defaults()
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ConfigError(f"{user_config_path()}: [slurm]: unknown keys {unknown} (allowed: {sorted(names)})")
    opts = SlurmOptions(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    opts.validate()
    return opts


def user_defaults() -> dict[str, Any]:
    """The ``[slurm]`` table of the user config file ({} when there is no file).

    Raises:
        ConfigError: the file exists but is not valid TOML, or ``[slurm]`` is not a table.
    """
    path = user_config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc})") from None
    table = data.get("slurm", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [slurm] must be a table")
    return table


def require_slurm() -> None:
    """Raises WorkbenchError (one line) when ``sbatch``/``squeue``/``scancel`` are not on PATH."""
    missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        raise WorkbenchError(
            f"Slurm: {', '.join(missing)} not found on PATH (a Slurm login node is needed; "
            "to try it here: scripts/slurm-local.sh start)"
        )


def _slurm(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkbenchError(f"Slurm: `{' '.join(args[:2])}` failed ({exc})") from None


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "").removeprefix("sbatch: error: ")


def job_command(run_id: str, run_dir: Path, nproc: int = 1) -> list[str]:
    """The job's command line: the supervisor (``--journal``) around ``workbench resume RUN --journal
    RUN_DIR --queued`` (a first start and a requeued start alike: finished folds and step checkpoints
    are kept)."""
    trainer = [sys.executable, "-m", "workbench", "resume", run_id, "--journal", str(run_dir), "--queued"]
    cmd = [sys.executable, "-m", "core.runs.supervise", "--run-id", run_id, "--journal", str(run_dir)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return [*cmd, "--", *trainer]


def batch_script(run_id: str, name: str, run_dir: Path, opts: SlurmOptions, nproc: int = 1) -> str:
    """The ``job.sbatch`` text: ``#SBATCH`` options, then ``exec`` of :func:`job_command` (the supervisor
    replaces the batch shell, so ``--signal=B:USR1`` reaches it)."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={shlex.quote('wb-' + re.sub(r'[^A-Za-z0-9_.-]', '_', name or 'run'))}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --export=ALL",
        *(f"#SBATCH {a}" for a in opts.sbatch_args()),
        f"# esci-workbench run {run_id}: the trainer reports through {run_dir}/{journal.JOURNAL}",
        "export PYTHONUNBUFFERED=1",
        f"cd {shlex.quote(os.getcwd())}",
        "exec " + shlex.join(job_command(run_id, run_dir, nproc)),
        "",
    ]
    return "\n".join(lines)


def _sbatch(script: Path, test_only: bool = False) -> str:
    """``sbatch --parsable SCRIPT`` (``--test-only``: check only); returns the job id (or '').

    Raises:
        WorkbenchError: sbatch refused the job (its first error line).
    """
    args = ["sbatch", "--parsable", *(["--test-only"] if test_only else []), str(script)]
    out = _slurm(args)
    if out.returncode != 0:
        raise WorkbenchError(f"sbatch: {_first_line(out.stderr or out.stdout) or f'exit {out.returncode}'}")
    return "" if test_only else out.stdout.strip().split(";")[0]


def submit(cfg, store: RunStore, opts: SlurmOptions, config_path: str | Path | None = None) -> tuple[str, str]:
    """Submit a run of ``cfg`` as a Slurm batch job.

    Args:
        cfg: a :class:`core.config.RunConfig` or pre-training config (``train.num_processes`` ranks).
        store: runs.db on this host.
        opts: the job's options (user defaults already applied).
        config_path: the config file (recorded as the run's ``launch.yaml`` when None).

    Returns:
        (run_id, job_id).

    Raises:
        ConfigError / DataError: the config, its data or the options are refused (more processes than
        ``opts.gpus``); WorkbenchError: no
        Slurm, or ``sbatch --test-only`` refuses the job. In all these cases no run row or folder exists.
    """
    from core.config import save_config
    from core.runs.launcher import validate_any

    opts.validate()
    require_slurm()
    validate_any(cfg)
    nproc = int(getattr(cfg.train, "num_processes", 1) or 1)
    if opts.gpus is not None and nproc > opts.gpus:
        raise ConfigError(
            f"train.num_processes={nproc} with --gpus {opts.gpus}: one process per GPU (ask for {nproc} GPUs)"
        )
    with tempfile.TemporaryDirectory() as tmp:  # sbatch checks the options before anything exists
        probe = Path(tmp) / "job.sbatch"
        probe.write_text(batch_script("probe", cfg.name, Path(tmp), opts, nproc))
        _sbatch(probe, test_only=True)
    run_id = store.create_run(cfg.name, cfg.to_dict(), status=Status.QUEUED)
    run_dir = Path(cfg.output_dir).expanduser().resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    store.update_run(run_id, run_dir=str(run_dir), backend="slurm")
    save_config(cfg, run_dir / "launch.yaml")
    job_id = _submit_job(store, run_id, cfg.name, run_dir, opts, nproc)
    return run_id, job_id


def _submit_job(store: RunStore, run_id: str, name: str, run_dir: Path, opts: SlurmOptions, nproc: int) -> str:
    """Write the snapshot and ``job.sbatch`` and submit; a refusal marks the run failed (and raises)."""
    from core.runs.lifecycle import atomic_write

    store.update_run(run_id, status=Status.QUEUED, ended=None, exit_code=None, error=None)
    journal.write_snapshot(store, run_id, run_dir)
    script = atomic_write(
        run_dir / "job.sbatch", lambda p: p.write_text(batch_script(run_id, name, run_dir, opts, nproc))
    )
    try:
        job_id = _sbatch(script)
    except WorkbenchError as exc:
        store.update_run(run_id, status=Status.FAILED, ended=now_iso(), error=str(exc))
        raise
    store.update_run(run_id, job_id=job_id, job_state="PENDING", job_reason=None, node=None)
    store.add_artifact(run_id, "slurm", run_dir / f"slurm-{job_id}.out")
    log.info("run %s: Slurm job %s submitted", run_id, job_id)
    return job_id


def resubmit(store: RunStore, run_id: str, opts: SlurmOptions | None = None) -> str:
    """Submit a crashed/stopped/failed/partial Slurm run again under its id (``workbench resume
    --detach``): the new job resumes it from its finished folds and step checkpoints.

    Returns:
        The new job id.

    Raises:
        WorkbenchError: not a Slurm run, no Slurm, or sbatch refuses the job.
    """
    run = store.get_record(run_id)
    if run.backend != "slurm":
        raise WorkbenchError(f"{store.path}: run {run.id} is not a Slurm run")
    require_slurm()
    if opts is None:
        opts = options_of(run.run_dir)
    ingest_quietly(store, run.id, run.run_dir)
    nproc = int((run.config.get("train") or {}).get("num_processes", 1) or 1)
    return _submit_job(store, run.id, run.name, run.run_dir, opts, nproc)


def options_of(run_dir: Path | None) -> SlurmOptions:
    """The options of a run's last ``job.sbatch`` (a resubmission, a relaunch); defaults without one."""
    kw: dict[str, Any] = {"requeue": False}
    try:
        lines = (Path(run_dir) / "job.sbatch").read_text().splitlines()
    except (OSError, TypeError):
        return SlurmOptions()
    names = {
        "partition": "partition",
        "gpus": "gpus",
        "time": "time",
        "account": "account",
        "qos": "qos",
        "cpus-per-task": "cpus_per_task",
        "mem": "mem",
    }
    for ln in lines:
        m = re.match(r"#SBATCH --([a-z-]+)(?:=(.*))?$", ln.strip())
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if key in names:
            kw[names[key]] = int(value) if key in ("gpus", "cpus-per-task") else value
        elif key == "requeue":
            kw["requeue"] = True
        elif key == "signal" and value and "@" in value:
            kw["signal_before_s"] = int(value.rsplit("@", 1)[1])
    return SlurmOptions(**kw)


@dataclass(frozen=True)
class JobInfo:
    """A job as Slurm reports it: ``state`` (e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``), Slurm's
    ``reason`` (``Resources``, ``None``, ...), ``node`` (the node list, '' while pending) and
    ``exit_code`` (``"0:0"``: exit code and signal, when sacct knows it)."""

    state: str
    reason: str = ""
    node: str = ""
    exit_code: str = ""


def job_states(job_ids: list[str]) -> dict[str, JobInfo]:
    """The state of each job: ``squeue --states=all`` first, ``sacct`` for jobs squeue no longer lists
    (where accounting is configured). A job neither knows is absent.

    Raises:
        WorkbenchError: squeue cannot be run or fails for another reason than an unknown job id (no
            Slurm on PATH, the controller does not answer): nothing can be said about any job then.
    """
    out: dict[str, JobInfo] = {}
    if not job_ids:
        return out
    require_slurm()
    ids = [str(j) for j in job_ids]
    batches = [ids] if len(ids) > 1 else []
    batches += [[j] for j in ids]  # one job at a time when the batch names a job Slurm has purged
    for batch in batches:
        res = _slurm(["squeue", "-h", "--states=all", "-j", ",".join(batch), "-o", "%i|%T|%r|%N"])
        if res.returncode != 0:
            if "invalid job id" in (res.stderr or "").lower():
                continue  # purged from the controller's memory (MinJobAge): sacct below, or gone
            raise WorkbenchError(f"squeue: {_first_line(res.stderr) or f'exit {res.returncode}'}")
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4 and parts[0] in batch:
                out[parts[0]] = JobInfo(parts[1], parts[2], parts[3])
        if len(batch) > 1:
            break  # the batch call answered for every job it knows
    missing = [j for j in job_ids if str(j) not in out]
    if missing and shutil.which("sacct"):
        res = _slurm(
            ["sacct", "-n", "-P", "-X", "-j", ",".join(map(str, missing)), "-o", "JobID,State,Reason,NodeList,ExitCode"]
        )
        for line in res.stdout.splitlines() if res.returncode == 0 else []:
            parts = line.strip().split("|")
            if len(parts) == 5 and parts[0] in map(str, missing):
                out[parts[0]] = JobInfo(parts[1].split()[0], parts[2], parts[3], parts[4])
    return out


def run_fields(status: str, info: JobInfo | None, requeue: bool) -> dict[str, Any]:
    """The runs columns that a job's Slurm state implies for a run whose journal says ``status``.

    Args:
        status: the run's status after its journal was ingested.
        info: the job's state (None: Slurm no longer knows the job).
        requeue: the job was submitted with ``--requeue`` (a PREEMPTED job comes back).

    Returns:
        Columns to update: always ``job_state``/``job_reason``/``node`` (when known), plus
        ``status``/``ended``/``error`` where the job's state decides the run's status.
    """
    if info is None:  # GONE: stop asking Slurm about it
        if status in ACTIVE:
            return {
                "job_state": GONE,
                "status": Status.CRASHED,
                "ended": now_iso(),
                "error": "the Slurm job is gone (not in squeue or sacct) and the trainer recorded no end",
            }
        return {"job_state": GONE}
    fields: dict[str, Any] = {"job_state": info.state, "job_reason": info.reason, "node": info.node or None}
    state, reason = info.state, (info.reason if info.reason not in ("None", "") else "")
    if state in PENDING_STATES:
        if status != Status.QUEUED:  # requeued (preemption, node failure, time limit): waiting to run again
            fields.update(status=Status.QUEUED, ended=None)
        return fields
    if state in RUNNING_STATES:
        if status == Status.QUEUED:
            fields["status"] = Status.RUNNING
        return fields
    if state == "PREEMPTED" and requeue:
        fields.update(status=Status.QUEUED, ended=None)
    elif state.startswith("CANCELLED"):
        if status in ACTIVE:
            fields.update(status=Status.STOPPED, ended=now_iso())
    elif state == "COMPLETED":
        if status in ACTIVE:
            fields.update(
                status=Status.CRASHED,
                ended=now_iso(),
                error="Slurm job COMPLETED without a final status from the trainer",
            )
    elif status in ACTIVE or status == Status.STOPPED:
        # the job died (FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...); a trainer that got Slurm's
        # SIGTERM at the time limit wrote "stopped" itself, but nobody asked for that stop
        why = {"TIMEOUT": "time limit reached", "OUT_OF_MEMORY": "out of memory", "NODE_FAIL": "node failure"}
        error = f"Slurm job {state}" + (f": {why[state]}" if state in why else "") + (f" ({reason})" if reason else "")
        fields.update(status=Status.CRASHED, ended=now_iso(), error=error)
    return fields


def ingest_quietly(store: RunStore, run_id: str, run_dir: Path | None) -> int:
    """:func:`core.runs.journal.ingest`, logging (not raising) a journal it cannot read; returns the
    number of events applied."""
    if run_dir is None:
        return 0
    try:
        return journal.ingest(store, run_id, run_dir)
    except WorkbenchError as exc:
        log.warning("run %s: %s", run_id, exc)
        return 0


def refresh(store: RunStore) -> list[str]:
    """Bring the Slurm runs of ``store`` up to date: their job states from Slurm, then their journals
    ingested, then the status the two imply (:func:`run_fields`). Runs with a final status and a
    terminal job state are left alone. Without Slurm on PATH nothing is done.

    Returns:
        The ids of the runs whose row changed.
    """
    runs = store.watched_jobs("slurm", sorted(TERMINAL_STATES))
    if not runs or shutil.which("squeue") is None:
        return []
    try:
        states: dict[str, JobInfo] | None = job_states([r.job_id for r in runs])  # before the journals
    except WorkbenchError as exc:  # the controller is down or busy: ingest, decide nothing from Slurm
        log.warning("%s", exc)
        states = None
    changed = []
    for r in runs:
        events = ingest_quietly(store, r.id, r.run_dir)
        if states is None:
            changed += [r.id] if events else []
            continue
        row = store.get_run(r.id)
        info = states.get(str(r.job_id))
        requeue = info is not None and info.state == "PREEMPTED" and _requeues(r.run_dir)  # read only when it matters
        fields = {k: v for k, v in run_fields(row["status"], info, requeue).items() if row.get(k) != v}
        if fields:
            store.update_run(r.id, **fields)
        if fields or events:
            changed.append(r.id)
    return changed


def _requeues(run_dir: Path | None) -> bool:
    try:
        return "#SBATCH --requeue" in (run_dir / "job.sbatch").read_text()
    except (OSError, TypeError):
        return False


def cancel(store: RunStore, run_id: str, grace: float = 30.0) -> str:
    """Stop a Slurm run: ``scancel`` its job (Slurm sends SIGTERM, then SIGKILL after its KillWait),
    wait up to ``grace`` seconds for the job to end, ingest its journal.

    Returns:
        The run's status afterwards (``stopped`` unless it ended otherwise first).

    Raises:
        WorkbenchError: unknown run, not a Slurm run, or scancel failed.
    """
    run = store.get_record(run_id)
    if run.backend != "slurm" or not run.job_id:
        raise WorkbenchError(f"{store.path}: run {run.id} is not a Slurm job")
    require_slurm()
    res = _slurm(["scancel", str(run.job_id)])
    if res.returncode != 0:
        raise WorkbenchError(f"scancel {run.job_id}: {_first_line(res.stderr) or f'exit {res.returncode}'}")
    end = time.monotonic() + grace
    while time.monotonic() < end:
        info = job_states([run.job_id]).get(str(run.job_id))
        if info is None or info.state in TERMINAL_STATES:
            break
        time.sleep(0.5)
    refresh(store)
    row = store.get_run(run.id)
    if row["status"] in ACTIVE:  # Slurm has not reported the end yet: the stop was asked for
        store.update_run(run.id, status=Status.STOPPED, ended=now_iso())
    return store.get_run(run.id)["status"]
