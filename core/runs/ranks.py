"""Data-parallel ranks of one run on one host: starting and watching them, and what a rank may do.

**Starting** (:class:`RankGroup`, used by :mod:`core.runs.supervise` ``--nproc N``). The supervisor
starts N copies of the trainer command, each with the environment contract of ``torchrun``:
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and
``MASTER_PORT`` (a free port), plus ``OMP_NUM_THREADS`` (the CPUs divided among the ranks, unless
set). ``accelerate.Accelerator()`` (and :func:`join_ranks`) then initialises ``torch.distributed``
from those variables itself: on CPU ``DistributedType.MULTI_CPU`` with the ``gloo`` backend, on
GPUs ``MULTI_GPU`` with ``nccl`` and one GPU per rank (``LOCAL_RANK``). ``torchrun
--nproc_per_node N -m workbench train CONFIG`` gives the same environment and works too (rank 0
creates the run and tells the others its id); the supervisor starts the ranks itself because it
must see each rank's exit: when one rank exits non-zero or is killed, the others are terminated
(SIGTERM, :data:`GRACE_S`, SIGKILL), so no rank is ever left waiting in a collective operation, and
the run's end names the rank that caused it (:func:`outcome_of`). With N = 1 nothing changes: one
child, no distributed variables.

**What a rank does.** Every rank trains on its shard of the batches and joins the collective
operations (gradients, the stop decision of :func:`core.runs.lifecycle.check_stop`, predictions);
only rank 0 writes runs.db, ``train.log`` and the artifacts. Non-main ranks get a
:class:`RankStore`: its reads pass through, its writes do nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

#: the exit code of a rank that stopped at a stop all ranks agreed on (``workbench`` exits 143 for a
#: :class:`core.runs.lifecycle.RunStopped` inside ranks): not a failure that overrides rank 0's record
STOPPED_EXIT = 143
#: seconds a rank gets to exit after SIGTERM (another rank failed) before SIGKILL
GRACE_S = 10.0
#: how long a collective operation may wait for the other ranks (rank 0 tokenizes a large
#: release alone while the others wait at a barrier; a vanished peer is noticed at once anyway)
COLLECTIVE_TIMEOUT = timedelta(hours=4)
#: store methods that write (a :class:`RunStore`'s, and those of a store with the same methods)
WRITE_METHODS = frozenset(
    {
        "create_run",
        "update_run",
        "log_metrics",
        "delete_metrics",
        "add_artifact",
        "set_journal_offset",
        "replace_label_issues",
        "add_label_decision",
        "put_ensemble",
    }
)


# ---------------------------------------------------------------------------------- who am I
def world_size() -> int:
    """The number of ranks of this run from ``WORLD_SIZE`` (1 when unset: a plain process)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    """This process's rank from ``RANK`` (0 when unset)."""
    return int(os.environ.get("RANK") or 0)


def is_main_rank() -> bool:
    """True for rank 0 (and for a plain process): the one that writes runs.db and the artifacts."""
    return rank() == 0


def in_ranks() -> bool:
    """True when this process is one of the ranks of a data-parallel run (started by the
    supervisor's :class:`RankGroup` or by ``torchrun``: ``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def distributed_world() -> int:
    """The size of the initialised ``torch.distributed`` group, 1 when there is none. Never imports
    torch (a plain process that has not loaded ``torch.distributed`` is a 1-process run)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


