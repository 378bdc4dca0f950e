"""Messages between yapd and an engine host (yapd/engines/host.py) over a socketpair.

Each message is a pickled tuple behind its length. Both ends are asyncio protocols: a
write never blocks the event loop (the transport buffers it), and a read hands every
whole message in the bytes received to ``on_message`` at once, with no task switch per
message: a chat engine's deltas cross here one per token.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from typing import Any

_LEN = struct.Struct("!I")
# A message longer than this is a broken peer, not a request: a prompt is at most some
# tens of thousands of token ids.
MAX_MESSAGE = 64 << 20


class PipeClosed(ConnectionError):
    """The other end is gone."""


class MessageTooLarge(ValueError):
    """A message over MAX_MESSAGE, not sent: the other end would take it for a broken peer."""


class MessagePipe(asyncio.Protocol):
    """One end. ``on_message`` gets each message; ``on_closed`` once, with the reason
    (None: the other end closed it)."""

    def __init__(self, on_message: Callable[[tuple[Any, ...]], None],
                 on_closed: Callable[[Exception | None], None]) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._buf = bytearray()
        self._transport: Any = None  # asyncio's Transport, or uvloop's (not a subclass)
        self.closed = False
        self._told = False

    @classmethod
    async def open(cls, sock: Any, on_message: Callable[[tuple[Any, ...]], None],
                   on_closed: Callable[[Exception | None], None]) -> MessagePipe:
        loop = asyncio.get_running_loop()
        _, pipe = await loop.create_unix_connection(lambda: cls(on_message, on_closed), sock=sock)
        return pipe

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_MESSAGE:
                self._fail(PipeClosed(f"a message of {size} bytes: the other end is broken"))
                return
            end = _LEN.size + size
            if len(self._buf) < end:
                return
            try:
                # Only yapd and the host it started hold this socketpair's ends.
                msg = pickle.loads(self._buf[_LEN.size:end])  # noqa: S301
            except Exception as exc:  # any unpickling error means a broken peer
                self._fail(PipeClosed(f"an unreadable message: {type(exc).__name__}: {exc}"))
                return
            del self._buf[:end]
            self._on_message(msg)
            if self.closed:
                return

    def send(self, *msg: Any) -> None:
        if self.closed or self._transport is None:
            raise PipeClosed("the engine host's pipe is closed")
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            raise MessageTooLarge(f"a message of {len(data)} bytes (at most {MAX_MESSAGE})")
        self._transport.write(_LEN.pack(len(data)) + data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._tell(exc)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        self._buf.clear()
        self._tell(exc)  # before the abort's connection_lost, which has no error to say
        if self._transport is not None:
            self._transport.abort()

    def _tell(self, exc: Exception | None) -> None:
        if not self._told:
            self._told = True
            self._on_closed(exc)
