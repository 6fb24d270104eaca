"""Waiting in tests: poll a condition, bounded, until it holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(cond: Callable[[], object], timeout_s: float = 5.0, step_s: float = 0.005) -> None:
    """Poll ``cond()`` every ``step_s`` until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step_s)
