"""Other processes as Linux's /proc shows them: a process's children and the CPU time it
has used (an EngineCore of vLLM's, say)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (whose parentheses may hold
    spaces): state, ppid, ... (proc(5)'s third field on); None where the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(parent: int) -> dict[int, bytes]:
    """``parent``'s child processes, each with its command line (NUL-separated, as a
    process title set by setproctitle leaves it). A child in the middle of its exec shows
    an empty command line for that moment: a caller that must not miss one looks again."""
    out = {}
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        fields = stat_fields(pid)
        with contextlib.suppress(OSError, ValueError, IndexError):
            if fields is not None and int(fields[1]) == parent:
                out[pid] = (entry / "cmdline").read_bytes()
    return out


def cpu_seconds(pid: int) -> float | None:
    """The CPU time (user and system, every thread) process ``pid`` has used so far; None
    where it is gone."""
    fields = stat_fields(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else None
    except (IndexError, ValueError):
        return None
