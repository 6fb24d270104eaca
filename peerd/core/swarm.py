"""Viewer swarms: the bookkeeping of a WebTorrent tracker; pure, no I/O, no clock.

Browsers watching the same media find each other through the node, as WebTorrent clients do
through a tracker, then exchange segments over WebRTC data channels the node never sees. This
module is the tracker's state machine; :mod:`peerd.http.swarm` is the WebSocket edge that feeds
it text frames and carries out what it returns.

Theory of operation
-------------------
The edge opens a *connection* (:meth:`Tracker.open`) once the viewer's token for one media item
passed at the WebSocket upgrade, with the token's expiry. Every text frame goes to
:meth:`Tracker.receive` with ``now``; it returns :class:`Send` (a JSON text to one connection),
:class:`Failure` (a request refused, to count and log) and at most one :class:`Close` (the frame
broke a rule: the connection is closed with a reason).
The edge calls :meth:`Tracker.close` when a socket ends and :meth:`Tracker.expire` now and then.

The wire is the WebTorrent tracker protocol (bittorrent-tracker's WebSocket client, which
P2P Media Loader 2.x uses unchanged): JSON objects whose ``info_hash``, ``peer_id``,
``offer_id`` and ``to_peer_id`` are 20-character "binary strings" (code points 0-255)::

    → {"action": "announce", "info_hash", "peer_id", "event"?, "left"?, "numwant"?,
       "offers"?: [{"offer": {"type": "offer", "sdp"}, "offer_id"}]}
    ← {"action": "announce", "info_hash", "interval", "complete", "incomplete"}
    ←   to up to len(offers) other peers of the swarm, one offer each:
       {"action": "announce", "info_hash", "peer_id": <offerer>, "offer_id", "offer"}
    → {"action": "announce", "info_hash", "peer_id", "to_peer_id", "offer_id",
       "answer": {"type": "answer", "sdp"}}
    ←   to the offerer only: {"action": "announce", "info_hash", "peer_id", "offer_id", "answer"}
    → {"action": "scrape", "info_hash"?: <one or a list>}
    ← {"action": "scrape", "files": {<info_hash>: {"complete", "incomplete", "downloaded"}},
       "flags": {"min_request_interval"}}

A *swarm* is keyed by (media id, info_hash): the media comes from the connection's token, so a
viewer can only ever meet viewers of the media it may watch, whatever info_hash it sends.
P2P Media Loader derives one info_hash per stream (rendition or audio track) of a player:
``base64(sha1("v2-<swarmId>-<type>-<index>")[:15])`` (:func:`pml_info_hash`), so renditions
are separate swarms by themselves. A connection holds one peer id per swarm: an announce with
another peer id on the same info_hash replaces the first (bittorrent-tracker's client shares
one socket among the clients of one page that use the same URL; other viewers have sockets of
their own).

Only tracker messages are relayed, and each is rebuilt from checked fields (nothing a client
adds travels on): an offer goes to peers the tracker picks in the sender's swarm, an answer
only to the peer whose offer this connection was handed (matched by offer id), once.
A frame that is not a tracker message, one over the size limit, one past the connection's rate
(a token bucket of ``messages_per_s`` with a burst of :func:`burst`) or one after the token
expired closes the connection (:class:`Reject`). A full swarm, too many swarms on one
connection or a peer id another connection holds get a ``failure reason`` and the
connection stays. A connection silent for ``idle_s`` is closed; a swarm membership not
announced again within ``idle_s`` is dropped (a client re-announces every ``interval_s``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from peerd.errors import BadRequest as Malformed

ID_CHARS = 20  # info_hash, peer_id, offer_id: 20 "binary string" characters
MAX_OFFERS = 10  # bittorrent-tracker's client sends at most 5 per announce
MAX_SCRAPE = 32
MAX_PENDING_OFFERS = 64  # offers handed to one connection and not answered yet
EVENTS = frozenset({"started", "stopped", "completed", "update", "paused", ""})


class Reject(Enum):
    """Why a message was refused (metrics label; the close reason or failure text says more)."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    RATE = "rate"
    EXPIRED = "expired"
    IDLE = "idle"
    SWARM_FULL = "swarm_full"
    TOO_MANY_SWARMS = "too_many_swarms"
    PEER_ID_TAKEN = "peer_id_taken"
    UNKNOWN_ANSWER = "unknown_answer"


