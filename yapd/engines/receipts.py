"""When a vLLM engine's front end took each request's first output from its EngineCore.

A first token's way out, from the EngineCore's stamp (its step's outputs built) to the turn
holding it, crosses two processes: the core's side (its output thread, under the GIL it
shares with the core's next step, and the socket) and the front end's (the output
handler decoding and processing the batch, the turn's task waking on yapd's loop). At 16
sessions on an H100 the chat's took 19-22 ms p50 (docs/bench/README.md, runs aj-ak), more
than yapd's gap to `vllm serve`; a receipt stamped where the front end's output handler
takes the batch from the core's client splits it in two.

Stamped only while the engine keeps request stats (the stamps it splits exist only then).
"""

from __future__ import annotations

import time
from collections.abc import Iterable


class Receipts:
    """Requests sent and not yet answered, by the engine's internal id, and the time the
    first output of each answered one was taken (``time.monotonic()``, the core's clock
    too), by the caller's id until its stream reads it."""

    def __init__(self) -> None:
        self._waiting: dict[str, str] = {}  # internal id -> the caller's
        self._internal: dict[str, str] = {}  # the caller's id -> internal
        self._taken: dict[str, float] = {}  # the caller's id -> when its first output was taken

    def expect(self, internal: str, caller: str) -> None:
        """A request on its way to the core."""
        self._waiting[internal] = caller
        self._internal[caller] = internal

    def took(self, internal_ids: Iterable[str]) -> None:
        """A batch of outputs taken from the core now: the first of those still waited on."""
        if not self._waiting:
            return
        now = time.monotonic()
        for internal in internal_ids:
            caller = self._waiting.pop(internal, None)
            if caller is not None:
                self._internal.pop(caller, None)
                self._taken[caller] = now

    def first(self, caller: str) -> float | None:
        """When the request's first output was taken (once: the entry goes)."""
        return self._taken.pop(caller, None)

    def forget(self, caller: str) -> None:
        """The request's stream has ended, answered or not."""
        self._taken.pop(caller, None)
        internal = self._internal.pop(caller, None)
        if internal is not None:
            self._waiting.pop(internal, None)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._taken)
