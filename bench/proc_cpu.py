"""CPU seconds of benchmarked processes, read from /proc (Linux): one process, or a server and its children."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far (0 when it has exited)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == ppid:
                out.append(int(entry.name))
    return out


def parent_of(pid: int) -> int:
    fields = _stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return int(fields[1])


def tree_cpu_seconds(root: int) -> float:
    """CPU of ``root``, its live children, and its exited children (reaped: counted in cutime/cstime).

    For PostgreSQL: the postmaster and its backends.
    """
    fields = _stat(root)
    if fields is None:
        return 0.0
    own = sum(int(x) for x in fields[11:15]) / TICKS  # utime, stime, cutime, cstime
    return own + sum(cpu_seconds(p) for p in children_of(root))