# WebSocket close codes (RFC 6455 7.4.1)
POLICY = 1008
TOO_BIG = 1009
GOING_AWAY = 1001


@dataclass(frozen=True)
class Limits:
    """The ``[swarm]`` limits."""

    max_peers_per_swarm: int = 200
    max_swarms_per_connection: int = 8
    messages_per_s: float = 5.0
    max_message_bytes: int = 64 * 1024
    idle_s: float = 150.0
    interval_s: int = 60


def burst(limits: Limits) -> float:
    """Messages a connection may send at once (a player announces each stream on start)."""
    return max(10.0, 4 * limits.messages_per_s)


@dataclass(frozen=True)
class Send:
    """Send ``text`` to connection ``conn``; ``relayed`` names an offer or answer relayed."""

    conn: int
    text: str
    relayed: str | None = None


@dataclass(frozen=True)
class Close:
    """Close connection ``conn`` with a WebSocket close ``code`` and a human ``reason``."""

    conn: int
    code: int
    reason: str
    why: Reject


@dataclass(frozen=True)
class Failure:
    """A request refused without closing (answered with ``failure reason``)."""

    why: Reject


Action = Send | Close | Failure


@dataclass
class _Member:
    conn: int
    complete: bool
    seen: float


@dataclass
class _Swarm:
    peers: dict[str, _Member] = field(default_factory=dict)  # peer_id -> member
    complete: int = 0


@dataclass
class _Conn:
    media: str
    expires: float
    seen: float
    tokens: float
    at: float
    # info_hash -> this connection's peer_id in that swarm
    joined: dict[str, str] = field(default_factory=dict)
    # (info_hash, offer_id) -> the offerer's peer_id, for answers
    offers: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _id(msg: dict[str, Any], key: str) -> str:
    v = msg.get(key)
    if not isinstance(v, str) or len(v) != ID_CHARS or max(map(ord, v)) > 0xFF:
        raise Malformed(f"invalid {key}")
    return v


def _sdp(v: Any, kind: str) -> dict[str, str]:
    if not isinstance(v, dict) or v.get("type") != kind or not isinstance(v.get("sdp"), str):
        raise Malformed(f"invalid {kind}")
    return {"type": kind, "sdp": v["sdp"]}


