"""What a forked EngineCore's malloc arena costs a step: a probe for any Linux machine.

A forked child's one thread is the thread that forked it, and so its malloc arena is that
thread's. yapd's engines start in worker threads (vLLM's start blocks), whose arenas are
glibc thread arenas; yapd's forked tool EngineCore took ~230 minor faults a turn on H200s
where spawned cores took ~1 (docs/bench/README.md, "A forked core's heap"). This program
forks a child the ways yapd can, each from a fresh process whose worker thread has first
built up its arena as a start does, and has the child make and drop a step's scratch
buffers (0.1, 0.3 and 1 MB) for a number of steps:

- ``worker``: forked by the worker thread (yapd's default);
- ``worker_steady``: the same, with yapd's steady heap (``engines.core_steady_heap``);
- ``by_main``: forked by the main thread's event loop for that worker
  (``engines.fork_from_main_thread``);
- ``main``: forked by the main thread itself, as a single-threaded program forks.

It prints each way's minor faults and microseconds a step (median over its rounds) as
JSON::

    python -m yapctl.heapprobe [--steps N] [--rounds R] [--torch] [--step buffers|mixed] [--busy-main]

``--torch`` imports torch first, as every EngineCore's parent has, ``--step mixed`` adds
small array operations to each step, ``--busy-main`` has the main thread build up an arena
of its own first (yapd's has, after its imports and while it serves): each changes how much
the arenas churn.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from yapd import forking

WAYS = ("worker", "worker_steady", "by_main", "main")
WARM_STEPS = 20


def build_up_arena() -> list[Any]:
    """This thread's malloc arena as a start leaves it: much allocated, a third of it freed
    again in between (the caller holds the rest until its child exists)."""
    kept: list[Any] = [bytearray(50_000) for _ in range(4000)] + [np.zeros(100_000) for _ in range(50)]
    del kept[::3]
    return kept


def step() -> None:
    """A step's scratch arrays, made and dropped. Whether a thread arena churns hangs on
    what else a step allocates (what comes to lie at the top of its newest heap): an import
    statement in here, or making this a closure, was enough to stop it on this project's
    CPU machine. So this is a scenario that churns, not a model of vLLM's step."""
    buffers = [np.ones(n // 8) for n in (100_000, 300_000, 1_000_000)]
    del buffers


def mixed_step() -> None:
    """step, with a few small array operations besides (index arithmetic of 4k tokens)."""
    buffers = [np.ones(n // 8) for n in (100_000, 300_000, 1_000_000)]
    positions = np.arange(4096)
    np.concatenate([positions, positions]).cumsum()
    del buffers


STEPS = {"buffers": step, "mixed": mixed_step}


def _child(report: Any, steps: int, kind: str) -> None:
    step = STEPS[kind]
    for _ in range(WARM_STEPS):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    took = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        took.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    report.send({"minflt_per_step": round(faults / steps, 2), "us_per_step": round(statistics.median(took) * 1e6, 1)})


def fork_one(way: str, steps: int, kind: str = "buffers") -> dict[str, Any]:
    """In this process: fork one child ``way`` and return what it measured, with where
    the fork was made."""
    fork = mp.get_context("fork")
    made: dict[str, Any] = {}

    def start(loop: asyncio.AbstractEventLoop | None) -> None:
        kept = build_up_arena()
        # Made in the starting thread, after its arena, as vLLM's start makes them.
        recv, send = fork.Pipe(duplex=False)
        proc = fork.Process(target=_child, args=(send, steps, kind))
        with forking.forks_on(loop) as on, \
                forking.child_settings({}, None, steady_heap=way == "worker_steady") as settings:
            proc.start()
        send.close()
        got = recv.recv() if recv.poll(120) else {"error": "the child said nothing"}
        proc.join(30)
        made.update(got, by_main=bool(on and on.forks), steady_heap=settings.steady_heap)
        del kept

    if way == "main":
        start(None)
    else:
        in_a_worker(start, by_main=way == "by_main")
    return made


def in_a_worker(start: Callable[[asyncio.AbstractEventLoop | None], None], by_main: bool) -> None:
    """Run ``start`` in a worker thread, as yapd runs vLLM's start. ``by_main``: with an
    event loop running on this thread meanwhile, handed to ``start`` (for its
    ``forking.forks_on``); else None."""
    if by_main:
        async def main() -> None:
            await asyncio.to_thread(start, asyncio.get_running_loop())

        asyncio.run(main())
    else:
        worker = threading.Thread(target=start, args=(None,))
        worker.start()
        worker.join()


@dataclass(frozen=True)
class Scenario:
    """What the forking process is like: ``torch`` imported (as every EngineCore's parent
    has), ``step`` (see STEPS), ``busy_main``: its main thread built up an arena of its own
    first, as yapd's has after its imports and while it serves (the arena a child forked
    by the main thread allocates from)."""

    torch: bool = False
    step: str = "buffers"
    busy_main: bool = False

    def flags(self) -> list[str]:
        return ["--step", self.step] + ["--torch"] * self.torch + ["--busy-main"] * self.busy_main


def measure(way: str, steps: int, scenario: Scenario = Scenario()) -> dict[str, Any]:
    """One child forked ``way`` from a fresh Python process (this one's arenas are not the
    scenario's): what it measured."""
    args = [sys.executable, "-m", "yapctl.heapprobe", "--one", way, "--steps", str(steps), *scenario.flags()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-2000:] or f"exit code {out.returncode}"}
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def probe(steps: int, rounds: int, scenario: Scenario) -> dict[str, Any]:
    runs = [{"way": way, **measure(way, steps, scenario)} for _ in range(rounds) for way in WAYS]
    medians: dict[str, dict[str, float]] = {}
    for way in WAYS:
        ok = [r for r in runs if r["way"] == way and "error" not in r]
        if ok:
            medians[way] = {key: round(statistics.median(r[key] for r in ok), 2)
                            for key in ("minflt_per_step", "us_per_step")}
    return {"steps": steps, "rounds": rounds, **dataclasses.asdict(scenario),
            "glibc_malloc": forking.steady_heap_supported(), "median": medians, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="measured steps per child")
    p.add_argument("--rounds", type=int, default=3, help="children of each way, taking turns")
    p.add_argument("--torch", action="store_true", help="import torch first, as an EngineCore's parent has")
    p.add_argument("--step", choices=sorted(STEPS), default="buffers",
                   help="buffers: 0.1, 0.3 and 1 MB made and dropped; mixed: with small array operations")
    p.add_argument("--busy-main", action="store_true",
                   help="the main thread builds up an arena of its own first, as yapd's has while it serves")
    p.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # one child, in this process
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    scenario = Scenario(args.torch, args.step, args.busy_main)
    if not args.one:
        print(json.dumps(probe(args.steps, args.rounds, scenario), indent=1))
        return 0
    if scenario.torch:
        import torch  # noqa: F401
    kept = build_up_arena() if scenario.busy_main else None
    print(json.dumps(fork_one(args.one, args.steps, scenario.step)))
    del kept
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
