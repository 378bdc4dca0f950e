"""A level's turns and what is watched over them: CPU and faults per process, profiles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from yapctl import pyspy
from yapctl.gpubench.runsetup import ROUNDS, Setup, turns_for
from yapd.procfs import counters, host_cpu

T = TypeVar("T")


# --profile-level: the window (after the level's warm-up turns) and the functions kept (enough to
# see a turn start's parts: prompts, vLLM's add_request, the frames).
PROFILE_AFTER_S = 3.0
PROFILE_S = 10.0
PROFILE_TOP = 80


def gc_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """yapd's collections and the ms spent in them, by generation, from one /status
    ``gc_pauses`` to a later one: a level's own (the counts there run from yapd's start)."""
    return {key: {g: round(after[key][g] - before[key].get(g, 0), 2) for g in after[key]}
            for key in ("collections", "ms")}


class CpuMeter:
    """The CPU time named processes use over a level, per turn: whether an EngineCore of
    yapd's spends more of it on a turn than raw's does (the front end's too); and, for
    where a slower one loses it, its page faults, context switches and busiest threads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: counters(pid) for name, pid in pids.items()}
        self.host_before = host_cpu()

    def per_turn(self, turns: int) -> dict[str, dict[str, Any]]:
        """Per process and turn: CPU ms, minor and major faults, voluntary and involuntary
        context switches, ms its threads were ready but waited for a CPU, moves of its
        threads between CPUs; the CPU ms and waits of its busiest threads (by name), and
        the minor faults of the threads that take most; and its resident MB at the end."""
        out = {}
        for name, pid in self.pids.items():
            was, now = self.before[name], counters(pid)
            if was is None or now is None or not turns:
                continue
            d = now.since(was)
            busiest = [t for t, v in sorted(d.threads.items(), key=lambda kv: -kv[1])[:6] if v > 0]
            out[name] = {"cpu_ms": round(d.cpu_s * 1000 / turns, 2), "minflt": round(d.minflt / turns, 1),
                         "majflt": round(d.majflt / turns, 2), "vcsw": round(d.vcsw / turns, 1),
                         "ivcsw": round(d.ivcsw / turns, 1), "runq_ms": round(d.runq_s * 1000 / turns, 3),
                         "migrations": round(d.migrations / turns, 1),
                         "threads_ms": {t: round(d.threads[t] * 1000 / turns, 2) for t in busiest},
                         "threads_runq_ms": {t: round(d.threads_runq.get(t, 0.0) * 1000 / turns, 3)
                                             for t in busiest},
                         # which threads take the faults (a forked tool core: ~230 a turn)
                         "threads_minflt": {t: round(n / turns, 1) for t, n in
                                            sorted(d.threads_minflt.items(), key=lambda kv: -kv[1])[:4] if n > 0},
                         # resident memory at the level's end (what a malloc setting may cost)
                         "rss_mb": round(d.rss_kb / 1024, 1)}
        return out

    def host(self) -> dict[str, Any]:
        """The machine's CPUs over the level: how many, the share of their time busy and
        the share stolen by a virtual machine's host; empty where /proc/stat is unread."""
        now = host_cpu()
        if self.host_before is None or now is None:
            return {}
        return {"cpus": now.cpus, **now.since(self.host_before).shares()}


@contextlib.contextmanager
def watching(s: Setup, c: int, pids: dict[str, int]) -> Iterator[Callable[[int], dict[str, Any]]]:
    """A level's watch on ``pids``: /proc's counters over it and, at --pyspy-level,
    py-spy's samples. Yields what gives the level's figures from its turns (warm-up ones
    included), to call once the block is left (the profiles are read then)."""
    meter = CpuMeter(pids)
    spied: dict[str, Any] = {}

    def figures(turns: int) -> dict[str, Any]:
        return {**proc_figures(meter, turns), **({"pyspy": spied, "pyspy_native": s.pyspy_native} if spied else {})}

    with pyspy.profiled(pids if c == s.pyspy_level else {}, s.work / "pyspy", spied, s.pyspy_native):
        yield figures


def proc_figures(meter: CpuMeter, turns: int) -> dict[str, Any]:
    """A level's figures from ``meter``: CPU ms per turn by process, and the rest of
    what /proc counted (:meth:`CpuMeter.per_turn`)."""
    proc = meter.per_turn(turns)
    return {"cpu_ms_per_turn": {name: p["cpu_ms"] for name, p in proc.items()}, "proc_per_turn": proc,
            **({"host_cpu": host} if (host := meter.host()) else {})}


async def at_level(c: int, one: Callable[[int], Awaitable[T]], rounds: int = ROUNDS) -> list[T]:
    """``c`` warm-up turns (-1) side by side, then ``turns_for(c, rounds)`` turns over
    ``c`` workers, as yapd's bench runs a level: the results of the timed turns."""
    await asyncio.gather(*(one(-1) for _ in range(c)))
    counter = iter(range(turns_for(c, rounds)))
    rows: list[T] = []

    async def worker() -> None:
        for i in counter:
            rows.append(await one(i))

    await asyncio.gather(*(worker() for _ in range(c)))
    return rows


async def profiled(level: Awaitable[Any], profile: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``profile()``'s answer, asked ``PROFILE_AFTER_S`` into ``level`` (after its warm-up
    turns), once the level is done; a failed level takes the window down with it."""

    async def window() -> dict[str, Any]:
        await asyncio.sleep(PROFILE_AFTER_S)
        return await profile()

    task = asyncio.ensure_future(window())
    try:
        await level
    except BaseException:
        task.cancel()
        raise
    return await task
