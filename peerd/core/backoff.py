"""Retry delays: exponential backoff with jitter (pure; the caller passes the random draw)."""

from __future__ import annotations


def backoff_delay(failures: int, initial_s: float, max_s: float, draw: float) -> float:
    """Delay before retry number ``failures`` (1 = first retry).

    The ceiling doubles per failure up to ``max_s``; the delay is drawn uniformly from the upper
    half of it (``draw`` in [0, 1)), so many nodes that lost the coordinator together do not
    come back in lockstep, yet none retries much sooner than planned.
    """
    if failures < 1:
        return 0.0
    ceiling = min(max_s, initial_s * 2.0 ** min(failures - 1, 60))
    return ceiling * (0.5 + 0.5 * min(max(draw, 0.0), 1.0))
