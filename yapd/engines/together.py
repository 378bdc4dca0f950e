"""An engine's requests that leave together: a burst's sends held to the end of the loop's pass.

vLLM 0.26's EngineCore, idle, blocks for one request, takes whatever else is already in
its input queue and steps (``EngineCore._process_input_queue``); a request that reaches it
during that step waits for the step's end. A burst of turns (sessions in lockstep, a room
of callers answered at once) starts on yapd's event loop one turn after another, each
building its prompt before its request leaves, so the burst's requests reach the core
spread over the loop's pass: on the H100 at 16 sessions its first tokens came 5.5 to an
engine step (docs/bench/README.md, run ag). Held here, the requests of one pass leave back
to back once the pass is over (the loop's next round), in the order they were asked.

Measured on one H100 (runs ah and ai, docs/bench/README.md): no steady gain, and the chat
engine took each burst in two steps with its requests held or not; the core's own intake
splits a burst however it arrives. So turn.send_together is off by default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from yapd.turn import start_now

R = TypeVar("R")


class Together(Generic[R]):
    """Sends through ``send``: those of a request whose id was :meth:`hold`-ed wait for
    the end of the event loop's pass, the others leave at once.

    ``key`` says a request's id (the one given to :meth:`hold`); ``wanted`` is asked as a
    held request is about to leave: one the caller ended meanwhile (aborted by id before
    it ever left) stays behind, and its send returns as if it had left.
    """

    def __init__(self, send: Callable[[R], Awaitable[None]], key: Callable[[R], str],
                 wanted: Callable[[R], bool] = lambda request: True) -> None:
        self._send = send
        self._key = key
        self._wanted = wanted
        self._asked: set[str] = set()
        self._held: list[tuple[R, asyncio.Future[None]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def hold(self, request_id: str) -> None:
        """The next send of ``request_id`` waits for the end of the loop's pass."""
        self._asked.add(request_id)

    def forget(self, request_id: str) -> None:
        """``request_id`` will not be sent (its stream ended first): nothing to hold."""
        self._asked.discard(request_id)

    @property
    def held(self) -> int:
        """Requests waiting for the end of the pass."""
        return sum(not fut.done() for _, fut in self._held)

    async def send(self, request: R) -> None:
        """Send ``request``, now or with the pass's others. A cancel while it is held
        leaves it unsent; once its pass is over it may have left: the caller aborts it."""
        key = self._key(request)
        if key not in self._asked:
            await self._send(request)
            return
        self._asked.discard(key)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._held:
            # call_soon: after every handle already queued for this pass, i.e. after
            # the other turn starts that this pass's messages woke.
            asyncio.get_running_loop().call_soon(self._flush)
        self._held.append((request, fut))
        await fut

    def _flush(self) -> None:
        held, self._held = self._held, []
        for request, fut in held:
            if fut.done():  # its caller was cancelled while it was held: never sent
                continue
            if not self._wanted(request):
                fut.set_result(None)
                continue
            # Eager (Python 3.12): the send is on its way before the next one starts.
            task = start_now(self._send_one(request, fut))
            if not task.done():
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send_one(self, request: R, fut: asyncio.Future[None]) -> None:
        try:
            await self._send(request)
        except asyncio.CancelledError:  # the loop is closing
            fut.cancel()
            raise
        except Exception as exc:  # the caller's error, as an unheld send would raise it
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(None)
