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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        now = time.time_ns()
        self.samples.append((now, {n: sum(cpu_seconds(p) for p in pids) for n, pids in self.groups.items()}))

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
