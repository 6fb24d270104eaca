"""Uplink admission: what the node sends, and which viewer streams it takes on.

A home uplink is the node's scarce resource. Every byte written to a viewer or a peer (HLS full
and fast path, LAN and libp2p blob serving) is counted here at the send side, into a sliding
window of ``window_s`` split in ten slots: counting is one slot comparison and an addition.

Theory of operation (``budget_bps`` > 0; 0 turns all of this off and admits everything)::

    a blob request of stream k (k = media id, client address, token)
        k admitted and seen within stream_idle_s ─► served by the node (always: no admitted
        │                                           stream starves, whatever the rate)
        ▼ a new stream
    no stream admitted: projected = rate      (an idle node takes one viewer if it has room)
    else: per = max(rate / admitted streams, stream_bps)    (what one stream costs)
          projected = rate + per + per * sum over streams admitted less than a window ago
                      of (1 - age / window_s)               (what they will send but did not yet)
        open:      projected <= budget               ─► admitted (remembered), else overflow
        overflow:  projected <= budget * resume_ratio ─► open again and admitted, else refused

A refused stream is not remembered: its next request is decided again, so it comes back to the
node once the uplink has room. The gap between ``budget`` and ``budget * resume_ratio`` is the
hysteresis that keeps the state from flapping at the edge. What a refusal means (a redirect to
the bucket, or 503) is the caller's business (:mod:`peerd.http.hls`). Bytes are counted once
sent, so a stream admitted a moment ago is not in the rate yet: the ``unseen`` term keeps a
burst of arrivals (a cold start, a premiere) from being admitted all at once, and
``stream_bps`` is what a stream is assumed to cost before any is measured. Streams unseen for
``stream_idle_s`` are forgotten (a player that stopped), at most ``max_streams`` are kept.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

SLOTS = 10

AdmissionState = Literal["off", "open", "overflow"]


@dataclass(frozen=True)
class UplinkReport:
    """The uplink as the heartbeat and the API report it (bytes/s)."""

    state: AdmissionState
    budget_bps: int
    send_bps: int
    spare_bps: int
    streams: int


@dataclass
class Uplink:
    """Send-rate meter and stream admission of one node (pure: ``now`` is passed in)."""

    budget_bps: float = 0.0
    window_s: float = 5.0
    resume_ratio: float = 0.8
    stream_idle_s: float = 60.0
    stream_bps: float = 0.0
    max_streams: int = 10_000
    overflow: bool = False
    _slot: int = 0
    _current: int = 0
    _past: list[tuple[int, int]] = field(default_factory=list)  # (slot, bytes), oldest first
    _streams: OrderedDict[Hashable, float] = field(default_factory=OrderedDict)
    _recent: deque[float] = field(default_factory=deque)  # admission times, last window

    # -- the meter -------------------------------------------------------------------------

    def sent(self, nbytes: int, now: float) -> None:
        """Count ``nbytes`` written to a viewer or a peer at ``now`` (seconds, monotonic)."""
        slot = int(now * SLOTS / self.window_s)
        if slot != self._slot:
            self._roll(slot)
        self._current += nbytes

    def _roll(self, slot: int) -> None:
        if self._current:
            self._past.append((self._slot, self._current))
        self._slot, self._current = slot, 0
        oldest = slot - SLOTS + 1
        while self._past and self._past[0][0] < oldest:
            self._past.pop(0)

    def rate(self, now: float) -> float:
        """Bytes/s sent over the last ``window_s``."""
        slot = int(now * SLOTS / self.window_s)
        if slot != self._slot:
            self._roll(slot)
        return (self._current + sum(n for _, n in self._past)) / self.window_s

    # -- admission -------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether a budget is set (admission is on)."""
        return self.budget_bps > 0

    def admit(self, key: Hashable, now: float) -> bool:
        """Whether stream ``key``'s request is served by the node (see the module doc)."""
        if self.budget_bps <= 0:
            return True
        seen = self._streams.get(key)
        if seen is not None and now - seen <= self.stream_idle_s:
            self._streams[key] = now
            self._streams.move_to_end(key)
            return True
        self._expire(now)
        if self._update(now):
            return False
        self._streams[key] = now
        self._recent.append(now)
        if len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)
        return True

    def _expire(self, now: float) -> None:
        cutoff = now - self.stream_idle_s
        streams = self._streams
        while streams:
            key, seen = next(iter(streams.items()))
            if seen >= cutoff:
                break
            del streams[key]

    def _update(self, now: float) -> bool:
        """Decide the state for a new stream now (True: overflow)."""
        rate = self.rate(now)
        limit = self.budget_bps * (self.resume_ratio if self.overflow else 1.0)
        n = len(self._streams)
        if not n:
            self.overflow = rate > limit
            return self.overflow
        per = max(rate / n, self.stream_bps)
        recent, window = self._recent, self.window_s
        while recent and recent[0] <= now - window:
            recent.popleft()
        unseen = per * sum(1.0 - (now - t) / window for t in recent)
        self.overflow = rate + unseen + per > limit
        return self.overflow

    def report(self, now: float) -> UplinkReport:
        """The current figures and state (a new stream would be refused in ``overflow``)."""
        rate = self.rate(now)
        if self.budget_bps <= 0:
            return UplinkReport("off", 0, int(rate), 0, 0)
        self._expire(now)
        overflow = self._update(now)
        return UplinkReport(
            "overflow" if overflow else "open",
            int(self.budget_bps),
            int(rate),
            max(0, int(self.budget_bps - rate)),
            len(self._streams),
        )
