"""Waiting in tests: poll a condition, bounded, until it holds."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def until(cond: Callable[[], object], timeout_s: float = 5.0, step_s: float = 0.005) -> None:
    """Poll ``cond()`` every ``step_s`` until it is true; AssertionError after ``timeout_s``.

    ``cond`` may be a coroutine function: its result is awaited (an HTTP probe, a thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = cond()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step_s)
