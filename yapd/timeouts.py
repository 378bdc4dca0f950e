"""Awaiting with a time limit, in the calling task, without losing a cancel.

Before Python 3.12 ``asyncio.wait_for`` runs what it awaits in a task of its own (an
engine request made there leaves a loop round later), and it returns the result, dropping
the cancel, when the task is cancelled in the loop round that result arrives in: a
barge-in's cancel of a turn blocked in a slow send, or a closed view's watcher, ran on.
3.11's ``asyncio.timeout`` (on which 3.12 rebuilt ``wait_for``) has neither flaw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``, raising ``TimeoutError`` (asyncio's, on 3.10) after ``timeout`` s
    (None: no limit)."""
    if hasattr(asyncio, "timeout"):  # Python 3.11+
        async with asyncio.timeout(timeout):
            return await aw
    if timeout is None:
        return await aw
    # Python 3.10: the same, by hand: cancel this task when the time is up.
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await aw
    except asyncio.CancelledError:
        if expired:
            raise asyncio.TimeoutError from None
        raise
    finally:
        handle.cancel()


async def polled(condition: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Wait until ``condition()`` holds (True) or ``timeout`` s pass (False), looking every
    ``every`` s, for states nothing announces (requests, turns across sessions); it is
    looked at once at least, however little time is given."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)
    return True