class Tracker:
    """Every swarm of the node and every tracker connection (see the module docstring)."""

    def __init__(self, limits: Limits, rng: random.Random | None = None) -> None:
        self.limits = limits
        self.rng = rng or random.Random()  # noqa: S311 - peer choice, not a secret
        self._burst = burst(limits)
        self.swarms: dict[tuple[str, str], _Swarm] = {}
        self.conns: dict[int, _Conn] = {}
        # Swarm memberships (a viewer in two renditions' swarms counts twice); kept as a count
        # so a metrics scrape in another thread never walks the swarms.
        self.peers = 0

    def open(self, conn: int, media: str, expires: float, now: float) -> None:
        """A connection whose viewer may watch ``media`` until ``expires`` (Unix time)."""
        self.conns[conn] = _Conn(media, expires, now, self._burst, now)

    def close(self, conn: int) -> None:
        """The connection ended: it leaves every swarm."""
        c = self.conns.pop(conn, None)
        if c is not None:
            for info_hash in list(c.joined):
                self._leave(c, info_hash)

    def expire(self, now: float) -> list[Close]:
        """Close connections silent for ``idle_s``; drop memberships not announced in it."""
        closes = []
        idle = self.limits.idle_s
        for cid, c in list(self.conns.items()):
            if now - c.seen >= idle:
                closes.append(Close(cid, GOING_AWAY, f"idle for {idle:g} s", Reject.IDLE))
                self.close(cid)
                continue
            for info_hash, peer_id in list(c.joined.items()):
                m = self.swarms[(c.media, info_hash)].peers[peer_id]
                if now - m.seen >= idle:
                    self._leave(c, info_hash)
        return closes

    def receive(self, conn: int, data: str | bytes, now: float) -> list[Action]:
        """What to do about one frame from ``conn``; nothing once the connection was closed
        (a frame read after an expiry or a close the edge has not carried out yet)."""
        c = self.conns.get(conn)
        if c is None:
            return []
        if not isinstance(data, str):
            return [self._reject(conn, POLICY, "binary frames are not tracker messages")]
        # A string's length in characters bounds its UTF-8 size from below: the exact check
        # (the edge's frame limit) is in bytes.
        if len(data) > self.limits.max_message_bytes:
            return [self._reject(conn, TOO_BIG, "message too big", Reject.OVERSIZED)]
        # max(): a wall clock stepped back must not drain the bucket
        c.tokens = min(self._burst, c.tokens + max(0.0, now - c.at) * self.limits.messages_per_s)
        c.at = now
        if c.tokens < 1:
            rate = f"{self.limits.messages_per_s:g}"
            return [self._reject(conn, POLICY, f"over {rate} messages/s", Reject.RATE)]
        c.tokens -= 1
        c.seen = now
        if now >= c.expires:
            return [self._reject(conn, POLICY, "token expired", Reject.EXPIRED)]
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise Malformed("not a JSON object")
            action = msg.get("action")
            if action == "announce":
                return self._announce(conn, c, msg, now)
            if action == "scrape":
                return self._scrape(conn, c, msg)
            raise Malformed("unknown action")
        except (Malformed, ValueError, RecursionError) as exc:
            reason = exc.message if isinstance(exc, Malformed) else "not JSON"
            return [self._reject(conn, POLICY, reason)]

    def _reject(self, conn: int, code: int, reason: str, why: Reject = Reject.MALFORMED) -> Close:
        self.close(conn)
        return Close(conn, code, reason, why)

    def _announce(self, conn: int, c: _Conn, msg: dict[str, Any], now: float) -> list[Action]:
        info_hash = _id(msg, "info_hash")
        peer_id = _id(msg, "peer_id")
        event = msg.get("event") or ""
        if not isinstance(event, str) or event not in EVENTS:
            raise Malformed("invalid event")
        answer = msg.get("answer")
        offers = msg.get("offers")
        if answer is not None:
            return self._answer(conn, c, msg, info_hash, peer_id)
        if offers is not None and (not isinstance(offers, list) or len(offers) > MAX_OFFERS):
            raise Malformed("invalid offers")
        relay = []
        for o in offers or ():
            if not isinstance(o, dict):
                raise Malformed("invalid offers")
            relay.append((_sdp(o.get("offer"), "offer"), _id(o, "offer_id")))
        failure = self._join(conn, c, info_hash, peer_id, event, msg.get("left"), now)
        out: list[Action] = []
        if failure is not None:
            reply = {
                "action": "announce",
                "info_hash": info_hash,
                "failure reason": _FAILURES[failure],
            }
            return [Failure(failure), Send(conn, _dumps(reply))]
        swarm = self.swarms.get((c.media, info_hash))
        complete = swarm.complete if swarm else 0
        incomplete = len(swarm.peers) - complete if swarm else 0
        stats: dict[str, Any] = {
            "action": "announce",
            "info_hash": info_hash,
            "interval": self.limits.interval_s,
            "complete": complete,
            "incomplete": incomplete,
        }
        out.append(Send(conn, _dumps(stats)))
        if swarm is None or not relay:
            return out
        others = [p for p in swarm.peers if p != peer_id]
        for (offer, offer_id), to in zip(
            relay, self.rng.sample(others, min(len(others), len(relay))), strict=False
        ):
            member = swarm.peers[to]
            target = self.conns[member.conn]
            pending = target.offers
            pending[(info_hash, offer_id)] = peer_id
            while len(pending) > MAX_PENDING_OFFERS:
                pending.popitem(last=False)
            text = _dumps(
                {
                    "action": "announce",
                    "info_hash": info_hash,
                    "peer_id": peer_id,
                    "offer_id": offer_id,
                    "offer": offer,
                }
            )
            out.append(Send(member.conn, text, relayed="offer"))
        return out

    def _join(
        self,
        conn: int,
        c: _Conn,
        info_hash: str,
        peer_id: str,
        event: str,
        left: Any,
        now: float,
    ) -> Reject | None:
        if event == "stopped":
            if c.joined.get(info_hash) == peer_id:
                self._leave(c, info_hash)
            return None
        key = (c.media, info_hash)
        swarm = self.swarms.get(key)
        held = c.joined.get(info_hash)
        if held is not None and held != peer_id:
            self._leave(c, info_hash)  # a new peer id on this stream replaces the old one
            swarm = self.swarms.get(key)
            held = None
        if held is None:
            if len(c.joined) >= self.limits.max_swarms_per_connection:
                return Reject.TOO_MANY_SWARMS
            if swarm is not None and peer_id in swarm.peers:
                return Reject.PEER_ID_TAKEN
            if swarm is not None and len(swarm.peers) >= self.limits.max_peers_per_swarm:
                return Reject.SWARM_FULL
            if swarm is None:
                swarm = self.swarms[key] = _Swarm()
            swarm.peers[peer_id] = _Member(conn, False, now)
            self.peers += 1
            c.joined[info_hash] = peer_id
        assert swarm is not None
        member = swarm.peers[peer_id]
        member.seen = now
        done = event == "completed" or (isinstance(left, int | float) and left == 0)
        if done and not member.complete:
            member.complete = True
            swarm.complete += 1
        return None

    def _leave(self, c: _Conn, info_hash: str) -> None:
        peer_id = c.joined.pop(info_hash)
        key = (c.media, info_hash)
        swarm = self.swarms[key]
        member = swarm.peers.pop(peer_id)
        self.peers -= 1
        if member.complete:
            swarm.complete -= 1
        if not swarm.peers:
            del self.swarms[key]

    def _answer(
        self, conn: int, c: _Conn, msg: dict[str, Any], info_hash: str, peer_id: str
    ) -> list[Action]:
        answer = _sdp(msg.get("answer"), "answer")
        to = _id(msg, "to_peer_id")
        offer_id = _id(msg, "offer_id")
        # Only an offer this connection was handed, from that peer, answered once, as the
        # peer id it holds in that swarm.
        if c.joined.get(info_hash) != peer_id or c.offers.get((info_hash, offer_id)) != to:
            return [Failure(Reject.UNKNOWN_ANSWER)]
        del c.offers[(info_hash, offer_id)]
        swarm = self.swarms.get((c.media, info_hash))
        member = swarm.peers.get(to) if swarm else None
        if member is None:
            return [Failure(Reject.UNKNOWN_ANSWER)]
        text = _dumps(
            {
                "action": "announce",
                "info_hash": info_hash,
                "peer_id": peer_id,
                "offer_id": offer_id,
                "answer": answer,
            }
        )
        return [Send(member.conn, text, relayed="answer")]

    def _scrape(self, conn: int, c: _Conn, msg: dict[str, Any]) -> list[Action]:
        asked = msg.get("info_hash")
        if asked is None:
            hashes = list(c.joined)
        elif isinstance(asked, list) and len(asked) <= MAX_SCRAPE:
            hashes = [_id({"info_hash": h}, "info_hash") for h in asked]
        else:
            hashes = [_id(msg, "info_hash")]
        files = {}
        for h in hashes:
            swarm = self.swarms.get((c.media, h))
            complete = swarm.complete if swarm else 0
            incomplete = len(swarm.peers) - complete if swarm else 0
            files[h] = {"complete": complete, "incomplete": incomplete, "downloaded": complete}
        reply = {
            "action": "scrape",
            "files": files,
            "flags": {"min_request_interval": self.limits.interval_s},
        }
        return [Send(conn, _dumps(reply))]


_FAILURES = {
    Reject.SWARM_FULL: "swarm full",
    Reject.TOO_MANY_SWARMS: "too many swarms on one connection",
    Reject.PEER_ID_TAKEN: "peer_id in use",
}


def pml_info_hash(swarm_id: str, stream_type: str, stream_index: str) -> str:
    """The info_hash P2P Media Loader 2.x announces for one stream of a player.

    ``swarm_id`` is its ``swarmId`` setting (default: the master playlist's URL),
    ``stream_type`` ``main`` (video renditions) or ``secondary`` (audio tracks),
    ``stream_index`` its per-stream id (a hash of the stream's attributes as hls.js parsed
    them). The result is the 20 ASCII characters its tracker client sends.
    """
    digest = hashlib.sha1(  # noqa: S324 - the protocol's name for a stream, not a secret
        f"v2-{swarm_id}-{stream_type}-{stream_index}".encode()
    ).digest()
    return base64.b64encode(digest[:15]).decode()
