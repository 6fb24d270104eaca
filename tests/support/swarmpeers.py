"""Simulated viewer-swarm peers: raw WebTorrent tracker clients on aiohttp WebSockets, for the
tracker's limit tests and its load bench (``scripts/bench/swarm_bench.py``).

A peer connects to ``/swarm/<media>?token=...``, announces one info hash with fake offers
(SDP strings, no WebRTC), answers every offer relayed to it, and counts what it receives.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


def binary_id() -> str:
    """20 random bytes as the protocol's "binary string" (code points 0-255)."""
    return os.urandom(20).decode("latin-1")


def swarm_url(base_url: str, media: str, token: str) -> str:
    """The tracker URL of ``media`` on the node at ``base_url`` (``http://host:port``)."""
    return base_url.replace("http://", "ws://", 1) + f"/swarm/{media}?token={token}"


def announce(info_hash: str, peer_id: str, **extra: Any) -> str:
    """An announce message."""
    return json.dumps({"action": "announce", "info_hash": info_hash, "peer_id": peer_id, **extra})


def fake_offers(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` offers with fake SDP and fresh offer ids."""
    return [
        {"offer": {"type": "offer", "sdp": f"v=0 fake offer {tag} {i}"}, "offer_id": binary_id()}
        for i in range(n)
    ]


@dataclass
class Totals:
    """What every simulated peer saw, added up."""

    connected: int = 0
    replies: int = 0
    offers: int = 0
    answers: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)


class Peer:
    """One simulated viewer on its own WebSocket."""

    def __init__(self, session: aiohttp.ClientSession, url: str, info_hash: str) -> None:
        self.session = session
        self.url = url
        self.info_hash = info_hash
        self.peer_id = binary_id()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.replied = asyncio.Event()
        self.replies = 0
        self.offers = 0
        self.answers = 0
        self.failures = 0
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Open the socket and start reading."""
        self.ws = await self.session.ws_connect(self.url, autoping=True)
        self._reader = asyncio.create_task(self._read())

    async def announce(self, offers: int, event: str = "started") -> None:
        """Announce with ``offers`` fake offers."""
        assert self.ws is not None
        await self.ws.send_str(
            announce(
                self.info_hash,
                self.peer_id,
                event=event,
                numwant=offers,
                offers=fake_offers(offers, event),
            )
        )

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            if "failure reason" in m:
                self.failures += 1
                self.replied.set()
            elif "offer" in m:
                self.offers += 1
                await self.ws.send_str(
                    announce(
                        self.info_hash,
                        self.peer_id,
                        to_peer_id=m["peer_id"],
                        offer_id=m["offer_id"],
                        answer={"type": "answer", "sdp": "v=0 a"},
                    )
                )
            elif "answer" in m:
                self.answers += 1
            elif "interval" in m:
                self.replies += 1
                self.replied.set()

    async def close(self) -> None:
        """Close the socket and stop reading."""
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await self._reader


async def simulate(
    base_url: str,
    swarms: list[tuple[str, str, str]],
    n: int,
    *,
    offers: int = 5,
    connect_concurrency: int = 50,
    settle_timeout_s: float = 30.0,
    timeout_s: float = 120.0,
    connected: Callable[[], Awaitable[None]] | None = None,
) -> Totals:
    """``n`` peers spread over ``swarms`` (media id, token, info hash), each announcing once
    with ``offers`` offers; waits for every announce reply, then until every offer relayed
    was answered back (at most ``settle_timeout_s``), awaits ``connected()`` (if given) with
    every socket still open, and returns the totals."""
    totals = Totals()
    sem = asyncio.Semaphore(connect_concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        peers = [
            Peer(session, swarm_url(base_url, media, token), info_hash)
            for media, token, info_hash in (swarms[i % len(swarms)] for i in range(n))
        ]

        async def start(p: Peer) -> None:
            async with sem:
                await p.connect()
                await p.announce(offers)
                await p.replied.wait()

        async with asyncio.timeout(timeout_s):
            results = await asyncio.gather(*(start(p) for p in peers), return_exceptions=True)
        totals.errors = [repr(r) for r in results if isinstance(r, BaseException)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_timeout_s
        while sum(p.answers for p in peers) < sum(p.offers for p in peers):
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        for p in peers:
            totals.connected += p.ws is not None and not p.ws.closed
            totals.replies += p.replies
            totals.offers += p.offers
            totals.answers += p.answers
            totals.failures += p.failures
        if connected is not None:
            await connected()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
    return totals
