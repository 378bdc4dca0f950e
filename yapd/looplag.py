"""How late the event loop runs what is due.

Every turn's messages, every token frame and both engines' output handlers share one
event loop: whatever delays it is added to a reply's first token and to its token gaps.
A timer that should fire every ``interval`` measures by how much it fires late.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any


class LoopLag:
    def __init__(self, interval: float = 0.05, window_s: float = 20.0) -> None:
        self.interval = interval
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, float]] = collections.deque()  # (when, lag) in s

    async def run(self, observe: Callable[[float], None]) -> None:
        while True:
            # perf_counter, not loop.time(): uvloop's clock is cached per iteration
            # and counts in whole milliseconds.
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            lag = max(0.0, now - t0 - self.interval)
            self.add(now, lag)
            observe(lag)

    def add(self, when: float, lag: float) -> None:
        self.samples.append((when, lag))
        # By time, not by count: a loop running late takes fewer samples a second.
        while self.samples and self.samples[0][0] < when - self.window_s:
            self.samples.popleft()

    def snapshot(self, window_s: float | None = None) -> dict[str, Any]:
        """p50 / p99 / max in ms over the last ``window_s`` seconds (at most the window
        kept; all of it by default): a caller that timed something shorter, as a benchmark
        level, asks for its own span and gets nothing from before it."""
        span_s = self.window_s if window_s is None else max(0.0, min(window_s, self.window_s))
        last = self.samples[-1][0] if self.samples else 0.0
        kept = [(when, lag) for when, lag in self.samples if when >= last - span_s]
        if not kept:
            return {"samples": 0, "window_s": 0.0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        xs = sorted(lag for _, lag in kept)

        def at(q: float) -> float:
            return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2)

        span = kept[-1][0] - kept[0][0] + self.interval
        return {"samples": len(xs), "window_s": round(min(span, span_s), 1), "p50_ms": at(0.5),
                "p99_ms": at(0.99), "max_ms": round(xs[-1] * 1000, 2)}
