"""How long an EngineCore's output thread can wait for the GIL: a probe, any machine.

A vLLM EngineCore runs its steps on its main thread and sends each step's outputs from a
thread of its own (``process_output_sockets``). With async scheduling the main thread
hands a step's outputs to that thread and goes straight on to schedule and launch the
next step, in Python, until it blocks on the GPU. The sender, woken by the hand-over,
needs the GIL to encode and send: it gets it when the main thread blocks, or when
Python's switch interval (5 ms by default) makes the main thread give it up. So a first
token can sit in its core for up to the main thread's Python time per step, at most the
switch interval (yapd's ``engines.core_switch_interval_ms`` shortens it in its cores).

This program plays both threads: a main thread that waits ``--gpu-ms`` with the GIL
released (the GPU), hands a timestamp to a sender thread through ``queue.Queue``, then
runs ``--work-ms`` of Python (the next step's scheduling); the sender notes when it got
each hand-over. It prints, per work time and switch interval, the sender's wait p50 /
p95 in ms::

    python -m yapctl.gilprobe [--steps N] [--gpu-ms MS] [--work-ms 1,3,6] [--intervals-ms 5,1,0.5]

A program that prints figures, not a test: the suite checks it runs.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Sequence

from yapctl.bench import pct


def _spin(rounds: int) -> None:
    x = 0
    for i in range(rounds):
        x += i


def rounds_per_ms() -> float:
    """How many rounds of ``_spin`` take a millisecond here, the GIL to itself."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _spin(100_000)
        best = min(best, time.perf_counter() - t0)
    return 100_000 / (best * 1000)


def sender_waits(interval_s: float, work_ms: float, gpu_ms: float, steps: int,
                 per_ms: float) -> tuple[list[float], list[float]]:
    """Run ``steps`` steps under ``interval_s``: the sender's wait (ms) for each hand-over,
    and how long the main thread's Python of each step took (``work_ms`` of it alone)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    handed: queue.Queue[float | None] = queue.Queue()
    waits: list[float] = []

    def sender() -> None:
        while (at := handed.get()) is not None:
            waits.append((time.monotonic() - at) * 1000)
            sum(range(2000))  # encoding the outputs: a little Python of its own

    thread = threading.Thread(target=sender, name="sender")
    thread.start()
    gpu = threading.Event()  # never set: a wait that releases the GIL, as a CUDA sync does
    rounds = max(1, round(work_ms * per_ms))
    took: list[float] = []
    try:
        for _ in range(steps):
            gpu.wait(gpu_ms / 1000)
            handed.put(time.monotonic())
            t0 = time.perf_counter()
            _spin(rounds)  # the next step's scheduling, in Python
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        handed.put(None)
        thread.join()
        sys.setswitchinterval(before)
    return waits, took


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"numbers above 0 needed: {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="hand-overs per row")
    p.add_argument("--gpu-ms", type=float, default=4.0, help="the main thread's wait with the GIL released")
    p.add_argument("--work-ms", type=_floats, default=[1.0, 3.0, 6.0], help="its Python after each hand-over")
    p.add_argument("--intervals-ms", type=_floats, default=[5.0, 1.0, 0.5], help="switch intervals to run under")
    args = p.parse_args(argv)
    if args.steps < 1 or args.gpu_ms < 0:
        p.error("--steps must be >= 1 and --gpu-ms >= 0")
    per_ms = rounds_per_ms()
    print(f"{args.steps} steps a row, {args.gpu_ms:g} ms on the GPU each (the GIL released)")
    print("| main thread's Python a step, nominal ms | switch interval ms | the sender's wait p50 / p95 ms | "
          "the main thread's Python a step took p50 / p95 ms |")
    print("| --- | --- | --- | --- |")
    for work in args.work_ms:
        for interval in args.intervals_ms:
            waits, took = sender_waits(interval / 1000, work, args.gpu_ms, args.steps, per_ms)
            print(f"| {work:g} | {interval:g} | {pct(waits, 50)} / {pct(waits, 95)} | "
                  f"{pct(took, 50)} / {pct(took, 95)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