# ---------------------------------------------------------------------------------- starting ranks
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (bound to port 0 and released; rank 0's rendezvous store
    binds it moments later, as ``torchrun --standalone`` does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(base: dict[str, str], rank_: int, nproc: int, port: int) -> dict[str, str]:
    """``base`` plus the ``torchrun`` variables of rank ``rank_`` of ``nproc`` on this host (one
    node: local rank = rank) and ``OMP_NUM_THREADS`` = CPUs // nproc (at least 1) unless ``base``
    sets it (accelerate would otherwise pick physical cores // nproc itself)."""
    env = {
        **base,
        "RANK": str(rank_),
        "LOCAL_RANK": str(rank_),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


@dataclass(frozen=True)
class RankExit:
    """One rank's end: ``returncode`` as Popen reports it (``-N``: killed by signal N);
    ``terminated``: the supervisor itself sent it SIGTERM/SIGKILL because another rank failed."""

    rank: int
    pid: int
    returncode: int
    terminated: bool = False


@dataclass(frozen=True)
class Outcome:
    """How the trainer process(es) of a run ended, as the supervisor saw them.

    ``returncode``: the Popen code that decides the exit code (rank 0's, or the causing rank's;
    ``-N`` = signal N). ``stop_signal``: the first stop signal the supervisor received (None: no
    stop was asked for). ``rank``/``error``: set when a rank's failure overrides what rank 0
    recorded (a rank killed by a signal nobody asked for, or a non-zero rank that exited non-zero
    first); None when rank 0's own record decides.
    """

    returncode: int
    stop_signal: int | None = None
    rank: int | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """Shell convention: ``128 + N`` for a process killed by signal N, else the code itself."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def outcome_of(exits: list[RankExit], stop_signal: int | None = None) -> Outcome:
    """The run's end from its ranks' exits (in the order they were seen).

    - one rank (N = 1), or a stop was requested: rank 0's return code decides (its own record);
    - a rank killed by a signal the supervisor did not send: ``crashed``, naming rank and signal;
    - else a rank other than 0 that exited non-zero first (the others were then terminated):
      ``failed``, naming the rank and its code (:data:`STOPPED_EXIT`, a rank that stopped with
      the others, is no failure);
    - else (all 0, or rank 0 failed first): rank 0's record decides.

    Raises:
        ValueError: no exit of rank 0 in ``exits``.
    """
    first = next((e for e in exits if e.rank == 0), None)
    if first is None:
        raise ValueError("outcome_of: rank 0 has no exit")
    if len(exits) == 1 or stop_signal is not None:
        return Outcome(first.returncode, stop_signal)
    causes = [e for e in exits if e.returncode not in (0, STOPPED_EXIT) and not e.terminated]
    killed = [e for e in causes if e.returncode < 0]
    if killed:
        e = killed[0]
        code = 128 - e.returncode
        msg = f"rank {e.rank} (pid {e.pid}) was killed by {_signal_name(-e.returncode)} (exit {code})"
        return Outcome(e.returncode, None, e.rank, msg + "; the other ranks were stopped")
    if causes and causes[0].rank != 0:
        e = causes[0]
        msg = f"rank {e.rank} (pid {e.pid}) exited with code {e.returncode}; the other ranks were stopped"
        return Outcome(e.returncode, None, e.rank, msg)
    return Outcome(first.returncode)


@dataclass
class RankGroup:
    """The N trainer processes of a run started by its supervisor.

    ``start()`` starts them (N = 1: ``cmd`` with ``env`` unchanged; N > 1: each with
    :func:`rank_env` and one free ``MASTER_PORT``); ``send_signal()`` passes a signal on to every
    live rank; ``wait()`` returns when all have exited, terminating the others as soon as one
    exits non-zero or is killed (SIGTERM, ``grace`` seconds, SIGKILL).
    """

    cmd: list[str]
    nproc: int = 1
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    grace: float = GRACE_S
    procs: list[subprocess.Popen] = field(default_factory=list)
    terminated: set[int] = field(default_factory=set)

    def start(self) -> None:
        """Start the ranks (rank 0 first)."""
        if self.nproc == 1:
            self.procs.append(subprocess.Popen(self.cmd, env=self.env))
            return
        port = free_port()
        for r in range(self.nproc):
            self.procs.append(subprocess.Popen(self.cmd, env=rank_env(self.env, r, self.nproc, port)))

    def send_signal(self, signum: int) -> None:
        """``signum`` to every rank still running (a signal before :meth:`start` reaches nobody)."""
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    def wait(self, poll_s: float = 0.05) -> list[RankExit]:
        """Wait for every rank; returns their exits in the order seen. The first non-zero exit
        makes the others terminated (they are marked ``terminated`` in their :class:`RankExit`)."""
        if self.nproc == 1:  # exactly the 1-process supervisor: a blocking wait on the child
            p = self.procs[0]
            return [RankExit(0, p.pid, p.wait())]
        exits: dict[int, RankExit] = {}
        deadline: float | None = None
        while len(exits) < len(self.procs):
            for r, p in enumerate(self.procs):
                if r not in exits and p.poll() is not None:
                    exits[r] = RankExit(r, p.pid, p.returncode, terminated=r in self.terminated)
                    if p.returncode != 0 and deadline is None:
                        deadline = time.monotonic() + self.grace
                        self._terminate_others(signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline:
                self._terminate_others(signal.SIGKILL)
            if len(exits) < len(self.procs):
                time.sleep(poll_s)
        return list(exits.values())

    def _terminate_others(self, signum: int) -> None:
        for r, p in enumerate(self.procs):
            if p.returncode is None:
                self.terminated.add(r)
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)


# ---------------------------------------------------------------------------------- stores
class RankStore:
    """A store for a non-main rank: every read passes through to ``store``, every write
    (:data:`WRITE_METHODS`) does nothing and returns None. Generic over any object with
    :class:`core.runs.store.RunStore`'s methods (runs.db, or an append-only journal store)."""

    def __init__(self, store: Any):
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name in WRITE_METHODS:
            return _ignore
        return getattr(self._store, name)

    def transaction(self) -> contextlib.AbstractContextManager:
        """No write transaction (its writes do nothing anyway)."""
        return contextlib.nullcontext()

    @property
    def wrapped(self) -> Any:
        """The store whose reads this one passes through."""
        return self._store


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def rank_store(store: Any) -> Any:
    """``store`` on rank 0 (and in a plain process), a :class:`RankStore` over it on other ranks."""
    if is_main_rank() or isinstance(store, RankStore):
        return store
    return RankStore(store)


# ---------------------------------------------------------------------------------- collectives
def join_ranks(cpu: bool) -> None:
    """Initialise ``torch.distributed`` for this run when it has several ranks (``WORLD_SIZE`` > 1),
    through accelerate's ``PartialState`` (gloo on CPU, nccl on GPUs), with
    :data:`COLLECTIVE_TIMEOUT`. A no-op in a plain process or when already initialised."""
    if world_size() == 1 or distributed_world() > 1:
        return
    from accelerate import PartialState

    PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)


def leave_ranks() -> None:
    """Tear this rank's ``torch.distributed`` group down (nothing with one rank). Call it before the
    process exits: a gloo group left to the interpreter's exit now and then aborts the process
    (``terminate called without an active exception``, SIGABRT), which the supervisor would have
    to read as a crash."""
    if distributed_world() > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled); ``obj`` itself with one rank."""
    if distributed_world() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order, on every rank; ``[obj]`` with one rank."""
    n = distributed_world()
    if n == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank is here (nothing with one rank)."""
    if distributed_world() > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others after it (and read it)."""
    if distributed_world() == 1:
        yield
        return
    if not is_main_rank():
        barrier()
    yield
    if is_main_rank():
        barrier()


