"""Hand-off of a live input to Cloudflare Stream: when to start restreaming it, when to stop (pure).

Theory of operation
-------------------
A home node carries a live input's viewers over its own uplink, then over R2 (live segments
offered to the bucket past the uplink budget, :mod:`peerd.core.uplink`). When neither can take
more, the node can restream the input to a Cloudflare Stream live input and the coordinator
sends new viewers there (:mod:`peerd.live.handoff` does the restreaming; this module only
decides). Every check (``now`` passed in, seconds, monotonic) looks at one
:class:`Observation`::

    outgrown = viewers >= start_viewers
               and the uplink is not "open"   (overflow: new viewers are being turned away;
                                               "off": no budget set, so the viewer count is the
                                               operator's only measure of the node's reach)
               and not spill                  (R2 cannot take the input's live segments)
    settled  = viewers <= stop_viewers and the uplink is not in "overflow"

    not handed off: outgrown held without a break for start_after_s ─► "start"
    handed off:     settled held without a break for stop_after_s   ─► "stop"

``viewers`` is the input's whole audience: the node's own viewers plus, while handed off,
Stream's (its viewer count): otherwise the audience moved to Stream would look like an audience
that left, and the node would stop the restream under the viewers watching it. A condition that
breaks for one check starts its timer again, and ``stop_viewers`` lies below ``start_viewers``:
together they keep a count hovering at the threshold from starting and stopping the restream
every few seconds (each start is a new Stream broadcast for its viewers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from peerd.core.uplink import AdmissionState

Action = Literal["start", "stop"]
EgressState = Literal["off", "connecting", "sending", "retrying"]


@dataclass(frozen=True)
class HandoffPolicy:
    """The thresholds (``[live.handoff]``)."""

    start_viewers: int = 50
    stop_viewers: int = 10
    start_after_s: float = 10.0
    stop_after_s: float = 120.0


@dataclass(frozen=True)
class Observation:
    """What one check sees of an input and the node."""

    viewers: int  # the node's viewers of the input, plus Stream's while handed off
    admission: AdmissionState  # the uplink's (peerd.core.uplink.UplinkReport.state)
    spill: bool  # R2 overflow can take the input's live segments now


@dataclass(frozen=True)
class HandoffStatus:
    """One input's hand-off, as the coordinator's heartbeat reports it."""

    input: str
    handed_off: bool
    since: float | None  # unix time the hand-off started
    stream_uid: str | None  # the Cloudflare Stream live input
    playback_url: str | None  # its HLS manifest, where the coordinator sends viewers
    egress: EgressState
    failures: int  # egress connections that failed during this hand-off


@dataclass
class Handoff:
    """The start/stop decision of one input's hand-off (pure: ``now`` is passed in)."""

    policy: HandoffPolicy
    active: bool = False
    _since: float | None = None  # when the condition for the next change began to hold

    def outgrown(self, obs: Observation) -> bool:
        """Whether the node and R2 together cannot carry the input's audience."""
        p = self.policy
        return obs.viewers >= p.start_viewers and obs.admission != "open" and not obs.spill

    def settled(self, obs: Observation) -> bool:
        """Whether the node can carry the input's audience again."""
        return obs.viewers <= self.policy.stop_viewers and obs.admission != "overflow"

    def step(self, obs: Observation, now: float) -> Action | None:
        """The change to make at ``now``, if any (the caller makes it; :attr:`active` follows)."""
        holds = self.settled(obs) if self.active else self.outgrown(obs)
        if not holds:
            self._since = None
            return None
        if self._since is None:
            self._since = now
        wait = self.policy.stop_after_s if self.active else self.policy.start_after_s
        if now - self._since < wait:
            return None
        self._since = None
        self.active = not self.active
        return "start" if self.active else "stop"

    def end(self) -> Action | None:
        """The input's publication ended: ``"stop"`` if it was handed off."""
        self._since = None
        if not self.active:
            return None
        self.active = False
        return "stop"
