"""What a monitor shows next to a run: GPUs (NVML), the run's process tree (psutil), its log, its ETA.

Every reader here is cheap and non-blocking enough to call from a UI worker thread every 1-2 s:
NVML queries are O(GPUs), psutil walks one process tree, :class:`LogTail` reads only the bytes
appended since its last call.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MIB = 1024 * 1024


@dataclass
class GpuStats:
    """One GPU at one instant.

    Attributes:
        index: NVML device index.
        name: marketing name (e.g. "NVIDIA H100 80GB HBM3").
        util: GPU utilisation over the last sample period, percent (0-100).
        mem_used, mem_total: device memory, MiB.
        temperature: core temperature, degrees Celsius.
        power: board power draw, watts (None where NVML cannot read it).
        processes: pid -> device memory used by that process, MiB.
    """

    index: int
    name: str
    util: float
    mem_used: float
    mem_total: float
    temperature: float
    power: float | None
    processes: dict[int, float] = field(default_factory=dict)


class GpuProbe:
    """GPU statistics through NVML (``nvidia-ml-py``); ``available`` is False without a driver.

    ``reason`` says why no GPU is shown (no NVML library, no driver, no device). The probe
    never raises after construction: a failed read returns ``[]`` and sets ``reason``.
    Source: NVIDIA Management Library API reference (``nvmlDeviceGetUtilizationRates``,
    ``nvmlDeviceGetMemoryInfo``, ``nvmlDeviceGetTemperature``, ``nvmlDeviceGetPowerUsage``,
    ``nvmlDeviceGetComputeRunningProcesses``).
    """

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            n = pynvml.nvmlDeviceGetCount()
            self.available = n > 0
            self.reason = "" if n else "NVML found no GPU"
        except ImportError:
            self.reason = "nvidia-ml-py not installed"
        except Exception as exc:  # noqa: BLE001 - pynvml.NVMLError and friends
            self.reason = "no NVIDIA driver" if "NotFound" in type(exc).__name__ else f"NVML: {type(exc).__name__}"

    def read(self) -> list[GpuStats]:
        """One :class:`GpuStats` per device (empty list without NVML)."""
        if not self.available or self._nvml is None:
            return []
        nv = self._nvml
        out = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                util = nv.nvmlDeviceGetUtilizationRates(h).gpu
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                temp = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                try:
                    power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                except nv.NVMLError:
                    power = None
                procs = {}
                try:
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                        procs[int(p.pid)] = (p.usedGpuMemory or 0) / MIB
                except nv.NVMLError:
                    pass
                out.append(GpuStats(i, name, float(util), mem.used / MIB, mem.total / MIB, float(temp), power, procs))
        except Exception as exc:  # noqa: BLE001
            self.reason = f"NVML read failed: {type(exc).__name__}"
            return []
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None
            self.available = False


def gpu_summary(gpus: Sequence[GpuStats], reason: str = "") -> str:
    """One line for a header: ``2x NVIDIA H100 | util 34% | mem 12.0/80.0 GiB`` or the reason."""
    if not gpus:
        return f"GPU: none ({reason})" if reason else "GPU: none"
    util = sum(g.util for g in gpus) / len(gpus)
    used = sum(g.mem_used for g in gpus) / 1024
    total = sum(g.mem_total for g in gpus) / 1024
    names = {g.name for g in gpus}
    name = names.pop() if len(names) == 1 else "GPUs"
    return f"GPU: {len(gpus)}x {name} | util {util:.0f}% | mem {used:.1f}/{total:.1f} GiB"


@dataclass
class TreeStats:
    """CPU and memory of a process and all its descendants.

    Attributes:
        pids: the live pids of the tree.
        cpu_percent: summed CPU use since the previous sample, percent of one core (200 = 2 cores).
        rss: summed resident memory, bytes.
    """

    pids: list[int]
    cpu_percent: float
    rss: int


class TreeSampler:
    """Samples a process tree's CPU and RSS; keeps ``psutil.Process`` objects between calls so
    ``cpu_percent`` measures the interval since the previous sample (the first sample reads 0)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, root: psutil.Process | None) -> TreeStats | None:
        """Stats of ``root`` and its descendants, or None if ``root`` is None or gone."""
        if root is None:
            return None
        try:
            members = [root] + root.children(recursive=True)
        except psutil.Error:
            return None
        cpu, rss, pids = 0.0, 0, []
        alive = {}
        for p in members:
            proc = self._procs.get(p.pid, p)
            try:
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
                pids.append(p.pid)
                alive[p.pid] = proc
            except psutil.Error:
                continue
        self._procs = alive
        return TreeStats(pids, cpu, rss)


def host_stats() -> tuple[float, float, float]:
    """(CPU percent of the whole machine since the last call, RAM used GiB, RAM total GiB)."""
    vm = psutil.virtual_memory()
    return psutil.cpu_percent(None), (vm.total - vm.available) / 1024**3, vm.total / 1024**3


class LogTail:
    """Follows a growing text file (``train.log``): each :meth:`poll` returns only the complete
    lines appended since the previous call, and ``lines`` keeps the last ``max_lines``.

    A file that shrinks (truncated or replaced) is read again from the start; a missing file
    yields no lines. Reads are bounded: at most ``max_bytes`` per call (the tail of a huge backlog).
    """

    def __init__(self, path: str | Path, max_lines: int = 500, max_bytes: int = 1 << 20):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.lines: deque[str] = deque(maxlen=max_lines)
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def poll(self) -> list[str]:
        """New complete lines (without newlines) since the last call; [] if none or no file."""
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset, self._partial = st.st_ino, 0, b""
        if st.st_size == self._offset:
            return []
        start = max(self._offset, st.st_size - self.max_bytes)
        skipped = start > self._offset
        try:
            with open(self.path, "rb") as fh:
                fh.seek(start)
                data = fh.read(st.st_size - start)
        except OSError:
            return []
        self._offset = start + len(data)
        if skipped:
            self._partial = b""
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        new = [c.decode("utf-8", "replace").rstrip("\r") for c in complete]
        self.lines.extend(new)
        return new


def estimate_eta(
    points: Sequence[tuple[float, float]], total_steps: float | None, window: int = 20
) -> tuple[float | None, float | None]:
    """Steps per second and seconds left, from ``(time, global_step)`` points.

    Args:
        points: (unix time s, global optimizer step) in time order (the trainer's
            ``progress/step`` metric).
        total_steps: the run's total optimizer steps over all folds (``progress/total_steps``).
        window: use only the last ``window`` points (the current speed, not the average since start).

    Returns:
        (steps per second, ETA in seconds); each None when it cannot be estimated yet
        (fewer than two points, no progress, or no total).
        ETA = (total - last step) / rate, with rate = (step_n - step_0) / (t_n - t_0) over the window.
    """
    pts = list(points)[-window:]
    if len(pts) < 2:
        return None, None
    (t0, s0), (t1, s1) = pts[0], pts[-1]
    if t1 <= t0 or s1 <= s0:
        return None, None
    rate = (s1 - s0) / (t1 - t0)
    if not total_steps:
        return rate, None
    return rate, max(0.0, (total_steps - s1) / rate)


def format_seconds(s: float | None) -> str:
    """``1:02:03`` / ``4:05`` / ``-``."""
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
