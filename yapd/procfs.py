"""Other processes as Linux's /proc shows them: a process's children, and the CPU time,
page faults, context switches and run-queue waits it has had (an EngineCore of vLLM's,
say); and the machine's CPU time, a virtual machine's stolen time with it."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (whose parentheses may hold
    spaces): state, ppid, ... (proc(5)'s third field on); None where the process is gone."""
    return _stat_fields(Path(f"/proc/{pid}/stat"))


def _stat_fields(path: Path) -> list[str] | None:
    # A process's stat, or one thread's (/proc/PID/task/TID/stat): the same fields.
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_s(fields: list[str]) -> float:
    """User and system time from stat fields (ticks, as seconds)."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(parent: int) -> dict[int, bytes]:
    """``parent``'s child processes, each with its command line (NUL-separated, as a
    process title set by setproctitle leaves it). A child in the middle of its exec shows
    an empty command line for that moment: a caller that must not miss one looks again."""
    out = {}
    for pid in _child_pids(parent):
        with contextlib.suppress(OSError):
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
    return out


def _child_pids(parent: int) -> set[int]:
    # Each thread's children list (Linux 3.5+ with CONFIG_PROC_CHILDREN, as distributions
    # build it) is a few reads; without it every process's parent is looked up in /proc,
    # thousands of reads on a busy host, each time a start or a stop looks for its cores.
    if not _has_children_lists():
        return _child_pids_by_scan(parent)
    out: set[int] = set()
    for task in Path(f"/proc/{parent}/task").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):  # a thread that ended meanwhile
            out.update(int(pid) for pid in (task / "children").read_text().split())
    return out


@functools.cache
def _has_children_lists() -> bool:
    return Path(f"/proc/self/task/{threading.get_native_id()}/children").exists()


def _child_pids_by_scan(parent: int) -> set[int]:
    out = set()
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(int(entry.name))
        with contextlib.suppress(ValueError, IndexError):
            if fields is not None and int(fields[1]) == parent:
                out.add(int(entry.name))
    return out


@dataclass(frozen=True)
class Counters:
    """What process ``pid`` has spent so far, every thread of it together: CPU seconds,
    page faults (minor: a page mapped without I/O, as after a copy-on-write or a freed and
    touched-again page; major: read from disk), and context switches (voluntary: it
    waited; involuntary: the scheduler took the CPU away). ``threads``: CPU seconds by
    thread name (threads of one name added up). ``runq_s``: seconds its threads were
    ready to run but waited for a CPU (the scheduler's run queue: CPUs short, or a
    virtual machine's CPUs held back by its host); ``threads_runq``: the same by name;
    ``migrations``: how often its threads moved to another CPU (0 where the kernel does
    not say: /proc/PID/task/TID/sched needs CONFIG_SCHED_DEBUG); ``threads_minflt``: minor
    faults by thread name (which thread touches pages anew: a forked EngineCore's main
    thread runs on the malloc arena of the parent thread that forked it, its later
    threads on arenas of their own)."""

    cpu_s: float
    minflt: int
    majflt: int
    vcsw: int
    ivcsw: int
    threads: dict[str, float] = field(default_factory=dict)
    runq_s: float = 0.0
    threads_runq: dict[str, float] = field(default_factory=dict)
    migrations: int = 0
    threads_minflt: dict[str, float] = field(default_factory=dict)
    rss_kb: int = 0  # resident memory when read (not a count: ``since`` keeps the later one)

    def since(self, before: Counters) -> Counters:
        return Counters(self.cpu_s - before.cpu_s, self.minflt - before.minflt, self.majflt - before.majflt,
                        self.vcsw - before.vcsw, self.ivcsw - before.ivcsw,
                        _minus(self.threads, before.threads), self.runq_s - before.runq_s,
                        _minus(self.threads_runq, before.threads_runq), self.migrations - before.migrations,
                        _minus(self.threads_minflt, before.threads_minflt), self.rss_kb)


def _minus(now: dict[str, float], was: dict[str, float]) -> dict[str, float]:
    return {n: now.get(n, 0.0) - was.get(n, 0.0) for n in set(now) | set(was)}


def counters(pid: int) -> Counters | None:
    """Process ``pid``'s :class:`Counters`; None where it is gone. Threads that ended
    before the call are in the process's CPU time and faults, not in its context
    switches or ``threads``."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    vcsw = ivcsw = migrations = 0
    threads: dict[str, float] = {}
    runq: dict[str, float] = {}
    minflt: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            vcsw += int(status["voluntary_ctxt_switches"])
            ivcsw += int(status["nonvoluntary_ctxt_switches"])
            name = status["Name"].strip()
            tfields = _stat_fields(task / "stat")
            if tfields is not None:
                threads[name] = threads.get(name, 0.0) + _cpu_s(tfields)
                minflt[name] = minflt.get(name, 0.0) + int(tfields[7])
            migrations += _migrations(task)
            # schedstat: ns on a CPU, ns waiting on a run queue, time slices
            runq[name] = runq.get(name, 0.0) + int((task / "schedstat").read_text().split()[1]) / 1e9
    try:
        return Counters(_cpu_s(fields), int(fields[7]), int(fields[9]), vcsw, ivcsw, threads,
                        sum(runq.values()), runq, migrations, minflt, _rss_kb(pid))
    except (IndexError, ValueError):
        return None


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _migrations(task: Path) -> int:
    try:
        with (task / "sched").open() as f:
            for line in f:
                if line.startswith("se.nr_migrations"):
                    return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class HostCpu:
    """The machine's CPU time so far, its CPUs added up (/proc/stat, seconds): ``busy_s``
    (user, nice, system, interrupts), ``idle_s`` (iowait too) and ``steal_s``: time a
    virtual machine's CPUs had work while its host ran something else (0 on bare metal)."""

    cpus: int
    busy_s: float
    idle_s: float
    steal_s: float

    def since(self, before: HostCpu) -> HostCpu:
        return HostCpu(self.cpus, self.busy_s - before.busy_s, self.idle_s - before.idle_s,
                       self.steal_s - before.steal_s)

    def shares(self) -> dict[str, float]:
        """Busy and steal time as percentages of all the CPUs' time."""
        total = self.busy_s + self.idle_s + self.steal_s
        if total <= 0:
            return {"busy_pct": 0.0, "steal_pct": 0.0}
        return {"busy_pct": round(100 * self.busy_s / total, 2), "steal_pct": round(100 * self.steal_s / total, 2)}


def host_cpu() -> HostCpu | None:
    """This machine's :class:`HostCpu`; None where /proc/stat cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        ticks = [int(v) for v in lines[0].split()[1:9]]
    except (OSError, IndexError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))
    hz = os.sysconf("SC_CLK_TCK")
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return HostCpu(cpus, (user + nice + system + irq + softirq) / hz, (idle + iowait) / hz, steal / hz)
