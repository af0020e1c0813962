"""
``within(awaitable, seconds)``: ``asyncio.wait_for`` without its lost cancellations.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives just
as the awaited result does (CPython gh-86296, fixed in 3.12): a Stop button or
a SIGTERM could then be lost, and a sweep ran on to the end. ``asyncio.timeout``
does not have that race; every deadline in qmpkit goes through it.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

__all__ = ["within"]

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """Await ``aw``; past ``seconds`` (None: no limit) cancel it and raise TimeoutError."""
    async with asyncio.timeout(seconds):
        return await aw
