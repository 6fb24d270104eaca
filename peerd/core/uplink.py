"""Uplink admission: what the node sends, and which viewer streams it takes on.

A home uplink is the node's scarce resource. Every byte written to a viewer or a remote peer
(HLS full and fast path, WHEP sessions, libp2p blob serving; not LAN peers, whose bytes never
leave the home's network) is counted here at the send side, into
a sliding window of ``window_s`` split in ten slots: counting is one slot comparison and an
addition.

Theory of operation (``budget_bps`` > 0; 0 turns all of this off and admits everything)::

    a blob request of stream k (k = media id, client address, token)
        k admitted and seen within stream_idle_s ─► served by the node (always: no admitted
        │                                           stream starves, whatever the rate)
        ▼ a new stream
    no stream admitted: projected = rate      (an idle node takes one viewer if it has room)
    else: per = the stream's bit rate when the caller knows it (its media's), else
                max(rate / admitted streams, stream_bps)   (what one stream costs)
          projected = max(rate, committed) + unseen + per
            committed: sum of the bit rates of known-rate streams seen within window_s
                       (what they go on sending, though a player filling its buffer sent
                       more than that in its first seconds, and one between segments less)
            unseen:    sum over unknown-rate streams admitted less than a window ago of
                       their per * (1 - age / window_s)  (what they will send but did not yet)
        open:      projected <= budget               ─► admitted (remembered), else overflow
        overflow:  projected <= budget * resume_ratio ─► open again and admitted, else refused
        a stream the bucket can take (spill): admitted only while
                   projected <= budget * resume_ratio (the rest is kept for streams only
                   the node can serve), whatever the state
        not admitted, and the bucket cannot take it (no spill: the bucket lacks the media,
        is unreachable, or there is none): admitted at its lowest rendition (``floor_bps``)
                   while floors + floor_bps <= budget, else refused
            floors: sum of the lowest-rendition bit rates of the streams seen within two
                    windows (a stream of unknown floor: its bit rate, else ``stream_bps``)

A stream the bucket can serve costs the node nothing to turn away (a redirect), one it cannot
costs its viewer a wait (503 + ``Retry-After``): so the last ``1 - resume_ratio`` of the budget
goes to the second kind only. :meth:`Uplink.admitted` answers for streams already admitted
without deciding (a caller that must look up whether the bucket holds the media first).

A viewer refused for want of room has nowhere to go but a wait (503) when the bucket cannot
take it (an R2 outage at the peak): the node then takes it at the cost of its media's lowest
rendition rather than its top one, as long as every stream it serves could still play at its
own lowest rendition (``floors`` within the budget). Admitted streams are never cut: those
playing higher renditions get less of the uplink, and their players' ABR steps down, to their
floor at worst; the newcomer's player starts at the lowest rendition (the HLS master lists it
first, :mod:`peerd.http.hls`) and steps up only when its share allows. Streams unseen for two
windows do not count among the floors: a playing stream fetches a segment at least every
segment duration, and those still admitted but silent (a paused or departed player) would
otherwise keep the floor room for ``stream_idle_s``. :attr:`UplinkReport.floor_spare_bps` is
the room left at lowest renditions, for the coordinator.

A refused stream is not remembered: its next request is decided again, so it comes back to the
node once the uplink has room. The gap between ``budget`` and ``budget * resume_ratio`` is the
hysteresis that keeps the state from flapping at the edge. What a refusal means (a redirect to
the bucket, or 503) is the caller's business (:mod:`peerd.http.hls`). Bytes are counted once
sent, so a stream admitted a moment ago is not in the rate yet: the ``committed`` and
``unseen`` terms keep a burst of arrivals (a cold start, a premiere) from being admitted all at
once, and ``stream_bps`` is what a stream of unknown bit rate is assumed to cost before any is
measured. A stream's own bit rate is the better guess: a node sending 0.8 Mbit/s streams under
a 6 Mbit/s budget that assumed 3 Mbit/s each turned viewers away with half its uplink idle, and
one that added the new streams' bit rates on top of a rate already holding their first
segments (players fetch a buffer ahead at once) did so with a third of it idle. Streams unseen
for ``stream_idle_s`` are forgotten (a player that stopped), at most ``max_streams`` are kept. A
stream the node knows is open (a WHEP session) is held (:meth:`Uplink.hold`) until it ends
(:meth:`Uplink.release`), whatever the rate.

Whether the node can send a stream over its budget to the bucket at all (:func:`can_spill`) is
reported beside the admission state, so a coordinator does not send viewers to a node in
overflow that could only refuse them (its class B budget spent: no HEAD, so no redirect).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

SLOTS = 10


def can_spill(links: bool, viewer_requests_left: int, bucket_down: bool) -> bool:
    """Whether a stream over the budget can be redirected to the bucket now, as far as the node
    knows: it can give viewers links (R2 configured; with SSE-C only through a public domain),
    the bucket did not fail a redirect within its ``Retry-After``, and the month's class B
    budget leaves the ``viewer`` purpose at least the HEAD that precedes a redirect."""
    return links and not bucket_down and viewer_requests_left >= 1


AdmissionState = Literal["off", "open", "overflow"]


@dataclass(frozen=True)
class UplinkReport:
    """The uplink as the heartbeat and the API report it (bytes/s)."""

    state: AdmissionState
    budget_bps: int
    send_bps: int
    spare_bps: int
    streams: int
    floor_spare_bps: int = 0  # budget minus the floors: room for streams at their lowest rendition


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
    # stream -> (last seen, bit rate, lowest-rendition bit rate; bytes/s, 0 if unknown), least
    # recently seen first
    _streams: OrderedDict[Hashable, tuple[float, float, float]] = field(default_factory=OrderedDict)
    _last_cost: float = 0.0  # the bit rate of the last stream admitted (0: unknown)
    # (when, per) of unknown-rate streams admitted within the last window
    _recent: deque[tuple[float, float]] = field(default_factory=deque)

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

    def admitted(self, key: Hashable, now: float) -> bool:
        """Whether ``key`` is an admitted stream (then seen at ``now``), or admission is off."""
        if self.budget_bps <= 0:
            return True
        known = self._streams.get(key)
        if known is not None and now - known[0] <= self.stream_idle_s:
            self._streams[key] = (now, known[1], known[2])
            self._streams.move_to_end(key)
            return True
        return False

    def admit(
        self,
        key: Hashable,
        now: float,
        cost_bps: float = 0.0,
        spill: bool = False,
        floor_bps: float = 0.0,
    ) -> bool:
        """Whether stream ``key``'s request is served by the node (see the module doc);
        ``cost_bps``: what the stream will send (its media's bit rate, bytes/s), 0 if unknown;
        ``spill``: the bucket can serve it instead; ``floor_bps``: what it sends at its lowest
        rendition (0: unknown, never admitted at its floor)."""
        if self.admitted(key, now):
            return True
        self._expire(now)
        per, projected = self._update(now, cost_bps)
        if not self.overflow and not (spill and projected > self.budget_bps * self.resume_ratio):
            self._remember(key, now, cost_bps, floor_bps)
            self._last_cost = cost_bps
            if cost_bps <= 0:
                self._recent.append((now, per))
            return True
        if spill or floor_bps <= 0 or self.floors(now) + floor_bps > self.budget_bps:
            return False
        # It starts at its lowest rendition: that is what it is counted to send.
        self._remember(key, now, floor_bps, floor_bps)
        return True

    def takes(self, now: float, cost_bps: float) -> bool:
        """Whether a new stream costing ``cost_bps`` would be admitted at that cost now (not
        only at its floor), the bucket aside; always with admission off."""
        if self.budget_bps <= 0:
            return True
        self._expire(now)
        self._update(now, cost_bps)
        return not self.overflow

    def floors(self, now: float) -> float:
        """The lowest-rendition bit rates of the streams seen within two windows (bytes/s)."""
        total = 0.0
        for seen, cost, floor in reversed(self._streams.values()):  # most recently seen first
            if seen < now - 2 * self.window_s:
                break
            total += floor or cost or self.stream_bps
        return total

    def _remember(self, key: Hashable, now: float, cost_bps: float, floor_bps: float) -> None:
        self._streams[key] = (now, cost_bps, floor_bps)
        self._streams.move_to_end(key)
        if len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)

    def hold(self, key: Hashable, now: float) -> None:
        """Keep stream ``key`` admitted at ``now`` without deciding again (a stream the node
        already serves, such as a WHEP session, stays admitted as long as it is open)."""
        if self.budget_bps > 0:
            known = self._streams.get(key)
            cost, floor = (known[1], known[2]) if known is not None else (0.0, 0.0)
            self._streams[key] = (now, cost, floor)
            self._streams.move_to_end(key)

    def release(self, key: Hashable) -> None:
        """Forget stream ``key`` (it ended): it no longer counts among the admitted streams."""
        self._streams.pop(key, None)

    def _expire(self, now: float) -> None:
        cutoff = now - self.stream_idle_s
        streams = self._streams
        while streams:
            key, (seen, _, _) = next(iter(streams.items()))
            if seen >= cutoff:
                break
            del streams[key]

    def _update(self, now: float, cost_bps: float = 0.0) -> tuple[float, float]:
        """Decide the state (:attr:`overflow`) for a new stream costing ``cost_bps`` (0:
        unknown) now; returns what that stream is taken to cost and the projected rate."""
        rate = self.rate(now)
        limit = self.budget_bps * (self.resume_ratio if self.overflow else 1.0)
        n = len(self._streams)
        per = cost_bps if cost_bps > 0 else max(rate / max(n, 1), self.stream_bps)
        if not n:
            self.overflow = rate > limit
            return per, rate
        recent, window = self._recent, self.window_s
        while recent and recent[0][0] <= now - window:
            recent.popleft()
        unseen = sum(c * (1.0 - (now - t) / window) for t, c in recent)
        committed = 0.0
        for seen, cost, _ in reversed(self._streams.values()):  # most recently seen first
            if seen <= now - window:
                break
            committed += cost
        projected = max(rate, committed) + unseen + per
        self.overflow = projected > limit
        return per, projected

    def report(self, now: float) -> UplinkReport:
        """The current figures and state (a new stream like the last one admitted would be
        refused in ``overflow``)."""
        rate = self.rate(now)
        if self.budget_bps <= 0:
            return UplinkReport("off", 0, int(rate), 0, 0)
        self._expire(now)
        self._update(now, self._last_cost)
        return UplinkReport(
            "overflow" if self.overflow else "open",
            int(self.budget_bps),
            int(rate),
            max(0, int(self.budget_bps - rate)),
            len(self._streams),
            max(0, int(self.budget_bps - self.floors(now))),
        )
