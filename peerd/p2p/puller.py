"""Prefetch a whole media item from one named LAN peer (the coordinator's ``prefetch`` by peer).

The coordinator may tell a node "get media M from peer P" (``POST /api/v1/commands/prefetch``
with ``source: "peer"``). :class:`PeerPuller` runs :func:`peerd.delivery.pull.pull_media` over
the signed node-to-node HTTP routes of :mod:`peerd.p2p.lan`: the manifest from
``GET /p2p/v1/media/<media id>``, each missing blob from ``GET /p2p/v1/blobs/<cid>`` of that peer
only, every byte verified against its id, the rows committed after the last blob.

A peer that sends bytes not matching their id (manifest or blob) is reported to the LAN
directory (which bans it) and the pull fails with :class:`~peerd.errors.IntegrityError`; nothing
partial is kept. Only peers seen on the LAN (mDNS) with an HTTP URL can be named: a libp2p-only
peer is refused with a clear message (its blobs still arrive through ``prefetch`` with
``source: "any"`` once the media is known, via the resolver's libp2p source).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from peerd.core.ids import Cid
from peerd.delivery.pull import PullReport, pull_media
from peerd.delivery.source import Offer
from peerd.discovery.directory import PeerDirectory
from peerd.errors import IntegrityError, NotFound, UpstreamError
from peerd.identity import Identity
from peerd.p2p.lan import MEDIA_ROUTE, ROUTE, signed_get, stream_body
from peerd.runtime import Runtime

log = logging.getLogger("peerd.p2p.puller")

MAX_MANIFEST = 16 * 1024 * 1024


@dataclass
class _NamedPeer:
    """One LAN peer as a :class:`~peerd.delivery.source.Source` (refusals are errors)."""

    peer_id: str
    base: str
    puller: PeerPuller
    name: str = "lan"
    timeout_s: float = 30.0

    async def get(self, path: str) -> aiohttp.ClientResponse:
        """A signed GET of ``path`` on the peer."""
        try:
            return await signed_get(self.puller.client(), self.puller.identity, self.base, path)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"LAN peer at {self.base} unreachable: {exc!r}") from exc

    async def manifest(self, media_id: str) -> bytes:
        """The peer's manifest bytes of ``media_id`` (checked by the pull)."""
        resp = await self.get(MEDIA_ROUTE.format(media_id=media_id))
        try:
            if resp.status == 404:
                raise NotFound(f"peer {self.peer_id} does not have media {media_id}")
            if resp.status != 200:
                raise UpstreamError(f"peer {self.peer_id} refused the manifest: HTTP {resp.status}")
            data = await resp.content.read(MAX_MANIFEST + 1)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"manifest transfer from {self.peer_id} broke: {exc!r}") from exc
        finally:
            resp.release()
        return data

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """The peer's blob ``cid``; anything but 200 is an error (the peer was named)."""
        resp = await self.get(ROUTE.format(cid=cid))
        if resp.status != 200:
            resp.release()
            raise UpstreamError(f"peer {self.peer_id} did not serve blob {cid}: HTTP {resp.status}")
        yield Offer(self.name, self.peer_id, stream_body(resp), size=resp.content_length)

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Nothing: :meth:`PeerPuller.pull_media_from` reports the whole pull to the directory."""


class PeerPuller:
    """Pulls media items from named LAN peers (the coordinator's prefetch by peer)."""

    def __init__(
        self,
        rt: Runtime,
        directory: PeerDirectory,
        identity: Identity,
        *,
        concurrency: int = 4,
        timeout_s: float = 30.0,
    ) -> None:
        self.rt = rt
        self.directory = directory
        self.identity = identity
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def client(self) -> aiohttp.ClientSession:
        """The HTTP client (opened on first use)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout, auto_decompress=False)
        return self._session

    async def pull_media_from(self, peer_id: str, media_id: str) -> PullReport:
        """Fetch ``media_id`` (manifest and every blob) from ``peer_id`` into the local store."""
        peer = self.directory.table.get(peer_id)
        if peer is None or not peer.url or not self.directory.known(peer_id):
            raise NotFound(
                f"peer {peer_id} is not a live LAN peer of this node (only peers seen by mDNS, "
                "not banned, can be named)"
            )
        source = _NamedPeer(peer_id, peer.url.rstrip("/"), self)
        try:
            report = await pull_media(
                self.rt.catalog,
                self.rt.store,
                media_id,
                lambda: source.manifest(media_id),
                source,
                concurrency=self.concurrency,
            )
        except IntegrityError:
            self.directory.report(peer_id, False, "integrity")
            raise
        self.directory.report(peer_id, True)
        log.info(
            "media pulled from peer",
            extra={"media": media_id, "peer": peer_id, "fetched": report.fetched},
        )
        return report
