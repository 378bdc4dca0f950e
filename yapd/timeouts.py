"""Awaiting with a time limit, without losing a cancel.

Before Python 3.12 ``asyncio.wait_for`` returns the awaited result, and drops the cancel,
when the task is cancelled in the loop round that result arrives in: a barge-in's cancel
of a turn blocked in a slow send, or a closed view's watcher, then ran on. 3.11's
``asyncio.timeout`` (on which 3.12 rebuilt ``wait_for``) ends cancelled; Python 3.10 has
only ``wait_for``, and keeps its flaw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``, raising ``TimeoutError`` (asyncio's, on 3.10) after ``timeout`` s."""
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(aw, timeout)
    async with asyncio.timeout(timeout):
        return await aw