def _device():
    """Where a collective's tensors live: the rank's GPU under nccl, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (all_reduce MAX); ``flag`` with one
    rank. Every rank must call it at the same point."""
    if distributed_world() == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (all_reduce SUM / N); ``value`` with one rank."""
    n = distributed_world()
    if n == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item()) / n


def sum_over_ranks(array):
    """Element-wise sum over the ranks of a float32 numpy array of the same shape on every rank
    (all_reduce SUM); the array itself with one rank. Rows a rank did not compute are 0 there, so
    the sum assembles each rank's rows exactly (x + 0 = x)."""
    if distributed_world() == 1:
        return array
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(array.copy()).to(_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def broadcast_module(module) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank (nothing with one rank)."""
    if distributed_world() == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_gradients(params: list) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks, in one all_reduce of a flat
    float32 buffer (a rank without a gradient for a parameter adds zeros); a parameter no rank has a
    gradient for keeps ``grad=None`` (so AdamW skips it, as with one process). Every rank must call
    it with the same parameters in the same order; nothing happens with one rank.

    For a model that is not called through one ``forward`` (DDP's reducer needs that): the
    pre-training loop calls its backbone and heads separately."""
    n = distributed_world()
    if n == 1 or not params:
        return
    import torch
    import torch.distributed as dist

    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params] + [has]
    )
    dist.all_reduce(flat)
    offset = 0
    for p, count in zip(params, flat[-len(params) :].tolist()):
        size = p.numel()
        if count > 0:
            p.grad = (flat[offset : offset + size] / n).view_as(p).to(p.dtype)
        offset += size
