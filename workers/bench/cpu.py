"""CPU time of the servers under test, per component, sampled from ``/proc`` while a scenario runs.

A figure is only a server's figure if the server was the one out of CPU:
each step records the share of a core every component used while
publishing (the load client reports its own), so the report can say what
bounded it: the server, the client, nginx, Redis or the nodes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parts = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += children.get(pid, [])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def core_jiffies() -> dict[int, tuple[int, int, int]]:
    """Per core, (busy, interrupts, total) clock ticks so far, from ``/proc/stat``.

    Busy is all but idle and iowait; interrupts (irq + softirq) are counted
    apart because on loopback the kernel's network work for the server's
    writes runs there, on the server's core, and belongs to no process.
    """
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in values[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], ticks[5] + ticks[6], sum(ticks))
    return out


def pin(pids: list[int], core: int) -> None:
    """Pin these processes and their descendants (nginx's workers, say) to one core."""
    for pid in descendants(pids):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {core})


class CpuSampler:
    """Samples each component's CPU seconds every ``period`` in a thread; ``share`` over a wall-clock window.

    ``groups`` maps a component's name to its root pids; their descendants
    are looked up once, when sampling starts (the servers measured here do
    not fork while running).
    """

    def __init__(self, groups: dict[str, list[int]], period: float = 0.25) -> None:
        self.groups = {name: descendants(pids) for name, pids in groups.items()}
        self.period = period
        self.samples: list[tuple[int, dict[str, float]]] = []
        self.cores: list[tuple[int, dict[int, tuple[int, int, int]]]] = []  # (time, core_jiffies()) per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        now = time.time_ns()
        self.samples.append((now, {n: sum(cpu_seconds(p) for p in pids) for n, pids in self.groups.items()}))
        self.cores.append((now, core_jiffies()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.period)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def share(self, start_ns: int, end_ns: int) -> dict[str, float]:
        """Each component's share of one core between the samples nearest ``start_ns`` and ``end_ns``."""
        inside = [s for s in self.samples if start_ns <= s[0] <= end_ns]
        if len(inside) < 2:
            return {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        seconds = (t1 - t0) / 1e9
        return {name: round((b[name] - a[name]) / seconds, 3) for name in self.groups}

    def core_busy(self, start_ns: int, end_ns: int) -> dict[int, tuple[float, float]]:
        """Per core, (busy, interrupts) shares between ``start_ns`` and ``end_ns`` (1.0: all the time).

        Busy counts every process and the kernel's interrupt work. On a
        shared machine other programs run on the cores too: a server core
        that was busy while neither the server nor the interrupts used it
        tells that the server was short of CPU, not of work.
        """
        inside = [c for c in self.cores if start_ns <= c[0] <= end_ns]
        if len(inside) < 2:
            return {}
        a, b = inside[0][1], inside[-1][1]
        out = {}
        for core in a.keys() & b.keys():
            total = max(b[core][2] - a[core][2], 1)
            out[core] = (round((b[core][0] - a[core][0]) / total, 3), round((b[core][1] - a[core][1]) / total, 3))
        return out
