"""Prefetch a whole media item from one named LAN peer (the coordinator's ``prefetch`` by peer).

The coordinator may tell a node "get media M from peer P" (``POST /api/v1/commands/prefetch``
with ``source: "peer"``). :class:`PeerPuller` does it over the signed node-to-node HTTP routes of
:mod:`peerd.p2p.lan`:

1. ``GET /p2p/v1/media/<media id>`` returns the peer's manifest bytes. A media id is the CID of its
   canonical manifest, so the bytes are checked against the id before anything else happens: a
   peer cannot hand over a different media item.
2. Every blob the manifest names and this node lacks is fetched from that peer
   (``GET /p2p/v1/blobs/<cid>``), streamed into the store, and kept only if it hashes to its id.
   Blobs already held are skipped, so a pull interrupted by a crash resumes where it stopped.
3. The media, rendition and segment rows are committed in one transaction after the last blob,
   so the catalog never names a segment the node does not hold.

A peer that sends bytes not matching their id is reported to the LAN directory (which bans it)
and the pull fails with :class:`~peerd.errors.IntegrityError`; nothing partial is kept. Only
peers seen on the LAN (mDNS) with an HTTP URL can be named: a libp2p-only peer is refused with
a clear message (its blobs still arrive through ``prefetch`` with ``source: "any"`` once the
media is known, via the resolver's libp2p source).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import Manifest, decode
from peerd.discovery.directory import PeerDirectory
from peerd.errors import IntegrityError, NotFound, PeerdError, UpstreamError
from peerd.identity import Identity
from peerd.p2p.lan import signed_get, stream_body
from peerd.runtime import Runtime

log = logging.getLogger("peerd.p2p.puller")

MEDIA_ROUTE = "/p2p/v1/media/{media_id}"
BLOB_ROUTE = "/p2p/v1/blobs/{cid}"
MAX_MANIFEST = 16 * 1024 * 1024


@dataclass(frozen=True)
class PeerPullReport:
    """What a pull from a named peer did."""

    media_id: str
    peer_id: str
    blobs: int
    fetched: int
    bytes: int
    recorded: bool


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

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout, auto_decompress=False)
        return self._session

    def _peer_url(self, peer_id: str) -> str:
        peer = self.directory.table.get(peer_id)
        if peer is None or not peer.url or not self.directory.known(peer_id):
            raise NotFound(
                f"peer {peer_id} is not a live LAN peer of this node (only peers seen by mDNS, "
                "not banned, can be named)"
            )
        return peer.url.rstrip("/")

    async def _get(self, base: str, path: str) -> aiohttp.ClientResponse:
        try:
            return await signed_get(self._client(), self.identity, base, path)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"LAN peer at {base} unreachable: {exc!r}") from exc

    async def _manifest(self, peer_id: str, base: str, media_id: str) -> tuple[bytes, Manifest]:
        resp = await self._get(base, MEDIA_ROUTE.format(media_id=media_id))
        try:
            if resp.status == 404:
                raise NotFound(f"peer {peer_id} does not have media {media_id}")
            if resp.status != 200:
                raise UpstreamError(f"peer {peer_id} refused the manifest: HTTP {resp.status}")
            data = await resp.content.read(MAX_MANIFEST + 1)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"manifest transfer from {peer_id} broke: {exc!r}") from exc
        finally:
            resp.release()
        if len(data) > MAX_MANIFEST or cid_of(data) != media_id:
            self.directory.report(peer_id, False, "integrity")
            raise IntegrityError(
                f"peer {peer_id} sent a manifest that does not hash to {media_id}",
                expected=media_id,
            )
        try:
            return data, decode(data)
        except (PeerdError, ValueError) as exc:
            raise IntegrityError(f"manifest of {media_id} from {peer_id} is malformed") from exc

    async def pull_media_from(self, peer_id: str, media_id: str) -> PeerPullReport:
        """Fetch ``media_id`` (manifest and every blob) from ``peer_id`` into the local store."""
        base = self._peer_url(peer_id)
        data, manifest = await self._manifest(peer_id, base, media_id)
        inits = {r.init for r in manifest.renditions if r.init}
        cids = [Cid(c) for c in manifest.blob_cids()]
        sem = asyncio.Semaphore(self.concurrency)
        fetched = 0
        nbytes = 0

        async def one(cid: Cid) -> None:
            nonlocal fetched, nbytes
            if await self.rt.store.has(cid):
                return
            async with sem:
                resp = await self._get(base, BLOB_ROUTE.format(cid=cid))
                if resp.status != 200:
                    resp.release()
                    raise UpstreamError(
                        f"peer {peer_id} did not serve blob {cid} of {media_id}: HTTP {resp.status}"
                    )
                try:
                    await self.rt.store.put_stream(
                        stream_body(resp),
                        expected=cid,
                        kind="init" if cid in inits else "segment",
                        max_size=resp.content_length,
                    )
                except IntegrityError:
                    self.directory.report(peer_id, False, "integrity")
                    raise
                finally:
                    resp.release()
                fetched += 1
                nbytes += resp.content_length or 0

        try:
            async with asyncio.TaskGroup() as tg:
                for c in cids:
                    tg.create_task(one(c))
        except BaseExceptionGroup as group:
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        self.directory.report(peer_id, True)
        from peerd.replication.media import record_media  # noqa: PLC0415 (boto3-free module)

        async with self.rt.catalog.transaction() as tx:
            recorded = await record_media(
                tx, media_id, data, manifest, time.time(), r2_state="none"
            )
        log.info(
            "media pulled from peer",
            extra={"media": media_id, "peer": peer_id, "fetched": fetched, "bytes": nbytes},
        )
        return PeerPullReport(media_id, peer_id, len(cids), fetched, nbytes, recorded)
