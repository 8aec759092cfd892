"""CPU seconds of process trees, read from ``/proc``: where a run's two cores went."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of its reaped children)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    # After the name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based.
    ppid = int(fields[1])
    ticks = sum(int(f) for f in fields[11:15])
    return ppid, ticks / _TICK


def _table() -> dict[int, tuple[int, float]]:
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = found
    return table


def children(pid: int) -> list[int]:
    """The live children of ``pid``."""
    return [p for p, (ppid, _) in _table().items() if ppid == pid]


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root`` and every live descendant (and reaped ones)."""
    table = _table()
    return sum(table[p][1] for p in _members(root) if p in table)


def trees_cpu(roots: list[int]) -> float:
    """The CPU seconds of several process trees."""
    return sum(tree_cpu(r) for r in roots)


def peak_rss_kb(pid: int) -> int | None:
    """The peak resident set size of a live process (``VmHWM``), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _members(root: int) -> set[int]:
    table = _table()
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in members:
                members.add(pid)
                frontier.append(pid)
    return {p for p in members if p in table}


def sched(roots: list[int]) -> dict[str, float]:
    """Seconds the live processes of these trees spent running and waiting for a CPU.

    From ``/proc/PID/task/TID/schedstat`` (time on a CPU, time runnable on a run queue):
    on a machine shared with other work, the second is what the sharing cost. The rest of
    a worker's life it was blocked, waiting on Redis, Postgres or a timer.
    """
    running = waiting = 0.0
    for root in roots:
        for pid in _members(root):
            for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
                try:
                    on_cpu, on_queue, _ = task.read_text().split()
                except (OSError, ValueError):
                    continue
                running += int(on_cpu) / 1e9
                waiting += int(on_queue) / 1e9
    return {"running_s": round(running, 2), "runqueue_s": round(waiting, 2)}
