"""
``within(awaitable, seconds)``: ``asyncio.wait_for`` without its lost cancellations.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives just
as the awaited result does (CPython gh-86296, fixed in 3.12): a Stop button or
a SIGTERM could then be lost, and a sweep ran on to the end. ``asyncio.timeout``
does not have that race; every deadline in qmpkit goes through it.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

__all__ = ["within", "ticks"]

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """Await ``aw``; past ``seconds`` (None: no limit) cancel it and raise TimeoutError."""
    async with asyncio.timeout(seconds):
        return await aw


async def ticks(hz: float) -> AsyncIterator[None]:
    """Yield ``hz`` times a second on the loop's clock. A tick that falls behind
    (the work took longer than the period) is skipped, never burst."""
    loop = asyncio.get_running_loop()
    period = 1.0 / hz
    next_t = loop.time()
    while True:
        yield
        next_t += period
        now = loop.time()
        if next_t < now:
            next_t = now
        await asyncio.sleep(next_t - now)
